"""User turns for the state classifier: plans, assembly with sound spans, chunk labels."""

import random

import numpy as np

from datamodules.corpus.turns import (
    ANSWER,
    DROP,
    IGNORE,
    KIND_SHARES,
    LISTEN,
    PAUSE_S,
    TAIL_S,
    active_span,
    assemble_turn,
    chunk_labels,
    plan_turns,
)


def test_chunk_labels_listen_until_the_end_then_ignore_one_chunk():
    labels = chunk_labels(12, end_s=1.0, label=ANSWER)
    # chunk c decides at (c + 1) * 0.16 s: 0.16 .. 0.96 listen; 1.12 holds < 160 ms of silence
    assert labels.tolist() == [LISTEN] * 6 + [IGNORE] + [ANSWER] * 5
    assert chunk_labels(3, end_s=0.32, label=DROP).tolist() == [LISTEN, LISTEN, IGNORE]


def test_plan_has_every_kind_in_its_share_and_pauses_in_the_middle():
    questions = ["what is the colour of the small red ball", "how many legs does a spider have"]
    turns = plan_turns(200, questions, ["The cat sleeps on the warm mat."], random.Random(0))
    kinds = [t["kind"] for t in turns]
    for kind, share in KIND_SHARES.items():
        assert abs(kinds.count(kind) - 200 * share) <= 1, kind
    for t in turns:
        assert t["label"] == (ANSWER if "question" in t["kind"] else DROP)
        assert t["pieces"][0][0] == "silence" and t["pieces"][-1] == ("silence", TAIL_S)
        if t["kind"] == "paused_question":
            (_, a), (_, pause), (_, b) = t["pieces"][1:4]
            assert f"{a} {b}" in questions and PAUSE_S[0] <= pause <= PAUSE_S[1]
        if t["kind"] == "noise":
            assert t["text"] == "" and t["pieces"][1][0] == "noise"


def test_assembled_turn_spans_are_where_the_sound_is():
    rate = 16000

    def synth(text):  # 0.1 s of silence, a tone of 0.1 s per word, 0.05 s of silence
        n = len(text.split())
        tone = 0.5 * np.sin(2 * np.pi * 300 * np.arange(int(0.1 * n * rate)) / rate)
        return np.concatenate([np.zeros(1600), tone, np.zeros(800)]).astype(np.float32)

    pieces = [("silence", 0.25), ("speech", "a b"), ("silence", 0.5), ("speech", "c"), ("noise", "hum", 0.4),
              ("silence", 1.3)]  # fmt: skip
    audio, spans = assemble_turn(pieces, synth, rate, "turn-x")
    assert len(audio) == int((0.25 + 0.35 + 0.5 + 0.25 + 0.4 + 1.3) * rate)
    expected = [[0.35, 0.55], [1.2, 1.3], [1.35, 1.75]]
    assert np.allclose(spans, expected, atol=0.011)
    assert active_span(np.zeros(1000, np.float32), rate) is None
    again, _ = assemble_turn(pieces, synth, rate, "turn-x")
    assert np.array_equal(audio, again)  # noise is seeded by the turn's key
