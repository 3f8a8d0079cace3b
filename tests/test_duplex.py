"""The duplex pipeline on untrained miniature models: sessions hold all state, a saved session
continues exactly as the original, a dropped turn leaves the cache as before it, an answer is
spoken with its latency marks, and `infer.py chat` reads what a microphone file can be."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.audio import load_audio
from modules.config import ConfigError, load_config
from server.chat import chat_file, input_files, latency_table, read_input
from server.engine import DuplexModel
from server.session import Session
from tools.make_chat_input import make_chat_input


def _model(args: list[str], *extra: str) -> DuplexModel:
    cfg = load_config(["stage=input_4_state", *args, "speech_llm.max_answer_tokens=16",
                       "speech_decoder.max_tokens=45", *extra])  # fmt: skip
    torch.manual_seed(0)
    return DuplexModel.untrained(cfg)


def _say(model: DuplexModel, session: Session, text: str):
    """generate(), with the untrained LLM made to say `text`."""
    return model.generate(session, force_ids=model.llm.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture
def duplex_args(speech_args) -> list[str]:
    return [
        *speech_args,
        "codec.dim=32", "codec.encoder_channels=4", "codec.encoder_resblock_kernels=[3]", "codec.resblock_kernels=[3]",
        "codec.istft_width=16", "codec.istft_layers=1", "codec.mel_encoder_layers=1",
        "codec.global_dim=8", "codec.global_groups=2", "codec.global_codebook_size=16", "codec.codebook_size=64",
        "speech_decoder.dim=16", "speech_decoder.num_heads=2", "speech_decoder.ffn_dim=32",
        "speech_decoder.codebook_size=64", "speech_decoder.dropout=0.0",
        "duplex.vad_threshold=0.0",  # every chunk is speech to the gate: turns open at once
        "duplex.first_chunk_tokens=5", "duplex.chunk_tokens=10", "duplex.context_tokens=2",
    ]  # fmt: skip


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def test_saved_session_continues_exactly_as_the_original(duplex_args, tmp_path):
    # Never decide while the test feeds (thresholds above 1), then answer on demand.
    model = _model(duplex_args, "speech_llm.state_answer_threshold=2", "speech_llm.state_drop_threshold=2")
    audio = _speech(2.0)
    a = model.new_session()
    assert model.feed(a, audio[:9000])[0].kind == "turn_start"  # 3 chunks and 1320 samples pending
    a.save(tmp_path / "s.pt")
    b = Session.load(tmp_path / "s.pt")
    assert b.input.positions == a.input.positions and b.clock == a.clock and len(b.pending) == len(a.pending)
    for s in (a, b):
        assert model.feed(s, audio[9000:]) == []
        s.mode = "answer"  # as if the state head had fired
    ra, rb = _say(model, a, "It is Monday."), _say(model, b, "It is Monday.")
    assert ra.text == rb.text == "It is Monday." and len(ra.audio) > 0
    assert np.array_equal(ra.audio, rb.audio) and ra.tokens == rb.tokens
    torch.testing.assert_close(a.input.last_hidden, b.input.last_hidden)
    assert a.input.positions == b.input.positions and a.history == b.history
    assert a.mode == b.mode == "idle"
    # the reply and its end are in the context: positions grew by the closing, the reply and the end
    assert a.input.cache.get_seq_length() == a.input.positions
    with pytest.raises(ValueError, match="format"):
        Session.from_state_dict({**a.state_dict(), "format": 99})


def test_a_dropped_turn_leaves_the_context_as_before(duplex_args):
    model = _model(duplex_args, "speech_llm.state_drop_threshold=-1")  # state 2 on the first decision
    s = model.new_session()
    before = s.input.positions
    keys = s.input.cache.layers[0].keys.clone()
    audio, kinds = _speech(0.8), []
    for i in range(0, len(audio), 2560):  # chunk by chunk until the first decision
        kinds += [e.kind for e in model.feed(s, audio[i : i + 2560])]
        if "drop" in kinds:
            break
    assert kinds == ["turn_start", "drop"]
    assert s.input.positions == before and s.input.cache.get_seq_length() == before
    assert torch.equal(s.input.cache.layers[0].keys, keys) and s.mode == "idle" and not s.input.in_turn


def test_an_answer_is_spoken_with_its_latency_marks(duplex_args):
    model = _model(
        duplex_args, "speech_llm.state_answer_threshold=-1", "speech_llm.state_drop_threshold=2"
    )  # state 1 on the first decision
    s = model.new_session()
    events = model.feed(s, _speech(0.8))
    assert [e.kind for e in events] == ["turn_start", "answer"]
    with pytest.raises(RuntimeError, match="generate"):
        model.feed(s, _speech(0.2))
    reply = _say(model, s, "You saw four animals, then two more. Six.")
    assert s.history[-1] == {"role": "assistant", "text": reply.text} and s.mode == "idle"
    # tiny speaks whole sentences (duplex.segment_clauses=false); "Six." is too short to stand alone
    assert reply.text == "You saw four animals, then two more. Six." and reply.segments == [
        "You saw four animals, then two more.",
        "Six.",
    ]
    marks = reply.latency_ms
    assert set(marks) == {"text", "prefill", "tokens", "pcm", "total"} and all(v >= 0 for v in marks.values())
    assert marks["total"] == pytest.approx(marks["text"] + marks["prefill"] + marks["tokens"] + marks["pcm"], abs=0.5)
    assert len(reply.audio) == sum(len(c) for _, c in reply.pcm_chunks) == 600 * len(reply.audio) // 600
    table = latency_table([{"latency_ms": reply.latency_ms}])
    assert "state-1 decision -> first PCM" in table


def test_an_answer_shorter_than_one_fifo_window_is_spoken(duplex_args, monkeypatch):
    """A reply whose codec tokens never fill the first window (here 7 tokens against 40) is
    decoded whole at the end of its segment, not dropped."""
    model = _model(duplex_args, "speech_llm.state_answer_threshold=-1", "speech_llm.state_drop_threshold=2",
                   "duplex.first_chunk_tokens=40", "duplex.chunk_tokens=40")  # fmt: skip
    generate = model.decoder.generate

    def seven_tokens(*args, on_token=None, **kw):  # the decoder says 7 codes, then EOS
        for step in range(7):
            on_token(step, torch.tensor([step + 3]))
        kw["max_tokens"] = 0
        return generate(*args, **kw)

    monkeypatch.setattr(model.decoder, "generate", seven_tokens)
    s = model.new_session()
    assert [e.kind for e in model.feed(s, _speech(0.8))] == ["turn_start", "answer"]
    reply = _say(model, s, "Yes.")
    assert reply.segments == ["Yes."] and len(reply.audio) == 7 * 600
    expected = model.codec.decode(torch.tensor([[3, 4, 5, 6, 7, 8, 9]]), model.voice)[0, 0].numpy()
    np.testing.assert_allclose(reply.audio, expected, atol=1e-5)


def test_chat_file_lays_answers_on_the_input_timeline(duplex_args):
    model = _model(duplex_args, "speech_llm.state_answer_threshold=-1", "speech_llm.state_drop_threshold=2")
    r = chat_file(model, _speech(1.0))
    assert r["turns"] and r["turns"][0]["decision_s"] > 0
    assert len(r["track"]) >= int(len(r["input"]) / 16000 * 24000) - 1
    assert r["events"][0]["event"] == "turn_start"


def test_chat_inputs_are_converted_or_refused_clearly(tmp_path):
    stereo = np.stack([_speech(0.5), _speech(0.5, 1)], 1)
    sf.write(tmp_path / "a.wav", stereo, 44100)
    (tmp_path / "b.wav").write_bytes(b"not audio at all")
    wav = read_input(tmp_path / "a.wav")
    assert wav.ndim == 1 and abs(len(wav) - 0.5 * 16000 * 16000 / 44100) < 2  # mono, 16 kHz
    with pytest.raises(ConfigError, match=r"b\.wav"):
        read_input(tmp_path / "b.wav")
    assert input_files(str(tmp_path)) == [tmp_path / "a.wav", tmp_path / "b.wav"]
    assert input_files(f"{tmp_path / 'a.wav'},{tmp_path / 'a.wav'}") == [tmp_path / "a.wav"] * 2
    with pytest.raises(ConfigError, match="does not exist"):
        input_files(str(tmp_path / "missing.wav"))
    assert load_audio(str(tmp_path / "a.wav"))[1] == 44100


def test_chat_input_joins_the_questions_of_a_test_dialogue(mini_corpus, tmp_path):
    out = tmp_path / "q.wav"
    summary = make_chat_input(str(mini_corpus), str(out), dialogue=0, turns=2, pause=1.0)
    info = sf.info(str(out))
    first = json.loads((mini_corpus / "manifests" / "qa_test.jsonl").read_text().splitlines()[0])
    heard = sum(t["duration"] for t in first["turns"][:2])
    assert len(summary["turns"]) == 2 and abs(info.frames / info.samplerate - (0.5 + 1.0 + heard)) < 0.01
    with pytest.raises(ValueError, match="dialogues 0"):
        make_chat_input(str(mini_corpus), str(out), dialogue=99)


def test_a_reply_that_ends_at_once_is_an_empty_answer(duplex_args):
    model = _model(duplex_args, "speech_llm.state_answer_threshold=-1", "speech_llm.state_drop_threshold=2")
    s = model.new_session()
    assert [e.kind for e in model.feed(s, _speech(0.8))] == ["turn_start", "answer"]
    reply = _say(model, s, "")  # the first token is the end of the turn
    assert reply.text == "" and reply.segments == [] and len(reply.audio) == 0 and reply.latency_ms == {}
    assert s.mode == "idle" and s.history[-1] == {"role": "assistant", "text": ""}


def test_trained_chain_chats_and_is_evaluated_end_to_end(duplex_args, tmp_path, capsys, reference_answers):
    """The whole chain at 2 steps a stage: `infer.py chat` on a spoken dialogue and `eval_dialogue`."""
    import infer
    import train
    from tools.write_codec_tokens import write_codec_tokens

    args = [*duplex_args, "duplex.vad_threshold=0.5", "speech_llm.state_answer_threshold=-1",
            "speech_llm.state_drop_threshold=2", "speech_llm.max_answer_tokens=4", "speech_decoder.max_tokens=30",
            "data.tts.segment_s=0.1", "data.tts.max_batch_size=3", "data.tts_codes.max_tokens_per_batch=400",
            "codec.disc_period_widths=[2,4,4,4]", "codec.disc_periods=[2,3]", "codec.disc_scales=1",
            "codec.disc_scale_width=4", "eval.limit=2"]  # fmt: skip
    reference_answers(load_config(["stage=input_4_state", *args]))  # the mini LLM's "own" answers
    for stage in ("input_1_ctc", "judge", "input_2_align", "input_3_prompt", "input_4_state", "output_1_codec"):
        train.main([f"stage={stage}", *args])
    write_codec_tokens(load_config(["stage=output_1_codec", *args]), voice_utterances=4, progress=False)
    for stage in ("output_2_decoder", "output_3_prefix"):
        train.main([f"stage={stage}", *args])

    corpus = load_config(["stage=input_4_state", *args]).corpus.root
    make_chat_input(corpus, str(tmp_path / "q.wav"), dialogue=0, turns=2, pause=1.0)
    out = infer.main(["chat", *args, f"input_wav={tmp_path / 'q.wav'}", f"output_wav={tmp_path / 'a.wav'}"])
    printed = capsys.readouterr().out
    assert out["answers"] >= 1 and "state-1 decision -> first PCM" in printed
    report = (tmp_path / "a.md").read_text()  # the transcript and table as printed, for `make demo`'s summary
    assert out["report"] == str(tmp_path / "a.md") and "assistant:" in report and report.strip() in printed
    assert (
        sf.info(str(tmp_path / "a.wav")).samplerate == 24000 and sf.info(str(tmp_path / "a.dialogue.wav")).channels == 2
    )
    turns = json.loads((tmp_path / "a.json").read_text())["turns"]  # what the trained judge hears in each answer
    assert all(("judge_heard" in t) == (t["audio_s"] > 0) for t in turns)
    assert all(t["judge_wer"] >= 0 for t in turns if "judge_wer" in t)
    assert ("judge heard:" in report) == any(t["audio_s"] > 0 for t in turns)
    with pytest.raises(ConfigError, match="output_wav"):
        infer.main(["chat", *args, f"input_wav={tmp_path / 'q.wav'}"])

    result = infer.main(["eval_dialogue", *args])
    assert result["dialogues"] == 2 and result["turns"] == len(result["records"]) >= 2
    for key in ("speech_to_speech_accuracy", "speech_to_text_accuracy", "text_to_text_accuracy", "answered"):
        assert 0 <= result[key] <= 1
    assert result["state_classifier"]["turns"] == 2  # eval.limit test turns
    run_root = Path(load_config(["stage=input_4_state", *args]).run_root)
    assert (run_root / "tiny" / "eval" / "dialogue.md").is_file() and (
        run_root / "tiny" / "eval" / "state.md"
    ).is_file()


def test_bench_dialogue_times_each_table4_step_against_context(duplex_args, tmp_path):
    """`make bench-dialogue` with no trained chain: random weights, a forced reply; the Table 4 steps
    add up to the total, the longer context is measured, and the report files are written."""
    from tools import bench_dialogue

    small = ["llm.arch.vocab_size=400", "llm.arch.hidden_size=32", "llm.arch.intermediate_size=64",
             "llm.arch.num_hidden_layers=1", "llm.arch.num_attention_heads=2", "llm.arch.num_key_value_heads=1"]  # fmt: skip
    r = bench_dialogue.main(["--contexts", "60,20", "--steps", "2", "--repeats", "1", "--threads", "1",
                             *duplex_args, *small])  # fmt: skip
    assert r["weights"].startswith("random weights") and r["llm_params"] < 100_000
    assert set(r["llm_ms_per_token"]) == {20, 60} and all(v > 0 for v in r["llm_ms_per_token"].values())
    assert [row["context"] for row in r["first_pcm"]] == [20, 60]
    for row in r["first_pcm"]:
        parts = sum(row["avg_ms"][k] for k in ("text", "prefill", "tokens", "pcm"))
        assert row["avg_ms"]["total"] > 0 and abs(parts - row["avg_ms"]["total"]) < 1.0
    assert r["paper"] == {"measured": False, "reason": "not asked (--paper)"}
    out = Path(load_config(duplex_args, stage="input_4_state").run_root) / "tiny" / "eval"
    assert json.loads((out / "bench_dialogue.json").read_text())["llm_step_ratio"] == r["llm_step_ratio"]
    assert (out / "bench_dialogue.png").stat().st_size > 0


def test_bench_paper_llm_has_qwen2_7b_shape():
    from tools.bench_dialogue import paper_llm

    llm = paper_llm("meta")
    assert sum(p.numel() for p in llm.parameters()) == 7_615_616_512  # Qwen2-7B-Instruct
    assert next(llm.parameters()).dtype == torch.bfloat16


# --- the engine's states, API and what it builds -----------------------------------------------------
def _same(a, b, where: str = "") -> None:
    """Recursive equality of two state dicts (tensors exactly)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_a_session_round_trip_covers_every_state(duplex_args, tmp_path):
    """Mid-turn after an answered turn: fbank tail, encoder and adapter caches, KV cache, VAD,
    pending audio, turn audio and history all survive a file, and both copies go on alike."""
    import dataclasses

    from server.session import Session as SessionClass

    model = _model(duplex_args, "speech_llm.state_answer_threshold=2", "speech_llm.state_drop_threshold=2")
    audio = _speech(3.0, seed=3)
    a = model.new_session()
    model.feed(a, audio[:8000])
    a.mode = "answer"
    _say(model, a, "Yes.")
    model.feed(a, audio[8000:21000])  # a second turn, open, with samples pending
    d = a.state_dict()
    assert {f.name for f in dataclasses.fields(SessionClass)} <= set(d)
    assert set(d["input"]) == {"fbank", "encoder", "adapter", "cache", "positions", "in_turn", "last_hidden"}
    assert len(d["input"]["fbank"]["tail"]) and d["input"]["encoder"]["cache"] is not None and d["input"]["cache"]
    assert len(d["pending"]) and d["turn_audio"] and d["history"] and d["vad"]["state"].abs().sum() > 0
    a.save(tmp_path / "s.pt")
    b = Session.load(tmp_path / "s.pt")
    _same(a.state_dict(), b.state_dict())
    for s in (a, b):
        model.feed(s, audio[21000:])
    _same(a.state_dict(), b.state_dict())


