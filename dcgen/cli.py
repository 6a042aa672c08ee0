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

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

# compose and load_run_config are re-exported: `from dcgen.cli import compose` is public
from .config import (COMMANDS, GROUPS, command_help, compose, compose_resume, load_run_config,  # noqa: F401
                     run_dir_override)
from .run import Run
from .validate import ConfigError, one_line, validate

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a temporary failure, try again (SLURM requeues the same command)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C; a checkpoint was written when training, but a
                        # person asked to stop, so wrappers that retry on 75 do not retry

USAGE = """usage: dcgen {train,sample,evaluate,prepare,export,compare,convert,elastic} [group=choice ...] [key=value ...]

  dcgen train [task=pixel] [model=dcdit_small] [train.max_steps=3000] [run_dir=DIR] ...
  dcgen sample run_dir=DIR [num_samples=16 steps=250 sampler=ddpm cfg_scale=1 tail_drop=0 seed=0]
  dcgen evaluate run_dir=DIR [num_samples=50000 ...]
  dcgen prepare task=NAME [...]
  dcgen export run_dir=DIR out_dir=DIR [push_to_hub=owner/name]

`dcgen <command> --help` lists that command's groups, choices and keys with their defaults;
`dcgen <command> --cfg job` prints the composed config. Rerunning a `dcgen train` command on its
run dir resumes it (requeue-safe); exit code 75 means preempted, checkpoint written."""



# ----------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------

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
    rd = run_dir_override(overrides)
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
    if command == "elastic":
        from .elastic import elastic_command
        return elastic_command(cfg)
    if command == "convert":
        from .compat.convert import convert_command
        return convert_command(cfg)
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
