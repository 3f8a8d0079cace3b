"""Text QA in chat format for the stand-in LLM (stage `llm_text`).

Training streams an endless mixture, drawn afresh from seeded generators:
  * multi-round QA dialogues over the *training* combinations of `datamodules.corpus.qa`;
  * "repeat after me" requests over the ASR training transcripts, so the LLM can copy
    text from its context, as any real instruction-tuned LLM can (the speech-alignment
    stage relies on it to emit transcripts);
  * counting and listing requests ("Count down from nine to four", "Name the months from
    March to July"): the sequence knowledge a real LLM brings from pre-training, which
    the step-by-step answers of the QA families build on.
Validation uses the fixed dev dialogues (held-out combinations). The loss covers the user
and assistant turns (the dialogue text is the stand-in's whole pre-training corpus), not
the system prompt.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from datamodules.corpus.answers import number_to_words
from datamodules.corpus.qa import DAYS, MONTHS, build_qa_splits, paraphrase_fact, sample_dialogue

IGNORE_INDEX = -100
# A "gap" position in a spread user turn (see `SpreadSpec`, `encode_chat`): the LLM reads a zero input
# vector there, as it does where the lexical adapter hears no word (a CTC blank).
GAP_ID = -1
HELDOUT_DRAW = {"all": None, "train": False}  # data.text_qa.combinations -> sample_dialogue's heldout
REPEAT_PROMPTS = ["Repeat after me: {s}", "Please say this back to me: {s}", "Say exactly this: {s}"]


@dataclass
class TextQADataConfig:
    # Training batches are length-bucketed and bounded by padded tokens (B * max length),
    # like the audio batches; validation uses a fixed batch size.
    max_tokens_per_batch: int = 4096
    bucket_pool: int = 512  # examples sorted together before cutting batches
    batch_size: int = 64  # validation
    num_workers: int = 0
    repeat_prob: float = 0.1  # share of "repeat after me" examples
    # Share of those whose sentence is a random word sequence (3-10 words of the transcripts'
    # vocabulary): no language prior can guess it, so only copying lowers the loss (on the
    # templated transcripts the stand-in learns the templates and guesses the slot words).
    scramble_prob: float = 0.0
    # Share of repeat requests whose words are said 1-4 times each (see repeat_request).
    stutter_prob: float = 0.0
    sequence_prob: float = 0.1  # share of counting / listing examples
    # Share of examples whose user turns are in spoken form: lower case, no punctuation, as
    # speech carries neither (the answers stay written). A real LLM reads "what is two plus
    # three" as well as "What is two plus three?"; a stand-in trained on written text only
    # answers half as many (README: stand-in variants).
    spoken_form_prob: float = 0.0
    # Share of QA dialogues whose user turns (in spoken form) are spread over positions as the
    # lexical adapter delivers speech at 12.5 Hz: each token is followed by 0 to 2g gap
    # positions (zero input vectors), g drawn per example from `spread_gaps`, some tokens
    # said twice, a few gaps before and after. Measured on the spoken QA: 2.8 speech positions
    # per spoken-form token. Without it a stand-in that only ever read dense text answers 0.37
    # of first questions from the lexical vectors alone (README: stand-in variants).
    speech_spread_prob: float = 0.0
    spread_gaps: tuple[float, float] = (1.0, 2.5)
    spread_repeat_prob: float = 0.1  # share of tokens that fill two positions
    # Share of fact questions asked with a training-only paraphrase (`datamodules.corpus.qa.FACT_PARAPHRASES`),
    # so the stand-in learns each fact apart from the phrasings the tests hold out.
    fact_paraphrase_prob: float = 0.0
    # Which QA combinations the stand-in reads: "all" (the default) as a pretrained LLM knows
    # its facts and sums, so the test questions' held-out combinations are held out from the
    # speech stages only and Table 3 measures what the speech path carries; "train" the spoken
    # corpus's training combinations only, a test of the stand-in's own generalization (at 580
    # steps it answered 0.565 of the test turns, 0.0 of the month family: docs/stand_in_llm.md).
    combinations: str = "all"
    # Train on the user turns too (a language-model loss on the questions), or on the
    # assistant turns only. A random word sequence in a user turn cannot be predicted, so its
    # loss there is pure noise.
    user_turn_loss: bool = True
    # Transcripts for the repeat task: the ASR *training* manifest (never dev/test text).
    repeat_manifest: str = "${corpus.root}/manifests/asr_train.jsonl"
    # Unseen sentences for the repeat evaluation after training (the test transcripts).
    repeat_eval_manifest: str = "${corpus.root}/manifests/asr_test.jsonl"
    max_length: int = 320  # tokens; longer examples are cut (none are at the tiny scale)
    val_dialogues: int = 100


@dataclass
class SpreadSpec:
    """How one example's user tokens spread over positions, as speech does (see `encode_chat`)."""

    rng: random.Random
    mean_gaps: float  # gap positions after a token: uniform over 0 .. 2 x mean_gaps
    repeat_prob: float  # a token fills two positions

    def positions(self, first: bool) -> list[bool]:
        """One token's positions: True = the token, False = a gap; `first` adds 0-2 leading gaps."""
        lead = [False] * self.rng.randint(0, 2) if first else []
        said = [True] * (2 if self.rng.random() < self.repeat_prob else 1)
        return lead + said + [False] * self.rng.randint(0, round(2 * self.mean_gaps))


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    roles: tuple[str, ...] = ("user", "assistant"),
    spread: SpreadSpec | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and labels that are IGNORE_INDEX outside the turns of `roles`.

    A turn's span (its content and closing <|im_end|>) is found in the rendered text (prefix
    renders are stable for ChatML) and mapped to tokens through the character offsets. With
    `spread`, the user turns' content tokens are spread over gap positions (`SpreadSpec`).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    user_spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] not in roles and not (spread and m["role"] == "user"):
            continue
        prefix = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=m["role"] == "assistant"
        )
        start = len(prefix) if m["role"] == "assistant" else text.index(m["content"], len(prefix))
        if text[start : start + len(m["content"])] != m["content"]:
            raise ValueError(
                f"the chat template does not render prefixes stably; cannot locate the {m['role']} turn {i}"
            )
        if m["role"] in roles:
            spans.append((start, start + len(m["content"]) + len(tokenizer.eos_token)))
        if m["role"] == "user":
            user_spans.append((start, start + len(m["content"])))
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, labels = [], []
    current = None  # the user span of the previous token
    for tok, (begin, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        label = tok if any(s <= begin < e for s, e in spans) else IGNORE_INDEX
        span = next((u for u in user_spans if u[0] <= begin < u[1]), None) if spread else None
        if span is None:
            ids.append(tok)
            labels.append(label)
        else:
            said = False
            for is_token in spread.positions(first=span != current):
                ids.append(tok if is_token else GAP_ID)
                labels.append(label if is_token and not said else IGNORE_INDEX)  # a repeat is not a target
                said |= is_token
        current = span
    return ids[:max_length], labels[:max_length]


def sequence_request(rng: random.Random) -> dict:
    """A counting or listing request over numbers, days or months (training only)."""
    kind = rng.choice(["number", "day", "month"])
    names = [number_to_words(n) for n in range(21)] if kind == "number" else DAYS if kind == "day" else MONTHS
    cyclic = kind != "number"
    n = rng.randint(2, 8)
    backwards = rng.random() < 0.5
    start = (
        rng.randrange(len(names))
        if cyclic
        else rng.randint(n - 1 if backwards else 0, 20 - (0 if backwards else n - 1))
    )
    step = -1 if backwards else 1
    items = [names[(start + step * i) % len(names)] for i in range(n)]
    if kind == "number":
        q = f"Count {'down ' if backwards else ''}from {items[0]} to {items[-1]}."
    else:
        q = f"Name the {kind}s from {items[0]} {'back ' if backwards else ''}to {items[-1]}."
    answer = ", ".join(items)
    return {"question": q, "answer": answer[:1].upper() + answer[1:] + "."}


def transcript_words(transcripts: list[str]) -> list[str]:
    """The distinct words of `transcripts`, as written (case and apostrophes kept)."""
    return sorted({w.strip(".,;:?!") for t in transcripts for w in t.split()} - {""})


def repeat_request(
    rng: random.Random, transcripts: list[str], words: list[str], scramble_prob: float, stutter_prob: float = 0.0
) -> dict:
    """ "Repeat after me: <s>" -> <s>, where <s> is a transcript or (with `scramble_prob`) 3-10 random words.

    With `stutter_prob` the request says each word 1-4 times ("the the cat cat cat is red") and
    the answer says it once: reading a word that spans several positions, as a word spans
    several speech embeddings (12.5 Hz) in stage input_2_align.
    """
    if rng.random() < scramble_prob:
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        s = s[:1].upper() + s[1:] + "."
    else:
        s = rng.choice(transcripts)
    said = s
    if stutter_prob > 0 and rng.random() < stutter_prob:
        core = s.rstrip(".!?")
        said = " ".join(" ".join([w] * rng.randint(1, 4)) for w in core.split()) + s[len(core) :]
    return {"question": rng.choice(REPEAT_PROMPTS).format(s=said), "answer": s, "said": said}


_UNSPOKEN = re.compile(r"[^\w\s']")


def spoken_form(text: str) -> str:
    """What speech carries of `text`: "Which is bigger, eight or nine?" -> "which is bigger eight or nine"."""
    return " ".join(_UNSPOKEN.sub(" ", text).lower().split())


def to_spoken_form(turns: list[dict]) -> list[dict]:
    """The user turns in spoken form; for a repeat request only the sentence said, not the instruction."""
    out = []
    for t in turns:
        said = t.get("said")
        q = t["question"].replace(said, spoken_form(said)) if said else spoken_form(t["question"])
        out.append({**t, "question": q})
    return out


def dialogue_messages(turns: list[dict]) -> list[dict]:
    history = [(t["question"], t["answer"]) for t in turns[:-1]]
    return [*chat_messages(history, turns[-1]["question"]), {"role": "assistant", "content": turns[-1]["answer"]}]


def read_transcripts(manifest: str | Path) -> list[str]:
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"repeat-task transcripts not found at {path}; build the corpus first (make corpus)")
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


