"""`python infer.py chat input_wav=... output_wav=...`: spoken dialogue from wav files.

Each file is streamed in 160 ms chunks as a live microphone would deliver them (plus 1.5 s of
silence after its end, as a microphone goes on listening) through one `DuplexModel` session
(the engine's `feed` / `generate`):
silero-vad opens user turns, the state head ends them (or drops them), and every answered turn
is spoken. The assistant's audio is laid on the input's timeline: an answer starts playing at
its state-1 decision (end of the chunk that fired, in input time) plus the measured time to its
first PCM, and a later answer cuts off an earlier one still playing (barge-in).

Writes, per input, the assistant track at 24 kHz (`output_wav`; with several inputs
`output_wav` is a folder of `<name>.answer.wav`), a stereo `<name>.dialogue.wav` (left the user,
right the assistant) and `<name>.json` (both sides' text, events, latencies); prints the
transcript and the latency breakdown (Table 4 rows: avg / p50 / p90 over every answer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from omegaconf import DictConfig

from datamodules.audio import AudioDecodeError, load_audio, resample, to_rate
from modules.config import ConfigError
from modules.speech_llm.model import CHUNK_SAMPLES
from server.engine import DuplexModel
from server.latency import LATENCY_ROWS, percentiles

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
TAIL_S = 1.5
INPUT_RATE, OUTPUT_RATE = 16000, 24000


def input_files(spec: str) -> list[Path]:
    """A file, a folder (its audio files, sorted) or several joined by commas."""
    files: list[Path] = []
    for part in [p for p in str(spec).split(",") if p.strip()]:
        path = Path(part.strip())
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise ConfigError(f"input_wav folder {path} holds no {'/'.join(AUDIO_SUFFIXES)} file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"input_wav {path} does not exist")
    if not files:
        raise ConfigError("input_wav is empty: give a file, a folder or a comma-separated list")
    return files


def read_input(path: Path) -> np.ndarray:
    """16 kHz mono float32 of any readable file (other rates are resampled, channels averaged)."""
    try:
        wav, sr = load_audio(str(path))
    except (AudioDecodeError, RuntimeError, OSError) as exn:
        raise ConfigError(f"cannot read {path} as audio: {exn}") from exn
    return to_rate(wav, sr, INPUT_RATE)


def with_listening_tail(wav: np.ndarray) -> np.ndarray:
    """The input followed by TAIL_S of silence (a microphone goes on listening after the speech)."""
    return np.concatenate([np.asarray(wav, np.float32), np.zeros(int(TAIL_S * INPUT_RATE), np.float32)])


def latency_table(answers: list[dict]) -> str:
    lines = [f"### Latency breakdown over {len(answers)} answers (ms; Table 4 rows)", "",
             "| step | avg | p50 | p90 |", "|---|---|---|---|"]  # fmt: skip
    for key, label in LATENCY_ROWS:
        s = percentiles([a["latency_ms"][key] for a in answers if a["latency_ms"]])
        cells = [f"{s[k]:.0f}" for k in ("avg", "p50", "p90")] if s["n"] else ["n/a"] * 3
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chat_file(model: DuplexModel, wav: np.ndarray) -> dict:
    """One file through a fresh session; returns events, turns, the assistant track (24 kHz)."""
    session = model.new_session()
    audio = with_listening_tail(wav)
    track = np.zeros(int(len(audio) / INPUT_RATE * OUTPUT_RATE), np.float32)
    turns, events, replies, playing_until = [], [], [], 0.0
    for i in range(0, len(audio), CHUNK_SAMPLES):
        for ev in model.feed(session, audio[i : i + CHUNK_SAMPLES]):
            t = round((ev.chunk + 1) * CHUNK_SAMPLES / INPUT_RATE, 2)
            events.append({"event": ev.kind, "t_s": t, "probs": ev.probs})
            if ev.kind != "answer":
                continue
            reply = model.generate(session)
            start = t + reply.latency_ms.get("total", 0.0) / 1000
            barge_in = playing_until > t
            if barge_in:  # the new answer cuts the old one off at its decision
                track[int(t * OUTPUT_RATE) :] = 0.0
            a = int(start * OUTPUT_RATE)
            if a + len(reply.audio) > len(track):
                track = np.concatenate([track, np.zeros(a + len(reply.audio) - len(track), np.float32)])
            track[a : a + len(reply.audio)] = reply.audio
            playing_until = start + len(reply.audio) / OUTPUT_RATE
            user = session.history[-2]["text"]
            turns.append({"decision_s": t, "user_heard": user, "assistant": reply.text, "segments": reply.segments,
                          "reply_tokens": reply.tokens, "audio_s": round(len(reply.audio) / OUTPUT_RATE, 2),
                          "barge_in": barge_in, "latency_ms": reply.latency_ms})  # fmt: skip
            replies.append(reply.audio)
    return {"events": events, "turns": turns, "track": track, "input": audio, "replies": replies}


def judge_turns(judge, turns: list[dict], replies: list[np.ndarray]) -> None:
    """Adds what the judge hears in each spoken reply and its WER against the reply's text."""
    from datamodules.transcripts import wer
    from modules.encoder.ctc import transcribe

    spoken = [(t, a) for t, a in zip(turns, replies) if len(a)]
    heard = transcribe(judge, [a for _, a in spoken], OUTPUT_RATE) if spoken else []
    for (t, _), h in zip(spoken, heard):
        t["judge_heard"], t["judge_wer"] = h, round(wer([h], [t["assistant"]]), 3)


