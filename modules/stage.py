"""What every stage shares: freezing, trainable-only checkpoints, the Trainer, the LR schedule,
and the one way a stage runs (`STAGES`, `run_stage`).

A component LightningModule subclasses `StageModule` and names its components
(`components()`); the stage config's `trainable` list decides which ones train. Frozen
components get `requires_grad_(False)` and stay in eval mode, even after Lightning calls
`.train()`. A checkpoint keeps only trainable weights plus the resolved run config.

Every stage goes through `run_stage`: build the module -> load the outputs of `init_from` ->
freeze -> prepare (checks, caches, recordings) -> data -> fit -> (rank zero) save the stage output,
measure, write metrics.json. A stage is declared by a `StageSpec` in its component's module
(`STAGE_SPECS`); `STAGES` lists the stages in the chain's order and imports a component only
when its spec is asked for, so this module imports no component.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from modules.config import OptimConfig, run_dir, save_config, to_container

log = logging.getLogger(__name__)


class StageModule(L.LightningModule):
    """Base class of the component LightningModules."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.run_config: dict = to_container(cfg)  # what checkpoints store
        # Frozen weights are absent from our checkpoints; `on_load_checkpoint` checks the rest.
        self.strict_loading = False

    def components(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    # --- freezing -------------------------------------------------------------------------
    def apply_freezing(self, trainable: list[str]) -> dict[str, dict[str, int]]:
        """Train exactly the components named in `trainable`; return per-component counts."""
        comps = self.components()
        unknown = sorted(set(trainable) - set(comps))
        if unknown:
            raise ValueError(f"stage.trainable names unknown components {unknown}; this module has {sorted(comps)}")
        counts = {}
        for name, comp in comps.items():
            train = name in trainable
            comp.requires_grad_(train)
            if not train:
                comp.eval()
            n = sum(p.numel() for p in comp.parameters())
            counts[name] = {"trainable": n if train else 0, "frozen": 0 if train else n}
        self._frozen = [n for n in comps if n not in trainable]
        for name, c in counts.items():
            log.info("%-16s trainable %12s  frozen %12s", name, f"{c['trainable']:,}", f"{c['frozen']:,}")
        return counts

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            comps = self.components()
            for name in getattr(self, "_frozen", []):
                comps[name].eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters plus the buffers of trainable components (e.g. CMVN stats)."""
        keep = {id(p) for p in self.parameters() if p.requires_grad}
        frozen = set(getattr(self, "_frozen", []))
        for name, comp in self.components().items():
            if name not in frozen:
                keep |= {id(b) for b in comp.buffers()}
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if id(v) in keep}

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["run_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = self.state_dict()
        theirs = checkpoint["state_dict"]
        unexpected = sorted(set(theirs) - set(own))
        if unexpected:
            raise ValueError(f"checkpoint has weights this module lacks: {unexpected[:5]}")
        bad = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in theirs.items()
            if v.shape != own[k].shape
        ]
        if bad:
            raise ValueError("checkpoint and model sizes disagree:\n  " + "\n  ".join(bad[:10]))
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(theirs))
        if missing:
            raise ValueError(f"checkpoint lacks trainable weights {missing[:5]} (from another stage?)")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not biases, norms or 1-d parameters."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: nn.Module, optim: OptimConfig, max_steps: int) -> dict:
    """AdamW with linear warm-up and cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    opt = torch.optim.AdamW(param_groups(module, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas))

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def apply_num_threads(cfg: DictConfig) -> None:
    """torch.set_num_threads(trainer.num_threads) when set (0 leaves torch's default)."""
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)


