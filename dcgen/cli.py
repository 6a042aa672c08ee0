"""`dcgen train | sample | evaluate | prepare [key=value ...]` (the README lists every command).

Configs ship inside the package (`dcgen.configs`) and are composed with Hydra's compose API, so
the command works from any directory, from a non-editable install, and unchanged under
`accelerate launch -m dcgen ...` and `torchrun -m dcgen ...` (no Hydra output dirs, no chdir).
A user's own config folder joins with `hydra.searchpath=[file:///path]` (its experiment/, model/,
task/ ... files become choices). User mistakes end in one line on stderr and exit code 2;
DCGEN_DEBUG=1 shows the traceback. Exit codes: 0 done, 2 bad input (nothing written) or a
failed checkpoint write, 75 preempted (SIGTERM/SIGUSR1: a checkpoint was written; rerun the same
command to resume), 130 interrupted (Ctrl-C: the same, but wrappers should not retry).
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from .run import Run
from .trust import check_file_config
from .validate import ConfigError, is_restart_key, one_line, validate

COMMANDS = {"train": "train", "sample": "sample", "evaluate": "evaluate", "prepare": "prepare",
            "export": "export", "compare": "compare"}
GROUPS = ("task", "model", "objective", "optim", "experiment", "compat")
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a temporary failure, try again (SLURM requeues the same command)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C; a checkpoint was written when training, but a
                        # person asked to stop, so wrappers that retry on 75 do not retry

USAGE = """usage: dcgen {train,sample,evaluate,prepare,export,compare} [group=choice ...] [key=value ...]

  dcgen train [task=pixel] [model=dcdit_small] [train.max_steps=3000] [run_dir=DIR] ...
  dcgen sample run_dir=DIR [num_samples=16 steps=250 sampler=ddpm cfg_scale=1 tail_drop=0 seed=0]
  dcgen evaluate run_dir=DIR [num_samples=50000 ...]
  dcgen prepare task=NAME [...]
  dcgen export run_dir=DIR out_dir=DIR [push_to_hub=owner/name]

