"""Types and allowed values of the run config, checked before any work starts.

The YAML files in this folder are the only home of default values; this module
only says what each key must be. Groups whose settings belong to a builder
(``attention``, ``vae``, ``data``) are checked by that builder, which also runs
before any training work. A failure raises :class:`ConfigError` naming the key,
the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf


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
}


def describe(rule: Rule) -> str:
    if hasattr(rule, "choices"):
        return f"one of {list(rule.choices)}"
    return getattr(rule, "description", DESCRIPTIONS.get(rule, rule.__name__))


SCHEMA: dict[str, dict[str, Rule]] = {
    "": {"seed": non_negative_int},
    "model": {
        "name": text,
        "hidden_size": positive_int,
        "depth": positive_int,
        "num_heads": positive_int,
        "mlp_ratio": positive,
        "patch_size": int_list(3),
        "class_dropout_prob": unit_interval,
        "gradient_checkpointing": boolean,
    },
    "train": {
        "max_steps": positive_int,
        "batch_size": positive_int,
        "grad_accum_steps": positive_int,
        "lr": positive,
        "weight_decay": non_negative,
        "betas": lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(unit_interval(b) for b in v),
        "warmup_steps": non_negative_int,
        "lr_schedule": one_of("constant", "cosine"),
        "grad_clip": non_negative,
        "ema_decay": unit_interval,
        "mixed_precision": one_of("no", "bf16", "fp16"),
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
    },
    "logger": {
        "name": one_of("none", "tensorboard", "wandb"),
        "project": text,
        "entity": optional(text),
        "mode": one_of("auto", "online", "offline"),
    },
}
SCHEMA["train"]["betas"].description = "two numbers in [0, 1)"
REQUIRED_GROUPS = ("model", "attention", "data", "vae", "train", "logger")


def _plain(node):
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def validate_train_config(cfg: Mapping) -> None:
    """Check every key of the groups in SCHEMA: known, required where present in the schema, valid."""
    missing = [g for g in REQUIRED_GROUPS if g not in cfg]
    if missing:
        raise ConfigError(f"config groups {missing} are missing; the root config must select {list(REQUIRED_GROUPS)}")
    for group, rules in SCHEMA.items():
        node = cfg if group == "" else cfg[group]
        prefix = f"{group}." if group else ""
        keys = set(node.keys()) if group else {k for k in node.keys() if k in rules}
        unknown = sorted(keys - set(rules))
        if unknown:
            raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(rules)}")
        optional_keys = {"project", "entity", "mode"} if group == "logger" else set()
        for key, rule in rules.items():
            if key not in node:
                if key in optional_keys:
                    continue
                raise ConfigError(f"{prefix}{key} is missing; it must be {describe(rule)}")
            value = _plain(node[key])
            if not rule(value):
                raise ConfigError(f"{prefix}{key}={value!r} is not valid; it must be {describe(rule)}")
