"""Stage llm_text: tokenizer, chat encoding, a short real fit, save/load, resume, evaluation."""

import json

import pytest
import torch

import train
from datamodules.text_qa import IGNORE_INDEX, dialogue_messages, encode_chat
from datamodules.tokenizer import train_bpe_tokenizer
from modules.config import load_config
from modules.llm.hf import build_qwen2, load_llm
from modules.stage import read_checkpoint

TINY = [
    "llm.arch.vocab_size=400",
    "llm.arch.hidden_size=32",
    "llm.arch.intermediate_size=64",
    "llm.arch.num_hidden_layers=1",
    "llm.arch.num_attention_heads=2",
    "llm.arch.num_key_value_heads=1",
    "data.text_qa.batch_size=4",
    "data.text_qa.max_tokens_per_batch=400",
    "data.text_qa.bucket_pool=16",
    "data.text_qa.val_dialogues=4",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "eval.limit=6",
    "eval.max_new_tokens=8",
]


@pytest.fixture
def transcripts(tmp_path):
    path = tmp_path / "asr_train.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["the red fox runs home", "seven small dogs sleep"])
    )
    return path


def test_chat_labels_cover_the_chosen_turns_only():
    tok = train_bpe_tokenizer(["What is two plus two? Two plus two is four. system user assistant"] * 50, 300)
    turns = [
        {"question": "What is two plus two?", "answer": "Two plus two is four."},
        {"question": "What is that plus two?", "answer": "Four plus two is six."},
    ]
    ids, labels = encode_chat(tok, dialogue_messages(turns), 512, roles=("assistant",))
    assert len(ids) == len(labels)
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "Two plus two is four.<|im_end|>Four plus two is six.<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system")
    # training default: user and assistant turns, never the system prompt or role headers
    _, labels = encode_chat(tok, dialogue_messages(turns), 512)
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == (
        "What is two plus two?<|im_end|>Two plus two is four.<|im_end|>"
        "What is that plus two?<|im_end|>Four plus two is six.<|im_end|>"
    )
    # truncation keeps ids and labels aligned
    ids, labels = encode_chat(tok, dialogue_messages(turns), 10)
    assert len(ids) == len(labels) == 10


def test_sequence_requests_are_consistent():
    import random

    from datamodules.corpus.answers import normalize_answer
    from datamodules.text_qa import sequence_request

    rng = random.Random(0)
    for _ in range(200):
        r = sequence_request(rng)
        items = r["answer"].rstrip(".").split(", ")
        assert 2 <= len(items) <= 8
        assert items[0].lower() in r["question"].lower() and items[-1].lower() in r["question"].lower()
        if r["question"].startswith("Count"):
            values = [int(normalize_answer(x)[0]) for x in items]
            step = -1 if "down" in r["question"] else 1
            assert values == list(range(values[0], values[0] + step * len(values), step))
            assert all(0 <= v <= 20 for v in values)


def test_repeat_requests_copy_transcripts_or_random_word_sequences():
    import random

    from datamodules.text_qa import REPEAT_PROMPTS, repeat_request, transcript_words

    transcripts = ["Don't forget the red kite.", "Is Maria's cat asleep?"]
    words = transcript_words(transcripts)
    assert words == sorted(["Don't", "forget", "the", "red", "kite", "Is", "Maria's", "cat", "asleep"])
    rng = random.Random(0)
    plain = [repeat_request(rng, transcripts, words, scramble_prob=0.0) for _ in range(20)]
    assert {r["answer"] for r in plain} == set(transcripts)
    scrambled = [repeat_request(rng, transcripts, words, scramble_prob=1.0) for _ in range(200)]
    for r in scrambled:
        assert any(r["question"] == p.format(s=r["answer"]) for p in REPEAT_PROMPTS)
        body = r["answer"].rstrip(".").split()
        assert 3 <= len(body) <= 10 and body[0][0].isupper()
        assert all(w in words or w[:1].lower() + w[1:] in words for w in body)
    assert len({r["answer"] for r in scrambled}) > 190  # fresh sequences, not a fixed set


