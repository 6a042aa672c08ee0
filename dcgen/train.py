"""The single training loop: `train(cfg)` on Accelerate (one CPU, one GPU, many GPUs or machines).

Reads top to bottom in numbered phases. Every random draw that shapes the update (data order,
timesteps, noise, label dropout, the multi-budget rho) is a function of (seed, step, global sample
index), never of the number of processes (each process draws only its own rows): a 2-process run equals a 1-process run with the same
global batch, and a resumed run equals an uninterrupted one bit for bit.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import latest_checkpoint, resume, resume_candidates, save_checkpoint
from .diffusion.objective import check_objective
from .ema import EMA
from .rng import host_to_device, set_rng_state
from .run import Run

log = logging.getLogger("dcgen.train")


class NonFiniteLossError(RuntimeError):
    pass


class Distillation:
    """The upcycling warm-up (METHOD §9.1): for the first `steps` optimizer steps the loss is the
    MSE to a frozen teacher's output; afterwards the objective's own loss, and the teacher is
    released. Without a teacher, always the objective's loss."""

    def __init__(self, teacher=None, steps: int = 0):
        self.teacher, self.steps = teacher, int(steps)

    def losses(self, objective, model, step: int, x, y, t, noise, tail_drop):
        if self.teacher is not None and step >= self.steps:
            self.teacher = None  # distillation over: free the teacher's memory
        if self.teacher is not None:
            from .compat.upcycle import distill_terms
            return distill_terms(objective, model, self.teacher, x, y, t=t, noise=noise, tail_drop=tail_drop)
        return objective.training_losses(model, x, y, t=t, noise=noise, tail_drop=tail_drop)


# ----------------------------------------------------------------------------------------------
# Data order: a function of (seed, step) only.
# ----------------------------------------------------------------------------------------------

class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches of dataset indices for steps start_step, start_step+1, ...

    Global sample position q = step * G + j walks through one random permutation per epoch
    (seeded by seed and epoch); process r takes positions [r G/W, (r+1) G/W) of each step and
    splits them into `accum` micro-batches. Resuming at a step needs no replay."""

    def __init__(self, n: int, global_batch: int, world: int, rank: int, accum: int, seed: int,
                 start_step: int, max_steps: int, with_epoch: bool = False):
        self.n, self.G, self.W, self.r, self.A = n, global_batch, world, rank, accum
        self.with_epoch = with_epoch  # yield (index, epoch) for datasets that re-draw per epoch
        self.seed, self.start, self.stop = seed, start_step, max_steps
        self.local = global_batch // world
        self.micro = self.local // accum
        self._perm_epoch, self._perm = -1, None

    def _index(self, q: int) -> int:
        epoch, i = divmod(q, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return (int(self._perm[i]), epoch) if self.with_epoch else int(self._perm[i])

    def positions(self, step: int, micro: int) -> range:
        base = step * self.G + self.r * self.local + micro * self.micro
        return range(base, base + self.micro)

    def __iter__(self):
        for step in range(self.start, self.stop):
            for k in range(self.A):
                yield [self._index(q) for q in self.positions(step, k)]

    def __len__(self):
        return (self.stop - self.start) * self.A


def step_randomness(seed: int, rows: range, sample_shape, objective, p_drop: float):
    """Timesteps, noise and label-dropout mask of the global sample positions `rows` (this
    process's micro-batch: q = step * G + j). Each row draws from its own generator, seeded by
    (seed, q), so the draw is identical for any number of processes and micro-batches, and a
    process draws only its own rows: the per-step cost falls as processes are added."""
    from .rng import item_generator
    t, noise, drop = [], [], []
    for q in rows:
        g = item_generator(seed, "train-step", q)
        t.append(objective.draw_timesteps(1, g, shape=(1, *sample_shape)))  # integer t (Gaussian) or s in [0, 1] (flow)
        noise.append(torch.randn(1, *sample_shape, generator=g))
        drop.append(torch.rand(1, generator=g) < p_drop)
    return torch.cat(t), torch.cat(noise), torch.cat(drop)


# ----------------------------------------------------------------------------------------------

def build_model(cfg: DictConfig, task):
    """The model of `cfg.model` (a description node) with the task's shape filled in."""
    from .models import build
    return build(OmegaConf.to_container(cfg.model, resolve=True), input_size=list(task.grid),
                 in_channels=task.channels, num_classes=task.num_classes)


def param_groups(model, cfg: DictConfig) -> list:
    """The optimizer's parameter groups: one, or two when `train.label_lr_mult` != 1 (the label
    table at lr x label_lr_mult: its gradient is a small, noisy part of the loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    mult = float(cfg.train.get("label_lr_mult", 1.0))
    if mult == 1.0 or getattr(model, "y_embedder", None) is None:
        return params
    table = {id(p) for p in model.y_embedder.parameters()}
    return [{"params": [p for p in params if id(p) not in table]},
            {"params": [p for p in params if id(p) in table], "lr": float(cfg.optim.lr) * mult}]


def native_bf16() -> bool:
    """bf16 autocast is worth it only where the GPU computes bf16 natively (Ampere and newer);
    V100 and T4 emulate it, slower than fp32. Capability probe, not a version check."""
    if not torch.cuda.is_available():
        return False
    import inspect
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability() >= (8, 0)


def resolve_mixed_precision(choice: str | None) -> str | None:
    """Accelerate's mixed_precision from `train.mixed_precision`; None defers to Accelerate.

    null: the launcher's setting if there is one (`accelerate launch --mixed_precision`, an
    accelerate config file, ACCELERATE_MIXED_PRECISION), else `auto`. auto: bf16 where native,
    else "no". An explicit value wins over the launcher's."""
    from .validate import MIXED_PRECISION, ConfigError
    if choice is None:
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if launcher:
            resolved = launcher.lower()
        else:
            choice = "auto"
    if choice is not None:
        resolved = choice if choice != "auto" else ("bf16" if native_bf16() else "no")
    if not MIXED_PRECISION.check(resolved):  # the rule `validate` applies to the config key
        raise ConfigError(f"mixed precision {resolved!r} (from {'the launcher' if choice is None else 'the config'}): "
                          f"expected {MIXED_PRECISION.expected}")
    return None if choice is None else resolved