def native_bf16(accelerator: str) -> bool:
    """Whether the device the run trains on computes bf16 in hardware: a CUDA GPU that supports
    it, or a CPU with AMX or AVX512-BF16. Elsewhere (e.g. an AVX2-only CPU) torch emulates bf16
    matmuls, and a bf16-mixed step is many times slower than fp32 (README: Benchmarks).
    A CPU whose ATen kernels are held to AVX2 or less (`ATEN_CPU_CAPABILITY=avx2`, e.g. to time the
    recipe as an AVX2 machine runs it) counts as one without."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_precision(precision: str, accelerator: str) -> str:
    """`trainer.precision`, with `auto` made concrete: bf16-mixed where `native_bf16`, else 32-true.
    An explicit bf16 precision on hardware without native bf16 runs, with a warning."""
    fast = native_bf16(accelerator)
    if precision == "auto":
        return "bf16-mixed" if fast else "32-true"
    if precision.startswith("bf16") and not fast:
        log.warning(
            "trainer.precision=%s on hardware without native bf16: torch emulates it, which can make a "
            "step many times slower than 32-true (trainer.precision=auto picks the faster one)",
            precision,
        )
    return precision


def build_trainer(cfg: DictConfig, monitor: str = "val/loss", manual_optimization: bool = False) -> L.Trainer:
    """A Trainer logging to runs/<exp>/<stage>/tb and checkpointing to .../checkpoints.

    With `manual_optimization` (a module that steps its optimizers itself, e.g. a GAN) the module
    clips its own gradients: Lightning refuses `gradient_clip_val` there.
    """
    t = cfg.trainer
    apply_num_threads(cfg)
    precision = resolve_precision(t.precision, t.accelerator)
    log.info("precision: %s%s", precision, " (trainer.precision=auto)" if t.precision == "auto" else "")
    out = run_dir(cfg)
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode="min",
        save_top_k=1,
        save_last=True,
    )
    callbacks: list = [ckpt, LearningRateMonitor(logging_interval="step")]
    if t.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,  # streaming data has no epochs: validate every N steps
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=None if manual_optimization else t.gradient_clip_val,
        accumulate_grad_batches=1 if manual_optimization else t.accumulate_grad_batches,
        logger=TensorBoardLogger(save_dir=str(out), name="tb", version=""),
        callbacks=callbacks,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        default_root_dir=str(out),
    )


# Settings a resumed run may change (more steps, other threads or logging; where runs live).
RESUMABLE_CHANGES = ("trainer", "resume", "run_root", "eval", "stages")


def fit(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule) -> L.Trainer:
    """Save the resolved config, then train; resume from last.ckpt when `cfg.resume`.

    A run only resumes with the settings it was started with (`trainer.*` aside, e.g. more
    steps): a changed recipe raises, naming the settings, instead of continuing the old run.
    """
    out = run_dir(cfg)
    last = out / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if cfg.resume and last.is_file() else None
    if ckpt_path and (out / "config.yaml").is_file():
        theirs = to_container(OmegaConf.load(out / "config.yaml"))
        ours = to_container(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)))  # as saved: tuples are lists
        sections = [k for k in set(theirs) | set(ours) if k not in RESUMABLE_CHANGES]
        diff = config_differences(theirs, ours, sections=sections)
        if diff:
            raise ValueError(
                f"{last} was written by a run with other settings (theirs -> ours):\n  "
                + "\n  ".join(diff[:12])
                + f"\nresume=false starts stage '{cfg.stage.name}' over (replacing that run), or undo the changes to continue it"
            )
    save_config(cfg, out / "config.yaml")
    trainer = build_trainer(cfg, manual_optimization=not module.automatic_optimization)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def write_metrics(cfg: DictConfig, metrics: dict[str, Any], stage: str | None = None) -> Path:
    """Merge `metrics` into runs/<exp>/<stage>/metrics.json."""
    path = run_dir(cfg, stage) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **metrics}, indent=2) + "\n")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our checkpoints safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --- stage outputs: what a later stage starts from --------------------------------------------
STAGE_OUTPUT = "model.pt"


def save_stage_output(cfg: DictConfig, module: StageModule, extras: dict[str, str] | None = None) -> Path:
    """runs/<exp>/<stage>/model.pt: the trained (trainable) weights, the resolved config and
    `extras` (strings a later stage needs, e.g. the CTC units)."""
    path = run_dir(cfg) / STAGE_OUTPUT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.trainable_state_dict(), "run_config": module.run_config, **(extras or {})}, path)
    return path


def read_stage_output(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The model.pt written by `stage` (of `cfg`'s experiment and variant)."""
    path = run_dir(cfg, stage) / STAGE_OUTPUT
    if not path.is_file():
        raise FileNotFoundError(
            f"stage '{cfg.stage.name}' needs the output of '{stage}', but {path} does not exist; run "
            f"`python train.py stage={stage} experiment={cfg.experiment}"
            + (f" stage.variant={cfg.stage.variant}`" if cfg.stage.variant else "`")
            + " first"
        )
    return read_checkpoint(path)