def test_stuttered_repeat_requests_say_each_word_one_to_four_times():
    import itertools
    import random

    from datamodules.text_qa import REPEAT_PROMPTS, repeat_request

    transcripts = ["Don't forget the red kite.", "Is Maria's cat asleep?"]
    rng = random.Random(0)
    counts = set()
    for _ in range(100):
        r = repeat_request(rng, transcripts, ["a"], scramble_prob=0.0, stutter_prob=1.0)
        assert r["answer"] in transcripts
        said = next(
            r["question"][len(p.split("{s}")[0]) :]
            for p in REPEAT_PROMPTS
            if r["question"].startswith(p.split("{s}")[0])
        )
        assert said[-1] == r["answer"][-1] and said.count(r["answer"][-1]) == 1  # punctuation once, at the end
        runs = [(w, len(list(g))) for w, g in itertools.groupby(said[:-1].split())]
        assert [w for w, _ in runs] == r["answer"][:-1].split()
        counts |= {n for _, n in runs}
    assert counts == {1, 2, 3, 4}
    # stutter_prob=0 draws nothing extra: the random stream (and the default data) is unchanged
    a, b = random.Random(1), random.Random(1)
    assert [repeat_request(a, transcripts, ["a"], 0.5) for _ in range(20)] == [
        repeat_request(b, transcripts, ["a"], 0.5, stutter_prob=0.0) for _ in range(20)
    ]


def test_spoken_form_lowercases_and_drops_punctuation_of_user_turns_only():
    import random

    from datamodules.text_qa import repeat_request, spoken_form, to_spoken_form

    assert spoken_form("Which is bigger, eight or nine?") == "which is bigger eight or nine"
    assert spoken_form("Don't forget Maria's kite!") == "don't forget maria's kite"
    turns = [{"question": "What is two plus three?", "answer": "Two plus three is five."}]
    assert to_spoken_form(turns) == [{"question": "what is two plus three", "answer": "Two plus three is five."}]
    # a repeat request keeps its written instruction; only the sentence said changes
    r = repeat_request(random.Random(0), ["The Cat, Tom, is red."], ["a"], scramble_prob=0.0)
    (spoken,) = to_spoken_form([r])
    assert spoken["question"].endswith(": the cat tom is red") and spoken["answer"] == "The Cat, Tom, is red."
    assert spoken["question"][0].isupper()


def test_spread_user_turns_keep_the_text_between_gaps_and_learn_each_token_once():
    import random

    from datamodules.text_qa import GAP_ID, SpreadSpec

    tok = train_bpe_tokenizer(["what is two plus three Two plus three is five. system user assistant"] * 50, 300)
    turns = [
        {"question": "what is two plus three", "answer": "Two plus three is five."},
        {"question": "what is two plus two", "answer": "Two plus two is four."},
    ]
    dense, dense_labels = encode_chat(tok, dialogue_messages(turns), 512)
    rng = random.Random(0)
    ids, labels = encode_chat(tok, dialogue_messages(turns), 512, spread=SpreadSpec(rng, 2.0, 0.3))
    assert len(ids) == len(labels) > len(dense)
    # dropping the gaps and the second position of a repeated token gives the dense chat back
    kept = [(i, lab) for k, (i, lab) in enumerate(zip(ids, labels)) if i != GAP_ID and not (k and ids[k - 1] == i)]
    assert [i for i, _ in kept] == dense and [lab for _, lab in kept] == dense_labels
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == GAP_ID)
    # only user content spreads: the text before the first gap is the system turn and user header
    first_gap = ids.index(GAP_ID)
    assert tok.decode(ids[:first_gap]).endswith("<|im_start|>user\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    first_user_end, first_answer_end = [k for k, i in enumerate(ids) if i == im_end][1:3]
    assert GAP_ID not in ids[first_user_end:first_answer_end]  # the assistant turn stays dense
    # about 1 + mean_gaps positions per user token (gaps 0..4, mean 2)
    user_tokens = sum(len(tok(t["question"])["input_ids"]) for t in turns)
    assert 2.0 < (len(ids) - len(dense) + user_tokens) / user_tokens < 5.0


def test_spread_examples_train_through_zero_vectors_at_the_gaps():
    import random

    from datamodules.text_qa import GAP_ID, TextQADataConfig, TextQAStream, collate
    from modules.llm.stand_in import TextLLM

    cfg = load_config(["stage=llm_text", "experiment=tiny", *TINY])
    tok = train_bpe_tokenizer(["what is two plus three Two plus three is five. system user assistant"] * 50, 400)
    data = TextQADataConfig(repeat_prob=0.0, sequence_prob=0.0, speech_spread_prob=1.0)
    stream = TextQAStream(tok, data, qa_seed=0, seed=0, transcripts=[])
    batch = collate([stream.example(random.Random(k)) for k in range(3)], tok.pad_token_id)
    assert (batch["input_ids"] == GAP_ID).any()
    module = TextLLM(cfg, tok)
    loss, _ = module._loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and module.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    # a gap reads a zero vector, not some token's embedding
    with torch.no_grad():
        as_token = module._loss(
            {**batch, "input_ids": batch["input_ids"].masked_fill(batch["input_ids"] == GAP_ID, 5)}
        )[0]
        embeds = module.llm.get_input_embeddings()(batch["input_ids"].clamp(min=0))
        embeds[batch["input_ids"] == GAP_ID] = 0.0
        logits = module.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, :-1]
        by_hand = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
    assert torch.allclose(loss, by_hand, atol=1e-5) and (loss - as_token).abs() > 1e-6


