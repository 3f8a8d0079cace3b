"""Config loading: OmegaConf, Hydra-style group folders, strict keys.

    python train.py stage=<stage> experiment=<exp> [group=<choice> ...] [a.b=value ...]

Composition order (later wins):
    schema defaults (`RunConfig`) <- configs/{model,data,trainer}/<choice>.yaml
    <- configs/stage/<stage>.yaml <- configs/experiment/<exp>.yaml (its body)
    <- the experiment's `stages.<stage>` block <- command-line `a.b=value` overrides.

A stage file says what the stage is (`stage.trainable`, `stage.init_from`, its data and losses);
an experiment holds each stage's budgets (`optim`, `trainer`) in one `stages.<stage>` block, and
a block for a stage that has no file in configs/stage/ is an error naming the stages.

An experiment file names its group choices in `defaults:` (e.g. `model: tiny`); the
command line can change them (`trainer=gpu`). Every key anywhere is checked against the
dataclass schema: an unknown key is an error naming the valid keys (and the closest one),
an unknown group choice an error listing the files of that folder.
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.asr import ASRDataConfig
from datamodules.corpus.layout import CorpusConfig
from datamodules.corpus.turns import TurnsDataConfig
from datamodules.spoken_qa import SpokenQADataConfig
from datamodules.text_qa import TextQADataConfig
from datamodules.tts import TTSDataConfig
from modules.adapter import AdapterConfig
from modules.codec.network import CodecConfig
from modules.encoder.network import CTCConfig, EncoderConfig
from modules.llm.hf import LLMConfig
from modules.speech_decoder.network import SpeechDecoderConfig
from modules.speech_llm.embeddings import SpeechLLMConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "data", "trainer")
SELECTORS = ("stage", "experiment")


class ConfigError(ValueError):
    """A config that cannot be composed; the message says what to change."""


def run_cli(main: Callable[[], object], error_prefix: str = "config error") -> None:
    """Entry point of a `key=value` command: INFO logging, and a ConfigError exits with its message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except ConfigError as e:
        sys.exit(f"{error_prefix}: {e}")


@dataclass
class StageConfig:
    name: str = "???"
    # Components whose parameters this stage trains; every other one is frozen (eval mode).
    trainable: list[str] = field(default_factory=list)
    # Stages whose outputs this stage starts from, in order.
    init_from: list[str] = field(default_factory=list)
    # A named alternative of the chain (e.g. `static` for encoders trained without dynamic
    # chunks): outputs go to runs/<exp>/<stage>-<variant>/ and `init_from` reads the same variant
    # unless an entry names another as <stage>@<variant> (`input_1_ctc@`: the main chain).
    variant: str = ""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio at trainer.max_steps


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    # Lightning's precision names, or `auto`: bf16-mixed where the hardware computes bf16 natively
    # (a CUDA GPU, a CPU with AMX / AVX512-BF16), else 32-true (`modules.stage.resolve_precision`).
    precision: str = "32-true"
    max_steps: int = 1000
    val_check_interval: int = 200
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 20
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1
    num_threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    enable_progress_bar: bool = True


@dataclass
class DataConfig:
    asr: ASRDataConfig = field(default_factory=ASRDataConfig)
    spoken_qa: SpokenQADataConfig = field(default_factory=SpokenQADataConfig)
    text_qa: TextQADataConfig = field(default_factory=TextQADataConfig)
    tts: TTSDataConfig = field(default_factory=TTSDataConfig)
    # The TTS shards with codec tokens (tools.write_codec_tokens writes them after output_1_codec).
    tts_codes: TTSDataConfig = field(default_factory=TTSDataConfig)
    turns: TurnsDataConfig = field(default_factory=TurnsDataConfig)  # user turns for the state classifier


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_new_tokens: int = 64
    limit: int = 0  # evaluate only the first N dialogues (utterances for ASR); 0 = all
    # Chains compared in the ASR table: "" = the main one, others = stage.variant names.
    variants: list[str] = field(default_factory=lambda: ["", "dynamic"])
    # Table 2: replies of the LLM to the test questions that the decoder speaks, and its top-k values
    speech_output_turns: int = 100
    # Table 2 speaks each reply segment by segment as the duplex engine does (duplex.segment_*:
    # at sentence ends, and commas in the first segment), joining their audio; false: whole replies
    speech_output_segments: bool = True
    # Decoder chains in Table 2: "" = the main one (with the pre-network), "nopre" = without it.
    decoder_variants: list[str] = field(default_factory=lambda: ["nopre", ""])
    top_ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])


