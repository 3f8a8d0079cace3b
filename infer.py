"""Inference and evaluation entry point (subcommands).

python infer.py eval_text_qa experiment=tiny [llm.path=DIR] [eval.limit=N]
    Text QA accuracy of a causal LM on the held-out test dialogues: the "text" row of
    the paper's Table 3. Writes runs/<exp>/llm_text/metrics.json (text_qa_accuracy).
"""

from __future__ import annotations

import json
import logging
import sys

from modules.config import ConfigError, load_config


def eval_text_qa(argv: list[str]) -> dict:
    from modules.text_llm import evaluate
    from modules.training import write_metrics

    cfg = load_config(argv, stage="llm_text")
    metrics = evaluate(cfg)
    path = write_metrics(cfg, metrics, stage="llm_text")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    print(f"written to {path}")
    return metrics


COMMANDS = {"eval_text_qa": eval_text_qa}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"usage: python infer.py <command> [key=value ...]; commands: {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
