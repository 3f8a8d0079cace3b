"""Generate, once, the frozen LLM's answers to the *text* of the spoken-QA training questions.

    python -m tools.make_llm_answers experiment=tiny [llm.path=DIR] [key=value ...]

Stage input_3_prompt teaches the prompt vectors to make the LLM answer a spoken question the
way it answers the same question in text, so its targets are the LLM's own replies, not the
corpus's reference answers (the paper did the same). Each dialogue is answered turn by turn,
with the LLM's own earlier replies in the context, in greedy decoding. Reads the question
text from the spoken-QA shards' JSON (no audio is decoded) and writes
`<speech_llm.answers_dir>/{train,dev}.jsonl` ({"id", "replies"}) plus `meta.json` naming the
LLM; a later call with the same LLM and shards reuses them.
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