@dataclass
class DuplexConfig:
    """The `duplex:` block: the streaming dialogue pipeline (server/engine.py; reference section 9
    has the release's values)."""

    vad_threshold: float = 0.5  # silero speech probability that opens a turn (release: 0.8)
    preroll_chunks: int = 6  # 960 ms of audio before the VAD fired go into the turn (release: 6)
    vad_end_chunks: int = 13  # ~2 s without speech drops a turn the state head never ended (release: 2 s)
    segment_min_tokens: int = 4  # text segmenting (release: 4 tokens, commas for the first segment ...)
    segment_comma_after: int = 20  # ... or once a segment has 20 tokens
    # false: segments end only at full stops (. ? ! newline), whole sentences as the decoder
    # learnt them, at the cost of waiting for the first sentence's end (release: true)
    segment_clauses: bool = True
    first_chunk_tokens: int = 20  # token FIFO: first window of an answer (release: 20)
    chunk_tokens: int = 40  # later windows (release: 40)
    context_tokens: int = 10  # context on each side of a window (release: 10)
    # A segment's speech stops after 20 + this many codec tokens per character of its text (the
    # assistant speaks ~2.7 tokens per character): an undertrained decoder that never says EOS
    # would otherwise run to speech_decoder.max_tokens (25 s) on every segment.
    max_tokens_per_char: float = 6.0


