"""Tests for the eSpeak NG driver, the voice inventory, the sentence generator and make_corpus."""

from __future__ import annotations

import json
import random
import re
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datamodules.corpus.espeak import ESpeak
from datamodules.corpus.sentences import MAX_WORDS, MIN_WORDS, generate_sentences
from datamodules.corpus.voices import ASSISTANT_VOICE, Voice, build_voices
from tools.make_corpus import _plan_tts, make_corpus

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tts() -> ESpeak:
    return ESpeak()


def test_two_voices_give_different_audio(tts: ESpeak) -> None:
    assert tts.sample_rate == 22050
    a = tts.synthesize(TEXT, Voice("a", "en-us", "m1", rate_wpm=170, pitch=45))
    b = tts.synthesize(TEXT, Voice("b", "en-gb-scotland", "f3", rate_wpm=150, pitch=60))
    for audio in (a, b):
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert 0.5 * tts.sample_rate < audio.shape[0] < 10 * tts.sample_rate
        assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.05
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_synthesis_is_deterministic(tts: ESpeak) -> None:
    # f3 is a "breathy" variant (random noise): covers the noise generator being reseeded.
    voice = Voice("v", "en-gb-x-rp", "f3", rate_wpm=160, pitch=55)
    first = tts.synthesize(TEXT, voice)
    tts.synthesize("Something else in between, to disturb any internal state.", ASSISTANT_VOICE)
    second = tts.synthesize(TEXT, voice)
    assert np.array_equal(first, second)


def test_silence_is_trimmed(tts: ESpeak) -> None:
    audio = tts.synthesize("Hello.", ASSISTANT_VOICE)
    edge = int(0.15 * tts.sample_rate)  # at most ~80 ms of silence is kept at each end
    assert np.abs(audio[:edge]).max() > 0.01
    assert np.abs(audio[-edge:]).max() > 0.01


def test_bad_inputs_raise_clear_errors(tts: ESpeak) -> None:
    with pytest.raises(ValueError, match=r"available variants include: .*f1"):
        tts.synthesize(TEXT, Voice("x", "en-us", "nosuchvariant"))
    with pytest.raises(ValueError, match="available English voices"):
        tts.synthesize(TEXT, Voice("x", "xx-yy", "m1"))
    with pytest.raises(ValueError, match="empty"):
        tts.synthesize("   ", ASSISTANT_VOICE)


def test_voice_splits_are_disjoint_and_deterministic() -> None:
    voices = build_voices(1234)
    assert voices == build_voices(1234)
    assert voices != build_voices(4321)
    assert sum(len(v) for v in voices.values()) >= 24
    assert len(voices["test"]) >= 4 and len(voices["dev"]) >= 4

    def config(v: Voice) -> tuple[str, str]:
        return (v.language, v.variant)

    seen = {config(v) for v in voices["train"]} | {config(v) for v in voices["dev"]}
    assert not seen & {config(v) for v in voices["test"]}
    assert not {config(v) for v in voices["train"]} & {config(v) for v in voices["dev"]}
    all_voices = [v for vs in voices.values() for v in vs]
    assert len({v.voice_id for v in all_voices}) == len(all_voices)
    assert config(ASSISTANT_VOICE) not in {config(v) for v in all_voices}
    # Both genders in every split; every voice is valid for the driver.
    for vs in voices.values():
        assert {v.gender for v in vs} == {"male", "female"}


def test_every_inventory_voice_is_valid(tts: ESpeak) -> None:
    for vs in build_voices(7).values():
        for v in vs:
            tts.check_voice(v)
    tts.check_voice(ASSISTANT_VOICE)


def test_sentences_say_every_word_the_fact_questions_ask_about() -> None:
    """The ASR training sentences carry the fact vocabulary (countries, coloured things, animals,
    opposites): an encoder that never heard "lemon" hears "eleven" in "What color is a lemon?"."""
    from datamodules.corpus.qa import FACTS

    sentences = generate_sentences(2400, random.Random("asr:1234"))  # the tiny corpus's train plan
    counts = Counter(w.strip(".,?!").lower() for s in sentences for w in s.split())
    heard = {subject.split()[-1].lower(): counts[subject.split()[-1].lower()] for _, subject, _ in FACTS}
    rare = {w: n for w, n in heard.items() if n < 3}
    assert not rare, f"fact words said fewer than 3 times in 2,400 sentences: {rare}"


