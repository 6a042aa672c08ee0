"""The vocabulary of config rules: what a key's value must be (`Rule`: a check and the words for
what is expected), with the constructors the schema (dcgen.schema) declares its keys with."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable


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


def shown_value(v) -> str:
    """A value as the error messages show it (null, 'text', 3, 1e+20)."""
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v)
