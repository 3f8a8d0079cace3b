"""Stages input_1_ctc, input_2_align, input_3_prompt and input_4_state on a miniature corpus and LLM.

For every stage: after a training step the frozen parameters are bit-identical and every
trainable one received a gradient; the trainable key set is exactly the declared one; the
stage output holds only trainable weights plus the resolved config; a stage loads the
previous stage's output and names both sizes when they disagree.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import train
from datamodules.asr import ASRDataModule
from datamodules.corpus.turns import ANSWER, DROP, LISTEN
from datamodules.spoken_qa import SpokenQADataModule, read_dialogues
from datamodules.state import ChunkStates
from evaluation.asr import evaluate_asr
from evaluation.spoken_qa import evaluate_question_hearing, evaluate_spoken_qa, with_tail_silence
from evaluation.state import decision_times, evaluate_state
from modules.config import load_config, run_dir
from modules.encoder.ctc import EncoderCTC, encoder_data_config, make_units
from modules.llm.answers import ensure_llm_answers
from modules.speech_llm.model import ChatLayout, Turn, build, read_llm_answers
from modules.speech_llm.streaming import StreamingInput
from modules.stage import load_stage_outputs, make_optimizer, read_checkpoint
from modules.state_classifier import chunk_states, decide, exchange_embeddings, record_turns

DECLARED = {
    "input_1_ctc": {"encoder", "ctc_head"},
    "input_2_align": {"encoder", "adapter", "specials"},
    "input_3_prompt": {"prompt"},
    "input_4_state": {"state_head"},
}


def _check_one_step(module, batch, trainable: set[str]) -> None:
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    opt = make_optimizer(module, module.cfg.optim, 10)["optimizer"]
    module.train()
    _step(module, batch).backward()
    for name, p in module.named_parameters():
        comp = name.split(".")[0]
        if comp in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert not p.requires_grad and p.grad is None, f"frozen {name} has a gradient"
    opt.step()
    after = module.state_dict()
    for k, v in before.items():
        if k.split(".")[0] not in trainable:
            assert torch.equal(v, after[k]), f"frozen {k} changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.split(".")[0] in trainable)


def _step(module, batch):
    # training_step without a Trainer (self.log needs one): the loss it would log.
    if isinstance(module, EncoderCTC):
        return module._loss(batch)[0]
    if "hidden" in batch:  # input_4_state: recorded LLM states
        return module.state_loss(batch)[0]
    return module._step(batch)[0]


def _first_batch(datamodule):
    return next(iter(datamodule.make_loader("train")))


def _saved_components(cfg) -> set[str]:
    saved = read_checkpoint(run_dir(cfg) / "model.pt")
    assert saved["run_config"]["stage"]["name"] == cfg.stage.name
    assert saved["run_config"]["encoder"]["d_model"] == cfg.encoder.d_model
    return {k.split(".")[0] for k in saved["state_dict"]}


def test_chat_layout_matches_the_rendered_template(mini_llm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mini_llm)
    layout = ChatLayout.from_tokenizer(tok)
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    joined = tok.decode(layout.system + layout.user_prefix) + "Hi" + tok.decode(layout.user_suffix)
    assert text.startswith(joined)
    assert text.endswith("Hello" + tok.decode(layout.answer_end))
    assert layout.answer_end[0] == tok.eos_token_id


def test_speech_input_stage_chain(speech_args):
    # --- stage 1: CTC -------------------------------------------------------------------------
    cfg1 = load_config(["stage=input_1_ctc", *speech_args])
    m1 = EncoderCTC(cfg1, make_units(cfg1))
    m1.apply_freezing(list(cfg1.stage.trainable))
    assert set(cfg1.stage.trainable) == DECLARED["input_1_ctc"]
    _check_one_step(m1, _first_batch(ASRDataModule(encoder_data_config(cfg1))), DECLARED["input_1_ctc"])
    metrics = train.main(["stage=input_1_ctc", *speech_args])
    assert metrics["train_steps"] == 2 and metrics["ctc_wer_dev_chunk4"] >= 0.0
    assert _saved_components(cfg1) == DECLARED["input_1_ctc"]
    saved = read_checkpoint(run_dir(cfg1) / "model.pt")["state_dict"]
    assert "encoder.cmvn_mean" in saved and saved["encoder.cmvn_istd"].ne(1).any()  # CMVN travels with it

    # --- stage 2: alignment through the frozen LLM ---------------------------------------------
    cfg2 = load_config(["stage=input_2_align", *speech_args])
    m2 = build(cfg2)
    loaded = load_stage_outputs(cfg2, m2)
    assert {k.split(".")[0] for k in loaded} == {"encoder"}  # the CTC head stays behind
    assert torch.equal(m2.encoder.cmvn_mean, saved["encoder.cmvn_mean"])
    m2.apply_freezing(list(cfg2.stage.trainable))
    _check_one_step(m2, _first_batch(ASRDataModule(encoder_data_config(cfg2))), DECLARED["input_2_align"])
    paper = ["speech_llm.align_asr_weight=1", "speech_llm.align_qa_weight=0"]  # transcripts only
    metrics = train.main(["stage=input_2_align", *speech_args, *paper])
    assert metrics["train_steps"] == 2 and "llm_wer_dev_chunk4" in metrics
    assert _saved_components(cfg2) == DECLARED["input_2_align"]

    # --- stage 2 with the spoken-QA answer term: paired batches, the same trainable set ------------
    qa_args = ["stage=input_2_align", *speech_args, "speech_llm.align_asr_weight=1", "speech_llm.align_qa_weight=0.5"]
    cfg2q = load_config(qa_args)
    ensure_llm_answers(cfg2q)
    m2q = build(cfg2q)
    load_stage_outputs(cfg2q, m2q)
    m2q.apply_freezing(list(cfg2q.stage.trainable))
    m2q.llm_answers = read_llm_answers(cfg2q, "train")
    paired = {
        "asr": _first_batch(ASRDataModule(encoder_data_config(cfg2q))),
        "qa": _first_batch(SpokenQADataModule(encoder_data_config(cfg2q, "spoken_qa"))),
    }
    m2q.eval()
    with torch.no_grad():
        total, _, n, extra = m2q._step(paired)
        plain = m2q._step(paired["asr"])[0]
    assert n == len(paired["asr"]["texts"]) and extra["qa_loss"] > 0
    assert torch.allclose(total, plain + 0.5 * extra["qa_loss"]) and torch.allclose(extra["asr_loss"], plain)
    _check_one_step(m2q, paired, DECLARED["input_2_align"])  # the prompt it reads stays frozen
    with torch.no_grad():  # spoken QA alone (the tiny recipe: align_asr_weight=0)
        m2q.cfg.speech_llm.align_asr_weight = 0.0
        qa_only, qa_acc, n_qa, extra_qa = m2q._step({"qa": paired["qa"]})
    assert set(extra_qa) == {"qa_loss", "qa_token_acc"} and n_qa == len(paired["qa"]["keys"])
    assert torch.allclose(qa_only, 0.5 * extra_qa["qa_loss"]) and torch.equal(qa_acc, extra_qa["qa_token_acc"])
    metrics = train.main([*qa_args, "resume=false"])  # both streams, in training and validation
    assert metrics["train_steps"] == 2 and _saved_components(cfg2q) == DECLARED["input_2_align"]
    assert (run_dir(cfg2q) / "tb").is_dir()
    # the tiny recipe's continuation (Makefile ALIGN_MORE): stage 2 starts again from its own
    # output, in place; at lr 0 it saves exactly what it loaded
    before = read_checkpoint(run_dir(cfg2q) / "model.pt")["state_dict"]
    train.main([*qa_args, "stage.init_from=[input_2_align]", "resume=false", "optim.lr=0", "optim.weight_decay=0"])
    after = read_checkpoint(run_dir(cfg2q) / "model.pt")["state_dict"]
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="align_asr_weight > 0 or align_qa_weight > 0"):
        train.main(
            ["stage=input_2_align", *speech_args, "speech_llm.align_asr_weight=0", "speech_llm.align_qa_weight=0"]
        )

    # --- stage 3: prompt vectors on spoken QA with the LLM's own answers -------------------------
    cfg3 = load_config(["stage=input_3_prompt", *speech_args])
    ensure_llm_answers(cfg3)
    answers = read_llm_answers(cfg3, "train")
    assert len(answers) == 8 and all(isinstance(r, list) and r for r in answers.values())
    m3 = build(cfg3)
    load_stage_outputs(cfg3, m3)
    m3.apply_freezing(list(cfg3.stage.trainable))
    m3.llm_answers = answers
    _check_one_step(m3, _first_batch(SpokenQADataModule(encoder_data_config(cfg3, "spoken_qa"))), {"prompt"})
    metrics = train.main(["stage=input_3_prompt", *speech_args])
    assert metrics["train_steps"] == 2
    assert _saved_components(cfg3) == DECLARED["input_3_prompt"]

    # --- stage 4: the state head on the LLM's recorded chunk-end states ----------------------------
    cfg4 = load_config(["stage=input_4_state", *speech_args])
    assert set(cfg4.stage.trainable) == DECLARED["input_4_state"]
    m4 = build(cfg4)
    assert {k.split(".")[0] for k in load_stage_outputs(cfg4, m4)} == DECLARED["input_2_align"] | {"prompt"}
    m4.apply_freezing(list(cfg4.stage.trainable))
    rec = record_turns(m4.eval(), cfg4.data.turns.train_shards, limit=5, batch=2)
    assert len(rec["turns"]) == 5 and rec["skipped"] == {}
    for t in rec["turns"]:  # one state and one label per 160 ms chunk; listen until the end of the sound
        assert len(t["states"]) == len(t["labels"]) >= t["duration"] / 0.16 - 2
        assert (t["labels"][: int(t["end"] / 0.16)] == LISTEN).all() and t["labels"][-1] == t["label"]
    states = ChunkStates(rec["turns"], rec["turns"], 64, 0)
    _check_one_step(m4, next(iter(states.train_dataloader())), DECLARED["input_4_state"])
    metrics = train.main(["stage=input_4_state", *speech_args])
    assert metrics["train_steps"] == 2 and metrics["turns"] == {"train": 24, "dev": 3}
    assert _saved_components(cfg4) == DECLARED["input_4_state"]
    report = evaluate_state(load_config(["stage=input_4_state", *speech_args]))
    assert report["turns"] == 3 and len(report["records"]) == 3
    assert {r["decision"] for r in report["records"]} <= {LISTEN, ANSWER, DROP}
    sweep = report["dev_threshold_sweep"]  # both thresholds on the dev turns
    assert {(r["drop_threshold"], r["answer_threshold"]) for r in sweep} == {
        (d, a) for d in (0.5, 0.7, 0.9) for a in (0.5, 0.6, 0.7, 0.8, 0.9)
    }
    for a in (0.5, 0.6, 0.7, 0.8, 0.9):  # a higher drop threshold only ever lets more turns be answered
        rows = sorted((r for r in sweep if r["answer_threshold"] == a), key=lambda r: r["drop_threshold"])
        answered = [r["answered"] + r["cut_in"] for r in rows]
        assert answered == sorted(answered) and [r["false_answer"] for r in rows] == sorted(
            r["false_answer"] for r in rows
        )

    # --- evaluation: Table 1 and Table 3 from the trained chain -----------------------------------
    cfg_eval = load_config(["stage=input_3_prompt", *speech_args, "eval.variants=['',dynamic]"])
    asr = evaluate_asr(cfg_eval)
    assert [(r["decoder"], r["variant"]) for r in asr["rows"]] == [("CTC", ""), ("LLM", "")]
    assert len(asr["missing"]) == 1 and "input_1_ctc-dynamic" in asr["missing"][0]  # not trained: skipped
    for row in asr["rows"]:
        assert row["utterances"] == 3 and row["wer_chunk_full"] >= 0 and row["wer_chunk_4"] >= 0
    qa = evaluate_spoken_qa(cfg_eval)
    assert qa["num_dialogues"] == 3 and qa["num_turns"] == sum(
        len(d["turns"]) for d in read_dialogues(cfg_eval.data.spoken_qa.test_shards)
    )
    assert 0 <= qa["speech_accuracy"] <= 1 and 0 <= qa["text_accuracy"] <= 1
    # each test turn reaches the model followed by the silence the QA stages trained with
    assert with_tail_silence(cfg_eval, np.ones(10, np.float32)).tolist() == [1.0] * 10 + [0.0] * 5120
    heard = evaluate_question_hearing(cfg_eval)  # how the stage-1 CTC hears the same questions
    assert heard["questions"] == qa["num_turns"] and heard["tail_silence_s"] == pytest.approx(0.32)
    assert set(heard["per_family"]) == set(qa["speech_per_family"])
    assert sum(v["questions"] for v in heard["per_family"].values()) == heard["questions"]
    assert 0 <= heard["exact"] <= 1 and len(heard["misses"]) <= 10
    out = run_dir(cfg_eval).parent / "eval"
    assert {"asr.json", "asr.md", "spoken_qa.json", "spoken_qa.md", "questions.json", "questions.md"} <= {
        p.name for p in out.iterdir()
    }

    # --- a later stage with an incompatible encoder names both sizes ------------------------------
    wider = ["encoder.d_model=24", "encoder.num_heads=2"]
    bad = load_config(["stage=input_2_align", *speech_args, *wider, "adapter.lexical=false"])
    with pytest.raises(ValueError, match=r"input_1_ctc saved \(16,\), this model has \(24,\)") as err:
        load_stage_outputs(bad, build(bad))
    assert "encoder.d_model: 16 -> 24" in str(err.value)
    with pytest.raises(ValueError, match=r"CTC layer \(\d+, 16\) .* do not fit .* CTC layer \(\d+, 24\)"):
        build(load_config(["stage=input_2_align", *speech_args, *wider, "adapter.lexical=true"]))  # starts from stage 1
    missing = load_config(["stage=input_2_align", *speech_args, "stage.variant=other"])
    with pytest.raises(FileNotFoundError, match="input_1_ctc-other"):
        load_stage_outputs(missing, build(missing))

    # --- a variant can start from another: a dynamic-chunk encoder from the chunk-4 one ------------
    dyn = ["stage=input_1_ctc", *speech_args, "stage.variant=dynamic", "encoder.dynamic_chunk=true"]
    train.main([*dyn, "stage.init_from=[input_1_ctc@]", "optim.lr=0", "optim.weight_decay=0"])
    copied = read_checkpoint(run_dir(load_config(dyn)) / "model.pt")["state_dict"]
    assert copied.keys() == saved.keys() and all(torch.equal(copied[k], saved[k]) for k in saved)  # lr 0: unchanged
    with pytest.raises(FileNotFoundError, match="input_1_ctc-other"):
        train.main([*dyn, "stage.init_from=[input_1_ctc@other]"])


@pytest.mark.parametrize("units", ["char", "bpe"])
def test_hierarchical_ctc_adds_a_character_loss_on_an_inner_layer(speech_args, units):
    args = [*speech_args, "encoder.num_layers=2", f"ctc.units={units}", "ctc.aux_weight=0.25"]
    cfg = load_config(["stage=input_1_ctc", *args, "ctc.aux_layer=1"])
    module = EncoderCTC(cfg, make_units(cfg))
    batch = _first_batch(ASRDataModule(encoder_data_config(cfg)))
    module.eval()
    with torch.no_grad():
        total, log_probs, _, aux = module._loss(batch)
        plain = load_config(["stage=input_1_ctc", *args, "ctc.aux_layer=0"])
        main = EncoderCTC(plain, module.vocab)
        main.load_state_dict({k: v for k, v in module.state_dict().items() if ".aux." not in k})
        main_loss, main_lp, _, no_aux = main._loss(batch)
    assert no_aux is None and aux is not None and aux > 0
    assert torch.allclose(total, 0.75 * main_loss + 0.25 * aux)
    assert torch.equal(log_probs, main_lp)  # decoding reads the top head only
    assert module.ctc_head.aux[-1].out_features == len(module.aux_vocab) == len(cfg.ctc.vocab) + 1
    module.apply_freezing(list(cfg.stage.trainable))
    _check_one_step(module, batch, DECLARED["input_1_ctc"])  # the inner head and every layer learn
    with pytest.raises(ValueError, match=r"ctc.aux_layer must be in 0..2"):
        EncoderCTC(load_config(["stage=input_1_ctc", *args, "ctc.aux_layer=3"]), module.vocab)


def test_embedding_ctc_rewards_speech_that_reads_like_the_transcript_tokens(speech_args):
    cfg = load_config(["stage=input_2_align", *speech_args, "speech_llm.embedding_ctc_weight=0.5"])
    model = build(cfg)
    text = "the cat is red"
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    table = model.llm.get_input_embeddings().weight.detach()
    gap = -table.mean(0, keepdim=True)  # points away from the vocabulary: a blank frame
    frames = torch.cat([torch.cat([table[i : i + 1], gap, gap]) for i in ids])[None]  # 3 frames per token
    lens = torch.tensor([frames.shape[1]])
    matching = model.embedding_ctc_loss(frames, lens, [text])
    shuffled = model.embedding_ctc_loss(frames[:, torch.randperm(frames.shape[1])], lens, [text])
    noise = model.embedding_ctc_loss(torch.randn_like(frames), lens, [text])
    assert matching < 0.5 * min(shuffled, noise)

    batch = _first_batch(ASRDataModule(encoder_data_config(cfg)))
    model.apply_freezing(list(cfg.stage.trainable))
    model.eval()
    with torch.no_grad():
        with_ctc = model._step(batch)[0]
        model.cfg.speech_llm.embedding_ctc_weight = 0.0
        plain = model._step(batch)[0]
        speech, speech_lens = model.speech_embeddings(batch["feats"], batch["feats_lens"])
        extra = model.embedding_ctc_loss(speech, speech_lens, batch["texts"])
    assert extra > 0 and torch.allclose(with_ctc, plain + 0.5 * extra)


def test_streaming_prefill_equals_the_teacher_forced_sequence(speech_args, mini_corpus):
    cfg = load_config(["stage=input_3_prompt", *speech_args])
    model = build(cfg).eval()
    rng = np.random.default_rng(0)
    wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (9000, 13000)]
    stream = StreamingInput(model)
    state = stream.start()
    for wav in wavs[:1]:
        for i in range(0, len(wav), 2560):
            stream.accept_audio(state, wav[i : i + 2560])
    reply = stream.end_turn(state, max_new_tokens=3)
    # The same turn, teacher-forced offline: speech embeddings of the whole utterance.
    from datamodules.features import fbank

    feats = torch.from_numpy(fbank(wavs[0]))[None]
    speech, lens = model.speech_embeddings(feats, torch.tensor([feats.shape[1]]))
    emb, mask, _ = model.build_sequences(speech, lens, [[Turn(0, None)]], "input_3_prompt", left_pad=False)
    with torch.inference_mode():
        logits = model.llm(inputs_embeds=emb, attention_mask=mask).logits[0, -1]
    assert int(logits.argmax()) == (reply[0] if reply else model.layout.eos_id)
    # positions: system + turn + reply + answer end
    assert state.positions == emb.shape[1] + len(reply) + len(model.layout.answer_end)


def test_lexical_adapter_starts_from_the_stage1_ctc_head(speech_args):
    from modules.speech_llm.model import unit_lexicon

    lexical = [*speech_args, "adapter.lexical=true", "ctc.units=bpe"]  # word pieces: mean embeddings
    train.main(["stage=input_1_ctc", *lexical])
    head = read_checkpoint(run_dir(load_config(["stage=input_1_ctc", *lexical])) / "model.pt")["state_dict"]
    cfg2 = load_config(["stage=input_2_align", *lexical])
    m2 = build(cfg2)
    assert m2.adapter.ctc.out_features == len(m2.ctc_units) == head["ctc_head.out.weight"].shape[0]
    load_stage_outputs(cfg2, m2)
    assert torch.equal(m2.adapter.ctc.weight, head["ctc_head.out.weight"])
    table = m2.llm.get_input_embeddings().weight
    piece = next(i for i, u in enumerate(m2.ctc_units.units) if u.startswith("\u2581") and len(u) > 2)
    ids = m2.tokenizer(m2.ctc_units.units[piece].replace("\u2581", " "), add_special_tokens=False)["input_ids"]
    assert torch.allclose(m2.adapter.lexicon[piece], table[ids].mean(0))
    assert torch.equal(m2.adapter.lexicon[0], torch.zeros_like(table[0]))  # the blank adds nothing
    assert torch.equal(unit_lexicon(m2.ctc_units, m2.tokenizer, table.detach()), m2.adapter.lexicon)
    m2.apply_freezing(list(cfg2.stage.trainable))
    _check_one_step(m2, _first_batch(ASRDataModule(encoder_data_config(cfg2))), DECLARED["input_2_align"])

    metrics = train.main(["stage=input_2_align", *lexical])
    assert metrics["train_steps"] == 2
    saved = read_checkpoint(run_dir(cfg2) / "model.pt")["state_dict"]
    assert {"adapter.ctc.weight", "adapter.lexicon"} <= set(saved)
    # later stages rebuild the same adapter and load the trained lexical path
    cfg3 = load_config(["stage=input_3_prompt", *lexical])
    m3 = build(cfg3)
    load_stage_outputs(cfg3, m3)
    assert torch.equal(m3.adapter.lexicon, saved["adapter.lexicon"])
    assert torch.equal(m3.adapter.ctc.weight, saved["adapter.ctc.weight"])


def test_llm_token_units_give_the_lexical_path_the_exact_llm_embeddings(speech_args, tmp_path):
    from modules.llm.stand_in import ensure_tokenizer
    from modules.speech_llm.model import unit_lexicon

    lexical = [*speech_args, "adapter.lexical=true", "ctc.units=llm"]
    train.main(["stage=input_1_ctc", *lexical])
    cfg2 = load_config(["stage=input_2_align", *lexical])
    m2 = build(cfg2)
    table = m2.llm.get_input_embeddings().weight
    assert torch.equal(m2.adapter.lexicon[1:], table[torch.tensor(m2.ctc_units.token_ids)])
    assert torch.equal(m2.adapter.lexicon[0], torch.zeros_like(table[0]))
    # an LLM with another tokenizer is refused, naming a token that differs
    other = ensure_tokenizer(load_config(["stage=llm_text", *speech_args, f"run_root={tmp_path / 'other'}",
                                          "llm.path=${run_root}/${experiment}/llm_text/hf", "llm.arch.vocab_size=300"]))  # fmt: skip
    with pytest.raises(ValueError, match="tokens of another tokenizer"):
        unit_lexicon(m2.ctc_units, other, torch.zeros(len(other), table.shape[1]))
    saved = tmp_path / "other" / "tiny" / "llm_text" / "hf"
    assert (saved / "tokenizer.json").is_file() and not (saved / "config.json").exists()  # tokenizer only, for now
    assert ensure_tokenizer(load_config(["stage=input_1_ctc", *speech_args, f"run_root={tmp_path / 'other'}",
                                         f"llm.path={saved}"])).get_vocab() == other.get_vocab()  # fmt: skip


def streamed_chunk_states(stream: StreamingInput, state, wav: np.ndarray) -> list[torch.Tensor]:
    """The LLM's last hidden state each time the streaming path completes a chunk's two embeddings
    while `wav` is fed 160 ms at a time."""
    emitted, online = 0, []
    for i in range(0, len(wav), 2560):
        emitted += stream.accept_audio(state, wav[i : i + 2560])
        if emitted and emitted % 2 == 0 and len(online) < emitted // 2:
            online.append(state.last_hidden.float())
    return online


def test_chunk_states_are_the_streaming_paths_last_hidden_states(speech_args):
    """The state head sees, offline, exactly what the streaming path has after each 160 ms chunk."""
    model = build(load_config(["stage=input_4_state", *speech_args])).eval()
    wav = np.random.default_rng(1).standard_normal(11000).astype(np.float32) * 0.1
    offline = chunk_states(model, [wav, wav[:6000]])
    assert len(offline[0]) == len(decision_times(model, len(wav) / 16000))
    stream = StreamingInput(model)
    state = stream.start()
    online = streamed_chunk_states(stream, state, wav)
    assert len(online) >= 3
    torch.testing.assert_close(torch.stack(online), offline[0][: len(online)], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(offline[1][:2], offline[0][:2], atol=1e-4, rtol=1e-4)  # causal: the prefix agrees


def test_chunk_states_after_an_exchange_are_the_streaming_paths(speech_args):
    """A turn recorded after an earlier exchange reads what the streaming path has once the LLM
    answered the first question, and differs from the same turn opening the conversation."""
    model = build(load_config(["stage=input_4_state", *speech_args])).eval()
    rng = np.random.default_rng(2)
    question, wav = (rng.standard_normal(n).astype(np.float32) * 0.1 for n in (9000, 11000))
    offline = chunk_states(model, [wav, wav], [exchange_embeddings(model, question), None])
    stream = StreamingInput(model)
    state = stream.start()
    stream.accept_audio(state, question)
    stream.reply(state, max_new_tokens=model.cfg.speech_llm.max_answer_tokens)
    stream.reset_turn(state)
    online = streamed_chunk_states(stream, state, wav)
    assert len(online) >= 3
    torch.testing.assert_close(torch.stack(online), offline[0][: len(online)], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(offline[0], offline[1], atol=1e-3)


def test_record_turns_puts_an_earlier_exchange_before_the_share_asked(speech_args):
    cfg = load_config(["stage=input_4_state", *speech_args])
    model = build(cfg).eval()
    alone = record_turns(model, cfg.data.turns.train_shards, limit=8, batch=4)["turns"]
    mixed = record_turns(model, cfg.data.turns.train_shards, limit=8, batch=4, context_prob=1.0)["turns"]
    assert not any(t["context"] for t in alone)
    first_question = next(i for i, t in enumerate(mixed) if t["kind"] == "question")
    assert [t["context"] for t in mixed] == [i > first_question for i in range(len(mixed))]
    for a, m in zip(alone, mixed):
        assert a["id"] == m["id"] and a["states"].shape == m["states"].shape
        assert torch.allclose(a["states"], m["states"], atol=1e-5) == (not m["context"])


def test_state_decision_rule_checks_drop_first():
    p = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.3, 0.6]])
    assert decide(p, 0.5, 0.5) == (ANSWER, 1)
    assert decide(p[[0, 2]], 0.5, 0.5) == (DROP, 1)
    assert decide(torch.tensor([[0.2, 0.45, 0.55]]), 0.4, 0.5) == (DROP, 0)  # both fire: state 2 wins
    assert decide(p[:1], 0.5, 0.5) == (LISTEN, 1)


def test_the_judge_hears_both_voice_groups_at_full_context_and_loads_from_its_own_config(speech_args):
    """Stage `judge`: trained on the ASR voices plus the assistant voice's training split (its
    BPE units see both), full context; `load_judge` rebuilds it from the config it was trained
    with even where the evaluating config's encoder differs; `eval_judge` reports one floor per
    voice group."""
    import infer
    from datamodules.shards.reader import iter_metadata
    from modules.encoder.ctc import load_judge

    cfg = load_config(["stage=judge", *speech_args])
    assert cfg.encoder.chunk_frames == 0 and cfg.ctc.units == "bpe"
    metrics = train.main(["stage=judge", *speech_args, "ctc.bpe_vocab_size=64"])
    assert {"ctc_wer_dev_chunkfull", "ctc_wer_assistant_dev_chunkfull"} <= set(metrics)
    saved = torch.load(Path(cfg.run_root) / "tiny" / "judge" / "model.pt", weights_only=True)
    assert "tts/train" in saved["run_config"]["data"]["asr"]["train_shards"]
    tts_words = {w for _, m in iter_metadata(cfg.data.tts.train_shards) for w in m["text"].split()}
    judge = load_judge(load_config(["stage=output_3_prefix", *speech_args, "encoder.d_model=32"]))
    assert judge.encoder.cfg.d_model == 16 and judge.encoder.cfg.chunk_frames == 0 and not judge.training
    assert all(judge.vocab.encode(w) for w in list(tts_words)[:20])  # the assistant's words are spellable
    from datamodules.transcripts import normalize_transcript
    from evaluation.judge import UNHEARD, training_texts

    floors = infer.main(["eval_judge", *speech_args, "eval.limit=3"])
    groups = {"assistant voice (TTS test)", "held-out user voices (ASR test)"}
    assert groups <= set(floors) <= groups | {UNHEARD}
    assert all(floors[g]["utterances"] == 3 and floors[g]["wer"] >= 0 for g in groups)
    # the third group: the assistant's test sentences the judge never trained on
    seen = training_texts(cfg)
    assert normalize_transcript(next(iter_metadata(cfg.data.tts.train_shards))[1]["text"]) in seen
    tts_test = [normalize_transcript(m["text"]) for _, m in iter_metadata(cfg.data.tts.test_shards)]
    if any(t not in seen for t in tts_test[:3]):
        assert 1 <= floors[UNHEARD]["utterances"] <= 3