def test_synthesis_states_round_trip():
    from server.fifo import TextSegmenter, TokenFIFO

    def decode(tokens):
        return np.sin(np.arange(600 * len(tokens), dtype=np.float32) * (1 + sum(tokens) % 7))

    a, b = TokenFIFO(decode, first_chunk=5, chunk=10, context=2), TokenFIFO(decode, first_chunk=5, chunk=10, context=2)
    out_a = [pcm for t in range(18) for pcm in a.push(t)]
    b.load_state_dict(a.state_dict())
    assert out_a and b.tail is not None and b.state_dict()["tokens"] == a.state_dict()["tokens"]
    rest_a = [pcm for t in range(18, 40) for pcm in a.push(t)] + [a.flush()]
    rest_b = [pcm for t in range(18, 40) for pcm in b.push(t)] + [b.flush()]
    assert all(np.array_equal(x, y) for x, y in zip(rest_a, rest_b, strict=True))
    seg, other = TextSegmenter(), TextSegmenter()
    for piece in ["It", " is", " six", ","]:
        seg.feed(piece)
    other.load_state_dict(seg.state_dict())
    assert [seg.feed(" yes"), seg.feed("."), seg.flush()] == [other.feed(" yes"), other.feed("."), other.flush()]


def test_the_engine_loads_the_llm_once_and_builds_no_ctc_or_discriminators(duplex_args, monkeypatch):
    from transformers import AutoModelForCausalLM

    from modules.codec.stage import Codec
    from modules.speech_llm.model import build

    loads = []
    load = AutoModelForCausalLM.from_pretrained

    def counted(*args, **kwargs):
        loads.append(args)
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    model = _model(duplex_args)
    assert len(loads) == 1 and model.decoder.llm is model.llm.llm
    names = [n for part in (model.llm, model.decoder, model.codec) for n, _ in part.named_modules()]
    assert model.judge is None and not [n for n in names if "discriminator" in n or "ctc" in n.split(".")[-1]]
    assert model.codec.discriminators is None and "discriminators" not in model.codec.components()

    # The trained chain's loader: the CTC model only with transcribe_user (stage outputs stubbed here).
    import modules.codec.stage
    import modules.encoder.ctc
    import modules.speech_decoder.stage
    import modules.speech_llm.model

    cfg = model.cfg
    ctc_built = []
    monkeypatch.setattr(modules.speech_llm.model, "load_speech_llm", lambda cfg, stages: build(cfg).eval())
    monkeypatch.setattr(modules.speech_decoder.stage, "read_stage_output", lambda cfg, stage: {})
    monkeypatch.setattr(modules.speech_decoder.stage, "load_saved_weights", lambda cfg, module, stage, saved: None)
    monkeypatch.setattr(modules.codec.stage, "load_codec", lambda cfg: Codec(cfg, with_discriminators=False))
    monkeypatch.setattr(modules.codec.stage, "voice_tokens", lambda cfg: model.voice)
    monkeypatch.setattr(modules.encoder.ctc, "load_encoder_ctc", lambda cfg: ctc_built.append(1) or "ctc")
    loads.clear()
    loaded = DuplexModel.load(cfg)
    assert loaded.judge is None and not ctc_built and len(loads) == 1 and loaded.decoder.llm is loaded.llm.llm
    assert DuplexModel.load(cfg, transcribe_user=True).judge == "ctc" and ctc_built == [1]


