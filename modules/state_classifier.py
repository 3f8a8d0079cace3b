"""The chunk-level state classifier (`StateClassifier`), its stage `input_4_state`, and what its
report (`infer.py eval_state`) reads.

A linear head (`StateClassifier`, owned by `SpeechLLM` as `state_head`; the release's `predictor_head`) reads the frozen LLM's
last hidden state at the end of every 160 ms chunk of a user turn: 0 keep listening, 1 the user
has finished and wants an answer, 2 the user has finished and no answer is due (backchannel,
filler, noise, speech to someone else); a fourth output is never a target and is ignored. At
inference P(drop) > `drop_threshold` drops the turn, else P(answer) > `answer_threshold`
answers it (the release's rule, state 2 checked first).

Everything in front of the head is frozen (encoder, adapter, prompt, LLM), so the stage runs
the speech LLM once over the turns of `data.turns` (`datamodules.corpus.turns`; the offline encoder
under the chunk mask, which equals the streaming path) and fits the head on the recorded
states: seconds per epoch instead of a forward pass of the LLM per step.

The report decides every test turn chunk by chunk as the streaming path would and measures:
per-class precision and recall (per chunk and per turn), the endpoint delay (ms from the true
end of a question to the answer decision, on the streaming path's clock), answers before the
end (cut-ins, e.g. during a mid-question pause), and the false-answer rate on state-2 material.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from datamodules.corpus.turns import ANSWER, DROP, IGNORE, LISTEN, STATE_NAMES, chunk_labels
from datamodules.features import fbank
from datamodules.shards.reader import SkipCounter, iter_decoded
from datamodules.state import ChunkStates
from modules.stage import StageModule, StageRun, StageSpec, validation_metrics

if TYPE_CHECKING:  # modules.speech_llm.model imports this module for the head
    from modules.speech_llm.model import SpeechLLM

log = logging.getLogger(__name__)

NUM_STATES = 4  # the head's outputs: listen, answer, drop and an ignored fourth (as the release)
PROMPT_TURN = "input_3_prompt"  # the user-turn layout with the prompt vectors (`SpeechLLM.user_turn_start`)


# --- the head ----------------------------------------------------------------------------------------
def decide(probs: torch.Tensor, answer_threshold: float, drop_threshold: float) -> tuple[int, int]:
    """(state, chunk) of the first decision over chunk probabilities [C, 3] (state 2 checked
    first, as the release); (LISTEN, C) if neither fires."""
    for c in range(len(probs)):
        if float(probs[c, DROP]) > drop_threshold:
            return DROP, c
        if float(probs[c, ANSWER]) > answer_threshold:
            return ANSWER, c
    return LISTEN, len(probs)


class StateClassifier(nn.Linear):
    """Linear(LLM width D -> 4) over the LLM's last hidden state at the end of a chunk.

    A `nn.Linear` itself, so its weights are `<owner attribute>.weight` / `.bias` in checkpoints.
    """

    decide = staticmethod(decide)

    def __init__(self, width: int):
        super().__init__(width, NUM_STATES)

    def probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(listen, answer, drop) [..., 3] from LLM last hidden states [..., D]: a softmax over the
        first three logits (the fourth is ignored, as in the release)."""
        return self(hidden.to(self.weight.dtype))[..., :IGNORE].float().softmax(-1)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """CE over chunk-end states [N, D] with labels [N] (IGNORE masked), the accuracy over the
        three states, and the number of labelled chunks."""
        logits = self(hidden)
        loss = nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
        valid = labels != IGNORE
        acc = ((logits[:, :IGNORE].argmax(-1) == labels) & valid).sum() / valid.sum().clamp(min=1)
        return loss, acc, int(valid.sum())


