"""One validation pass over a composed config, before any work is done or any file written.

Each key's rule (what its value must be) is declared with the key in the command's schema
(dcgen.schema); this module holds the rule vocabulary and the rules between keys. `validate(command,
cfg)` checks every rule whose key exists in the config and raises `ConfigError` naming the key, the bad value
and what is expected, in one line. Keys that a config does not have (an older run dir, a task
without that option) are skipped; unknown keys are refused earlier, at compose time (cli.py).

The keys that may change when a run is restarted (the length and cadence keys) live here too:
`RESTART_KEYS`. Anything else differing between a run dir's stored config and a new command
refuses the restart.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf


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


@dataclass(frozen=True)
class Rule:
    check: Callable[[Any], bool]
    expected: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def int_(lo: int | None = None, hi: int | None = None) -> Rule:
    def ok(v):
        return _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    rng = (f" >= {lo}" if lo is not None and hi is None else
           f" in [{lo}, {hi}]" if lo is not None else f" <= {hi}" if hi is not None else "")
    return Rule(ok, f"an integer{rng}")


def num(lo: float | None = None, hi: float | None = None, hi_open: bool = False,
        lo_open: bool = False) -> Rule:
    def ok(v):
        if not _is_num(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        if hi is not None and (v >= hi if hi_open else v > hi):
            return False
        return True
    if lo is not None and hi is not None:
        rng = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f" {'>' if lo_open else '>='} {lo:g}"
    else:
        rng = ""
    return Rule(ok, f"a number{rng}")


def choice(*options) -> Rule:
    shown = ", ".join("null" if o is None else str(o) for o in options)
    return Rule(lambda v: not isinstance(v, bool) and v in options, f"one of {shown}")


# Mixed precision: the one list, for the config key and for a launcher's setting alike
MIXED_PRECISION = Rule(
    lambda v: v in (None, "auto", "no", "bf16"),
    "null, auto, no or bf16 (fp16 is not supported: no loss-scaled path is tested and its range "
    "overflows in the backbone; fp8 is not supported either)")


def boolean() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false")


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.check(v), f"null or {rule.expected}")


def either(a: Rule, b: Rule) -> Rule:
    return Rule(lambda v: a.check(v) or b.check(v), f"{a.expected} or {b.expected}")


def list_of(rule: Rule, nonempty: bool = False) -> Rule:
    def ok(v):
        return isinstance(v, (list, tuple)) and (len(v) > 0 or not nonempty) and all(rule.check(x) for x in v)
    return Rule(ok, f"a {'non-empty ' if nonempty else ''}list of {rule.expected.removeprefix('a ').removeprefix('an ')}s")


def path_str() -> Rule:
    return Rule(lambda v: isinstance(v, str) and v != "", "a path")


TRACKERS = ("tensorboard", "wandb")

# seeds are combined with step, epoch and rank indices into torch generator seeds (< 2**64)
MAX_SEED = 2 ** 40

_MISSING = object()


def _value(cfg: DictConfig, key: str):
    try:
        node = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except Exception:  # a '???' mandatory value
        return "???"
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def shown_value(v) -> str:
    """A value as the error messages show it (null, 'text', 3, 1e+20)."""
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v)


def validate(command: str, cfg: DictConfig) -> None:
    """Raise ConfigError for the first key of `cfg` that breaks its rule (the rules of the
    command's schema, dcgen.schema), then for the rules between keys."""
    from .schema import help_of, rules
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
