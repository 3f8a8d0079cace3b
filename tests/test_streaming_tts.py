"""Streaming synthesis: text segmentation and the speech-token FIFO against decoding all at once."""

import numpy as np
import pytest
import torch

from modules.codec.network import CodecConfig, Generator
from modules.layers.quantizer import VectorQuantizer
from server.fifo import TextSegmenter, TokenFIFO


def _segments(pieces: list[str], **kw) -> list[str]:
    seg = TextSegmenter(**kw)
    out = [s for p in pieces if (s := seg.feed(p))]
    return out + ([rest] if (rest := seg.flush()) else [])


def test_segments_cut_at_sentence_ends_commas_only_first_or_long():
    pieces = ["Counting", " back", " from", " twelve", ":", " eleven", ",", " ten", ",", " nine", ".",
              " Twelve", " minus", " three", " is", " nine", "."]  # fmt: skip
    # first segment: cut at ":" once 4 tokens are in; later ones: commas do not cut
    assert _segments(pieces) == ["Counting back from twelve:", "eleven, ten, nine.", "Twelve minus three is nine."]
    # too short for a cut (fewer than 4 tokens): the first "." is kept inside
    assert _segments(["Yes", ".", " It", " is", " six", "."]) == ["Yes. It is six."]
    # commas cut later segments once they hold `comma_after` tokens
    long = ["A", "."] * 2 + [" w"] * 5 + [","] + [" x", "."]
    assert _segments(long, comma_after=5) == ["A.A.", "w w w w w,", "x."]


def test_without_clauses_only_full_stops_cut_and_split_reply_keeps_token_spans():
    from server.fifo import split_reply

    pieces = ["Counting", " back", " from", " twelve", ":", " eleven", ",", " ten", ",", " nine", ".",
              " Twelve", " minus", " three", " is", " nine", "."]  # fmt: skip
    whole = ["Counting back from twelve: eleven, ten, nine.", "Twelve minus three is nine."]
    assert _segments(pieces, clauses=False) == whole
    assert _segments(pieces[:10], clauses=False, comma_after=2) == ["Counting back from twelve: eleven, ten, nine"]

    class Pieces:  # token i is pieces[i]; tokens 17 and 18 are the two bytes of " é"
        def decode(self, ids, skip_special_tokens=True):
            text = "".join(pieces[i] for i in ids if i < 17)
            return text + (" é" if 18 in ids else "\ufffd" if 17 in ids else "")

    ids = list(range(17))
    assert split_reply(Pieces(), ids, clauses=False) == [(whole[0], 0, 11), (whole[1], 11, 17)]
    assert [s for s, _, _ in split_reply(Pieces(), ids)] == _segments(pieces)  # as the engine cuts them
    assert split_reply(Pieces(), [*ids, 17, 18], clauses=False)[-1] == ("é", 17, 19)  # waits for the whole character


def test_list_numbers_do_not_cut_and_flush_returns_the_rest():
    assert _segments(["Step", " one", " is", " 1", ".", " then", " go"]) == ["Step one is 1. then go"]
    seg = TextSegmenter()
    assert seg.flush() is None


def _codec_decoder(seed: int = 0):
    torch.manual_seed(seed)
    cfg = CodecConfig(dim=32, encoder_channels=4, global_dim=8, global_groups=2, resblock_kernels=[3, 5])
    gen, vq = Generator(cfg).eval(), VectorQuantizer(64, 32)
    voice = torch.randn(1, 8)

    @torch.no_grad()
    def decode(tokens: list[int]) -> np.ndarray:
        x = vq.embed(torch.tensor(tokens)[None]).transpose(1, 2)
        return gen(x, voice)[0, 0].numpy()

    return decode


@pytest.mark.parametrize("n_tokens", [7, 30, 75, 133])
def test_streamed_audio_equals_decoding_everything_at_once(n_tokens):
    decode = _codec_decoder()
    tokens = torch.randint(0, 64, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens)).tolist()
    fifo = TokenFIFO(decode, hop=600, first_chunk=20, chunk=40, context=10, crossfade=240)
    chunks, first_at = [], None
    for i, t in enumerate(tokens):
        for pcm in fifo.push(t):
            first_at = i + 1 if first_at is None else first_at
            chunks.append(pcm)
    chunks.append(fifo.flush())
    streamed = np.concatenate(chunks)
    full = decode(tokens)
    assert streamed.shape == full.shape == (600 * n_tokens,)
    if n_tokens >= 30:
        assert first_at == 30 and len(chunks[0]) == 20 * 600  # 20 tokens of audio after 30 tokens
    # 10 tokens of context exceed the generator's reach: equal everywhere, joins included
    assert np.abs(streamed - full).max() < 1e-4


def test_joins_are_cross_faded_when_windows_disagree():
    # A decoder whose windows disagree (a DC offset that depends on the window): the join ramps
    # from one to the other instead of jumping.
    def decode(tokens):
        return np.full(600 * len(tokens), float(len(tokens)), dtype=np.float32)

    fifo = TokenFIFO(decode, first_chunk=20, chunk=40, context=10, crossfade=240)
    out = np.concatenate([pcm for t in range(80) for pcm in fifo.push(t)] + [fifo.flush()])
    assert np.abs(np.diff(out)).max() <= (60 - 30) / 240 + 1e-5  # the largest step is one ramp increment
    with pytest.raises(ValueError, match="crossfade"):
        TokenFIFO(decode, context=1, crossfade=700)
