"""Transcript normalisation, CTC units and WER."""

import pytest

from datamodules.transcripts import BPEUnits, CharVocab, normalize_transcript, wer


def test_normalize_transcript():
    assert (
        normalize_transcript("Sofia enjoys playing the piano, on Sundays!")
        == "sofia enjoys playing the piano on sundays"
    )
    assert normalize_transcript("  Whose ladder\u2019s this?  ") == "whose ladder's this"
    assert normalize_transcript("twenty-one / two") == "twenty one two"


def test_char_vocab_round_trip_and_ctc_collapse():
    vocab = CharVocab(" 'abcdefghijklmnopqrstuvwxyz")
    ids = vocab.encode("The cup, red.")
    assert vocab.decode(ids) == "the cup red"
    # CTC collapse: repeats merge unless a blank separates them
    a, b, space = vocab.encode("a")[0], vocab.encode("b")[0], vocab.encode("a b")[1]
    assert vocab.decode([0, a, a, 0, a, space, b, b, 0]) == "aa b"
    assert vocab.oov("café 3") == {"é", "3"}
    with pytest.raises(ValueError, match="repeated"):
        CharVocab("aab")


def test_bpe_units_round_trip_and_serialisation():
    texts = ["the red fox runs home", "seven small dogs sleep at home", "the fox sleeps"] * 20
    units = BPEUnits.train(texts, 60, " 'abcdefghijklmnopqrstuvwxyz")
    ids = units.encode("The red dogs sleep.")
    assert 0 not in ids and max(ids) < len(units)
    assert units.decode(ids) == "the red dogs sleep"
    assert len(ids) < len("the red dogs sleep")  # pieces, not characters
    again = BPEUnits.from_json(units.to_json())
    assert again.encode("the red fox") == units.encode("the red fox")
    assert (
        units.decode([0, ids[0], ids[0], 0, ids[1]])
        == units.decode([ids[0], ids[1]])
        != units.decode([ids[0], 0, ids[0], ids[1]])
    )


def test_llm_token_units_are_the_tokens_the_transcripts_use():
    from datamodules.tokenizer import train_bpe_tokenizer
    from datamodules.transcripts import LLMTokenUnits

    texts = ["The red fox runs home.", "Seven small dogs sleep at home!"]
    llm = train_bpe_tokenizer(["the red fox runs home seven small dogs sleep at home zebra"] * 30, 300)
    units = LLMTokenUnits.from_texts(llm.backend_tokenizer, texts)
    used = {i for t in texts for i in llm(normalize_transcript(t), add_special_tokens=False)["input_ids"]}
    assert units.token_ids == sorted(used) and len(units) == len(used) + 1  # + the blank
    assert units.units[1:] == llm.convert_ids_to_tokens(units.token_ids)
    ids = units.encode("the red dogs sleep")
    assert 0 not in ids and [units.token_ids[i - 1] for i in ids] == llm("the red dogs sleep")["input_ids"]
    assert units.decode([0, ids[0], ids[0], 0, *ids[1:]]) == "the red dogs sleep"
    assert units.oov("the zebra") and not units.oov("The red fox!")  # "zebra": a token no transcript used
    again = LLMTokenUnits.from_json(units.to_json())
    assert again.token_ids == units.token_ids and again.encode("home at home") == units.encode("home at home")


def test_wer_counts_word_edits_on_normalised_text():
    assert wer(["the cup is red"], ["The cup is red."]) == 0.0
    assert wer(["the cap is red", "a b"], ["the cup is red", "a b c"]) == pytest.approx(2 / 7)
    with pytest.raises(ValueError):
        wer(["a"], [])
