"""Inference and evaluation entry point (subcommands).

python infer.py eval_text_qa experiment=tiny [llm.path=DIR] [eval.limit=N]
    Text QA accuracy of a causal LM on the held-out test dialogues. Writes
    runs/<exp>/llm_text/metrics.json (text_qa_accuracy).
python infer.py eval_asr experiment=tiny [eval.variants=[...]] [eval.limit=N]
    Table 1: ASR WER of CTC and LLM decoding at chunk = full and the streaming chunk, for the
    main chain and the dynamic-chunk variant. Writes runs/<exp>/eval/asr.{json,md}.
python infer.py eval_spoken_qa experiment=tiny [eval.limit=N]
    Table 3: spoken QA through the streaming input path vs the frozen LLM on the question
    text. Writes runs/<exp>/eval/spoken_qa.{json,md}.
python infer.py eval_input experiment=tiny
    Both tables.
python infer.py eval_questions experiment=tiny [eval.limit=N]
    How the stage-1 CTC hears the spoken QA test questions (a Table-3 diagnostic): exact match
    and WER per question family at the streaming chunk size, the most frequent misses. Writes
    runs/<exp>/eval/questions.{json,md}.
python infer.py chat experiment=tiny input_wav=FILE|DIR|A,B output_wav=OUT [duplex.key=value]
    Spoken dialogue: streams each file in 160 ms chunks through one session (VAD, state
    classifier, answer text + speech), writes the assistant track at 24 kHz, a stereo dialogue
    wav and a JSON, prints both sides' text and the latency breakdown (server/chat.py).
python infer.py eval_dialogue experiment=tiny [eval.limit=N]
    Spoken QA end to end through the duplex pipeline: speech -> speech, speech -> text and
    text -> text accuracy, answered share, latency breakdown, the state classifier's report
    -> runs/<exp>/eval/dialogue.{md,json} (evaluation/dialogue.py).
python infer.py eval_state experiment=tiny [eval.limit=N]
    State classifier (stage input_4_state) on the test turns: precision/recall, endpoint delay,
    false answers -> runs/<exp>/eval/state.{md,json}
python infer.py eval_judge experiment=tiny [eval.limit=N]
    The intelligibility judge (stage `judge`) on eSpeak's ground truth: its WER floor per voice
    group (assistant voice, held-out user voices) -> runs/<exp>/eval/judge.{json,md}.
python infer.py eval_codec experiment=tiny [eval.limit=N]
    The codec's reconstructions of the TTS test split: log-mel distance, SI-SNR, codebook use,
    and the CTC judge's WER on original vs reconstructed audio. Writes runs/<exp>/eval/codec.{json,md}.
python infer.py eval_speech_output experiment=tiny [eval.speech_output_turns=N] [eval.top_ks=[...]]
    Table 2: WER of the CTC judge on the decoder's speech of the LLM's test replies, with and
    without prefix and pre-network, over top-k. Writes runs/<exp>/eval/speech_output.{json,md}.
python infer.py report experiment=tiny [--readme]
    The headline numbers of every evaluation run so far (null for the rest) ->
    runs/<exp>/report.{json,md}; --readme also rewrites README.md's results block from the
    report.md of demo and tiny (evaluation/report.py).
"""

from __future__ import annotations

import json
import sys

from modules.config import ConfigError, load_config, run_cli


def _threads(cfg):
    """Honour trainer.num_threads (e.g. 1 per evaluation when two run side by side)."""
    from modules.stage import apply_num_threads

    apply_num_threads(cfg)
    return cfg


def eval_text_qa(argv: list[str]) -> dict:
    from modules.llm.stand_in import evaluate
    from modules.stage import write_metrics

    cfg = load_config(argv, stage="llm_text")
    metrics = evaluate(cfg)
    path = write_metrics(cfg, metrics, stage="llm_text")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    print(f"written to {path}")
    return metrics


def eval_asr(argv: list[str]) -> dict:
    from evaluation.asr import evaluate_asr

    return evaluate_asr(_threads(load_config(argv, stage="input_2_align")))


def eval_spoken_qa(argv: list[str]) -> dict:
    from evaluation.spoken_qa import evaluate_spoken_qa

    return evaluate_spoken_qa(_threads(load_config(argv, stage="input_3_prompt")))


def eval_questions(argv: list[str]) -> dict:
    from evaluation.spoken_qa import evaluate_question_hearing

    return evaluate_question_hearing(_threads(load_config(argv, stage="input_1_ctc")))


def eval_input(argv: list[str]) -> dict:
    return {"asr": eval_asr(argv), "spoken_qa": eval_spoken_qa(argv)}


def eval_state(argv: list[str]) -> dict:
    from evaluation.state import evaluate_state

    return evaluate_state(_threads(load_config(argv, stage="input_4_state")))


def chat(argv: list[str]) -> dict:
    from server.chat import chat as run_chat

    paths = {k: v for k, _, v in (a.partition("=") for a in argv if a.split("=", 1)[0] in ("input_wav", "output_wav"))}
    missing = [k for k in ("input_wav", "output_wav") if not paths.get(k)]
    if missing:
        raise ConfigError(f"chat needs {' and '.join(f'{k}=...' for k in missing)}")
    rest = [a for a in argv if a.split("=", 1)[0] not in paths]
    return run_chat(_threads(load_config(rest, stage="input_4_state")), paths["input_wav"], paths["output_wav"])


def eval_dialogue(argv: list[str]) -> dict:
    from evaluation.dialogue import evaluate_dialogue

    return evaluate_dialogue(_threads(load_config(argv, stage="input_4_state")))


def eval_judge(argv: list[str]) -> dict:
    from evaluation.judge import evaluate_judge

    return evaluate_judge(_threads(load_config(argv, stage="judge")))


def eval_codec(argv: list[str]) -> dict:
    from evaluation.codec import report_codec

    return report_codec(_threads(load_config(argv, stage="output_1_codec")))


def eval_speech_output(argv: list[str]) -> dict:
    from evaluation.speech_output import evaluate_speech_output

    return evaluate_speech_output(_threads(load_config(argv, stage="output_3_prefix")))


def report(argv: list[str]) -> dict:
    from evaluation.report import main as write_report

    return write_report(argv)


COMMANDS = {
    "eval_text_qa": eval_text_qa,
    "eval_asr": eval_asr,
    "eval_spoken_qa": eval_spoken_qa,
    "eval_input": eval_input,
    "eval_questions": eval_questions,
    "eval_state": eval_state,
    "chat": chat,
    "eval_dialogue": eval_dialogue,
    "eval_judge": eval_judge,
    "eval_codec": eval_codec,
    "eval_speech_output": eval_speech_output,
    "report": report,
}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"usage: python infer.py <command> [key=value ...]; commands: {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    run_cli(main, error_prefix="error")