def load_stage_outputs(cfg: DictConfig, module: nn.Module, stages: list[str] | None = None) -> list[str]:
    """Copy the weights saved by the `stages` (default `cfg.stage.init_from`) into `module`.

    See `load_saved_weights`. Returns the names of the tensors loaded.
    """
    loaded: list[str] = []
    for stage in cfg.stage.init_from if stages is None else stages:
        loaded += load_saved_weights(cfg, module, stage, read_stage_output(cfg, stage))
    return loaded


def load_saved_weights(
    cfg: DictConfig, module: nn.Module, stage: str, saved: dict[str, Any], leave_out: tuple[str, ...] | None = None
) -> list[str]:
    """Copy the weights of `saved` (the output of `stage`, see `read_stage_output`) into `module`.

    Saved components the module lacks (e.g. the CTC head after stage 1) are left out; with
    `leave_out`, only the saved top-level parts it names may be (e.g. the codec's training-only
    discriminators), and any other tensor the module lacks is an error. Every kept tensor must
    exist in `module` with the same shape; otherwise the error names the tensor, both shapes and
    the config values that differ between the two runs.
    """
    own = module.state_dict()
    present = {k.split(".")[0] for k in own}
    skip = (lambda top: top not in present) if leave_out is None else (lambda top: top in leave_out)
    theirs = {k: v for k, v in saved["state_dict"].items() if not skip(k.split(".")[0])}
    left = len(saved["state_dict"]) - len(theirs)
    if left:
        log.info("left out %d saved tensors of parts this module does not build", left)
    unknown = sorted(set(theirs) - set(own))
    bad = [
        f"{k}: {stage} saved {tuple(v.shape)}, this model has {tuple(own[k].shape)}"
        for k, v in theirs.items()
        if k in own and v.shape != own[k].shape
    ]
    path = run_dir(cfg, stage) / STAGE_OUTPUT
    if unknown or bad:
        diff = config_differences(saved.get("run_config", {}), to_container(cfg))
        raise ValueError(
            f"{path} does not fit stage '{cfg.stage.name}':\n  "
            + "\n  ".join(bad[:8] + [f"{k}: not in this model" for k in unknown[:5]])
            + ("\nconfig values that differ (theirs -> ours):\n  " + "\n  ".join(diff) if diff else "")
        )
    for k, v in theirs.items():
        own[k].copy_(v)
    log.info("loaded %d tensors from %s", len(theirs), path)
    return list(theirs)


def config_differences(
    theirs: dict,
    ours: dict,
    prefix: str = "",
    sections=("encoder", "adapter", "ctc", "llm", "speech_llm", "codec", "speech_decoder"),
) -> list[str]:
    """'encoder.d_model: 144 -> 192' for the component settings that differ."""
    out: list[str] = []
    for key in sorted(set(theirs) | set(ours)):
        if not prefix and key not in sections:
            continue
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


