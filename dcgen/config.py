"""Composing a command's config: Hydra's composition of configs/<command>.yaml on the typed schema
(dcgen.schema) with the command line's overrides, the checks made before anything runs (unknown
keys, group choices, typed values), and the requeue-safe resume of a run dir (the stored config
compared with the command's). `dcgen.cli` dispatches; everything that builds a config lives here.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from .run import Run
from .trust import check_file_config
from .validate import ConfigError, is_restart_key, one_line

COMMANDS = {"train": "train", "sample": "sample", "evaluate": "evaluate", "prepare": "prepare",
            "export": "export", "compare": "compare", "convert": "convert", "elastic": "elastic"}
ABOUT = {
    "train": "Train a model; rerunning the same command on its run_dir resumes it.",
    "sample": "Sample from the EMA weights of a run dir or an exported checkpoint dir.",
    "evaluate": "Sample on every process and compute the task's metrics (FID, ...).",
    "prepare": "Encode a task's data into its cache, once, before training.",
    "export": "Write a run's EMA model as a Hugging Face layout export; optionally push it to the Hub.",
    "elastic": "Quality against FLOPs across tail-drop budgets: one evaluation per budget, one table.",
    "convert": "Convert a DiT or official DC-DiT checkpoint (.pt) into a dcgen export.",
    "compare": "Train experiments with the same seeds and steps, score them at several points, and "
               "write a table and plots (docs/results.md).",
}

GROUPS = ("task", "model", "objective", "optim", "experiment", "compat")

def parse_overrides(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # hydra's message is several lines
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def search_dirs(parsed) -> list[Path]:
    """Folders named by a `hydra.searchpath=[file://...]` override."""
    out = []
    for ov in parsed:
        if ov.key_or_group == "hydra.searchpath":
            val = ov.value()
            for entry in (val if isinstance(val, list) else [val]):
                if isinstance(entry, str) and entry.startswith("file://"):
                    out.append(Path(entry[len("file://"):]))
    return out


def available(group: str, extra_dirs=()) -> list[str]:
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
    return out, parse_overrides(out)


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
    parsed = parse_overrides(overrides)
    extra = search_dirs(parsed)
    for d in extra:
        if not d.is_dir():
            raise ConfigError(f"hydra.searchpath: {d} is not a directory")
    for ov in parsed:
        key = ov.key_or_group
        if key in GROUPS and not ov.is_delete():
            choice = ov.value()
            if isinstance(choice, str) and choice not in available(key, extra):
                raise ConfigError(f"unknown {key} '{choice}' (available: {', '.join(available(key, extra))})")
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

def flat(node, prefix: str = "") -> dict:
    """Dotted leaf keys -> values of a resolved config."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    out = {}
    if isinstance(node, dict) and node:
        for k, v in node.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = node
    return out


def config_diff(old: DictConfig, new: DictConfig, ignore=("run_dir",)) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every leaf that differs, '<absent>' for a missing side."""
    a, b = flat(old), flat(new)
    absent = "<absent>"
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore or k.split(".")[0] in ignore:
            continue
        va, vb = a.get(k, absent), b.get(k, absent)
        if va != vb:
            diffs.append((k, va, vb))
    return diffs


def added_at_default(key: str, value, stored: DictConfig) -> bool:
    """True for a key the stored config lacks (its run started before dcgen had the key) that
    the command sets to the value dcgen uses in its absence: a command key at its schema default,
    or a task / model / objective / optim constructor argument at the default of the class the
    stored node names (through the exact class tables). New keys arrive with the old behaviour
    as their default, so such a key does not change the run: the identical command still resumes."""
    top, _, rest = key.partition(".")
    if top in ("task", "model", "objective", "optim"):
        if not rest or "." in rest:  # nested dicts of a constructor argument: not compared
            return False
        from .trust import TABLES, resolve_class
        node = stored.get(top)
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if target not in TABLES[top]:
            return False
        param = inspect.signature(resolve_class(top, target).__init__).parameters.get(rest)
        return param is not None and param.default is not inspect.Parameter.empty and param.default == value
    from .schema import schema
    defaults = flat(OmegaConf.structured(schema("train")))
    return key in defaults and defaults[key] == value


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
    parsed = parse_overrides(overrides)
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
        changed = [d for d in config_diff(stored, cfg, ignore=ignore)
                   if not (d[1] == "<absent>" and added_at_default(d[0], d[2], stored))]
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


def run_dir_override(overrides):
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
    extra = search_dirs(parse_overrides(overrides or []))
    lines = [f"usage: dcgen {command} [group=choice ...] [key=value ...]", "", ABOUT[command], ""]
    chosen = OmegaConf.to_container(cfg.choices)
    groups = [g for g in GROUPS if g in chosen]
    if groups:
        lines.append("groups (current choice marked *):")
        for g in groups:
            opts = [("*" if o == chosen[g] else "") + o for o in available(g, extra)]
            lines.append(f"  {g:<10} {' '.join(opts) if opts else '(none)'}")
        lines.append("")
    lines.append("keys (defaults; types, rules and help from dcgen/schema.py):")
    with open_dict(cfg):
        del cfg["choices"]
    from .schema import help_of
    for key, val in flat(OmegaConf.to_container(cfg, resolve=False)).items():
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
