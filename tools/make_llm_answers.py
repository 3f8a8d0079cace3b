"""Generate, once, the frozen LLM's answers to the *text* of the spoken-QA training questions.

    python -m tools.make_llm_answers experiment=tiny [llm.path=DIR] [key=value ...]

What they are for, how they are made and where they go: `modules.llm.answers`.
"""

from __future__ import annotations

import logging
import sys

from modules.config import load_config, run_cli
from modules.llm.answers import make_llm_answers
from modules.stage import apply_num_threads

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv, stage="input_3_prompt")
    apply_num_threads(cfg)  # e.g. 1, beside a training run on the other core
    print(f"answers written to {make_llm_answers(cfg)}")


if __name__ == "__main__":
    run_cli(main)