def test_spoken_qa_chat_and_the_streaming_step_give_the_same_reply(duplex_args):
    """One spoken question answered through the spoken-QA evaluation path (`answer_turn`), the
    duplex path (`feed` then `generate`, as chat and eval_dialogue) and the component's own
    streaming step: the same reply."""
    from evaluation.spoken_qa import answer_turn, with_tail_silence
    from modules.speech_llm.streaming import StreamingInput

    model = _model(duplex_args, "speech_llm.state_answer_threshold=2", "speech_llm.state_drop_threshold=2",
                   "speech_llm.max_answer_tokens=6")  # fmt: skip
    cfg = model.cfg
    wav = _speech(1.3, seed=5)
    extra = len(with_tail_silence(cfg, wav)) % 2560
    wav = wav[: len(wav) - extra]  # whole chunks: `feed` leaves no samples pending
    audio = with_tail_silence(cfg, wav)
    assert len(audio) % 2560 == 0

    spoken_qa = answer_turn(cfg, model, model.new_session(), wav)
    s = model.new_session()
    assert model.feed(s, audio)[0].kind == "turn_start" and s.mode == "listen"
    s.mode = "answer"
    duplex = model.generate(s)
    stream = StreamingInput(model.llm)
    state = stream.start()
    for i in range(0, len(audio), 2560):
        stream.accept_audio(state, audio[i : i + 2560])
    step = model.llm.tokenizer.decode(stream.end_turn(state), skip_special_tokens=True).strip()
    assert spoken_qa == duplex.text == step
    assert s.input.positions == state.positions