def test_user_turn_loss_off_trains_on_assistant_turns_only():
    import random

    from datamodules.text_qa import REPEAT_PROMPTS, TextQADataConfig, TextQAStream

    sentence = "Don't forget the red kite."
    tok = train_bpe_tokenizer([sentence + " ".join(REPEAT_PROMPTS) + " system user assistant"] * 50, 300)
    for user_loss in (True, False):
        cfg = TextQADataConfig(repeat_prob=1.0, user_turn_loss=user_loss)
        stream = TextQAStream(tok, cfg, qa_seed=0, seed=0, transcripts=[sentence])
        _, labels = stream.example(random.Random(0))
        learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
        assert learned.endswith(sentence + "<|im_end|>")
        assert learned.count(sentence) == (2 if user_loss else 1)  # the request repeats it in the user turn


def test_previous_token_head_init_attends_to_the_previous_position():
    from modules.llm.hf import LLMArchConfig

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = None, 2, 0

        def __len__(self):
            return 50

    arch = dict(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    ids = torch.randint(3, 50, (2, 24))
    for init in (False, True):
        torch.manual_seed(0)
        model = build_qwen2(LLMArchConfig(**arch, init_previous_token_head=init), Tok())
        model.config._attn_implementation = "eager"
        attn = model(input_ids=ids, output_attentions=True).attentions[0]  # [B, heads, L, L]
        on_previous = attn.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))  # weight on m - 1, per head
        if init:  # heads 0 and 1 share key/value group 0; the other group is untouched
            assert (on_previous[:2] > 0.8).all() and (on_previous[2:] < 0.5).all()
        else:
            assert (on_previous < 0.5).all()


def test_tiny_config_respects_the_size_budget():
    cfg = load_config(["stage=llm_text", "experiment=tiny"])

    class Tok:  # only what build_qwen2 reads
        bos_token_id, eos_token_id, pad_token_id = None, 2, 0

        def __len__(self):
            return cfg.llm.arch.vocab_size

    with torch.device("meta"):
        n = sum(p.numel() for p in build_qwen2(cfg.llm.arch, Tok()).parameters())
    assert 1_000_000 < n <= 15_000_000


