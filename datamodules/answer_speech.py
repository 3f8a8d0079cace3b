"""Spoken answers for stage output_3_prefix: (dialogue so far, the LLM's reply, codec tokens of it).

An example is ``{"id", "messages": chat messages up to the question (system, earlier turns with
the LLM's own replies, the question), "text": the reply, "codes": int64 [T]}``; the stage runs
the frozen LLM over messages + reply to get the hidden states of the reply tokens (the states
it had while generating them). Examples are built once per run in memory (a few thousand); this
module batches them by length (``B * (codes + text allowance) <= max_tokens_per_batch``) in a
shuffled order per epoch for training, in order otherwise::

    {"messages": list[list[dict]], "texts": list[str], "codes": int64 [B, T] (-1 padded),
     "codes_lens": int64 [B], "keys": list[str]}
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset

from datamodules.tts import PAD_CODE


def collate_answers(examples: list[dict]) -> dict[str, Any]:
    return {
        "messages": [e["messages"] for e in examples],
        "texts": [e["text"] for e in examples],
        "codes": pad_sequence([torch.as_tensor(e["codes"]) for e in examples], batch_first=True,
                              padding_value=PAD_CODE),
        "codes_lens": torch.tensor([len(e["codes"]) for e in examples], dtype=torch.long),
        "keys": [e["id"] for e in examples],
    }  # fmt: skip


def example_length(e: dict) -> int:
    return len(e["codes"]) + len(e["text"]) // 2


class _Batches(IterableDataset):
    def __init__(self, examples: list[dict], budget: int, shuffle: bool, seed: int):
        self.examples, self.budget, self.shuffle, self.seed, self.epoch = examples, budget, shuffle, seed, 0

    def __iter__(self):
        order = sorted(range(len(self.examples)), key=lambda i: example_length(self.examples[i]))
        batches, cur, longest = [], [], 0
        for i in order:
            n = example_length(self.examples[i])
            if cur and (len(cur) + 1) * max(longest, n) > self.budget:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            batches.append(cur)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(batches)
        self.epoch += 1
        for b in batches:
            yield collate_answers([self.examples[i] for i in b])


class AnswerSpeechDataModule(L.LightningDataModule):
    """Batches of built examples per split (``{"train": [...], "dev": [...]}``)."""

    def __init__(self, examples: dict[str, list[dict]], max_tokens_per_batch: int = 6000, seed: int = 1234):
        super().__init__()
        self.examples, self.budget, self.seed = examples, max_tokens_per_batch, seed

    def make_loader(self, split: str) -> DataLoader:
        if not self.examples.get(split):
            raise ValueError(f"no {split} examples of spoken answers")
        return DataLoader(_Batches(self.examples[split], self.budget, split == "train", self.seed), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self.make_loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.make_loader("dev")