# --- running a stage --------------------------------------------------------------------------
@dataclass
class StageRun:
    """One run of a stage, as `run_stage` hands it to the hooks of its `StageSpec`."""

    cfg: DictConfig
    module: StageModule
    loaded: list[str] = field(default_factory=list)  # tensors copied from the outputs of `init_from`
    # What the prepare hook leaves for the data hook (e.g. recorded LLM states).
    prepared: dict[str, Any] = field(default_factory=dict)
    # Measures known before training (e.g. data counts, model size); they go into metrics.json.
    metrics: dict[str, Any] = field(default_factory=dict)
    trainer: L.Trainer | None = None


def save_output(run: StageRun) -> None:
    """The default stage output: runs/<exp>/<stage>/model.pt with the trainable weights."""
    save_stage_output(run.cfg, run.module)


def validation_metrics(run: StageRun) -> dict[str, float]:
    """The last validation measures of the fit ("val/..." keys)."""
    return {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.startswith("val/")}


@dataclass(frozen=True)
class StageSpec:
    """How one stage trains. `run_stage` calls, in order: `build(cfg)`, loads `stage.init_from`,
    freezes per `stage.trainable`, `prepare(run)`, `data(run)`, fits, then on rank zero `save(run)`
    and `evaluate(run)` (measures merged into metrics.json)."""

    build: Callable[[DictConfig], StageModule]  # the module, before any saved weights are loaded
    data: Callable[[StageRun], L.LightningDataModule]
    prepare: Callable[[StageRun], None] | None = None  # work before fit: checks, caches, recordings
    evaluate: Callable[[StageRun], dict[str, Any]] | None = None  # measures after fit (rank zero)
    save: Callable[[StageRun], None] = save_output  # the stage output a later stage starts from (rank zero)


class StageRegistry(Mapping[str, StageSpec]):
    """Stage name -> `StageSpec`, in the chain's order.

    A spec is declared in its component's module as `STAGE_SPECS[name]`; that module is imported
    the first time the spec is asked for (names and order need no import).
    """

    def __init__(self, declared_in: dict[str, str]):
        self._declared_in = dict(declared_in)

    def __getitem__(self, name: str) -> StageSpec:
        if name not in self._declared_in:
            raise KeyError(f"unknown stage '{name}'; stages: {', '.join(self._declared_in)}")
        specs = importlib.import_module(self._declared_in[name]).STAGE_SPECS
        if name not in specs:
            raise KeyError(f"{self._declared_in[name]}.STAGE_SPECS declares no stage '{name}'")
        return specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._declared_in

    def __iter__(self) -> Iterator[str]:
        return iter(self._declared_in)

    def __len__(self) -> int:
        return len(self._declared_in)


STAGES = StageRegistry(
    {
        "llm_text": "modules.llm.stand_in",
        "input_1_ctc": "modules.encoder.ctc",
        "judge": "modules.encoder.ctc",
        "input_2_align": "modules.speech_llm.model",
        "input_3_prompt": "modules.speech_llm.model",
        "input_4_state": "modules.state_classifier",
        "output_1_codec": "modules.codec.stage",
        "output_2_decoder": "modules.speech_decoder.stage",
        "output_3_prefix": "modules.speech_decoder.stage",
    }
)


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Train stage `cfg.stage.name` (resuming per `cfg.resume`) and return its metrics, which rank
    zero also writes to runs/<exp>/<stage>/metrics.json: the per-component parameter counts, the
    steps trained, the measures the prepare hook left in `run.metrics` and the evaluate hook's measures."""
    spec = STAGES[cfg.stage.name]
    L.seed_everything(cfg.seed, workers=True)
    run = StageRun(cfg, spec.build(cfg))
    run.loaded = load_stage_outputs(cfg, run.module)
    counts = run.module.apply_freezing(list(cfg.stage.trainable))
    if spec.prepare is not None:
        spec.prepare(run)
    run.trainer = fit(cfg, run.module, spec.data(run))
    metrics = {"component_params": counts, "train_steps": run.trainer.global_step, **run.metrics}
    if run.trainer.global_rank == 0:
        spec.save(run)
        if spec.evaluate is not None:
            metrics.update(spec.evaluate(run))
        write_metrics(cfg, metrics)
    return metrics