def test_sentences_deterministic_without_digits() -> None:
    a = generate_sentences(400, random.Random(5))
    assert a == generate_sentences(400, random.Random(5))
    assert a != generate_sentences(400, random.Random(6))
    assert len(set(a)) == len(a)
    for s in a:
        assert not re.search(r"\d", s), s
        assert re.fullmatch(r"[A-Z][A-Za-z' ,.?!]*[.?!]", s), s
        assert MIN_WORDS <= len(s.split()) <= MAX_WORDS, s


def _fake_qa_splits(seed: int) -> dict[str, list[dict]]:
    """A tiny stand-in for datamodules.corpus.qa.build_qa_splits."""
    rng = random.Random(seed)

    def dialogue(split: str, i: int, n_turns: int) -> dict:
        turns = []
        for _ in range(n_turns):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            turns.append(
                {
                    "question": f"What is {['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][a]} plus one?",
                    "answer": f"It is {a + 1}.",
                    "gold": [str(a + 1)],
                    "family": "add" if b % 2 else "followup",
                }
            )
        return {"id": f"qa-{split}-{i:06d}", "turns": turns}

    return {
        "train": [dialogue("train", 0, 2), dialogue("train", 1, 1)],
        "dev": [dialogue("dev", 0, 1)],
        "test": [dialogue("test", 0, 3)],
    }


def _read_manifests(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "manifests").iterdir())}


