import random

import pytest

from datamodules.corpus.answers import check_answer, normalize_answer
from datamodules.corpus.qa import FAMILIES, build_qa_splits, is_heldout, sample_dialogue


def test_splits_are_deterministic_and_sized():
    a = build_qa_splits(7, {"train": 50, "dev": 10, "test": 20})
    b = build_qa_splits(7, {"train": 50, "dev": 10, "test": 20})
    assert a == b
    assert {k: len(v) for k, v in a.items()} == {"train": 50, "dev": 10, "test": 20}
    assert build_qa_splits(8, {"test": 20}) != {"test": a["test"]}
    for dialogues in a.values():
        for d in dialogues:
            assert 1 <= len(d["turns"]) <= 3


def test_at_least_six_families_each_with_checkable_reference():
    splits = build_qa_splits(3, {"train": 400, "test": 200})
    seen = {t["family"] for d in splits["train"] for t in d["turns"]}
    assert set(FAMILIES) <= seen and len(FAMILIES) >= 6
    for d in splits["train"] + splits["test"]:
        for t in d["turns"]:
            assert check_answer(t["answer"], t["gold"]), t  # the reference answer passes the checker


def test_test_combinations_never_occur_in_training():
    seed = 11
    rng = random.Random(0)
    train_combos = {(t.family, t.combo) for _ in range(3000) for t in sample_dialogue(rng, seed, heldout=False)}
    test_combos = {(t.family, t.combo) for _ in range(300) for t in sample_dialogue(rng, seed, heldout=True)}
    assert test_combos and not (train_combos & test_combos)
    assert all(is_heldout(seed, f, c) for f, c in test_combos)
    # every family is represented among the held-out questions
    assert {f for f, _ in test_combos} >= set(FAMILIES)


def test_followups_use_the_previous_answer():
    splits = build_qa_splits(5, {"train": 300})
    followups = [
        (d["turns"][i - 1], d["turns"][i])
        for d in splits["train"]
        for i in range(1, len(d["turns"]))
        if d["turns"][i]["family"] == "followup"
    ]
    assert followups
    for prev, cur in followups:
        assert normalize_answer(prev["gold"][0])[0] in normalize_answer(cur["answer"])


def test_single_neighbour_facts_are_never_held_out():
    # "the month before February" is knowledge; "two months before February" a combination
    for family, n in (("weekday", 7), ("month", 12)):
        for i in range(n):
            for direction in ("after", "before"):
                assert not is_heldout(3, family, (i, 1, direction))
    assert any(is_heldout(s, "month", (i, 2, d)) for s in range(3) for i in range(12) for d in ("after", "before"))


def test_fact_paraphrases_keep_the_fact_and_stay_out_of_the_spoken_splits():
    from datamodules.corpus.qa import FACT_PARAPHRASES, FACTS, paraphrase_fact

    rng = random.Random(3)
    turns = [t for _ in range(300) for t in sample_dialogue(rng, 1234, heldout=False)]
    facts = [t for t in turns if t.family == "fact"]
    assert facts
    for t in facts:
        p = paraphrase_fact(rng, t)
        category, subject, _ = FACTS[t.combo[0]]
        assert (p.answer, p.gold, p.family, p.combo) == (t.answer, t.gold, t.family, t.combo)
        assert subject in p.question and p.question != t.question
        assert any(p.question.lower() == q.format(s=subject).lower() for q in FACT_PARAPHRASES[category])
    other = next(t for t in turns if t.family != "fact")
    assert paraphrase_fact(rng, other) is other
    # the spoken corpus (and so every held-out test) asks the three canonical phrasings only
    paraphrased = {q.format(s=s).lower() for c, s, _ in FACTS for q in FACT_PARAPHRASES[c]}
    splits = build_qa_splits(1234, {"train": 200, "dev": 50, "test": 50})
    asked = {t["question"].lower() for split in splits.values() for d in split for t in d["turns"]}
    assert not asked & paraphrased


def test_text_qa_stream_paraphrases_fact_questions(monkeypatch):
    import datamodules.text_qa as text_qa
    from datamodules.corpus.qa import FACT_PARAPHRASES

    seen = []  # the chats the stream would encode (no tokenizer needed to look at them)
    monkeypatch.setattr(text_qa, "encode_chat", lambda tok, messages, *a, **k: seen.append(messages) or ([], []))
    cfg = text_qa.TextQADataConfig(repeat_prob=0.0, sequence_prob=0.0, fact_paraphrase_prob=1.0)
    stream = text_qa.TextQAStream(None, cfg, qa_seed=1234, seed=0, transcripts=[])
    rng = random.Random(0)
    for _ in range(200):
        stream.example(rng)
    stems = {q.split("{s}")[0].lower() for qs in FACT_PARAPHRASES.values() for q in qs}
    questions = [m["content"].lower() for msgs in seen for m in msgs if m["role"] == "user"]
    fact_like = [q for q in questions if any(w in q for w in ("capital", "color", "legs", "opposite"))]
    assert fact_like and all(any(q.startswith(s) for s in stems) for q in fact_like)


def test_text_qa_stream_reads_held_out_combinations_only_when_asked(monkeypatch):
    import datamodules.text_qa as text_qa

    seen = []
    monkeypatch.setattr(text_qa, "encode_chat", lambda tok, messages, *a, **k: seen.append(messages) or ([], []))
    seed = 1234
    heldout_questions = {
        t["question"]
        for d in build_qa_splits(seed, {"test": 400})["test"]
        for t in d["turns"]
        if t["family"] != "followup"
    }

    def questions(combinations: str) -> set[str]:
        seen.clear()
        cfg = text_qa.TextQADataConfig(repeat_prob=0.0, sequence_prob=0.0, combinations=combinations)
        stream = text_qa.TextQAStream(None, cfg, qa_seed=seed, seed=0, transcripts=[])
        rng = random.Random(0)
        for _ in range(3000):
            stream.example(rng)
        return {m["content"] for msgs in seen for m in msgs if m["role"] == "user"}

    assert not questions("train") & heldout_questions  # the spoken corpus's training combinations only
    assert len(questions("all") & heldout_questions) > 20  # a pretrained LLM's knowledge: every combination
    with pytest.raises(ValueError, match="combinations must be one of"):
        text_qa.TextQAStream(None, text_qa.TextQADataConfig(combinations="test"), qa_seed=seed, seed=0, transcripts=[])