`dcgen <command> --help` lists that command's groups, choices and keys with their defaults;
`dcgen <command> --cfg job` prints the composed config. Rerunning a `dcgen train` command on its
run dir resumes it (requeue-safe); exit code 75 means preempted, checkpoint written."""

ABOUT = {
    "train": "Train a model; rerunning the same command on its run_dir resumes it.",
    "sample": "Sample from the EMA weights of a run dir or an exported checkpoint dir.",
    "evaluate": "Sample on every process and compute the task's metrics (FID, ...).",
    "prepare": "Encode a task's data into its cache, once, before training.",
    "export": "Write a run's EMA model as a Hugging Face layout export; optionally push it to the Hub.",
    "compare": "Train experiments with the same seeds and steps, score them at several points, and "
               "write a table and plots (docs/results.md).",
}


# ----------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------

def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # hydra's message is several lines
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def _search_dirs(parsed) -> list[Path]:
    """Folders named by a `hydra.searchpath=[file://...]` override."""
    out = []
    for ov in parsed:
        if ov.key_or_group == "hydra.searchpath":
            val = ov.value()
            for entry in (val if isinstance(val, list) else [val]):
                if isinstance(entry, str) and entry.startswith("file://"):
                    out.append(Path(entry[len("file://"):]))
    return out


def _available(group: str, extra_dirs=()) -> list[str]:
    from importlib.resources import files
    names = set()
    try:
        root = files("dcgen.configs") / group
        names |= {p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")}
    except (FileNotFoundError, NotADirectoryError):
        pass
    for d in extra_dirs:
        if (d / group).is_dir():
            names |= {p.stem for p in (d / group).glob("*.yaml")}
    return sorted(names)


def _check_keys(cfg: DictConfig, parsed, where: str):
    """Reject overrides of keys that do not exist (naming the valid keys) and scalars given to a
    config section (naming its keys and the likely intended override)."""
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
        target = node._get_node(leaf)
        value = ov.value()
        if isinstance(target, DictConfig) and not isinstance(value, dict):
            keys = [str(k) for k in target.keys()]
            shown = " and ".join(f"'{k}'" for k in keys) if len(keys) <= 3 else ", ".join(keys)
            hint = f"; e.g. {key}.{keys[0]}={ov.input_line.split('=', 1)[1]}" if keys else ""
            raise ConfigError(f"'{key}' is a config section with the keys {shown}, not a value{hint}")


def _constructor_keys(base: DictConfig, overrides: list[str], parsed):
    """Model YAMLs state only what differs from the constructor's defaults; an override of any
    other constructor argument (`model.learn_sigma=false`) is added to the node (`+model...`)."""
    node = base.get("model") if isinstance(base, DictConfig) else None
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return overrides, parsed
    try:
        from .models import model_class
        params = set(inspect.signature(model_class(node._target_).__init__).parameters) - {"self"}
    except ValueError:
        return overrides, parsed
    out = []
    for text, ov in zip(overrides, parsed):
        key = ov.key_or_group
        if (not ov.is_add() and not ov.is_delete() and key.startswith("model.") and key.count(".") == 1
                and key[6:] not in node and key[6:] in params):
            text = "+" + text
        out.append(text)
    return out, _parse(out)


def _typed_error(command: str, e: BaseException) -> ConfigError | None:
    """A value the schema's type refuses (OmegaConf's ValidationError, somewhere in the cause
    chain) as one line naming the key and what it expects (dcgen.schema)."""
    from omegaconf.errors import ValidationError

    from .schema import rules
    from .validate import shown_value
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ValidationError) and getattr(e, "full_key", None):
            rule = rules(command).get(e.full_key) if command in COMMANDS else None
            why = f"expected {rule.expected}" if rule else one_line(e)
            return ConfigError(f"{e.full_key}={shown_value(e.value)}: {why}")
        e = e.__cause__ or e.__context__
    return None


def compose(config_name: str, overrides: list[str], record_choices: bool = False) -> DictConfig:
    """The config of `config_name` with `overrides`; with `record_choices`, a `choices` node
    records the group choices (task, model, ...) that composed it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    parsed = _parse(overrides)
    extra = _search_dirs(parsed)
    for d in extra:
        if not d.is_dir():
            raise ConfigError(f"hydra.searchpath: {d} is not a directory")
    for ov in parsed:
        key = ov.key_or_group
        if key in GROUPS and not ov.is_delete():
            choice = ov.value()
            if isinstance(choice, str) and choice not in _available(key, extra):
                raise ConfigError(f"unknown {key} '{choice}' (available: {', '.join(_available(key, extra))})")
    group_ovs = [o for o, p in zip(overrides, parsed)
                 if p.key_or_group in GROUPS or p.key_or_group.startswith("hydra.")]
    from .schema import register
    register()  # the typed schemas the command YAMLs name first (dcgen.schema)
    with initialize_config_module("dcgen.configs", version_base=None):
        try:
            base = hydra_compose(config_name, group_ovs)
        except Exception as e:  # Hydra's errors, and YAML errors of a (user's) config file
            raise ConfigError(" ".join(str(e).split())[:400]) from None
        overrides, parsed = _constructor_keys(base, overrides, parsed)
        _check_keys(base, parsed, f"{config_name}.yaml")
        try:
            cfg = hydra_compose(config_name, overrides, return_hydra_config=True)
        except HydraException as e:
            raise _typed_error(config_name, e) or ConfigError(str(e).splitlines()[0]) from None
        except Exception as e:  # omegaconf validation errors carry several lines
            raise ConfigError(" ".join(str(e).split())[:400]) from None
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
               if not k.startswith("hydra/")}
    with open_dict(cfg):
        del cfg["hydra"]
        if record_choices:
            cfg.choices = choices
    return cfg


# ----------------------------------------------------------------------------------------------
# Requeue-safe resume
# ----------------------------------------------------------------------------------------------

def _flat(node, prefix: str = "") -> dict:
    """Dotted leaf keys -> values of a resolved config."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    out = {}
    if isinstance(node, dict) and node:
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = node
    return out


def config_diff(old: DictConfig, new: DictConfig, ignore=("run_dir",)) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every leaf that differs, '<absent>' for a missing side."""
    a, b = _flat(old), _flat(new)
    absent = "<absent>"
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore or k.split(".")[0] in ignore:
            continue
        va, vb = a.get(k, absent), b.get(k, absent)
        if va != vb:
            diffs.append((k, va, vb))
    return diffs


