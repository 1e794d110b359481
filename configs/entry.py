"""The Hydra entry-point convention every linvid command follows.

    @entry_point("sample")
    def main(cfg: DictConfig) -> None: ...

turns a function of a config into a command over ``configs/<name>.yaml``: Hydra composes the
config from the YAML tree and the command-line overrides (``key=value``), then
:func:`configs.schema.validate_config` checks every key and value before the function does
any work. Commands with subcommands name them with a leading word, which is shorthand for
the config key that selects them::

    python -m eval.throughput suite budget_s=480      # = benchmark=suite budget_s=480
    python -m eval.fvd fetch-weights                  # = command=fetch-weights

:func:`compose_config` builds the same checked config in-process (tests, benchmarks).
Sweep run directories are named by :func:`path_safe` so that any directory linvid writes can
be passed back to any command as it is.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from configs.schema import validate_config

CONFIG_DIR = Path(__file__).resolve().parent


def path_safe(text: str) -> str:
    """A directory name from Hydra's ``key=value,key=value`` override list, free of Hydra grammar.

    ``=`` becomes ``-``, ``,`` becomes ``+``, and any other character outside
    ``[A-Za-z0-9._-]`` becomes ``_``: ``attention=hla,train.max_steps=600`` ->
    ``attention-hla+train.max_steps-600``.
    """
    text = str(text).replace("=", "-").replace(",", "+")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "run"


if not OmegaConf.has_resolver("path_safe"):
    OmegaConf.register_new_resolver("path_safe", path_safe)


def _quoted(word: str) -> str:
    return "'" + word.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_arguments(argv: Sequence[str], positional_key: str | None = None) -> list[str]:
    """Command-line arguments for Hydra: leading bare words become ``<positional_key>=<word>``.

    One word gives a string value, several a list (e.g. ``python -m eval.report a b`` ->
    ``runs=['a','b']``); the words are quoted, so paths may hold any character.
    """
    argv = list(argv)
    count = 0
    while positional_key and count < len(argv) and "=" not in argv[count] and not argv[count].startswith("-"):
        count += 1
    if count == 0:
        return argv
    words = [_quoted(word) for word in argv[:count]]
    value = words[0] if count == 1 else "[" + ",".join(words) + "]"
    return [f"{positional_key}={value}", *argv[count:]]


def entry_point(config_name: str, *, positional_key: str | None = None) -> Callable[[Callable], Callable[[], Any]]:
    """Decorate ``fn(cfg)`` into a Hydra command over ``configs/<config_name>.yaml`` (see the module docstring)."""

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
        def hydra_main(cfg: DictConfig) -> Any:
            validate_config(cfg, config_name)
            return fn(cfg)

        @functools.wraps(fn)
        def main() -> Any:
            sys.argv = [sys.argv[0], *hydra_arguments(sys.argv[1:], positional_key)]
            return hydra_main()

        main.run = fn  # the undecorated function, for callers that already hold a config
        return main

    return decorate


def compose_config(config_name: str, overrides: Sequence[str] = (), *, positional_key: str | None = None) -> DictConfig:
    """The checked config a command would run with, composed in-process from ``overrides``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=hydra_arguments(overrides, positional_key))
    validate_config(cfg, config_name)
    return cfg