def check_distributed_mode(accelerator=None) -> None:
    """DDP (one or many machines) and single processes are supported; sharded modes are refused
    before any work: checkpoints, export and EMA read full, unsharded parameters on rank 0."""
    from accelerate.utils import DistributedType

    from .validate import ConfigError
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"{name} is not supported by dcgen train (checkpoints, EMA and export "
                              "need unsharded parameters); supported: one process, or DDP on one "
                              "or many machines (accelerate launch / torchrun without FSDP or "
                              "DeepSpeed)")
    if accelerator is None:
        return
    sharded = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}
    name = sharded.get(accelerator.distributed_type)
    if name:
        raise ConfigError(f"{name} is not supported by dcgen train; supported: one process, or DDP "
                          "on one or many machines")


def cpu_threads(choice, local_world: int, recorded: int | None = None) -> tuple[int, str]:
    """(intra-op threads, why) for a CPU run. auto: the cores this process can actually get — its
    affinity set shared by the local processes, capped by OMP_NUM_THREADS when set, less what
    other processes keep busy (1-minute load average; two processes with 2 threads each on 2
    cores run 5-10x slower than with 1 each). A resumed run reuses the count it started with
    (`recorded`): a different count changes float summation order, and resume is bit-exact."""
    if choice != "auto":
        return int(choice), "train.num_threads"
    if recorded:
        return int(recorded), "auto, as when the run started"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, local_world))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        share = min(share, int(omp))
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    free = max(1, int(cores - busy + 0.5))
    n = max(1, min(share, free))
    return n, f"auto: {cores} cores, {local_world} local process(es), load {busy:.1f}"


class TrainingPreempted(RuntimeError):
    """SIGTERM/SIGUSR1 received: a checkpoint was written at a step boundary (exit code 75)."""


class TrainingInterrupted(TrainingPreempted):
    """SIGINT (Ctrl-C) received: a checkpoint was written at a step boundary (exit code 130)."""