class TextQAStream(IterableDataset):
    """Endless training batches; each worker (and rank) draws from its own seeded stream.

    Examples are drawn in pools of `bucket_pool`, sorted by length and cut into batches
    whose padded size `len(batch) * longest` stays within `max_tokens_per_batch`, so little
    compute goes into padding.
    """

    def __init__(
        self, tokenizer, cfg: TextQADataConfig, qa_seed: int, seed: int, transcripts: list[str], rank: int = 0
    ):
        if cfg.combinations not in HELDOUT_DRAW:
            raise ValueError(
                f"data.text_qa.combinations must be one of {sorted(HELDOUT_DRAW)}, not {cfg.combinations!r}"
            )
        self.tokenizer, self.cfg, self.transcripts, self.rank = tokenizer, cfg, transcripts, rank
        self.words = transcript_words(transcripts)
        self.qa_seed, self.seed = qa_seed, seed

    def example(self, rng: random.Random) -> tuple[list[int], list[int]]:
        u, spread = rng.random(), None
        if self.transcripts and u < self.cfg.repeat_prob:
            turns = [repeat_request(rng, self.transcripts, self.words, self.cfg.scramble_prob, self.cfg.stutter_prob)]
        elif u < self.cfg.repeat_prob + self.cfg.sequence_prob:
            turns = [sequence_request(rng)]
        else:
            paraphrase = self.cfg.fact_paraphrase_prob
            turns = [
                (paraphrase_fact(rng, t) if paraphrase and rng.random() < paraphrase else t).as_dict()
                for t in sample_dialogue(rng, self.qa_seed, heldout=HELDOUT_DRAW[self.cfg.combinations])
            ]
            if self.cfg.speech_spread_prob > 0 and rng.random() < self.cfg.speech_spread_prob:
                spread = SpreadSpec(rng, rng.uniform(*self.cfg.spread_gaps), self.cfg.spread_repeat_prob)
        if spread or (self.cfg.spoken_form_prob > 0 and rng.random() < self.cfg.spoken_form_prob):
            turns = to_spoken_form(turns)
        roles = ("user", "assistant") if self.cfg.user_turn_loss else ("assistant",)
        return encode_chat(self.tokenizer, dialogue_messages(turns), self.cfg.max_length, roles=roles, spread=spread)

    def __iter__(self):
        info = get_worker_info()
        rng = random.Random(f"text-qa-{self.seed}-{self.rank}-{info.id if info else 0}")
        while True:
            pool = sorted((self.example(rng) for _ in range(self.cfg.bucket_pool)), key=lambda x: len(x[0]))
            batches, batch = [], []
            for ex in pool:
                if batch and (len(batch) + 1) * len(ex[0]) > self.cfg.max_tokens_per_batch:
                    batches.append(batch)
                    batch = []
                batch.append(ex)
            batches.append(batch)
            rng.shuffle(batches)
            yield from (collate(b, self.tokenizer.pad_token_id) for b in batches)