# --- recording the LLM's states -------------------------------------------------------------------
def _speech(module: SpeechLLM, wavs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """16 kHz waves -> the adapter's speech embeddings [N, S, D] and their lengths [N] (offline,
    under the encoder's chunk mask, which equals the streaming path)."""
    dev = module.state_head.weight.device
    feats = [torch.from_numpy(fbank(w)) for w in wavs]
    lens = torch.tensor([len(f) for f in feats])
    padded = nn.utils.rnn.pad_sequence(feats, batch_first=True).to(dev)
    return module.speech_embeddings(padded, lens.to(dev), int(module.cfg.encoder.chunk_frames))


@torch.no_grad()  # not inference_mode: the head trains on these tensors
def chunk_states(
    module: SpeechLLM, wavs: list[np.ndarray], contexts: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """Per 16 kHz turn: the LLM's last hidden state at the end of each chunk, [C, D] float32.

    The sequence is the streaming path's: system turn, the earlier exchange `contexts[i]` where
    one is given (`exchange_embeddings`), user-turn start (with the prompt), speech. Chunk c ends
    with speech embedding 2c + 1 (the adapter gives two per 160 ms chunk).
    """
    dev = module.state_head.weight.device
    speech, speech_lens = _speech(module, wavs)
    system, start = module.embed_ids(module.layout.system), module.user_turn_start(PROMPT_TURN)
    heads = [torch.cat([system, c, start]) if c is not None else torch.cat([system, start])
             for c in contexts or [None] * len(wavs)]  # fmt: skip
    total = max(len(h) + s for h, s in zip(heads, speech_lens.tolist()))
    emb = system.new_zeros(len(wavs), total, system.shape[1])
    mask = torch.zeros(len(wavs), total, dtype=torch.long, device=dev)
    for i, (h, s) in enumerate(zip(heads, speech_lens.tolist())):
        emb[i, : len(h)] = h
        emb[i, len(h) : len(h) + s] = speech[i, :s].to(h.dtype)
        mask[i, : len(h) + s] = 1
    hidden = module.llm(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    out = []
    for i, (h, s) in enumerate(zip(heads, speech_lens.tolist())):
        ends = [len(h) + min(2 * c + 1, s - 1) for c in range(math.ceil(s / 2))]
        out.append(hidden[i, ends].float().cpu())
    return out


@torch.no_grad()
def exchange_embeddings(module: SpeechLLM, question: np.ndarray) -> torch.Tensor:
    """The LLM inputs [P, D] of an exchange that opens a conversation: the user turn with the
    speech of `question` (16 kHz), then the frozen LLM's own greedy reply to it (the streaming
    path's) and the end of the assistant turn."""
    from modules.speech_llm.streaming import StreamingInput  # imported here: it imports the model module

    stream = StreamingInput(module, PROMPT_TURN)
    state = stream.start()
    stream.accept_audio(state, question)
    reply = stream.reply(state)
    speech, lens = _speech(module, [question])
    start = module.user_turn_start(PROMPT_TURN)
    return torch.cat([start, speech[0, : int(lens[0])].to(start.dtype), module.user_turn_end(),
                      module.embed_ids([*reply, *module.layout.answer_end])])  # fmt: skip


def _follows_exchange(turn_id: str, share: float) -> bool:
    """Whether a turn is recorded after an earlier exchange: a fixed draw per turn id."""
    return share > 0 and zlib.crc32(turn_id.encode()) % 10_000 < share * 10_000


def record_turns(
    module: SpeechLLM, shards: str, limit: int = 0, batch: int = 16, desc: str = "turns", context_prob: float = 0.0
) -> dict:
    """{"turns": [{"id", "kind", "label", "end", "duration", "context", "states" [C, D], "labels" [C]}],
    "skipped": {reason: count}} for the turns of `shards` (the first `limit`; 0 = all).

    `context_prob` of the turns (a fixed draw per turn id) follow an earlier exchange, as every
    turn after a conversation's first does (`exchange_embeddings`; the earlier question is the last
    question turn read before it): a head that only ever saw a conversation's first turn reads
    the state after an answer as the end of a question."""
    counter = SkipCounter()
    turns, pending = [], []
    previous: dict = {}  # the last question turn read: its "wav" and, once needed, its exchange "emb"

    def flush():
        contexts = []
        for sample in pending:
            m = sample["meta"]
            follows = bool(previous) and _follows_exchange(str(m.get("id", sample["key"])), context_prob)
            if follows and "emb" not in previous:  # the LLM answers each earlier question once
                previous["emb"] = exchange_embeddings(module, previous["wav"])
            contexts.append(previous["emb"] if follows else None)
            if m["kind"] == "question":
                previous.clear()
                previous["wav"] = sample["wav"]
        states_of = chunk_states(module, [p["wav"] for p in pending], contexts)
        for sample, context, states in zip(pending, contexts, states_of):
            m = sample["meta"]
            labels = chunk_labels(len(states), float(m["end"]), int(m["label"]))
            turns.append({"id": str(m.get("id", sample["key"])), "kind": m["kind"], "label": int(m["label"]),
                          "context": context is not None, "end": float(m["end"]), "duration": float(m["duration"]),
                          "states": states, "labels": torch.from_numpy(labels)})  # fmt: skip
        pending.clear()

    bar = tqdm(desc=desc, unit="turn", total=limit or None)
    for sample in iter_decoded(shards, counter=counter):
        if "kind" not in sample["meta"] or "end" not in sample["meta"]:
            counter.add("not_a_turn", sample["key"], "no 'kind'/'end' in its JSON (not a turns shard?)")
            continue
        pending.append(sample)
        if len(pending) == batch:
            flush()
            bar.update(batch)
        if limit and len(turns) + len(pending) >= limit:
            break
    n = len(pending)
    if pending:
        flush()
    bar.update(n)
    bar.close()
    if not turns:
        raise ValueError(f"no readable turn in {shards} (skipped: {dict(counter.totals)})")
    return {"turns": turns, "skipped": dict(counter.totals)}


def label_counts(turns: list[dict]) -> dict[str, int]:
    labels = torch.cat([t["labels"] for t in turns])
    return {STATE_NAMES.get(k, "ignore"): int((labels == k).sum()) for k in (LISTEN, ANSWER, DROP, IGNORE)}


# --- the stage -------------------------------------------------------------------------------------
def build_stage_module(cfg: DictConfig) -> StageModule:
    """The speech LLM that owns the head (its stage logic trains the head on recorded states)."""
    from modules.speech_llm.model import build  # imported here: that module imports this one

    return build(cfg)


def record_dialogue_states(run: StageRun) -> None:
    """Run the frozen speech LLM once over the train and dev turns and keep its chunk-end states."""
    module, turns = run.module, run.cfg.data.turns
    module.eval()
    recorded = {split: record_turns(module, turns[f"{split}_shards"], turns.limit if split == "train" else 0,
                                    turns.record_batch, f"LLM states, {split} turns", turns.context_prob)
                for split in ("train", "dev")}  # fmt: skip
    module.state_head.train()
    run.prepared["recorded"] = recorded
    run.metrics.update(
        {
            "turns": {s: len(r["turns"]) for s, r in recorded.items()},
            "chunks": {s: label_counts(r["turns"]) for s, r in recorded.items()},
            "skipped": {s: r["skipped"] for s, r in recorded.items()},
        }
    )


def recorded_states(run: StageRun) -> ChunkStates:
    recorded = run.prepared["recorded"]
    return ChunkStates(
        recorded["train"]["turns"], recorded["dev"]["turns"], run.cfg.data.turns.batch_size, run.cfg.seed
    )


STAGE_SPECS = {
    "input_4_state": StageSpec(
        build=build_stage_module, prepare=record_dialogue_states, data=recorded_states, evaluate=validation_metrics
    )
}