def _shown_diffs(diffs, limit: int = 12) -> str:
    parts = [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:limit]]
    if len(diffs) > limit:
        parts.append(f"... ({len(diffs)} keys in all)")
    return "; ".join(parts)


def compose_resume(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The config to resume `run_dir` with, for a `dcgen train` command naming it.

    - Only `run_dir=` and restartable keys (validate.RESTART_KEYS) given: the stored config with
      those keys applied.
    - Anything else: the command's config is composed afresh and compared with the stored one.
      Identical, or differing only in restartable keys -> resume with the new values (said on
      stderr); any other difference -> ConfigError listing the differing keys, old -> new.
    Nothing is written here."""
    where = str(Run(run_dir).config_file)
    stored = load_run_config(Run(run_dir).config_file)
    parsed = _parse(overrides)
    given = [ov.key_or_group for ov in parsed if ov.key_or_group != "run_dir"]
    trusted = not all(is_restart_key(k) for k in given)
    # the stored file is only compared when the command gives the whole config (the command's
    # own nodes are built); it is built from when only run_dir= and restart keys are given
    check_file_config(stored, where, targets=not trusted)
    if not trusted:
        _check_keys(stored, parsed, where)
        cfg = stored.copy()
        for ov in parsed:
            if ov.key_or_group != "run_dir":
                OmegaConf.update(cfg, ov.key_or_group, ov.value(), merge=False)
        changed = config_diff(stored, cfg)
    else:
        cfg = compose("train", overrides, record_choices=True)
        ignore = ("run_dir",) if "choices" in stored else ("run_dir", "choices")
        changed = config_diff(stored, cfg, ignore=ignore)
        fixed = [d for d in changed if not is_restart_key(d[0])]
        if fixed:
            raise ConfigError(f"run dir {run_dir} was started with another config; this command "
                              f"changes {_shown_diffs(fixed)} (only the length and cadence keys "
                              "may change on a restart; start a new run_dir instead)")
        if "choices" not in stored:
            with open_dict(cfg):
                del cfg["choices"]
    cfg.run_dir = str(run_dir)
    if changed:
        print(f"dcgen train: resuming {run_dir} with {_shown_diffs(changed)}", file=sys.stderr)
    return cfg, trusted


def load_run_config(path: Path) -> DictConfig:
    """A run dir's stored config, read as untrusted data: YAML errors, a non-mapping, and
    interpolations are one-line ConfigErrors (see dcgen.trust)."""
    from .trust import check_files, parse_yaml, read_text
    check_files(Path(path).parent)  # the run dir: no links or special files to write through
    try:
        data = parse_yaml(read_text(path, "run config"), str(path))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    check_file_config(data, str(path), targets=False)  # plain data before OmegaConf sees it
    return OmegaConf.create(data)


def _run_dir_override(overrides):
    for o in overrides:
        if o.startswith("run_dir="):
            return o.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------------------------
# Help
# ----------------------------------------------------------------------------------------------

def command_help(command: str, overrides: list[str] | None = None) -> str:
    """Usage of one command: its groups with their choices, then every key with its default."""
    cfg = compose(COMMANDS[command], overrides or [], record_choices=True)
    extra = _search_dirs(_parse(overrides or []))
    lines = [f"usage: dcgen {command} [group=choice ...] [key=value ...]", "", ABOUT[command], ""]
    chosen = OmegaConf.to_container(cfg.choices)
    groups = [g for g in GROUPS if g in chosen]
    if groups:
        lines.append("groups (current choice marked *):")
        for g in groups:
            opts = [("*" if o == chosen[g] else "") + o for o in _available(g, extra)]
            lines.append(f"  {g:<10} {' '.join(opts) if opts else '(none)'}")
        lines.append("")
    lines.append("keys (defaults; types, rules and help from dcgen/schema.py):")
    with open_dict(cfg):
        del cfg["choices"]
    from .schema import help_of
    for key, val in _flat(OmegaConf.to_container(cfg, resolve=False)).items():
        if key.split(".")[0] in groups:
            continue  # group nodes: see the group's own files
        text = f"  {key}={'null' if val is None else val}"
        about = help_of(command, key)
        lines.append(f"{text:<44} {about}" if about else text)
    if groups:
        lines.append("")
        lines.append("group nodes (" + ", ".join(groups) + ") take dotted keys too, e.g. "
                     "task.grid=[8,8]; `--cfg job` shows them.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

def _split_flags(args: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, print_cfg, help) from the arguments after the command."""
    out, print_cfg, want_help = [], False, False
    it = iter(range(len(args)))
    skip = False
    for i in it:
        a = args[i]
        if skip:
            skip = False
            continue
        if a in ("-h", "--help"):
            want_help = True
        elif a in ("--cfg", "-c"):
            print_cfg = True
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt in ("job", "hydra", "all"):
                if nxt != "job":
                    raise ConfigError(f"--cfg {nxt}: dcgen has no Hydra run config; use --cfg job")
                skip = True
        else:
            out.append(a)
    return out, print_cfg, want_help


def run(command: str, args: list[str]):
    if command not in COMMANDS:
        raise ConfigError(f"unknown command '{command}' (valid: {', '.join(COMMANDS)})")
    overrides, print_cfg, want_help = _split_flags(args)
    if want_help:
        print(command_help(command, [o for o in overrides if o.split("=")[0] in GROUPS
                                     or o.startswith("hydra.")]))
        return None
    rd = _run_dir_override(overrides)
    trusted = True  # composed from the command line and the user's search path
    if command == "train" and rd and Run(rd).has_config():
        cfg, trusted = compose_resume(Path(rd), overrides)
    else:
        cfg = compose(COMMANDS[command], overrides, record_choices=command == "train")
    if command != "train" or print_cfg:  # train() validates its config itself: once
        validate(command, cfg)
    if print_cfg:
        print(OmegaConf.to_yaml(cfg))
        return None
    if command == "train":
        from .train import train
        return train(cfg, trusted=trusted)
    if command == "sample":
        from .sample import sample_command
        return sample_command(cfg)
    if command == "evaluate":
        from .evaluate import evaluate_command
        return evaluate_command(cfg)
    if command == "export":
        from .io import export_command
        return export_command(cfg)
    if command == "compare":
        from .compare import compare_command
        return compare_command(cfg, overrides)
    if command == "prepare":
        import logging

        from .trust import build
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        task = build(cfg.task, "task", "the command line", trusted=True)
        return task.prepare(seed=cfg.seed)


def _one_line(e: BaseException) -> str:
    text = one_line(e)
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    from .train import NonFiniteLossError, TrainingPreempted
    try:
        return _main(argv, NonFiniteLossError, TrainingPreempted)
    finally:
        _close_process_group()


def _close_process_group():
    """Every process of a launch closes its process group before it exits, whatever ended the
    command (done, bad input, a non-finite loss, preemption): a process that exits with gloo
    still open can abort in its teardown ("terminate called without an active exception")."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        # meet first: a rank that tears gloo down while a peer's connection threads still run can
        # take that peer down with it; a bounded wait, so a peer that died never hangs the exit
        if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            from datetime import timedelta
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            except Exception:  # a peer that is gone: close anyway
                pass
        dist.destroy_process_group()


def _main(argv, NonFiniteLossError, TrainingPreempted) -> int:
    from .checkpoint import CheckpointWriteError
    from .train import TrainingInterrupted
    try:
        run(argv[0], argv[1:])
    except TrainingInterrupted as e:
        print(f"dcgen {argv[0]}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingPreempted as e:
        print(f"dcgen {argv[0]}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints first)
        print(f"dcgen {argv[0]}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, KeyError,
            NonFiniteLossError, CheckpointWriteError) as e:
        if os.environ.get("DCGEN_DEBUG"):
            raise
        print(f"dcgen {argv[0]}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        from hydra.errors import InstantiationException
        if isinstance(e, InstantiationException) and not os.environ.get("DCGEN_DEBUG"):
            cause = e.__cause__ or e
            print(f"dcgen {argv[0]}: error: {_one_line(cause)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
