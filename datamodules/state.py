"""Batches of recorded LLM hidden states per 160 ms chunk with their state labels: the data of
stage input_4_state (the recordings are made once by the stage, with the frozen chain).
"""

from __future__ import annotations

import lightning as L
import torch

from datamodules.corpus.turns import IGNORE


class ChunkStates(L.LightningDataModule):
    """Recorded chunk states and labels of the train and dev turns (IGNORE chunks left out)."""

    def __init__(self, train: list[dict], dev: list[dict], batch_size: int, seed: int):
        super().__init__()
        self.parts = {"train": self._stack(train), "dev": self._stack(dev)}
        self.batch_size, self.seed = batch_size, seed

    @staticmethod
    def _stack(turns: list[dict]) -> torch.utils.data.TensorDataset:
        hidden, labels = torch.cat([t["states"] for t in turns]), torch.cat([t["labels"] for t in turns])
        keep = labels != IGNORE
        return torch.utils.data.TensorDataset(hidden[keep], labels[keep])

    def _loader(self, split: str, shuffle: bool):
        def collate(rows):
            hidden, labels = zip(*rows)
            return {"hidden": torch.stack(hidden), "labels": torch.stack(labels)}

        gen = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(self.parts[split], self.batch_size, shuffle=shuffle, collate_fn=collate,
                                           generator=gen)  # fmt: skip

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("dev", False)