@dataclass
class RunConfig:
    experiment: str = "???"
    seed: int = 1234
    run_root: str = "runs"
    resume: bool = True  # continue from runs/<exp>/<stage>/checkpoints/last.ckpt when present
    # Group choices actually used, recorded for the saved config.
    defaults: dict[str, str] = field(default_factory=dict)
    stage: StageConfig = field(default_factory=StageConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    ctc: CTCConfig = field(default_factory=CTCConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    speech_llm: SpeechLLMConfig = field(default_factory=SpeechLLMConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    speech_decoder: SpeechDecoderConfig = field(default_factory=SpeechDecoderConfig)
    duplex: DuplexConfig = field(default_factory=DuplexConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _choices(folder: str, config_dir: Path) -> list[str]:
    return sorted(p.stem for p in (config_dir / folder).glob("*.yaml"))


def _read_choice(folder: str, choice: str, config_dir: Path) -> DictConfig:
    path = config_dir / folder / f"{choice}.yaml"
    if not path.is_file():
        available = ", ".join(_choices(folder, config_dir)) or "(none)"
        raise ConfigError(f"unknown {folder} '{choice}': {config_dir / folder} has {available}")
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping, not a {type(loaded).__name__}")
    return loaded


def _read_experiment(name: str, config_dir: Path, seen: tuple[str, ...] = ()) -> DictConfig:
    """An experiment file; `extends: <parent>` merges it over the parent experiment first."""
    if name in seen:
        raise ConfigError(f"experiment files extend each other in a loop: {' -> '.join([*seen, name])}")
    cfg = _read_choice("experiment", name, config_dir)
    parent = cfg.pop("extends", None)
    if parent is None:
        return cfg
    return OmegaConf.merge(_read_experiment(str(parent), config_dir, (*seen, name)), cfg)  # type: ignore[return-value]


def _check_keys(schema: DictConfig, update: Any, where: str, prefix: str = "") -> None:
    """Raise ConfigError at the first key of `update` that `schema` does not have."""
    if not isinstance(update, DictConfig | dict):
        return
    for key in update:
        # Nodes, not values: values would resolve interpolations before the merge.
        value = update._get_node(key) if isinstance(update, DictConfig) else update[key]
        dotted = f"{prefix}{key}"
        if not isinstance(schema, DictConfig) or key not in schema.keys():  # noqa: SIM118 (`in` hides ??? values)
            valid = sorted(str(k) for k in schema) if isinstance(schema, DictConfig) else []
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{dotted}' (in {where}).{hint} "
                f"Valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}"
            )
        child = schema._get_node(key)
        # Free-form dicts (e.g. `defaults`) take any key; dataclass nodes are checked deeper.
        if isinstance(child, DictConfig) and child._metadata.object_type not in (None, dict):
            _check_keys(child, value, where, f"{dotted}.")


def _merge(base: DictConfig, update: DictConfig | dict, where: str) -> DictConfig:
    _check_keys(base, update, where)
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value in {where}: {e}") from None


def parse_overrides(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into selector/group choices and dotted overrides."""
    selected: dict[str, str] = {}
    dotted: list[str] = []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got '{arg}'")
        key, value = arg.split("=", 1)
        if key in SELECTORS or key in GROUPS:
            selected[key] = value
        else:
            dotted.append(arg)
    return selected, dotted


def load_config(argv: list[str] | None = None, config_dir: Path = CONFIG_DIR, **choices: str) -> DictConfig:
    """Compose, validate and return the run config (a structured DictConfig).

    `argv` holds `key=value` strings; keyword arguments are the same for code callers
    (`load_config(stage="llm_text", experiment="tiny")`).
    """
    selected, dotted = parse_overrides(list(argv or []))
    selected = {**choices, **selected}
    for key in SELECTORS:
        if key not in selected:
            raise ConfigError(f"missing {key}=<name>; choices: {', '.join(_choices(key, config_dir))}")
    stage, experiment = selected["stage"], selected["experiment"]
    exp_cfg = _read_experiment(experiment, config_dir)
    stage_cfg = _read_choice("stage", stage, config_dir)

    exp_defaults = exp_cfg.pop("defaults", OmegaConf.create({}))
    per_stage = exp_cfg.pop("stages", OmegaConf.create({}))
    stage_names = _choices("stage", config_dir)
    unknown_blocks = sorted(str(k) for k in per_stage if k not in stage_names)
    if unknown_blocks:
        raise ConfigError(
            f"experiment '{experiment}' has blocks for unknown stages {unknown_blocks} under `stages:`; "
            f"stages: {', '.join(stage_names)}"
        )
    unknown_groups = set(exp_defaults.keys()) - set(GROUPS)
    if unknown_groups:
        raise ConfigError(
            f"experiment '{experiment}' defaults name unknown groups {sorted(unknown_groups)}; groups: {', '.join(GROUPS)}"
        )
    group_choice = {g: str(exp_defaults[g]) for g in GROUPS if g in exp_defaults}
    group_choice.update({g: selected[g] for g in GROUPS if g in selected})

    cfg = OmegaConf.structured(RunConfig)
    for group in GROUPS:
        if group in group_choice:
            cfg = _merge(
                cfg, _read_choice(group, group_choice[group], config_dir), f"configs/{group}/{group_choice[group]}.yaml"
            )
    cfg = _merge(cfg, stage_cfg, f"configs/stage/{stage}.yaml")
    cfg = _merge(cfg, exp_cfg, f"configs/experiment/{experiment}.yaml")
    if stage in per_stage:
        cfg = _merge(cfg, per_stage[stage], f"configs/experiment/{experiment}.yaml: stages.{stage}")
    try:
        cli = OmegaConf.from_dotlist(dotted)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {dotted}: {e}") from None
    cfg = _merge(cfg, cli, "the command line")
    cfg.experiment = experiment
    cfg.stage.name = stage
    cfg.defaults = group_choice
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config values still missing (???): {', '.join(missing)}")
    return cfg


def saved_config(run_config: dict) -> DictConfig:
    """The structured config of a checkpoint's `run_config` (what a stage was trained with)."""
    return _merge(OmegaConf.structured(RunConfig), run_config, "the saved run config")


def run_dir(cfg: DictConfig, stage: str | None = None) -> Path:
    """runs/<experiment>/<stage>[-<variant>]/: config, checkpoints, TensorBoard logs, metrics.json.

    `stage` may name another variant as `<stage>@<variant>` (`input_1_ctc@` is the main one).
    """
    name, variant = (stage or cfg.stage.name), cfg.stage.variant
    if "@" in name:
        name, variant = name.split("@", 1)
    return Path(cfg.run_root) / cfg.experiment / (f"{name}-{variant}" if variant else name)


def eval_dir(cfg: DictConfig) -> Path:
    """runs/<experiment>/eval/: the tables (Markdown + JSON) and benchmark results; created."""
    out = Path(cfg.run_root) / cfg.experiment / "eval"
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def to_container(cfg: DictConfig | ListConfig) -> Any:
    """Plain Python containers (what checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True)
