"""Training-free step caching for DiT and DC-DiT: reuse the backbone's work across sampling steps.

The rule is TeaCache's (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model"): before the backbone, take the first block's timestep-modulated input
m = LN(h) * (1 + scale(t, y)) + shift(t, y), the part of the computation that sees both the noisy
input and the timestep. Add its relative L1 change since the previous call,
|m_k - m_(k-1)|_1 / |m_(k-1)|_1, to an accumulator. While the accumulator stays below the
threshold, the backbone is skipped and its cached contribution reused; otherwise the backbone
runs, its contribution is cached and the accumulator restarts at 0. The first call always runs.
Without TeaCache's per-model polynomial rescaling of the indicator (fitted to one released
checkpoint each), so thresholds are in raw relative-L1 units.

What is reused:
  DiT     the backbone's residual, out - in on the (B, L, D) tokens (TeaCache's choice), added to
          the current step's embedded input;
  DC-DiT  the de-chunked backbone output on the full (B, L, D) grid. The kept set changes from
          step to step, so a token-level residual has no fixed positions to go back to; the
          de-chunked output does. The encoder, router and decoder (the full-resolution parts)
          still run every step, so the boundaries and the fine detail follow the current x_t.

Why this method: it needs no training and no calibration set, it acts on the backbone that both
models share, and dynamic chunking cuts the tokens of each backbone call while caching cuts the
number of calls, so the two savings can multiply (the paper's claim (4), tested in
docs/results.md). A threshold of 0 never reuses (the accumulator is never below 0): sampling is
then identical to sampling without a cache.

One decision per forward, for the whole batch (both CFG halves run in one forward). State is kept
per input shape, so a sampler that alternates batch shapes does not compare unrelated inputs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class StepCache:
    """The accumulator, the cached contribution and the counts of one sampling run."""

    def __init__(self, threshold: float):
        threshold = float(threshold)
        if not threshold >= 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        """Forget every cached value (a new batch of samples)."""
        self._state: dict[tuple, dict] = {}
        self.calls = 0       # forwards seen
        self.reused = 0      # forwards whose backbone was skipped
        self.last_reused = False

    def reuse(self, signal: torch.Tensor) -> bool:
        """Given this forward's modulated input, True when the cached value is to be used (read it
        from `value`); False when the backbone must run (then `store` its contribution)."""
        self.calls += 1
        key = tuple(signal.shape)
        st = self._state.get(key)
        signal = signal.detach().float()
        if st is None or st["value"] is None:
            self._state[key] = {"prev": signal, "acc": 0.0, "value": None}
            self._key, self.last_reused = key, False
            return False
        prev = st["prev"]
        st["acc"] += float((signal - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
        st["prev"] = signal
        self._key = key
        if st["acc"] < self.threshold:
            self.reused += 1
            self.last_reused = True
            return True
        st["acc"] = 0.0
        self.last_reused = False
        return False

    @property
    def value(self) -> torch.Tensor:
        return self._state[self._key]["value"]

    def store(self, value: torch.Tensor) -> None:
        self._state[self._key]["value"] = value.detach()


def check_threshold(threshold) -> None:
    if threshold is not None and not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                                      and threshold >= 0):
        raise ValueError(f"cache_threshold must be null or a number >= 0, got {threshold!r}")


@contextmanager
def step_caching(model, cache: StepCache | None):
    """Attach `cache` to `model` (a DiT or DC-DiT) for the block; None attaches nothing."""
    if cache is None:
        yield None
        return
    if getattr(model, "step_cache", "missing") == "missing":
        raise ValueError(f"{type(model).__name__} does not support step caching")
    model.step_cache = cache
    try:
        yield cache
    finally:
        model.step_cache = None


__all__ = ["StepCache", "check_threshold", "step_caching"]
