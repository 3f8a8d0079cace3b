"""Build the offline synthetic speech corpus (ASR utterances + spoken-QA questions) with eSpeak NG.

Usage::

    python -m tools.make_corpus --out data/tiny --seed 1234 [--n-asr 3000] [--workers 2]

Layout written under ``--out``::

    audio/asr/<split>/<id>.flac          one ASR utterance (22050 Hz, PCM_16 FLAC)
    audio/qa/<split>/<id>-t<k>.flac      the spoken question of turn k (0-based) of a QA dialogue
    manifests/asr_<split>.jsonl          {"id","audio","text","speaker","language","duration","sample_rate","split"}
                                         (asr_train also lists every spoken question of qa_train, see below)
    manifests/qa_<split>.jsonl           {"id","speaker","language","split","turns":[{..., "audio","duration","sample_rate"}]}
    audio/tts/<split>/<id>.flac          speech output: one text in the fixed assistant voice, at 24 kHz
    manifests/tts_<split>.jsonl          {"id","audio","text","speaker":"assistant","language","duration","sample_rate","split"}
    audio/turns/<split>/<id>.flac        a user turn for the state classifier (22050 Hz): speech, noise
                                         and silence pieces (`datamodules.corpus.turns`)
    manifests/turns_<split>.jsonl        {"id","audio","text","kind","label","sounds":[[start_s,end_s],...],
                                         "end" (end of the last sound, s),"speaker","language","duration",...}
    manifests/voices.json                the voices of each split and the assistant voice
    corpus_stats.json                    utterances, hours and voices per split

Splits are by speaker: dev/test utterances and dialogues only use dev/test voices, which never
occur in training. Everything is a deterministic function of the seed: the same seed gives
byte-identical manifests whatever the number of workers (the eSpeak driver makes each utterance
depend only on its text and voice, and outputs are sorted by id). Speech-input audio is written at
eSpeak's native 22050 Hz (resampling is left to the feature pipeline); the TTS split, the codec's
and the speech decoder's data, is resampled once to the codec's 24 kHz (`datamodules.audio.resample`).

The TTS split speaks, in the assistant voice, templated sentences (`--n-tts`, 80/10/10) plus the
reference answers of the QA dialogues of the same split (the first `TTS_QA_DIALOGUES`), so the
speech decoder learns the answers' words ("counting back from twelve: eleven, ten").

The turns split (`--n-turns`, 80/10/10, in the voices of each split) teaches the state classifier
when a user turn is over and whether it asks for an answer: questions (some with a pause in the
middle), backchannels, fillers, noise and statements not addressed to the assistant.

The ASR training manifest also lists the spoken questions of the QA training dialogues (their
audio, with the question as transcript), as a general-domain ASR corpus covers questions: the
templated ASR sentences alone miss a fifth of the words of the QA test questions ("plus",
"animals", "bigger", ...), and an encoder that never heard them cannot pass them to the LLM.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from datamodules.audio import OUTPUT_SAMPLE_RATE, resample
from datamodules.corpus.sentences import generate_sentences
from datamodules.corpus.turns import assemble_turn, plan_turns
from datamodules.corpus.voices import ASSISTANT_VOICE, SPLITS, Voice, build_voices, voices_to_json

# Share of the ASR utterances that go to dev and to test (the rest is train).
ASR_HELDOUT_FRACTION = {"dev": 0.1, "test": 0.1}
LANGUAGE = "en"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")

QABuilder = Callable[[int], dict[str, list[dict]]]

# One synthesis job: (key, text, voice as a dict, absolute output path, output sample rate or 0 for
# eSpeak's own). Plain tuples pickle fast.
Job = tuple[str, str, dict[str, Any], str, int]


# --- Worker side ---------------------------------------------------------------------------------
_TTS: Any = None  # the worker process's ESpeak instance (one per process: the library is global)


def _init_worker() -> None:
    """Pool initializer: load eSpeak once in this worker process."""
    global _TTS
    from datamodules.corpus.espeak import ESpeak

    _TTS = ESpeak()


def _synthesize_job(job: Job) -> tuple[str, int, int]:
    """Synthesize one utterance (resampled if the job asks), write it as 16-bit FLAC; return
    ``(key, n_samples, sample_rate)``."""
    key, text, voice, path, rate = job
    if _TTS is None:
        _init_worker()
    audio = _TTS.synthesize(text, Voice.from_dict(voice))
    rate = rate or _TTS.sample_rate
    audio = resample(audio, _TTS.sample_rate, rate)
    return key, _write_pcm16(path, audio, rate), int(rate)


def _write_pcm16(path: str, audio: np.ndarray, rate: int) -> int:
    # eSpeak produces int16 samples; convert back exactly instead of letting libsndfile rescale.
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
    sf.write(path, pcm, rate, format="FLAC", subtype="PCM_16")
    return int(pcm.shape[0])


def _synthesize_turn_job(job: tuple) -> tuple[str, int, int, list]:
    """A user turn for the state classifier (`datamodules.corpus.turns`): pieces of speech, silence and
    noise in one voice at eSpeak's rate; returns ``(key, n_samples, sample_rate, sound spans)``."""
    key, pieces, voice, path = job
    if _TTS is None:
        _init_worker()
    v = Voice.from_dict(voice)
    audio, spans = assemble_turn(pieces, lambda text: _TTS.synthesize(text, v), _TTS.sample_rate, key)
    return key, _write_pcm16(path, audio, _TTS.sample_rate), int(_TTS.sample_rate), spans