class _Signals:
    """SIGTERM and SIGUSR1 (SLURM's warning before a kill, `--signal=USR1@120`) and SIGINT
    (Ctrl-C) request a stop at the next step boundary, where a checkpoint is written; a second
    signal exits at once (exit code 128 + signal). The CLI exits 75 after SIGTERM/SIGUSR1 (a
    requeue wrapper retries) and 130 after SIGINT (a person asked to stop: scripts see the usual
    interrupt code and do not retry); rerunning the command resumes either way."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        import signal
        self.received: int | None = None
        self.previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum

    def restore(self):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class _StepDecision:
    """One collective decision per optimizer step: stop (a preemption signal on any rank) and
    non-finite losses (which ranks), without a device sync of its own.

    Each micro-step ORs `isfinite(loss)` into a device flag. At the end of a step the flags of all
    ranks are summed in one all-reduce, and the result is copied into a host buffer (pinned and
    non-blocking on CUDA, with an event), one of two used in turn. It is read one step later, as
    plain host memory, when it has long arrived (on CUDA the next step's packing-length read has
    already waited for it; the event covers models without one); on log and checkpoint steps it
    is read at once, so no checkpoint is ever written after a non-finite step. Every rank reads
    the same reduced values at the same step, so all ranks stop together."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.device = accelerator.device
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)
        pin = self.device.type == "cuda"
        self.buffers = [torch.zeros(self.world + 1, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self.views = [b.numpy() for b in self.buffers]  # host memory, read without tensor calls
        self.queue: list[tuple[int, int, object]] = []  # (step, buffer index, event)

    def mark(self, loss: torch.Tensor):
        self.bad = self.bad | ~torch.isfinite(loss.detach())

    def push(self, step: int, signalled: bool):
        W = self.world
        vec = torch.zeros(W + 1, dtype=torch.float32, device=self.device)
        vec[self.rank] = self.bad.float()
        vec[W] = float(signalled)
        vec = self.acc.reduce(vec, reduction="sum")
        slot = step % 2
        self.buffers[slot].copy_(vec, non_blocking=self.device.type == "cuda")
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.queue.append((step, slot, event))
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def poll(self, wait: bool) -> tuple[bool, tuple[int, list[int]] | None]:
        """(stop requested, (step, ranks) of the first non-finite loss or None), from every queued
        step older than the newest, and the newest too when `wait`."""
        stop, bad = False, None
        while self.queue and (wait or len(self.queue) > 1):
            step, slot, event = self.queue.pop(0)
            if event is not None and not event.query():
                event.synchronize()
            vals = self.views[slot]
            ranks = [r for r in range(self.world) if vals[r] > 0]
            if ranks and bad is None:
                bad = (step, ranks)
            stop = stop or bool(vals[self.world] > 0)
        return stop, bad


class RunLog:
    """The plain progress line every `log_every` steps, to stdout and the run's log file, and the
    same numbers as one record of its metrics file (rank 0); a tqdm bar in addition only when
    stdout is a terminal."""

    def __init__(self, run: Run, total: int, start: int, enabled: bool):
        self.enabled, self.total, self.run = enabled, total, run
        self.file = open(run.log_file, "a", buffering=1) if enabled else None
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def line(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)
        self.file.write(text + "\n")

    def record(self, step: int, summary: dict):
        """The structured twin of `line` (metrics.jsonl): what readers parse."""
        if self.enabled:
            self.run.append_metrics({"step": step, "time": time.time(),
                                     **{k: float(v) for k, v in summary.items()}})

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def _eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_line(step: int, total: int, s: dict, eta_s: float) -> str:
    parts = [f"step {step}/{total}", f"loss {s['loss']:.4f}"]
    if "ratio_loss" in s:
        parts.append(f"ratio_loss {s['ratio_loss']:.4f}")
    if "repa_loss" in s:
        parts.append(f"repa_loss {s['repa_loss']:.4f}")
    if "kept_fraction" in s:
        parts.append(f"kept {s['kept_fraction']:.3f}")
    if "rho" in s:
        parts.append(f"rho {s['rho']:.1f}")
    if "grad_norm" in s:
        parts.append(f"grad_norm {s['grad_norm']:.3f}")
    parts += [f"lr {s['lr']:.2e}", f"{s['samples_per_s']:.1f} samples/s", f"ETA {_eta(eta_s)}"]
    return " | ".join(parts)


def _trackers(log_with) -> list[str]:
    from .validate import ConfigError
    if log_with in (None, "none"):
        return []
    names = [log_with] if isinstance(log_with, str) else list(log_with)
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("train.log_with=wandb needs Weights & Biases: pip install dcgen[wandb]") from None
    return names


@dataclass
class _Processes:
    """Phase 1: the processes, precision and threads of this run (nothing written yet)."""
    accelerator: object
    run: Run
    world: int
    rank: int
    is_main: bool
    micro: int
    previous: dict
    n_threads: int | None
    threads_note: str
    trackers: list


def _processes(cfg: DictConfig) -> _Processes:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list
    tc = cfg.train
    # cpu=True on CPU-only machines: without it Accelerate ignores torchrun's env and each
    # process would train alone; with it, gloo runs the processes as one job
    on_cpu = not torch.cuda.is_available()
    check_distributed_mode(None)  # the launcher's FSDP/DeepSpeed settings, before any setup
    mixed = resolve_mixed_precision(tc.get("mixed_precision"))
    trackers = _trackers(tc.get("log_with", ["tensorboard"]))
    state = PartialState(cpu=on_cpu)
    run_dir = [cfg.run_dir or Run.new_name()]
    broadcast_object_list(run_dir)  # every rank writes into the directory rank 0 chose
    run = Run(run_dir[0])
    acc_kw = {} if mixed is None else {"mixed_precision": mixed}
    accelerator = Accelerator(gradient_accumulation_steps=tc.grad_accum_steps, cpu=on_cpu,
                              log_with=trackers or None, project_dir=str(run.root), **acc_kw)
    check_distributed_mode(accelerator)
    resolve_mixed_precision(accelerator.mixed_precision)  # refuses fp16 from the launcher too
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    G_batch, A = int(tc.global_batch_size), int(tc.grad_accum_steps)
    if G_batch % (world * A):
        raise ValueError(f"train.global_batch_size={G_batch} is not divisible by processes ({world}) "
                         f"x train.grad_accum_steps ({A})")
    previous = _previous_state(run.root) if cfg.run_dir else {}
    threads_note, n_threads = "", None
    if accelerator.device.type == "cpu" and previous.get("step", 0) <= tc.max_steps:
        recorded = previous.get("num_threads")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        n_threads, why = cpu_threads(tc.get("num_threads", "auto"), local, recorded)
        if recorded and n_threads != recorded and is_main:
            log.warning("train.num_threads=%d differs from the %d thread(s) this run started with: "
                        "the float summation order changes, so the run continues but is no longer "
                        "bit-identical to an uninterrupted one", n_threads, recorded)
        torch.set_num_threads(n_threads)
        threads_note = f", {n_threads} CPU thread(s) ({why})"
    return _Processes(accelerator, run, world, rank, is_main, G_batch // (world * A), previous,
                      n_threads, threads_note, trackers)


@dataclass
class _Parts:
    """Phase 2: everything that can fail on a bad config, built before the run dir is touched."""
    task: object
    dataset: object
    model: torch.nn.Module
    objective: object
    ema: EMA
    optimizer: torch.optim.Optimizer
    distillation: Distillation
    upcycle_report: dict | None
    p_drop: float
    repa: object = None  # dcgen.repa.Repa when repa.weight > 0


def _build_parts(cfg: DictConfig, procs: _Processes, trusted: bool) -> _Parts:
    from .trust import build
    tc = cfg.train
    torch.manual_seed(cfg.seed)  # identical model init on every rank
    where = str(procs.run.config_file) if not trusted else "the command line"
    task = build(cfg.task, "task", where, trusted=trusted)
    dataset = task.train_dataset()
    if len(dataset) == 0:
        raise ValueError(f"task {task.name} has an empty training set")
    model = build_model(cfg, task)
    objective = build(cfg.objective, "objective", where, trusted=trusted)
    check_objective(objective, where)
    if objective.learn_sigma and model.out_channels != 2 * task.channels:
        raise ValueError("objective learns sigma but the model has learn_sigma: false "
                         "(set model.learn_sigma=true or objective.learn_sigma=false, loss=mse)")
    p_drop = float(tc.label_dropout) if task.num_classes > 0 else 0.0
    distillation, upcycle_report = Distillation(), None
    init = cfg.get("init") or {}
    if init.get("from_dit"):  # upcycling a pretrained DiT (METHOD §9.1)
        from .compat.upcycle import init_from_dit, load_dit_teacher
        teacher = load_dit_teacher(init.from_dit, device=procs.accelerator.device,
                                   num_heads=model.config["num_heads"])
        upcycle_report = init_from_dit(model, teacher, freeze_embedders=init.get("freeze_embedders", True))
        distillation = Distillation(teacher, int(init.get("distill_steps", 0)))
    if tc.sample_every:  # the previews' settings, checked now rather than at the first preview
        from .pipeline import with_diffusers_samplers
        from .sample import check_request, sampling_args
        preview = sampling_args(cfg.sample)
        check_request(with_diffusers_samplers(objective), task, num_samples=preview["num_samples"],
                      steps=preview["steps"], sampler=preview["sampler"], seed=cfg.seed)
    repa = _build_repa(cfg, model, task, procs, trusted)  # adds the projector to the model
    ema = EMA(model, tc.ema_decay)
    optimizer = build(cfg.optim, "optim", where, trusted=trusted)(params=param_groups(model, cfg))
    if tc.get("grad_checkpointing", False):
        if tc.get("compile", False):
            from .validate import ConfigError
            raise ConfigError("train.grad_checkpointing and train.compile together are not supported "
                              "(the compiled backbone is not checkpointed); choose one")
        model.set_grad_checkpointing(True)
    if tc.get("compile", False):
        from .models.compile import compile_backbone
        compile_backbone(model)
    return _Parts(task, dataset, model, objective, ema, optimizer, distillation, upcycle_report, p_drop, repa)


def _build_repa(cfg: DictConfig, model, task, procs: _Processes, trusted: bool):
    """REPA's projector and frozen encoder (dcgen/repa.py) when repa.weight > 0, else None."""
    rc = cfg.get("repa") or {}
    if not float(rc.get("weight", 0) or 0):
        return None
    from .validate import ConfigError
    if cfg.train.get("compile", False):
        raise ConfigError("repa and train.compile together are not supported (REPA reads a block's "
                          "output through a forward hook); choose one")
    if not trusted and str(rc.get("encoder")).startswith("torchscript:"):
        raise ConfigError(f"{procs.run.config_file}: refusing repa.encoder={rc.get('encoder')} from a run "
                          "dir's config (a TorchScript file is a program); give the whole command, "
                          "repa.encoder included, to resume")
    from .repa import Repa
    try:
        return Repa(rc, model, task, device=procs.accelerator.device)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def _open_run(cfg: DictConfig, procs: _Processes, parts: _Parts):
    """Phase 3: the stored config and the log file (rank 0); returns the log handler."""
    if procs.is_main:
        procs.run.write_config(cfg)  # atomic: another rank may be reading it for its own resume check
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    procs.accelerator.wait_for_everyone()
    if not procs.is_main:
        return None
    file_log = logging.FileHandler(procs.run.log_file)
    file_log.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    dcgen_log = logging.getLogger("dcgen")
    dcgen_log.addHandler(file_log)
    if dcgen_log.getEffectiveLevel() > logging.INFO:  # the run's log holds its INFO lines, whoever
        dcgen_log.setLevel(logging.INFO)              # configured logging (a library caller, pytest)
    if parts.upcycle_report is not None:
        log.info("upcycled from %s: %s", cfg.init.from_dit, parts.upcycle_report)
    return file_log


def _resume(cfg: DictConfig, procs: _Processes, parts: _Parts) -> int:
    """Phase 4: the newest readable checkpoint's weights, optimizer and random state; the step
    to start from (0 for a new run)."""
    resumed = resume(procs.run.root, parts.model, parts.ema, parts.optimizer, procs.rank,
                     procs.accelerator, log)
    if resumed is None:
        return 0
    ckpt, ck_state, rng = resumed
    start_step = ck_state["step"]
    if rng is not None:
        set_rng_state(rng["global"])
    else:  # written by another number of processes (the rule in docs/configs.md)
        from .rng import draw_seed
        torch.manual_seed(draw_seed(cfg.seed, "resume-rng", start_step, procs.rank))
        if procs.is_main:
            log.warning("%s was written by %s process(es), this run has %d: the global batch, data "
                        "order, timesteps and noise continue unchanged (they depend on the sample "
                        "position, not the process); each process's own random state is re-derived, "
                        "and the gradient all-reduce sums in another order, so the run is not "
                        "bit-identical to one that kept its process count", ckpt,
                        ck_state.get("world", "?"), procs.world)
    if procs.is_main:
        log.info("resumed from %s (step %d)", ckpt, start_step)
    return start_step


def _train_step(cfg, procs: _Processes, parts: _Parts, model, hooks, step: int, batches, sampler,
                stats: "_Stats", decision: "_StepDecision"):
    """One optimizer step over `train.grad_accum_steps` micro-batches: the objective's loss (or
    the distillation loss), the model family's auxiliary loss, backward, clip, update. Returns
    (grad norm or None, tail-drop rho, target N)."""
    tc, acc = cfg.train, procs.accelerator
    task, objective, optimizer = parts.task, parts.objective, parts.optimizer
    sample_shape = (task.channels, *task.grid)
    rho, n_eff = hooks.budget(step)
    grad_norm = None
    for k in range(int(tc.grad_accum_steps)):
        x, y = next(batches)
        t, noise, drop = step_randomness(cfg.seed, sampler.positions(step, k), sample_shape, objective,
                                         parts.p_drop)
        x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
        t, noise = host_to_device(t, acc.device), host_to_device(noise, acc.device)
        if task.num_classes > 0:
            y = torch.where(host_to_device(drop, y.device), torch.full_like(y, task.num_classes), y)
        else:
            y = None
        with acc.accumulate(model), acc.autocast():
            terms, aux = parts.distillation.losses(objective, model, step, x, y, t, noise, rho)
            loss_diff = terms["loss"].mean()
            loss = loss_diff
            extra = hooks.auxiliary_loss(aux, n_eff)
            if extra is not None:
                loss = loss + hooks.aux_weight * extra
            align = None
            if parts.repa is not None:  # the chosen block's tokens against the frozen encoder
                align = parts.repa.loss(acc.unwrap_model(model), x)
                loss = loss + parts.repa.weight * align
            decision.mark(loss)  # on the device: no host sync per micro-step
            acc.backward(loss)
            if acc.sync_gradients and tc.grad_clip:
                grad_norm = acc.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stats.add(loss_diff, extra, aux, t, objective.time_range, align)
    return grad_norm, rho, n_eff


def _stop_or_fail(procs: _Processes, decision: "_StepDecision", signals: "_Signals", step: int,
                  wait: bool, checkpoint, max_steps: int) -> None:
    """The collective decision after a step: every rank stops at the same step, for the same
    reason. A non-finite loss raises NonFiniteLossError; a signal writes a checkpoint and raises
    TrainingPreempted (TrainingInterrupted for Ctrl-C)."""
    decision.push(step - 1, signals.received is not None)
    stop, bad = decision.poll(wait=wait)
    if stop and bad is None:
        # the stop may come from the previous step's flags: this step's finite flag is read too
        # before any checkpoint is written
        bad = decision.poll(wait=True)[1]
    if bad is not None:
        bad_step, bad_ranks = bad
        raise NonFiniteLossError(
            f"non-finite loss at step {bad_step} (rank {', '.join(map(str, bad_ranks))}); training "
            f"stopped, the last good checkpoint is "
            f"{latest_checkpoint(procs.run.root) or 'none (no checkpoint yet)'}")
    if stop and step < max_steps:
        checkpoint(step)
        import signal as _signal
        interrupted = signals.received == _signal.SIGINT
        raise (TrainingInterrupted if interrupted else TrainingPreempted)(
            f"{'interrupted (Ctrl-C)' if interrupted else 'preempted (signal received)'}: "
            f"checkpoint at step {step} written to {latest_checkpoint(procs.run.root)}; rerun the "
            "same command to resume")


def _nothing_to_train(cfg: DictConfig, procs: _Processes, return_model: bool):
    """A restart whose checkpoint is past train.max_steps: nothing is trained or written (the
    stored config keeps its max_steps)."""
    msg = (f"{procs.run.root} is at step {procs.previous['step']}, past "
           f"train.max_steps={cfg.train.max_steps}: nothing to train")
    if return_model:
        from .validate import ConfigError
        raise ConfigError(msg)
    if procs.is_main:
        print(f"dcgen train: {msg}", file=sys.stderr)
    return procs.run.root


def train(cfg: DictConfig, return_model: bool = False, trusted: bool = True):
    """Train as `cfg` says; returns the run dir (and, with `return_model`, this process's
    unwrapped model and EMA model, e.g. to compare ranks). Raises TrainingPreempted after writing
    a checkpoint when SIGTERM/SIGUSR1/SIGINT arrives, NonFiniteLossError on a non-finite loss.
    `trusted`: False when `cfg` was read from a run dir's file (its task, objective and optim
    nodes are then built only from dcgen's exact tables, dcgen.trust)."""
    from .io import export_model
    from .validate import validate

    validate("train", cfg)
    tc = cfg.train
    procs = _processes(cfg)                               # 1. processes, precision, threads
    if procs.previous.get("step", 0) > tc.max_steps:
        return _nothing_to_train(cfg, procs, return_model)
    parts = _build_parts(cfg, procs, trusted)             # 2. task, data, model, objective, optimizer
    file_log = _open_run(cfg, procs, parts)               # 3. stored config, log file
    start_step = _resume(cfg, procs, parts)               # 4. resume
    acc, run, is_main = procs.accelerator, procs.run, procs.is_main
    task, ema, optimizer = parts.task, parts.ema, parts.optimizer
    hooks = parts.model.training_hooks(cfg.dc)            # what the model family adds to a step
    ema.model.to(acc.device)
    model, optimizer = acc.prepare(parts.model, optimizer)
    parts.optimizer = optimizer
    raw = acc.unwrap_model(model)
    G_batch = int(tc.global_batch_size)
    sampler = StepBatchSampler(len(parts.dataset), G_batch, procs.world, procs.rank, int(tc.grad_accum_steps),
                               cfg.seed, start_step, tc.max_steps,
                               with_epoch=getattr(parts.dataset, "wants_epoch", False))
    # a private generator: creating the iterator must not consume the (restored) global RNG
    loader = torch.utils.data.DataLoader(parts.dataset, batch_sampler=sampler, num_workers=tc.num_workers,
                                         pin_memory=acc.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)
    if procs.trackers:
        acc.init_trackers("tb" if procs.trackers == ["tensorboard"] else "dcgen")
    writer = acc.get_tracker("tensorboard", unwrap=True) if is_main and "tensorboard" in procs.trackers else None
    if is_main:
        n_params = sum(p.numel() for p in raw.parameters())
        log.info("%s: %.2fM parameters, task %s %s, %d processes, micro-batch %d, mixed precision %s%s, "
                 "run dir %s", type(raw).__name__, n_params / 1e6, task.name, tuple(task.grid), procs.world,
                 procs.micro, acc.mixed_precision, procs.threads_note, run.root)

    # 5. Loop -----------------------------------------------------------------------------------------
    stats, decision, signals = _Stats(device=acc.device), _StepDecision(acc), _Signals()
    runlog = RunLog(run, tc.max_steps, start_step, enabled=is_main)
    t_last, samples_since, steps_since = time.time(), 0, 0
    step = start_step
    ckpt_state = {"world": procs.world, "mixed_precision": acc.mixed_precision, "num_threads": procs.n_threads}
    export_extra = {"task": export_task_node(cfg, task), "objective": OmegaConf.to_container(cfg.objective, resolve=True)}

    def checkpoint(at: int):
        save_checkpoint(run.root, at, raw, ema, optimizer, {"data_position": at * G_batch, **ckpt_state},
                        {}, acc, keep=tc.ckpt_keep, keep_every=int(tc.get("ckpt_keep_every") or 0))
        if is_main:
            export_model(ema.model, run.export_dir, extra={**export_extra, "step": at})

    try:
        while step < tc.max_steps:
            _fault_signal(step, procs.rank)
            grad_norm, rho, n_eff = _train_step(cfg, procs, parts, model, hooks, step, batches, sampler,
                                                stats, decision)
            ema.update(raw)
            step += 1
            samples_since += G_batch
            steps_since += 1
            runlog.step()
            is_log = step % tc.log_every == 0 or step == tc.max_steps
            is_ckpt = bool(tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.max_steps
            _stop_or_fail(procs, decision, signals, step, is_log or is_ckpt, checkpoint, tc.max_steps)
            if is_log:  # rank-averaged
                summary = stats.reduce(acc)
                dt = time.time() - t_last
                summary.update({"lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples_since / dt,
                                "rho": rho, "target_n": n_eff})
                if "tokens_kept_per_sample" in summary:
                    summary["tokens_per_s"] = summary["samples_per_s"] * summary["tokens_kept_per_sample"]
                if grad_norm is not None:
                    summary["grad_norm"] = float(grad_norm)
                if procs.trackers:
                    acc.log({key if "/" in key else f"train/{key}": val for key, val in summary.items()}, step=step)
                runlog.line(format_line(step, tc.max_steps, summary, (tc.max_steps - step) * dt / max(1, steps_since)))
                runlog.record(step, summary)
                t_last, samples_since, steps_since = time.time(), 0, 0
            if tc.sample_every and step % tc.sample_every == 0 and is_main:
                _preview(cfg, task, ema.model, parts.objective, run, step, writer)
            if is_ckpt:
                checkpoint(step)
                _fault_after_checkpoint(step)
    finally:
        signals.restore()
        runlog.close()
        if file_log is not None:
            logging.getLogger("dcgen").removeHandler(file_log)
            file_log.close()
        for tracker in acc.trackers:
            tracker.finish()
        acc.trackers = []

    acc.wait_for_everyone()
    acc.end_training()  # destroys the process group
    if return_model:
        return run.root, raw, ema.model
    return run.root


def export_task_node(cfg: DictConfig, task) -> dict:
    """The task node an export records: the run's, plus the per-channel latent statistics the
    model trains with under latent_norm=channel (so that the export decodes without the cache,
    and the diffusers pipeline decodes as the task does)."""
    node = OmegaConf.to_container(cfg.task, resolve=True)
    if node.get("latent_norm") == "channel" and hasattr(task, "channel_statistics"):
        mean, std = task.channel_statistics()
        node["latent_mean"], node["latent_std"] = [float(v) for v in mean], [float(v) for v in std]
    return node


def _previous_state(run_dir: Path) -> dict:
    """state.json of the newest checkpoint whose state.json reads ({} for a new run): the step
    and thread count a resume starts from (the full load, with fallback, comes later)."""
    import json

    from .checkpoint import check_state
    for path in resume_candidates(run_dir):
        try:
            state = json.loads((path / "state.json").read_text())
            check_state(state)
        except (OSError, ValueError):
            continue  # damaged: the full load says so and falls back
        return state
    return {}


def _fault_signal(step: int, rank: int):
    """Test hook: DCGEN_FAULT_SIGNAL_AT_STEP=<step>[:<SIGNAME>[:<rank>]] makes the process (of that
    rank) send itself a real signal as step <step> begins (default SIGTERM, every rank)."""
    spec = os.environ.get("DCGEN_FAULT_SIGNAL_AT_STEP")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != step or (len(parts) > 2 and int(parts[2]) != rank):
        return
    import signal
    os.kill(os.getpid(), getattr(signal, parts[1] if len(parts) > 1 else "SIGTERM"))


def _fault_after_checkpoint(step: int):
    """Test hook: DCGEN_FAULT_KILL_AFTER_STEP=<s> SIGKILLs the process right after step s's checkpoint."""
    if os.environ.get("DCGEN_FAULT_KILL_AFTER_STEP") == str(step):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


class _Stats:
    """Running sums between log steps, kept on the device (no host sync per step) and reduced
    across processes at log time only."""

    BUCKETS = 10

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.bucket_kept = torch.zeros(self.BUCKETS, dtype=torch.float64, device=self.device)
        self.bucket_count = torch.zeros(self.BUCKETS, dtype=torch.float64, device=self.device)

    def _acc(self, key, val: torch.Tensor):
        val = val.detach().double().to(self.device)
        self.sums[key] = self.sums[key] + val if key in self.sums else val

    def add(self, loss, ratio, aux, t, t_range: float, repa=None):
        self.n += 1
        self._acc("loss", loss)
        if ratio is not None:
            self._acc("ratio_loss", ratio)
        if repa is not None:
            self._acc("repa_loss", repa)
        for s in aux or []:
            L = s.boundary_prob.shape[1]
            kept = s.kept_counts.double()
            nat = s.natural_counts.double()
            self._acc("kept_fraction", (kept / L).mean())
            self._acc("tokens_kept_per_sample", kept.mean())
            self._acc("natural_fraction", (nat / L).mean())
            # geometric mean over samples of L / max(count, 1)
            self._acc("compression_natural", torch.exp(torch.log(L / nat.clamp_min(1)).mean()))
            self._acc("compression_effective", torch.exp(torch.log(L / kept.clamp_min(1)).mean()))
            self._acc("mean_p", s.boundary_prob.detach().double().mean())
            tf = t.detach().double().to(kept.device) / t_range
            b = (tf * self.BUCKETS).long().clamp(0, self.BUCKETS - 1).to(self.device)
            self.bucket_kept.index_add_(0, b, (kept / L).to(self.device))
            self.bucket_count.index_add_(0, b, torch.ones_like(kept, device=self.device))

    def reduce(self, accelerator) -> dict:
        keys = sorted(self.sums)
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.device)
        vec = torch.cat([torch.stack([self.sums[k] for k in keys]) if keys else n[:0], n,
                         self.bucket_kept, self.bucket_count])
        vec = accelerator.reduce(vec, reduction="sum").cpu()  # the one sync, at log time
        n = float(vec[len(keys)])
        out = {k: float(vec[i]) / max(n, 1) for i, k in enumerate(keys)}
        bk = vec[len(keys) + 1:len(keys) + 1 + self.BUCKETS]
        bc = vec[len(keys) + 1 + self.BUCKETS:]
        for i in range(self.BUCKETS):
            if bc[i] > 0:
                out[f"kept_fraction_by_t/bucket{i}"] = float(bk[i] / bc[i])
        self.reset()
        return out


@torch.no_grad()
def _preview(cfg, task, model, objective, run: Run, step: int, writer):
    """A few samples from the EMA weights, written by the task and logged to TensorBoard."""
    from .pipeline import with_diffusers_samplers
    from .sample import generate, sampling_args
    from .viz import is_image_batch
    out_dir = run.preview_dir(step)
    # the same sampler construction as `dcgen sample` (dpm++ and unipc through diffusers)
    result = generate(model, with_diffusers_samplers(objective), task, **sampling_args(cfg.sample),
                      seed=cfg.seed, record=False)
    data = task.decode(result["samples"])
    task.write_samples(data, out_dir, labels=result["labels"])
    if writer is not None and is_image_batch(data):
        grid_img = (data[:16].clamp(-1, 1) + 1) / 2
        writer.add_images("samples", grid_img, step)
