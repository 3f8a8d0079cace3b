"""Train one stage, or the whole chain, of the Freeze-Omni recipe.

    python train.py stage=<stage> experiment=<exp> [group=<choice>] [a.b=value ...]
    python train.py stage=all experiment=tiny        # every stage of the chain, in order

Each stage writes runs/<experiment>/<stage>/: config.yaml (resolved), checkpoints/,
tb/ (TensorBoard) and metrics.json. `main` returns the stage's metrics (for `stage=all`, a dict
of them by stage), so tests call it.
"""

from __future__ import annotations

import sys

from modules.config import ConfigError, load_config, run_cli
from modules.stage import STAGES, run_stage


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a.split("=", 1)[1] for a in argv if a.startswith("stage=")), None)
    if stage == "all":
        rest = [a for a in argv if not a.startswith("stage=")]
        return {name: run_stage(load_config([f"stage={name}", *rest])) for name in STAGES}
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}, all")
    return run_stage(load_config(argv))


if __name__ == "__main__":
    run_cli(main)