def test_make_corpus_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default QA source is imported lazily from datamodules.corpus.qa: replace it with the fake.
    fake_module = types.ModuleType("datamodules.corpus.qa")
    fake_module.build_qa_splits = _fake_qa_splits  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datamodules.corpus.qa", fake_module)

    out1 = tmp_path / "c1"
    stats = make_corpus(out1, seed=11, n_asr=20, n_tts=10, n_turns=20, workers=2, progress=False)
    assert stats["asr"]["train"]["utterances"] == 16 + 3  # + the 3 spoken questions of qa_train
    assert stats["asr"]["dev"]["utterances"] == 2 and stats["asr"]["test"]["utterances"] == 2
    assert stats["qa"]["test"]["utterances"] == 3
    assert json.loads((out1 / "corpus_stats.json").read_text())["sample_rate"] == 22050

    voices = json.loads((out1 / "manifests" / "voices.json").read_text())
    split_voices = {s: {v["voice_id"] for v in voices[s]} for s in ("train", "dev", "test")}
    texts: dict[str, set[str]] = {}
    for split in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (out1 / "manifests" / f"asr_{split}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
        texts[split] = {r["text"] for r in rows}
        for r in rows:
            assert r["split"] == split and r["speaker"] in split_voices[split]
            info = sf.info(str(out1 / r["audio"]))
            assert info.samplerate == r["sample_rate"] == 22050
            assert abs(info.frames / info.samplerate - r["duration"]) < 1e-3
        dialogues = [json.loads(line) for line in (out1 / "manifests" / f"qa_{split}.jsonl").read_text().splitlines()]
        for d in dialogues:
            assert d["speaker"] in split_voices[split]
            for k, turn in enumerate(d["turns"]):
                assert turn["audio"] == f"audio/qa/{split}/{d['id']}-t{k}.flac"
                assert {"question", "answer", "gold", "family"} <= set(turn)
                frames = sf.info(str(out1 / turn["audio"])).frames
                assert abs(frames / 22050 - turn["duration"]) < 1e-3
    assert not texts["test"] & (texts["train"] | texts["dev"])
    train_rows = [json.loads(line) for line in (out1 / "manifests" / "asr_train.jsonl").read_text().splitlines()]
    qa_train = [json.loads(line) for line in (out1 / "manifests" / "qa_train.jsonl").read_text().splitlines()]
    questions = {(t["audio"], t["question"]) for d in qa_train for t in d["turns"]}
    assert questions <= {(r["audio"], r["text"]) for r in train_rows}
    assert not any(r["audio"].startswith("audio/qa/") for r in rows)  # the ASR test split stays sentences only

    # TTS: the assistant voice at 24 kHz speaks 8/1/1 sentences plus each split's QA answers.
    for split, n_sentences in (("train", 8), ("dev", 1), ("test", 1)):
        rows = [json.loads(line) for line in (out1 / "manifests" / f"tts_{split}.jsonl").read_text().splitlines()]
        answers = [t["answer"] for d in _fake_qa_splits(11)[split] for t in d["turns"]]
        assert len(rows) == n_sentences + len(answers) == stats["tts"][split]["utterances"]
        assert sorted(answers) == sorted(r["text"] for r in rows if not r["id"].startswith(f"tts-{split}-"))
        for r in rows:
            assert r["speaker"] == "assistant" and r["split"] == split
            info = sf.info(str(out1 / r["audio"]))
            assert info.samplerate == r["sample_rate"] == 24000
            assert abs(info.frames / info.samplerate - r["duration"]) < 1e-3

    # Turns (state classifier): 16/2/2 in the split's voices; questions come from the split's QA
    # dialogues; the pause of a paused question separates two sounds by at least 0.3 s.
    kinds = set()
    for split, n in (("train", 16), ("dev", 2), ("test", 2)):
        rows = [json.loads(line) for line in (out1 / "manifests" / f"turns_{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n == stats["turns"][split]["utterances"]
        split_questions = {t["question"] for d in _fake_qa_splits(11)[split] for t in d["turns"]}
        for r in rows:
            kinds.add(r["kind"])
            assert r["speaker"] in split_voices[split] and r["label"] == (1 if "question" in r["kind"] else 2)
            assert r["sounds"] and 0 < r["end"] == r["sounds"][-1][1] and r["duration"] - r["end"] >= 1.25
            assert abs(sf.info(str(out1 / r["audio"])).frames / 22050 - r["duration"]) < 1e-3
            if r["kind"] == "question":
                assert r["text"] in split_questions
            if r["kind"] == "paused_question":
                assert len(r["sounds"]) >= 2 and max(b[0] - a[1] for a, b in zip(r["sounds"], r["sounds"][1:])) >= 0.3
    assert {"question", "paused_question", "noise", "not_addressed"} <= kinds

    # Same seed, other worker count, explicit QA builder: byte-identical manifests.
    out2 = tmp_path / "c2"
    make_corpus(out2, seed=11, n_asr=20, n_tts=10, n_turns=20, workers=1, qa_builder=_fake_qa_splits, progress=False)
    assert _read_manifests(out1) == _read_manifests(out2)
    assert (out1 / "corpus_stats.json").read_bytes() == (out2 / "corpus_stats.json").read_bytes()

    out3 = tmp_path / "c3"
    stats3 = make_corpus(
        out3,
        seed=11,
        n_asr=20,
        n_tts=10,
        n_turns=0,
        workers=1,
        qa_builder=_fake_qa_splits,
        questions_in_asr=False,
        progress=False,
    )
    assert stats3["asr"]["train"]["utterances"] == 16


def test_tts_speaks_the_answers_of_the_first_dialogues_only() -> None:
    """The TTS split takes the answers of the first N QA dialogues of a split, in order."""
    qa = {"train": [{"id": f"d{i}", "turns": [{"answer": f"answer {i}.{k}"} for k in range(2)]} for i in range(5)]}
    plan = _plan_tts(7, 10, qa, max_dialogues=3)
    answers = [r for r in plan["train"] if not r["id"].startswith("tts-train-")]
    assert [r["id"] for r in answers] == [f"tts-d{i}-t{k}" for i in range(3) for k in range(2)]
    assert [r["text"] for r in answers] == [f"answer {i}.{k}" for i in range(3) for k in range(2)]
    assert len(plan["train"]) == 8 + 6 and plan["dev"] == _plan_tts(7, 10, qa)["dev"]


def test_prepare_corpus_refuses_a_qa_size_it_would_not_use(tmp_path: Path) -> None:
    from tools.prepare_corpus import prepare_corpus

    with pytest.raises(ValueError, match="qa_train=50 and qa_builder both set"):
        prepare_corpus(tmp_path / "c", qa_train=50, qa_builder=lambda seed: {}, progress=False)
    assert not (tmp_path / "c").exists()  # refused before anything was written
