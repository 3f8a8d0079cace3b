"""End-to-end spoken QA through the duplex pipeline (`infer.py eval_dialogue`).

Every test dialogue (unseen voices) is one `DuplexModel` session: each spoken question, followed
by 1.5 s of silence, is fed 160 ms at a time; silero-vad opens the turn and the state head
ends it (a turn it drops or never ends gets no answer and counts as wrong); the reply is
generated and spoken as in `infer.py chat`, with the conversation in the context. Three
accuracies, one checker (`datamodules.corpus.answers.check_answer`):

* speech in -> speech out: the reply's audio transcribed by the intelligibility judge (stage `judge`);
* speech in -> text out: the reply's text (the same replies);
* text in -> text out: the frozen LLM on the text of the same questions (Table 3's text row).

Also: the share of questions answered, the latency breakdown (Table 4 rows) over every answer,
and the state classifier's report on the test turns (`modules.state_classifier`). Writes
runs/<exp>/eval/dialogue.{json,md}.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from datamodules.corpus.answers import check_answer
from datamodules.spoken_qa import read_dialogues
from evaluation.spoken_qa import spoken_test_dialogues
from evaluation.state import evaluate_state
from modules.config import eval_dir
from modules.encoder.ctc import load_judge, transcribe
from modules.llm.generate import evaluate_text_qa
from modules.speech_llm.model import CHUNK_SAMPLES
from server.chat import OUTPUT_RATE, latency_table, with_listening_tail
from server.engine import DuplexModel


def dialogue_records(cfg: DictConfig, model: DuplexModel, judge, limit: int = 0) -> list[dict]:
    """One record per test turn; `judge` (`load_judge`) hears the replies' audio."""
    records = []
    for sample in spoken_test_dialogues(cfg, limit, "spoken dialogues (speech in, speech out)"):
        session = model.new_session()
        for k, turn in enumerate(sample["turns"]):
            wav = with_listening_tail(turn["wav"])
            reply, events = None, []
            for i in range(0, len(wav), CHUNK_SAMPLES):
                events += [e.kind for e in model.feed(session, wav[i : i + CHUNK_SAMPLES])]
                if session.mode == "answer":
                    reply = model.generate(session)
                    break
            if reply is None and session.mode == "listen":
                model.drop_turn(session)  # never decided within the silence after the question
            heard = ""
            if reply is not None and len(reply.audio):
                heard = transcribe(judge, [reply.audio], OUTPUT_RATE)[0]
            text = reply.text if reply is not None else ""
            records.append({
                "id": sample["key"], "turn": k, "question": turn["question"], "family": turn["family"],
                "gold": list(turn["gold"]), "events": events, "answered": reply is not None, "reply": text,
                "heard": heard, "text_correct": check_answer(text, turn["gold"]),
                "speech_correct": check_answer(heard, turn["gold"]),
                "latency_ms": reply.latency_ms if reply is not None else {},
            })  # fmt: skip
    return records


def evaluate_dialogue(cfg: DictConfig) -> dict:
    model = DuplexModel.load(cfg)
    limit = int(cfg.eval.limit)
    records = dialogue_records(cfg, model, load_judge(cfg), limit)
    dialogues = read_dialogues(cfg.data.spoken_qa.test_shards)[: limit or None]
    llm = model.llm
    text = evaluate_text_qa(
        llm.llm, llm.tokenizer, dialogues, cfg.eval.batch_size, llm.cfg.speech_llm.max_answer_tokens
    )
    state = evaluate_state(cfg, llm)  # the same loaded speech LLM
    n = len(records)
    result = {
        "dialogues": len({r["id"] for r in records}),
        "turns": n,
        "answered": sum(r["answered"] for r in records) / max(n, 1),
        "speech_to_speech_accuracy": sum(r["speech_correct"] for r in records) / max(n, 1),
        "speech_to_text_accuracy": sum(r["text_correct"] for r in records) / max(n, 1),
        "text_to_text_accuracy": text["accuracy"],
        "latency": latency_table([r for r in records if r["latency_ms"]]),
        "state_classifier": {
            k: state[k]
            for k in (
                "turns",
                "thresholds",
                "chunk",
                "turn",
                "endpoint_delay_ms",
                "answered_questions",
                "cut_in_rate",
                "false_answer_rate",
            )
        },
        "records": records,
    }
    table = "\n".join([
        f"### Spoken QA end to end through the duplex pipeline ({result['dialogues']} test dialogues, {n} turns, unseen voices)",
        "",
        "| input -> output | accuracy |",
        "|---|---|",
        f"| speech -> speech (the reply's audio, heard by the judge) | {result['speech_to_speech_accuracy']:.3f} |",
        f"| speech -> text (the same replies' text) | {result['speech_to_text_accuracy']:.3f} |",
        f"| text -> text (the frozen LLM on the questions' text) | {result['text_to_text_accuracy']:.3f} |",
        "",
        f"Questions answered (the state head ended the turn with 'answer'): {100 * result['answered']:.1f}%.",
        "",
        result["latency"],
    ])  # fmt: skip
    result["table"] = table
    out = eval_dir(cfg)
    (out / "dialogue.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "dialogue.md").write_text(table + "\n" + state["table"])
    print(table)
    return result