def test_short_fit_saves_a_loadable_llm_and_resumes(tmp_path, transcripts):
    args = ["stage=llm_text", "experiment=tiny", f"run_root={tmp_path / 'runs'}",
            f"data.text_qa.repeat_manifest={transcripts}", f"data.text_qa.repeat_eval_manifest={transcripts}",
            *TINY]  # fmt: skip
    metrics = train.main([*args, "trainer.max_steps=4"])
    out = tmp_path / "runs" / "tiny" / "llm_text"
    assert metrics["train_steps"] == 4
    assert 0.0 <= metrics["text_qa_accuracy"] <= 1.0 and metrics["text_qa_turns"] >= 6
    assert 0.0 <= metrics["repeat_exact_match"] <= 1.0
    failures = [json.loads(line) for line in (out / "repeat_failures.jsonl").read_text().splitlines()]
    assert len(failures) == round(2 * (1 - metrics["repeat_exact_match"]))  # both fixture sentences are asked
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["text_qa_accuracy"] == metrics["text_qa_accuracy"]
    assert (out / "config.yaml").is_file() and list((out / "tb").rglob("events.out.tfevents.*"))

    cfg = load_config(args)
    model, tok = load_llm(cfg.llm)  # the one loading path, local files only
    assert sum(p.numel() for p in model.parameters()) == metrics["num_parameters"]
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")

    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["run_config"]["stage"]["trainable"] == ["llm"]
    assert ckpt["global_step"] == 4

    again = train.main([*args, "trainer.max_steps=6"])  # resumes from last.ckpt
    assert again["train_steps"] == 6
    with pytest.raises(ValueError, match=r"other settings .*\n  optim.lr: 0.003 -> 0.001\nresume=false"):
        train.main([*args, "trainer.max_steps=8", "optim.lr=1e-3"])  # another recipe never continues this run
    assert train.main([*args, "trainer.max_steps=2", "optim.lr=1e-3", "resume=false"])["train_steps"] == 2


def test_repeat_evaluation_normalizes_and_lists_failures(monkeypatch):
    from modules.llm import generate as qa_eval

    asked, replies = [], iter(["the cup is red", "Seven dogs.", "Go home now!"])

    def fake_replies(model, tokenizer, convs, max_new_tokens):
        asked.extend(c[-1]["content"] for c in convs)
        return [next(replies) for _ in convs]

    monkeypatch.setattr(qa_eval, "generate_replies", fake_replies)
    sentences = ["The cup is red.", "Seven small dogs.", "Go home now."]
    result = qa_eval.evaluate_repeat(torch.nn.Linear(1, 1), None, sentences, "Repeat after me: ", batch_size=2)
    assert asked == ["Repeat after me: " + s for s in sentences]
    assert result["exact_match"] == pytest.approx(2 / 3) and result["num_sentences"] == 3
    assert result["failures"] == [{"sentence": "Seven small dogs.", "reply": "Seven dogs."}]


def test_missing_llm_path_says_what_to_do(tmp_path):
    cfg = load_config(["stage=llm_text", "experiment=tiny", f"llm.path={tmp_path}/nothing"])
    with pytest.raises(FileNotFoundError, match="stage=llm_text experiment=tiny"):
        load_llm(cfg.llm)


def test_next_token_loss_equals_cross_entropy_over_full_logits():
    """The head runs on labelled positions only; loss, accuracy and input gradients are unchanged."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from modules.llm.hf import next_token_loss

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    llm = Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, 300, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    labels = ids.masked_fill(torch.arange(16) < 10, IGNORE_INDEX)
    emb = llm.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss, acc = next_token_loss(llm, labels, mask, inputs_embeds=emb, ignore_index=IGNORE_INDEX)
    (grad,) = torch.autograd.grad(loss, emb)

    logits = llm(inputs_embeds=emb, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    (ref_grad,) = torch.autograd.grad(ref, emb)
    valid = targets != IGNORE_INDEX
    ref_acc = ((logits.argmax(-1) == targets) & valid).sum() / valid.sum()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert float(acc) == pytest.approx(float(ref_acc))

    # nothing labelled: a zero loss (not NaN) that still backpropagates
    none = torch.full_like(labels, IGNORE_INDEX)
    zero, _ = next_token_loss(llm, none, mask, input_ids=ids, ignore_index=IGNORE_INDEX)
    zero.backward()
    assert float(zero.detach()) == 0.0