def chat(cfg: DictConfig, input_wav: str, output_wav: str) -> dict:
    files = input_files(input_wav)
    inputs = {f: read_input(f) for f in files}  # every file is checked before any work
    out = Path(output_wav)
    several = len(files) > 1
    if several:
        out.mkdir(parents=True, exist_ok=True)
    elif out.parent:
        out.parent.mkdir(parents=True, exist_ok=True)
    model = DuplexModel.load(cfg, transcribe_user=True)  # the transcript prints what the user said
    from modules.encoder.ctc import trained_judge

    judge = trained_judge(cfg, "chat")  # what a listener hears in the spoken answers
    results, answers, lines = {}, [], []
    for f, wav in inputs.items():
        r = chat_file(model, wav)
        if judge is not None:
            judge_turns(judge, r["turns"], r["replies"])
        start = len(lines)
        target = out / f"{f.stem}.answer.wav" if several else out
        sf.write(target, r["track"], OUTPUT_RATE)
        user = resample(r["input"], INPUT_RATE, OUTPUT_RATE)
        n = max(len(user), len(r["track"]))
        stereo = np.zeros((n, 2), np.float32)
        stereo[: len(user), 0], stereo[: len(r["track"]), 1] = user, r["track"]
        base = target.with_name(target.name.removesuffix(".wav").removesuffix(".answer"))
        sf.write(f"{base}.dialogue.wav", stereo, OUTPUT_RATE)
        summary = {"input": str(f), "output": str(target), "events": r["events"], "turns": r["turns"]}
        Path(f"{base}.json").write_text(json.dumps(summary, indent=1) + "\n")
        lines.append(f"== {f} -> {target}")
        for t in r["turns"]:
            lat = t["latency_ms"].get("total")
            lines.append(f"  [{t['decision_s']:6.2f} s] user (heard): {t['user_heard']}")
            lines.append(f"  {'':10s} assistant: {t['assistant']}   ({t['audio_s']} s of speech, first PCM after "
                  f"{lat:.0f} ms{', barge-in' if t['barge_in'] else ''})" if lat is not None else
                  f"  {'':10s} assistant: {t['assistant']}   (no speech)")  # fmt: skip
            if "judge_heard" in t:
                lines.append(f"  {'':10s} judge heard: {t['judge_heard']}   (WER {100 * t['judge_wer']:.0f}%)")
        dropped = [e for e in r["events"] if e["event"] in ("drop", "vad_timeout")]
        if dropped:
            lines.append("  turns dropped: " + ", ".join(f"{e['event']} at {e['t_s']} s" for e in dropped))
        results[str(f)] = summary
        answers += r["turns"]
        print("\n".join(lines[start:]))
    table = latency_table(answers)
    print(table)
    # The transcript and the table, also as a file (`make demo` prints it again at the end).
    report = out / "chat.md" if several else out.with_suffix(".md")
    report.write_text("\n".join([*lines, table]) + "\n")
    return {"files": results, "latency_table": table, "answers": len(answers), "report": str(report)}