class TextQAEval(Dataset):
    """Fixed examples: every assistant turn of the given dialogues, with its history (the
    loss is measured on the answers only)."""

    def __init__(self, tokenizer, dialogues: list[dict], max_length: int):
        self.items = [
            encode_chat(tokenizer, dialogue_messages(d["turns"][: k + 1]), max_length, roles=("assistant",))
            for d in dialogues
            for k in range(len(d["turns"]))
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids [B, L], attention_mask [B, L] (True = token), labels [B, L]; right padding."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class TextQADataModule(L.LightningDataModule):
    """`qa_seed` is the corpus seed (it decides which QA combinations are held out);
    `seed` drives the training stream."""

    def __init__(self, cfg: TextQADataConfig, tokenizer: PreTrainedTokenizerBase, qa_seed: int, seed: int):
        super().__init__()
        self.cfg, self.tokenizer, self.qa_seed, self.seed = cfg, tokenizer, qa_seed, seed

    def setup(self, stage: str | None = None) -> None:
        transcripts = read_transcripts(self.cfg.repeat_manifest) if self.cfg.repeat_prob > 0 else []
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.train_set = TextQAStream(self.tokenizer, self.cfg, self.qa_seed, self.seed, transcripts, rank)
        dev = build_qa_splits(self.qa_seed, {"dev": self.cfg.val_dialogues})["dev"]
        self.val_set = TextQAEval(self.tokenizer, dev, self.cfg.max_length)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=None, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        collate_fn = functools.partial(collate, pad_id=self.tokenizer.pad_token_id)
        return DataLoader(self.val_set, batch_size=self.cfg.batch_size, shuffle=False, collate_fn=collate_fn)


SYSTEM_PROMPT = "You are a helpful assistant."


def chat_messages(history: list[tuple[str, str]], question: str) -> list[dict]:
    """System prompt + earlier (question, answer) turns + the new question."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return messages