def _run_jobs(jobs: Sequence, workers: int, progress: bool, fn: Callable = _synthesize_job) -> dict[str, tuple]:
    """Run ``fn`` on all jobs (in a process pool when ``workers > 1``); return ``{key: fn(job)[1:]}``
    (``(n_samples, sr)`` for synthesis jobs)."""
    results: dict[str, tuple] = {}
    bar = tqdm(total=len(jobs), desc="synthesizing", unit="utt", disable=not progress, smoothing=0.05)
    try:
        if workers <= 1 or len(jobs) < 2:
            _init_worker()
            for key, *rest in map(fn, jobs):
                results[key] = tuple(rest)
                bar.update()
            return results
        # "spawn" rather than fork: the caller may have torch (threads) or eSpeak already loaded.
        ctx = mp.get_context("spawn")
        chunksize = max(1, min(64, len(jobs) // (workers * 16)))
        with ctx.Pool(processes=workers, initializer=_init_worker) as pool:
            # Completion order does not matter: results are keyed and sorted afterwards.
            for key, *rest in pool.imap_unordered(fn, jobs, chunksize=chunksize):
                results[key] = tuple(rest)
                bar.update()
        return results
    finally:
        bar.close()


# --- Corpus planning -----------------------------------------------------------------------------
def _split_sizes(n: int) -> dict[str, int]:
    """Split ``n`` utterances roughly 80/10/10 into train/dev/test."""
    dev = round(n * ASR_HELDOUT_FRACTION["dev"])
    test = round(n * ASR_HELDOUT_FRACTION["test"])
    return {"train": n - dev - test, "dev": dev, "test": test}


def _balanced_assignment(voices: Sequence[Voice], n: int, rng: random.Random) -> list[Voice]:
    """``n`` voices with (almost) equal use of each voice, in random order."""
    if n and not voices:
        raise ValueError("no voices to assign")
    assigned = [voices[i % len(voices)] for i in range(n)]
    rng.shuffle(assigned)
    return assigned


def _plan_asr(seed: int, n_asr: int, voices: dict[str, list[Voice]]) -> dict[str, list[dict[str, Any]]]:
    """ASR utterances per split: ``{"id", "text", "voice"}`` (transcripts are distinct across splits)."""
    rng = random.Random(f"asr:{seed}")
    sentences = generate_sentences(n_asr, rng)
    plan: dict[str, list[dict[str, Any]]] = {}
    start = 0
    for split, size in _split_sizes(n_asr).items():
        texts = sentences[start : start + size]
        start += size
        assigned = _balanced_assignment(voices[split], size, rng)
        plan[split] = [
            {"id": f"asr-{split}-{i:06d}", "text": text, "voice": voice}
            for i, (text, voice) in enumerate(zip(texts, assigned))
        ]
    return plan


def _plan_qa(seed: int, voices: dict[str, list[Voice]], qa_builder: QABuilder) -> dict[str, list[dict[str, Any]]]:
    """QA dialogues per split, each with one user voice of the same split."""
    dialogues = qa_builder(seed)
    missing = [s for s in SPLITS if s not in dialogues]
    if missing:
        raise ValueError(f"the QA builder returned no {missing} split(s); got keys {sorted(dialogues)}")
    rng = random.Random(f"qa-voices:{seed}")
    plan: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for split in SPLITS:
        items = dialogues[split]
        assigned = _balanced_assignment(voices[split], len(items), rng)
        plan[split] = []
        for dialogue, voice in zip(items, assigned):
            did = str(dialogue["id"])
            if not _SAFE_ID.match(did) or did in seen:
                raise ValueError(f"QA dialogue id {did!r} is not a unique file-name-safe id")
            seen.add(did)
            if not dialogue.get("turns"):
                raise ValueError(f"QA dialogue {did!r} has no turns")
            plan[split].append({"id": did, "turns": dialogue["turns"], "voice": voice})
    return plan


# --- Writing -------------------------------------------------------------------------------------
# The TTS split speaks the answers of the first 1,200 QA dialogues of a split (all of the default
# corpus's): a corpus with more QA dialogues (`prepare_corpus --qa-train`) keeps the assistant
# voice's 2.6 h of training speech and its build time.
TTS_QA_DIALOGUES = 1200


def _plan_tts(
    seed: int, n_tts: int, qa_plan: dict[str, list[dict[str, Any]]], max_dialogues: int = TTS_QA_DIALOGUES
) -> dict[str, list[dict[str, Any]]]:
    """TTS texts per split: ``n_tts`` sentences (80/10/10) + the reference answers of the split's
    first ``max_dialogues`` QA dialogues."""
    rng = random.Random(f"tts:{seed}")
    sentences = generate_sentences(n_tts, rng)
    plan: dict[str, list[dict[str, Any]]] = {}
    start = 0
    for split, size in _split_sizes(n_tts).items():
        rows = [{"id": f"tts-{split}-{i:06d}", "text": t} for i, t in enumerate(sentences[start : start + size])]
        start += size
        dialogues = qa_plan.get(split, [])[:max_dialogues]
        answers = [(d["id"], k, t["answer"]) for d in dialogues for k, t in enumerate(d["turns"])]
        rows += [{"id": f"tts-{did}-t{k}", "text": str(text)} for did, k, text in answers]
        plan[split] = rows
    return plan


def _plan_turns(
    seed: int, n_turns: int, voices: dict[str, list[Voice]], qa_plan: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """State-classifier turns per split (`datamodules.corpus.turns.plan_turns`, 80/10/10), in the split's
    voices: the split's QA questions (templated questions without QA) and new statements."""
    rng = random.Random(f"turns:{seed}")
    sentences = generate_sentences(max(200, n_turns), rng)
    statements = [t for t in sentences if t.endswith(".")]
    templated_questions = [t for t in sentences if t.endswith("?")]
    plan: dict[str, list[dict[str, Any]]] = {}
    for split, size in _split_sizes(n_turns).items():
        questions = [str(t["question"]) for d in qa_plan.get(split, []) for t in d["turns"]] or templated_questions
        turns = plan_turns(size, questions, statements, rng)
        assigned = _balanced_assignment(voices[split], size, rng)
        plan[split] = [
            {**t, "id": f"turn-{split}-{i:06d}", "voice": v} for i, (t, v) in enumerate(zip(turns, assigned))
        ]
    return plan


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _hours(seconds: float) -> float:
    return round(seconds / 3600.0, 4)


def make_corpus(
    out_dir: str | Path,
    seed: int = 1234,
    n_asr: int = 3000,
    workers: int = 2,
    *,
    n_tts: int = 1500,
    n_turns: int = 2600,
    include_qa: bool = True,
    questions_in_asr: bool = True,
    qa_builder: QABuilder | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Synthesize the corpus into ``out_dir`` and return its statistics.

    ``qa_builder(seed) -> {"train"|"dev"|"test": [dialogue, ...]}`` defaults to
    ``datamodules.corpus.qa.build_qa_splits`` (imported only when needed); ``include_qa=False`` skips the
    spoken-QA part; ``questions_in_asr=False`` keeps the QA training questions out of the ASR
    training manifest; ``n_tts=0`` with ``include_qa=False`` leaves the TTS split empty. Existing
    ``audio/{asr,qa,tts}`` folders under ``out_dir`` are replaced.
    The returned dict is the content of ``corpus_stats.json`` plus ``elapsed_s`` (wall time).
    """
    t0 = time.perf_counter()
    if n_asr < 0:
        raise ValueError(f"n_asr must be >= 0, got {n_asr}")
    out = Path(out_dir)
    voices = build_voices(seed)

    asr_plan = _plan_asr(seed, n_asr, voices)
    qa_plan: dict[str, list[dict[str, Any]]] = {}
    if include_qa:
        if qa_builder is None:
            from datamodules.corpus.qa import build_qa_splits  # lazy: heavy/optional dependency

            qa_builder = build_qa_splits
        qa_plan = _plan_qa(seed, voices, qa_builder)

    tts_plan = _plan_tts(seed, n_tts, qa_plan)
    turns_plan = _plan_turns(seed, n_turns, voices, qa_plan)

    # Fresh audio folders so that no stale file from an earlier, larger run survives.
    for kind in ("asr", "qa", "tts", "turns"):
        shutil.rmtree(out / "audio" / kind, ignore_errors=True)
        for split in SPLITS:
            (out / "audio" / kind / split).mkdir(parents=True, exist_ok=True)
    (out / "manifests").mkdir(parents=True, exist_ok=True)

    jobs: list[Job] = []
    for split, utts in asr_plan.items():
        for u in utts:
            rel = f"audio/asr/{split}/{u['id']}.flac"
            u["audio"] = rel
            jobs.append((rel, u["text"], u["voice"].to_dict(), str(out / rel), 0))
    for split, dialogues in qa_plan.items():
        for d in dialogues:
            d["audio"] = []
            for k, turn in enumerate(d["turns"]):
                rel = f"audio/qa/{split}/{d['id']}-t{k}.flac"
                d["audio"].append(rel)
                jobs.append((rel, str(turn["question"]), d["voice"].to_dict(), str(out / rel), 0))
    assistant = ASSISTANT_VOICE.to_dict()
    for split, rows in tts_plan.items():
        for r in rows:
            r["audio"] = f"audio/tts/{split}/{r['id']}.flac"
            jobs.append((r["audio"], r["text"], assistant, str(out / r["audio"]), OUTPUT_SAMPLE_RATE))

    results = _run_jobs(jobs, workers, progress)
    turn_jobs = []
    for split, rows in turns_plan.items():
        for r in rows:
            r["audio"] = f"audio/turns/{split}/{r['id']}.flac"
            turn_jobs.append((r["audio"], r["pieces"], r["voice"].to_dict(), str(out / r["audio"])))
    turn_results = _run_jobs(turn_jobs, workers, progress, fn=_synthesize_turn_job)
    rates = {sr for rel, (_, sr) in results.items() if not rel.startswith("audio/tts/")}
    if len(rates) > 1:
        raise RuntimeError(f"inconsistent sample rates across workers: {sorted(rates)}")
    sample_rate = rates.pop() if rates else 0

    def duration(rel: str) -> float:
        n, sr = results[rel]
        return round(n / sr, 4)

    def asr_row(uid: str, rel: str, text: str, voice: Voice, split: str) -> dict[str, Any]:
        return {
            "id": uid,
            "audio": rel,
            "text": text,
            "speaker": voice.voice_id,
            "language": LANGUAGE,
            "duration": duration(rel),
            "sample_rate": sample_rate,
            "split": split,
        }

    stats: dict[str, Any] = {"seed": seed, "sample_rate": sample_rate, "asr": {}, "qa": {}, "tts": {}, "turns": {}}
    for split in SPLITS:
        rows = [asr_row(u["id"], u["audio"], u["text"], u["voice"], split) for u in asr_plan[split]]
        if split == "train" and include_qa and questions_in_asr:
            rows += [
                asr_row(f"asr-{Path(rel).stem}", rel, str(turn["question"]), d["voice"], split)
                for d in qa_plan[split]
                for turn, rel in zip(d["turns"], d["audio"])
            ]
        rows.sort(key=lambda r: r["id"])
        _write_jsonl(out / "manifests" / f"asr_{split}.jsonl", rows)
        stats["asr"][split] = {
            "utterances": len(rows),
            "hours": _hours(sum(r["duration"] for r in rows)),
            "voices": len({r["speaker"] for r in rows}),
        }

        tts_rows = [
            {"id": r["id"], "audio": r["audio"], "text": r["text"], "speaker": ASSISTANT_VOICE.voice_id,
             "language": LANGUAGE, "duration": duration(r["audio"]), "sample_rate": OUTPUT_SAMPLE_RATE, "split": split}
            for r in sorted(tts_plan[split], key=lambda r: r["id"])
        ]  # fmt: skip
        _write_jsonl(out / "manifests" / f"tts_{split}.jsonl", tts_rows)
        stats["tts"][split] = {
            "utterances": len(tts_rows),
            "hours": _hours(sum(r["duration"] for r in tts_rows)),
            "voices": 1 if tts_rows else 0,
        }

        turn_rows = []
        for r in turns_plan[split]:
            n, sr, sounds = turn_results[r["audio"]]
            lead = r["pieces"][0][1]
            turn_rows.append({
                "id": r["id"], "audio": r["audio"], "text": r["text"], "kind": r["kind"], "label": r["label"],
                "sounds": sounds, "end": sounds[-1][1] if sounds else lead, "speaker": r["voice"].voice_id,
                "language": LANGUAGE, "duration": round(n / sr, 4), "sample_rate": sr, "split": split,
            })  # fmt: skip
        _write_jsonl(out / "manifests" / f"turns_{split}.jsonl", turn_rows)
        stats["turns"][split] = {
            "utterances": len(turn_rows),
            "hours": _hours(sum(r["duration"] for r in turn_rows)),
            "voices": len({r["speaker"] for r in turn_rows}),
            "kinds": {k: sum(r["kind"] == k for r in turn_rows) for k in sorted({r["kind"] for r in turn_rows})},
        }

        if not include_qa:
            continue
        dialogue_rows = []
        for d in sorted(qa_plan[split], key=lambda d: d["id"]):
            turns = []
            for turn, rel in zip(d["turns"], d["audio"]):
                # Keep every field of the QA turn (question, answer, gold, family, ...).
                turns.append({**turn, "audio": rel, "duration": duration(rel), "sample_rate": sample_rate})
            dialogue_rows.append(
                {"id": d["id"], "speaker": d["voice"].voice_id, "language": LANGUAGE, "split": split, "turns": turns}
            )
        _write_jsonl(out / "manifests" / f"qa_{split}.jsonl", dialogue_rows)
        stats["qa"][split] = {
            "dialogues": len(dialogue_rows),
            "utterances": sum(len(d["turns"]) for d in dialogue_rows),
            "hours": _hours(sum(t["duration"] for d in dialogue_rows for t in d["turns"])),
            "voices": len({d["speaker"] for d in dialogue_rows}),
        }

    stats["total"] = {
        "utterances": len(jobs) + len(turn_jobs),
        "hours": _hours(sum(r[0] / r[1] for r in (*results.values(), *turn_results.values()))),
        "voices": sum(len(v) for v in voices.values()),
    }
    _write_json(out / "manifests" / "voices.json", voices_to_json(voices))
    _write_json(out / "corpus_stats.json", stats)
    return {**stats, "elapsed_s": round(time.perf_counter() - t0, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory, e.g. data/tiny")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--n-asr", type=int, default=3000, help="number of ASR utterances")
    parser.add_argument("--n-tts", type=int, default=1500, help="TTS sentences (besides the QA answers)")
    parser.add_argument("--n-turns", type=int, default=2600, help="user turns for the state classifier")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes (1 = no pool)")
    parser.add_argument("--no-qa", action="store_true", help="skip the spoken-QA dialogues")
    parser.add_argument(
        "--no-questions-in-asr", action="store_true", help="keep the QA training questions out of asr_train"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    stats = make_corpus(
        args.out,
        seed=args.seed,
        n_asr=args.n_asr,
        workers=args.workers,
        n_tts=args.n_tts,
        n_turns=args.n_turns,
        include_qa=not args.no_qa,
        questions_in_asr=not args.no_questions_in_asr,
        progress=not args.quiet,
    )
    for part in ("asr", "qa", "tts", "turns"):
        for split, s in stats[part].items():
            print(
                f"{part:3s} {split:5s}: {s['utterances']:6d} utterances, {s['hours']:7.3f} h, {s['voices']:2d} voices",
                file=sys.stderr,
            )
    print(f"wrote {args.out} in {stats['elapsed_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
