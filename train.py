"""Train one stage, or the whole chain, of the Freeze-Omni recipe.

    python train.py stage=<stage> experiment=<exp> [group=<choice>] [a.b=value ...]
    python train.py stage=all experiment=tiny        # every stage of the chain, in order

Each stage writes runs/<experiment>/<stage>/: config.yaml (resolved), checkpoints/,
tb/ (TensorBoard) and metrics.json. `main` returns the stage's metrics, so tests call it.
"""

from __future__ import annotations

import importlib
import sys

import lightning as L

from modules.config import ConfigError, load_config, run_cli

# stage name -> module whose `run(cfg) -> dict` trains it. The order is the chain's.
STAGES = {
    "llm_text": "modules.llm.stand_in",
    "input_1_ctc": "modules.encoder.ctc",
    "input_2_align": "modules.speech_llm.model",
    "input_3_prompt": "modules.speech_llm.model",
    "input_4_state": "modules.state_classifier",
    "output_1_codec": "modules.codec.stage",
    "output_2_decoder": "modules.speech_decoder.stage",
    "output_3_prefix": "modules.speech_decoder.stage",
}


def run_stage(argv: list[str]) -> dict:
    cfg = load_config(argv)
    L.seed_everything(cfg.seed, workers=True)
    runner = importlib.import_module(STAGES[cfg.stage.name])
    return runner.run(cfg)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a.split("=", 1)[1] for a in argv if a.startswith("stage=")), None)
    if stage == "all":
        rest = [a for a in argv if not a.startswith("stage=")]
        return {name: run_stage([f"stage={name}", *rest]) for name in STAGES}
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}, all")
    return run_stage(argv)


if __name__ == "__main__":
    run_cli(main)
