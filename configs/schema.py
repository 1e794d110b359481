"""Types and allowed values of every entry point's config, checked before any work starts.

The YAML files in this folder are the only home of default values; this module only says
what each key must be. :func:`validate_config` checks a composed config against the schema
of its entry point (``CONFIG_SCHEMAS``): every key known, every required key present and
set, every value valid. Groups whose settings belong to a builder (``attention``, ``vae``,
``data``) are checked by that builder, which also runs before any work. A failure raises
:class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """A config key or value is not valid."""


Rule = Callable[[object], bool]


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def non_negative_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def non_negative(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def unit_interval(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def boolean(v) -> bool:
    return isinstance(v, bool)


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def one_of(*choices) -> Rule:
    rule = lambda v: v in choices  # noqa: E731
    rule.choices = choices
    return rule


def int_list(length: int) -> Rule:
    rule = lambda v: isinstance(v, (list, tuple)) and len(v) == length and all(positive_int(x) for x in v)  # noqa: E731
    rule.description = f"a list of {length} positive integers"
    return rule


def at_least(minimum: int) -> Rule:
    rule = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum  # noqa: E731
    rule.description = f"an integer ≥ {minimum}"
    return rule


def text(v) -> bool:
    return isinstance(v, str) and bool(v)


def any_text(v) -> bool:
    return isinstance(v, str)


def list_of(rule: Rule, min_length: int = 1) -> Rule:
    wrapped = lambda v: isinstance(v, (list, tuple)) and len(v) >= min_length and all(rule(x) for x in v)  # noqa: E731
    wrapped.description = f"a list of at least {min_length} × {describe(rule)}"
    return wrapped


def one_or_list_of(rule: Rule) -> Rule:
    wrapped = lambda v: rule(v) or list_of(rule)(v)  # noqa: E731
    wrapped.description = f"{describe(rule)} or a list of them"
    return wrapped


def optional(rule: Rule) -> Rule:
    wrapped = lambda v: v is None or rule(v)  # noqa: E731
    wrapped.description = f"null or {describe(rule)}"
    return wrapped


DESCRIPTIONS = {
    positive_int: "a positive integer",
    non_negative_int: "an integer ≥ 0",
    non_negative: "a number ≥ 0",
    positive: "a number > 0",
    unit_interval: "a number in [0, 1)",
    boolean: "true or false",
    number: "a number",
    text: "a non-empty string",
    any_text: "a string",
}


def describe(rule: Rule) -> str:
    if hasattr(rule, "choices"):
        return f"one of {list(rule.choices)}"
    return getattr(rule, "description", DESCRIPTIONS.get(rule, rule.__name__))


TRAIN_SCHEMA: dict[str, dict[str, Rule]] = {
    "": {"seed": non_negative_int},
    "model": {
        "name": text,
        "family": one_of("dit", "wan"),
        "hidden_size": positive_int,
        "depth": positive_int,
        "num_heads": positive_int,
        "mlp_ratio": positive,
        "patch_size": int_list(3),
        "qk_norm": one_of("per_head", "across_heads"),
        "prediction": one_of("velocity", "data"),
        "class_dropout_prob": unit_interval,
        "gradient_checkpointing": boolean,
    },
    "train": {
        "stage": one_of("finetune", "transfer"),
        "trainable": one_of("all", "attention"),
        "init_from": optional(text),
        "max_steps": positive_int,
        "batch_size": positive_int,
        "grad_accum_steps": positive_int,
        "lr": positive,
        "weight_decay": non_negative,
        "betas": lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(unit_interval(b) for b in v),
        "warmup_steps": non_negative_int,
        "lr_schedule": one_of("constant", "cosine"),
        "grad_clip": non_negative,
        "ema": boolean,
        "ema_decay": unit_interval,
        "mixed_precision": one_of("no", "bf16", "fp16"),
        "compile": boolean,
        "compile_backend": one_of("inductor", "aot_eager", "eager"),
        "time_mean": number,
        "time_std": positive,
        "time_shift": positive,
        "checkpoint_every": positive_int,
        "log_every": positive_int,
        "sample_every": non_negative_int,
        "num_val_samples": non_negative_int,
        "val_steps": positive_int,
        "val_cfg_scale": non_negative,
        "max_nonfinite_steps": positive_int,
        "fvd_every": non_negative_int,
        "fvd_num_samples": at_least(2),
        "score_every": non_negative_int,
        "score_num_samples": positive_int,
    },
    "logger": {
        "name": one_of("none", "tensorboard", "wandb"),
        "project": text,
        "entity": optional(text),
        "mode": one_of("auto", "online", "offline"),
    },
}
TRAIN_SCHEMA["train"]["betas"].description = "two numbers in [0, 1)"
# A pretrained model (model.family=wan) brings its own architecture: only where it is and how to run it.
WAN_MODEL_SCHEMA: dict[str, Rule] = {
    "name": text,
    "family": one_of("wan"),
    "path": text,
    "reference_grid": optional(int_list(3)),
    "gradient_checkpointing": boolean,
}

SAMPLING_SCHEMA: dict[str, Rule] = {  # configs/sampling/default.yaml, shared by sample.py and eval.fvd
    "steps": positive_int,
    "cfg_scale": non_negative,
    "seed": non_negative_int,
    "batch_size": positive_int,
}

FVD_SCHEMA: dict[str, Rule] = {
    "command": one_of("compute", "fetch-weights"),
    "checkpoint": optional(text),
    "real": optional(text),
    "fake": optional(text),
    "num_frames": optional(at_least(9)),
    "stride": positive_int,
    "max_clips": positive_int,
    "num_samples": at_least(2),
    "model_weights": one_of("ema", "model"),
    "weights": optional(text),
    "device": optional(text),
    "split": text,
    "stats_cache": optional(text),
    "cache": boolean,
    "allow_unverified_weights": boolean,
    "out": optional(text),
    "cache_dir": optional(text),
    "sdist": optional(text),
    "force": boolean,
    **SAMPLING_SCHEMA,
}

_DEVICE = optional(one_of("cpu", "cuda"))
_DTYPE = one_of("float32", "bfloat16", "float16")
_VARIANTS = list_of(text)  # checked against the registry / configs/attention by the benchmark
BENCHMARK_SCHEMAS: dict[str, dict[str, Rule]] = {
    "attention": {
        "tokens": list_of(positive_int), "batch": positive_int, "heads": positive_int, "head_dim": positive_int,
        "dtype": _DTYPE, "device": _DEVICE, "variants": _VARIANTS, "budget_s": non_negative,
        "repeats": positive_int, "warmup": non_negative_int, "hla_order": optional(positive_int),
        "hla_rank": optional(non_negative_int), "hla_form": one_of("auto", "symmetric", "state", "value_modulation", "both", "all"),
        "fit_window": int_list(2), "isolation": one_of("auto", "subprocess", "inprocess"),
        "threads": optional(positive_int), "seed": non_negative_int, "out": optional(text),
        "from_json": optional(text), "compile": optional(one_of("inductor", "aot_eager", "eager")),
    },
    "train": {
        "variants": _VARIANTS, "frames": positive_int, "sizes": list_of(positive_int),
        "channels": positive_int, "batch": positive_int, "steps": positive_int, "warmup": non_negative_int,
        "dtype": _DTYPE, "device": _DEVICE, "budget_s": non_negative, "peak_tflops": optional(positive),
        "threads": optional(positive_int), "out": optional(text),
    },
    "sample": {
        "variants": _VARIANTS, "frames": positive_int, "size": positive_int,
        "channels": positive_int, "steps": positive_int, "repeats": positive_int, "dtype": _DTYPE,
        "device": _DEVICE, "out": optional(text),
    },
    "suite": {
        "budget_s": positive, "quick": boolean, "device": _DEVICE, "peak_tflops": optional(positive),
        "out": optional(text),
    },
}
for _schema in BENCHMARK_SCHEMAS.values():
    _schema["benchmark"] = one_of(*BENCHMARK_SCHEMAS)

# Root configs: {node path: {key: rule}} ("" = the root), and the groups their builders check.
CONFIG_SCHEMAS: dict[str, dict[str, dict[str, Rule]]] = {
    "train": TRAIN_SCHEMA,
    "sample": {"": {
        "checkpoint": text, "num_samples": positive_int, "labels": optional(list_of(non_negative_int)),
        "prompts": optional(list_of(text)), "prompts_file": optional(text), "videos_per_prompt": positive_int,
        "negative_prompt": any_text, "text_encoder": optional(text), "shift": optional(positive),
        "out_dir": optional(text), "fps": optional(positive), "weights": one_of("ema", "model"), **SAMPLING_SCHEMA,
    }},
    "extract_latents": {
        "": {"out": text, "batch_size": positive_int, "shard_size": positive_int, "seed": non_negative_int,
             "cpu_threads": optional(positive_int)},
        "text_encoder": {"path": optional(text), "max_length": positive_int},
    },
    "fvd": {"": FVD_SCHEMA},
    "demo_score": {"": {
        "checkpoint": text, "num_samples": positive_int, "model_weights": one_of("ema", "model"),
        "device": optional(text), "out": optional(text), "frames_png": optional(text), **SAMPLING_SCHEMA,
    }},
    "report": {"": {"runs": one_or_list_of(text), "out": optional(text), "val_clips": non_negative_int}},
    "diagnostics": {"": {
        "checkpoint": text, "weights": one_of("ema", "model"), "num_clips": positive_int,
        "times": list_of(unit_interval), "seed": non_negative_int, "rank_tolerance": positive,
        "max_tokens": positive_int, "out": optional(text),
    }},
}
BUILDER_GROUPS: dict[str, tuple[str, ...]] = {
    "train": ("attention", "data", "vae"),
    "extract_latents": ("data", "vae"),
}
# Keys that may be absent (e.g. wandb's settings when another logger is selected).
OPTIONAL_KEYS: dict[str, set[str]] = {"logger": {"project", "entity", "mode"}}


# Keys of a data config that say how its clips are loaded, not which clips: left out wherever
# data settings identify data (resuming a run, extracted latents, FVD's cached statistics).
DATA_LOADING_KEYS = ("num_workers", "cache_mb")


def data_identity(data: Mapping) -> dict:
    """A data config (node or dict) as plain values, without :data:`DATA_LOADING_KEYS`."""
    settings = dict(_plain(data))
    for key in DATA_LOADING_KEYS:
        settings.pop(key, None)
    return settings


def config_path(node: Mapping, key: str) -> Path | None:
    """``node[key]`` as a path with ``~`` expanded; None when the key is absent, null, empty or ``???``."""
    try:
        value = node.get(key)
    except MissingMandatoryValue:
        return None
    if value is None or str(value) in ("", "???"):
        return None
    return Path(os.path.expanduser(str(value)))


def _plain(node):
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _schema_of(cfg: Mapping, config_name: str) -> dict[str, dict[str, Rule]]:
    if config_name == "throughput":
        benchmark = cfg.get("benchmark")
        if benchmark not in BENCHMARK_SCHEMAS:
            raise ConfigError(f"benchmark={benchmark!r} is not valid; it must be one of {list(BENCHMARK_SCHEMAS)}")
        schema = {"": BENCHMARK_SCHEMAS[benchmark]}
        if "model" in cfg:  # the DiT benchmarks select a model config
            schema["model"] = TRAIN_SCHEMA["model"]
        return schema
    if config_name not in CONFIG_SCHEMAS:
        raise ConfigError(f"no schema for the config {config_name!r}; known: {sorted(CONFIG_SCHEMAS)}")
    if config_name == "train" and cfg.get("model", {}).get("family") == "wan":
        return {**CONFIG_SCHEMAS["train"], "model": WAN_MODEL_SCHEMA}
    return CONFIG_SCHEMAS[config_name]


def validate_config(cfg: Mapping, config_name: str) -> None:
    """Check a composed ``configs/<config_name>.yaml`` config: keys known, required keys set, values valid."""
    schema = _schema_of(cfg, config_name)
    groups = [g for g in schema if g] + list(BUILDER_GROUPS.get(config_name, ()))
    missing = [g for g in groups if g not in cfg]
    if missing:
        raise ConfigError(f"config groups {missing} are missing; the root config must select {groups}")
    for group, rules in schema.items():
        node = cfg if group == "" else cfg[group]
        prefix = f"{group}." if group else ""
        known = set(rules) | (set(groups) if group == "" else set())
        unknown = sorted(set(node.keys()) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(rules)}")
        for key, rule in rules.items():
            if key not in node.keys():
                if key in OPTIONAL_KEYS.get(group, ()):
                    continue
                raise ConfigError(f"{prefix}{key} is missing; it must be {describe(rule)}")
            if OmegaConf.is_missing(node, key):
                raise ConfigError(f"{prefix}{key} is not set: pass {prefix}{key}=<value> ({describe(rule)})")
            value = _plain(node[key])
            if not rule(value):
                raise ConfigError(f"{prefix}{key}={value!r} is not valid; it must be {describe(rule)}")
