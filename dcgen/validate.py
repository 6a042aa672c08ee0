"""One validation pass over a composed config, before any work is done or any file written.

Each key's rule (what its value must be) is declared with the key in the command's schema
(dcgen.schema, from the vocabulary of dcgen.rules); this module holds the pass itself, the rules
between keys, and the restart keys. `validate(command,
cfg)` checks every rule whose key exists in the config and raises `ConfigError` naming the key, the bad value
and what is expected, in one line. Keys that a config does not have (an older run dir, a task
without that option) are skipped; unknown keys are refused earlier, at compose time (cli.py).

The keys that may change when a run is restarted (the length and cadence keys) live here too:
`RESTART_KEYS`. Anything else differing between a run dir's stored config and a new command
refuses the restart.
"""
from __future__ import annotations

import fnmatch

from omegaconf import DictConfig, ListConfig, OmegaConf

# the rule vocabulary, re-exported: callers check values with the same rules the schema declares
from .schema import help_of, rules
from .rules import (MAX_SEED, MIXED_PRECISION, TRACKERS, Rule, boolean, choice, either, int_,  # noqa: F401
                    list_of, num, optional, path_str, shown_value)


class ConfigError(ValueError):
    """A user mistake in a config or command line; the CLI prints it as one line, exit 2."""


def one_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if limit is None else text[:limit]


# Keys that a restart of an existing run dir may change (requeue-safe resume, docs/configs.md).
# They change how long a run goes and how often it writes, never what an optimizer step computes.
RESTART_KEYS = (
    "train.max_steps", "train.ckpt_every", "train.ckpt_keep", "train.sample_every",
    "train.log_every", "train.num_workers", "train.num_threads", "train.log_with", "sample.*",
    "train.grad_checkpointing", "train.ckpt_keep_every",
)


def is_restart_key(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pat) for pat in RESTART_KEYS)


_MISSING = object()


def _value(cfg: DictConfig, key: str):
    try:
        node = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except Exception:  # a '???' mandatory value
        return "???"
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def validate(command: str, cfg: DictConfig) -> None:
    """Raise ConfigError for the first key of `cfg` that breaks its rule (the rules of the
    command's schema, dcgen.schema), then for the rules between keys."""
    for key, rule in rules(command).items():
        v = _value(cfg, key)
        if v is _MISSING:
            continue
        if v == "???":
            raise ConfigError(f"{key} is required: give {key}=<{help_of(command, key) or rule.expected}>")
        if not rule.check(v):
            raise ConfigError(f"{key}={shown_value(v)}: expected {rule.expected}")
    if command == "train":
        tc = cfg.train
        if int(tc.global_batch_size) % int(tc.grad_accum_steps):
            raise ConfigError(f"train.global_batch_size={tc.global_batch_size} is not divisible by "
                              f"train.grad_accum_steps={tc.grad_accum_steps}")
