"""`dcgen train | sample | evaluate | prepare [key=value ...]` (DESIGN §4).

Configs ship inside the package (`dcgen.configs`) and are composed with Hydra's compose API, so
the command works from any directory, from a non-editable install, and unchanged under
`accelerate launch -m dcgen ...` and `torchrun -m dcgen ...` (no Hydra output dirs, no chdir).
User mistakes end in one line on stderr and exit code 2; DCGEN_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

COMMANDS = {"train": "train", "sample": "sample", "evaluate": "evaluate", "prepare": "prepare"}
GROUPS = ("task", "model", "objective", "optim", "experiment", "compat")

USAGE = """usage: dcgen {train,sample,evaluate,prepare} [key=value ...]

  dcgen train [task=pixel] [model=dcdit_small] [train.max_steps=3000] [run_dir=DIR] ...
  dcgen sample run_dir=DIR [num_samples=16 steps=250 sampler=ddpm cfg_scale=1 tail_drop=0 seed=0]
  dcgen evaluate run_dir=DIR [num_samples=50000 ...]
  dcgen prepare task=NAME [...]

Config groups: task, model, objective, optim, experiment. `dcgen <cmd> --cfg` prints the
composed config. A run dir that holds a checkpoint resumes when passed to `dcgen train`."""


class ConfigError(ValueError):
    pass


def _available(group: str) -> list[str]:
    from importlib.resources import files
    try:
        root = files("dcgen.configs") / group
        return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # hydra's message is several lines
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def _check_keys(cfg: DictConfig, parsed, where: str):
    """Reject value overrides of keys that do not exist, naming the valid keys."""
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_add() or ov.is_delete() or key.split(".")[0] in GROUPS and "." not in key:
            continue
        if key.startswith("hydra"):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not (isinstance(node, DictConfig) and leaf in node.keys()):
            if isinstance(node, DictConfig):
                valid = ", ".join(sorted(str(k) for k in node.keys()))
                scope = f"under '{parent}'" if parent else f"at the top of {where}"
                raise ConfigError(f"unknown config key '{key}' (valid keys {scope}: {valid})")
            raise ConfigError(f"unknown config key '{key}' ('{parent}' is not a config section)")


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    parsed = _parse(overrides)
    for ov in parsed:
        key = ov.key_or_group
        if key in GROUPS and not ov.is_delete():
            choice = ov.value()
            if isinstance(choice, str) and choice not in _available(key):
                raise ConfigError(f"unknown {key} '{choice}' (available: {', '.join(_available(key))})")
    group_ovs = [o for o, p in zip(overrides, parsed) if p.key_or_group in GROUPS]
    with initialize_config_module("dcgen.configs", version_base=None):
        try:
            base = hydra_compose(config_name, group_ovs)
        except HydraException as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        _check_keys(base, parsed, f"{config_name}.yaml")
        try:
            return hydra_compose(config_name, overrides)
        except HydraException as e:
            raise ConfigError(str(e).splitlines()[0]) from None


def compose_resume(run_dir: Path, overrides: list[str]) -> DictConfig:
    """Config of an existing run, with value overrides (e.g. a longer train.max_steps) applied."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    parsed = _parse(overrides)
    for ov in parsed:
        if ov.key_or_group in GROUPS:
            raise ConfigError(f"run dir {run_dir} already has a config; '{ov.input_line}' would change "
                              "its composition (start a new run_dir instead)")
    _check_keys(cfg, parsed, str(run_dir / "config.yaml"))
    for ov in parsed:
        if ov.key_or_group == "run_dir":
            continue
        OmegaConf.update(cfg, ov.key_or_group, ov.value(), merge=False)
    cfg.run_dir = str(run_dir)
    return cfg


def _run_dir_override(overrides):
    for o in overrides:
        if o.startswith("run_dir="):
            return o.split("=", 1)[1]
    return None


def run(command: str, overrides: list[str]):
    if command not in COMMANDS:
        raise ConfigError(f"unknown command '{command}' (valid: {', '.join(COMMANDS)})")
    print_cfg = "--cfg" in overrides
    overrides = [o for o in overrides if o != "--cfg"]
    rd = _run_dir_override(overrides)
    if command == "train" and rd and (Path(rd) / "config.yaml").exists():
        cfg = compose_resume(Path(rd), overrides)
    else:
        cfg = compose(COMMANDS[command], overrides)
    if print_cfg:
        print(OmegaConf.to_yaml(cfg))
        return None
    if command == "train":
        from .train import train
        return train(cfg)
    if command == "sample":
        from .sample import sample_command
        return sample_command(cfg)
    if command == "evaluate":
        from .evaluate import evaluate_command
        return evaluate_command(cfg)
    if command == "prepare":
        import logging
        from hydra.utils import instantiate
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        task = instantiate(cfg.task, _convert_="all")
        return task.prepare(seed=cfg.seed)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    from .train import NonFiniteLossError
    try:
        run(argv[0], argv[1:])
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, KeyError,
            NonFiniteLossError) as e:
        if os.environ.get("DCGEN_DEBUG"):
            raise
        print(f"dcgen {argv[0]}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        from hydra.errors import InstantiationException
        if isinstance(e, InstantiationException) and not os.environ.get("DCGEN_DEBUG"):
            cause = e.__cause__ or e
            print(f"dcgen {argv[0]}: error: {_one_line(cause)}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
