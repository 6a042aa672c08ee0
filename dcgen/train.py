"""The single training loop: `train(cfg)` on Accelerate (one CPU, one GPU, many GPUs or machines).

Reads top to bottom in numbered phases. Every random draw that shapes the update (data order,
timesteps, noise, label dropout, the multi-budget rho) is a function of (seed, step, global sample
index), never of the number of processes: a 2-process run equals a 1-process run with the same
global batch, and a resumed run equals an uninterrupted one bit for bit.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .ema import EMA

log = logging.getLogger("dcgen.train")


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Schedules specific to dynamic chunking (METHOD §6): the one small function the loop consults.
# ----------------------------------------------------------------------------------------------

def dc_schedule(dc: DictConfig, step: int) -> tuple[float, float]:
    """(tail-drop rho, effective target N) for optimiser step `step`.

    rho: 0 before `multi_budget_start_step`, then one budget per step drawn uniformly from
    `budgets` by a CPU generator seeded with the step index ([R]'s draw): every rank and
    micro-step agrees without communication, and the sequence is reproducible.
    N: optional linear warm-up from n_start to target_n over n_warmup_steps."""
    rho = 0.0
    if dc.multi_budget and step >= dc.multi_budget_start_step and len(dc.budgets):
        g = torch.Generator().manual_seed(step)
        rho = float(dc.budgets[int(torch.randint(len(dc.budgets), (1,), generator=g))])
    n = float(dc.target_n)
    if dc.n_warmup_steps and dc.n_warmup_steps > 0:
        n = dc.n_start + (dc.target_n - dc.n_start) * min(1.0, step / dc.n_warmup_steps)
    return rho, n


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


def step_randomness(seed: int, step: int, global_batch: int, sample_shape, num_timesteps,
                    objective, p_drop: float):
    """Timesteps, noise and label-dropout mask for the whole global batch of `step`; each process
    slices its own rows, so the draw is identical for any number of processes."""
    g = torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 17)
    if hasattr(objective, "sample_s"):  # flow matching: continuous time
        t = objective.sample_s(global_batch, g)
    else:
        t = torch.randint(0, num_timesteps, (global_batch,), generator=g)
    noise = torch.randn(global_batch, *sample_shape, generator=g)
    drop = torch.rand(global_batch, generator=g) < p_drop
    return t, noise, drop


# ----------------------------------------------------------------------------------------------

def build_model(cfg: DictConfig, task):
    """Instantiate the model config with the task's shape filled in."""
    from hydra.utils import instantiate
    kw = {}
    for key, val in (("input_size", list(task.grid)), ("in_channels", task.channels),
                     ("num_classes", task.num_classes)):
        if cfg.model.get(key) is None:
            kw[key] = val
    return instantiate(cfg.model, **kw, _convert_="all")


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def train(cfg: DictConfig, return_model: bool = False):
    """Train as `cfg` says; returns the run dir (and, with `return_model`, this process's
    unwrapped model and EMA model, e.g. to compare ranks)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from hydra.utils import instantiate

    from .chunking import ratio_loss
    from .io import export_model

    tc, dc = cfg.train, cfg.dc

    # 1. Processes, run directory, frozen config ---------------------------------------------
    # cpu=True on CPU-only machines: without it Accelerate ignores torchrun's env and each
    # process would train alone; with it, gloo runs the processes as one job
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(tc.mixed_precision),
                              gradient_accumulation_steps=tc.grad_accum_steps,
                              cpu=not torch.cuda.is_available())
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    G_batch, A = int(tc.global_batch_size), int(tc.grad_accum_steps)
    if G_batch % (world * A):
        raise ValueError(f"train.global_batch_size={G_batch} is not divisible by processes ({world}) "
                         f"x train.grad_accum_steps ({A})")
    micro = G_batch // (world * A)
    run_dir = [cfg.run_dir or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}"]
    broadcast_object_list(run_dir)  # every rank writes into the directory rank 0 chose
    run_dir = Path(run_dir[0])
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    accelerator.wait_for_everyone()

    # 2. Task and data -------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical model init on every rank
    task = instantiate(cfg.task, _convert_="all")
    dataset = task.train_dataset()
    if len(dataset) == 0:
        raise ValueError(f"task {task.name} has an empty training set")

    # 3. Model, EMA, objective, optimiser ----------------------------------------------------------
    model = build_model(cfg, task)
    is_dc = hasattr(model, "router")
    objective = instantiate(cfg.objective, _convert_="all")
    if getattr(objective, "learn_sigma", False) and model.out_channels != 2 * task.channels:
        raise ValueError("objective learns sigma but the model has learn_sigma: false "
                         "(set model.learn_sigma=true or objective.learn_sigma=false, loss=mse)")
    p_drop = float(tc.label_dropout) if task.num_classes > 0 else 0.0
    if model.y_embedder is not None:
        model.y_embedder.dropout_prob = 0.0  # the loop draws label dropout (rank-invariant)
    teacher, distill_steps = None, 0
    init = cfg.get("init") or {}
    if init.get("from_dit"):  # upcycling a pretrained DiT (METHOD §9.1)
        from .upcycle import init_from_dit, load_dit_teacher
        teacher = load_dit_teacher(init.from_dit, device=accelerator.device,
                                   num_heads=model.config["num_heads"])
        report = init_from_dit(model, teacher, freeze_embedders=init.get("freeze_embedders", True))
        distill_steps = int(init.get("distill_steps", 0))
        if is_main:
            log.info("upcycled from %s: %s", init.from_dit, report)
    ema = EMA(model, tc.ema_decay)
    optimizer = instantiate(cfg.optim)(params=[p for p in model.parameters() if p.requires_grad])
    n_params = sum(p.numel() for p in model.parameters())

    # 4. Resume -------------------------------------------------------------------------------------
    start_step = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state, rng = load_checkpoint(ckpt, model, ema, optimizer, rank)
        start_step = state["step"]
        set_rng_state(rng["global"])
        if is_main:
            log.info("resumed from %s (step %d)", ckpt, start_step)
    ema.model.to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    sampler = StepBatchSampler(len(dataset), G_batch, world, rank, A, cfg.seed, start_step,
                               tc.max_steps, with_epoch=getattr(dataset, "wants_epoch", False))
    # a private generator: creating the iterator must not consume the (restored) global RNG
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=tc.num_workers,
                                         pin_memory=accelerator.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tb"))
        log.info("%s: %.2fM parameters, task %s %s, %d processes, micro-batch %d, run dir %s",
                 type(raw).__name__, n_params / 1e6, task.name, tuple(task.grid), world, micro, run_dir)

    # 5. Loop -----------------------------------------------------------------------------------------
    T_steps = getattr(objective, "num_timesteps", 1000)
    sample_shape = (task.channels, *task.grid)
    stats = _Stats(device=accelerator.device)
    t_last, samples_since = time.time(), 0
    progress = None
    if is_main:
        from tqdm.auto import tqdm
        progress = tqdm(total=tc.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
    step = start_step
    while step < tc.max_steps:
        rho, n_eff = dc_schedule(dc, step) if is_dc else (0.0, dc.target_n)
        t_all, noise_all, drop_all = step_randomness(cfg.seed, step, G_batch, sample_shape, T_steps,
                                                     objective, p_drop)
        grad_norm = None
        for k in range(A):
            x, y = next(batches)
            rows = sampler.positions(step, k)
            sl = slice(rows.start - step * G_batch, rows.stop - step * G_batch)
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            t, noise = t_all[sl].to(accelerator.device), noise_all[sl].to(accelerator.device)
            if task.num_classes > 0:
                y = torch.where(drop_all[sl].to(y.device), torch.full_like(y, task.num_classes), y)
            else:
                y = None
            with accelerator.accumulate(model), accelerator.autocast():
                if teacher is not None and step >= distill_steps:
                    teacher = None  # distillation over: free the teacher's memory
                if teacher is not None:  # distillation warm-up
                    from .upcycle import distill_terms
                    terms, aux = distill_terms(objective, model, teacher, x, y, t=t, noise=noise,
                                               tail_drop=rho)
                else:
                    terms, aux = objective.training_losses(model, x, y, t=t, noise=noise, tail_drop=rho)
                loss_diff = terms["loss"].mean()
                loss = loss_diff
                if is_dc:
                    lr_ = torch.stack([ratio_loss(s.boundary_prob, s.boundary_mask_natural, n_eff,
                                                  dc.ratio_group_size) for s in aux]).mean()
                    loss = loss + dc.ratio_weight * lr_
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at step {step}; training stopped, the last "
                        f"good checkpoint is {latest_checkpoint(run_dir) or 'none (no checkpoint yet)'}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.grad_clip:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            stats.add(loss_diff, lr_ if is_dc else None, aux, t, T_steps)
        ema.update(raw)
        step += 1
        samples_since += G_batch
        if progress is not None:
            progress.update(1)

        # logging (rank-averaged)
        if step % tc.log_every == 0 or step == tc.max_steps:
            summary = stats.reduce(accelerator)
            dt = time.time() - t_last
            summary.update({"lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples_since / dt,
                            "rho": rho, "target_n": n_eff})
            if "tokens_kept_per_sample" in summary:
                summary["tokens_per_s"] = summary["samples_per_s"] * summary["tokens_kept_per_sample"]
            if grad_norm is not None:
                summary["grad_norm"] = float(grad_norm)
            if writer is not None:
                for key, val in summary.items():
                    writer.add_scalar(key if "/" in key else f"train/{key}", val, step)
                writer.flush()
                progress.set_postfix(loss=f"{summary['loss']:.4f}",
                                     kept=f"{summary.get('kept_fraction', 1.0):.2f}")
            t_last, samples_since = time.time(), 0

        if tc.sample_every and step % tc.sample_every == 0 and is_main:
            _preview(cfg, task, ema.model, objective, run_dir, step, writer)
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.max_steps:
            save_checkpoint(run_dir, step, raw, ema, optimizer,
                            {"data_position": step * G_batch, "world": world},
                            {}, accelerator, keep=tc.ckpt_keep)
            if is_main:
                export_model(ema.model, run_dir / "export",
                             extra={"task": OmegaConf.to_container(cfg.task, resolve=True),
                                    "objective": OmegaConf.to_container(cfg.objective, resolve=True),
                                    "step": step})
            _fault_after_checkpoint(step)

    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if return_model:
        return run_dir, raw, ema.model
    return run_dir


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

    def add(self, loss, ratio, aux, t, T):
        self.n += 1
        self._acc("loss", loss)
        if ratio is not None:
            self._acc("ratio_loss", ratio)
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
            tf = t.detach().double().to(kept.device) / (T if T > 1.5 else 1.0)
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
def _preview(cfg, task, model, objective, run_dir: Path, step: int, writer):
    """A few samples from the EMA weights, written by the task and logged to TensorBoard."""
    from .sample import generate
    out_dir = run_dir / "samples" / f"step_{step:08d}"
    s = cfg.sample
    result = generate(model, objective, task, num_samples=s.num_samples, steps=s.steps,
                      sampler=s.sampler, cfg_scale=s.cfg_scale, seed=cfg.seed, record=False)
    data = task.decode(result["samples"])
    task.write_samples(data, out_dir, labels=result["labels"])
    if writer is not None and data.dim() == 4 and data.shape[1] in (1, 3):
        grid_img = (data[:16].clamp(-1, 1) + 1) / 2
        writer.add_images("samples", grid_img, step)
