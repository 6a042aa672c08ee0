"""The run directory: the one module that spells its file names.

    run_dir/
      config.yaml        the resolved config the run was started with (rewritten atomically)
      log.txt            the human log: progress lines and messages (rank 0)
      metrics.jsonl      one JSON object per log step: what readers use (never log.txt)
      checkpoints/       step_NNNNNNNN/ folders and the `latest` pointer (dcgen.checkpoint)
      export/            the EMA model in the Hugging Face layout (dcgen.io)
      samples/<name>/    `dcgen sample` outputs and training previews (step_NNNNNNNN)
      eval/<name>/       `dcgen evaluate` outputs

A `Run` is a path with names; it owns no open files, so every process may make one. Writes that
another process may read concurrently (the config, which a resuming rank reads while rank 0
rewrites it) go through a temporary file and an atomic rename.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .files import atomic_write_text

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
SAMPLES = "samples"
EVAL = "eval"
SAMPLE_CONFIG_FILE = "sample_config.yaml"  # beside the files of one `dcgen sample` call
EVAL_CONFIG_FILE = "evaluate_config.yaml"  # beside the files of one `dcgen evaluate` call
# exports written before 2026-11-30 carried the run's config file instead of config.json
LEGACY_EXPORT_CONFIG = CONFIG_FILE


class Run:
    """Names inside one run directory (see the module docstring)."""

    def __init__(self, root):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    @staticmethod
    def new_name() -> str:
        """The default run dir of a command that names none."""
        return f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}"

    # -- files ------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log_file(self) -> Path:
        return self.root / LOG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT

    def samples_dir(self, name: str | None = None) -> Path:
        """samples/<name>; the current time when no name is given."""
        return self.root / SAMPLES / (name or time.strftime("%Y%m%d-%H%M%S"))

    def preview_dir(self, step: int) -> Path:
        return self.samples_dir(f"step_{step:08d}")

    def eval_dir(self, name: str | None = None) -> Path:
        """eval/<name>; the current time when no name is given."""
        return self.root / EVAL / (name or time.strftime("%Y%m%d-%H%M%S"))

    def checkpoint_dir(self, step: int) -> Path:
        """checkpoints/step_NNNNNNNN (kept or not)."""
        return self.checkpoints / f"step_{step:08d}"

    # -- config -----------------------------------------------------------------------------------
    def has_config(self) -> bool:
        return self.config_file.exists()

    def write_config(self, cfg) -> None:
        """Store the resolved config (an OmegaConf node) atomically."""
        from omegaconf import OmegaConf
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, OmegaConf.to_yaml(cfg, resolve=True))

    # -- structured metrics -------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        """One JSON line per log step (rank 0). Appended and flushed; a line cut by a kill is
        skipped by `read_metrics`."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict]:
        """Every complete record of metrics.jsonl, in order; for a step logged twice (a resume
        repeats the steps after its checkpoint) the last record wins, at its first position."""
        if not self.metrics_file.exists():
            return []
        by_step: dict = {}
        for line in self.metrics_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                by_step[rec["step"]] = rec
        return [by_step[s] for s in sorted(by_step)]
