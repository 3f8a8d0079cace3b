"""The speech LLM's streaming step and the one greedy decoding loop.

Glossary: B streams, V the LLM vocabulary, D the LLM width, n positions.

`StreamingInput` feeds 16 kHz audio chunk by chunk through fbank -> encoder -> adapter and
prefills the LLM's KV cache as the audio arrives (the paper's chunk-wise prefill); at the end of
a turn only the speech-end vector and the assistant header remain to prefill. The model holds no
stream: everything of one stream lives in its `InputState`, which saves itself (`state_dict`,
tensors and plain values only) and comes back with `InputState.from_state_dict`.

`greedy_loop` is the only greedy decoder of the project: offline batched replies
(`greedy_generate`, used by `SpeechLLM.generate`), streaming replies (`StreamingInput.reply`)
and the duplex engine's reply producer all run it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from datamodules.features import StreamingFbank
from modules.adapter import AdapterState
from modules.encoder.network import EncoderState

if TYPE_CHECKING:
    from modules.speech_llm.model import SpeechLLM

PROMPT_TASK = "input_3_prompt"  # the user-turn layout with the learned prompt (modules.speech_llm.model.PROMPT)


# --- the one greedy loop ----------------------------------------------------------------------
def greedy_loop(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor], torch.Tensor],
    eos_id: int,
    max_new_tokens: int,
    force: list[int] | None = None,
) -> list[list[int]]:
    """Greedy decoding of B streams; returns each stream's ids, without the eos.

    logits [B, V]: each row predicts its stream's next token. `step(next_ids [B]) -> logits [B, V]`
    feeds one token per stream (streams that already ended get one too, to be ignored) and
    returns the next predictions; it is called once per token kept, so the caller's cache holds
    every kept token. A stream ends at `eos_id` or after `max_new_tokens`. `force` (B = 1 only)
    replaces the greedy choices with fixed ids (each still costs its step); the stream then
    ends after `len(force)` tokens or at a forced eos.
    """
    if force is not None and len(logits) != 1:
        raise ValueError(f"forced ids need one stream; got {len(logits)}")
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    result: list[list[int]] = [[] for _ in range(len(logits))]
    limit = max_new_tokens if force is None else len(force)
    for i in range(limit):
        nxt = logits.argmax(-1) if force is None else torch.tensor([force[i]], device=logits.device)
        done |= nxt == eos_id
        for b in (~done).nonzero().flatten().tolist():
            result[b].append(int(nxt[b]))
        if bool(done.all()):
            break
        logits = step(nxt)
    return result


@torch.inference_mode()
def greedy_generate(
    llm: PreTrainedModel, emb: torch.Tensor, mask: torch.Tensor, eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy decoding from left-padded input embeddings emb [B, L, D], mask [B, L] (1 = valid);
    returns ids without eos."""
    cache = DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    table = llm.get_input_embeddings()
    run = {"mask": mask, "pos": pos[:, -1:] + 1}

    def step(nxt: torch.Tensor) -> torch.Tensor:
        run["mask"] = torch.cat([run["mask"], torch.ones_like(run["mask"][:, :1])], dim=1)
        o = llm(inputs_embeds=table(nxt[:, None]), attention_mask=run["mask"], position_ids=run["pos"],
                past_key_values=cache, use_cache=True)  # fmt: skip
        run["pos"] = run["pos"] + 1
        return o.logits[:, -1]

    return greedy_loop(out.logits[:, -1], step, eos_id, max_new_tokens)


# --- one stream's state -------------------------------------------------------------------------
def cache_state_dict(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [1, H, n, Dk] of every filled layer of an LLM KV cache."""
    return [(layer.keys, layer.values) for layer in cache.layers if layer.is_initialized]


def cache_from_state_dict(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


@dataclass
class InputState:
    """Per-conversation state of the streaming input path (one stream)."""

    fbank: StreamingFbank
    encoder: EncoderState
    adapter: AdapterState
    cache: DynamicCache = field(default_factory=DynamicCache)
    positions: int = 0  # LLM positions filled so far
    in_turn: bool = False  # a user turn is open (its start is prefilled)
    last_hidden: torch.Tensor | None = None  # [D] LLM's last hidden state after the latest prefill

    def state_dict(self) -> dict:
        """Each part's own state dict, the KV cache's layers and the counters (tensors and plain
        values only: loads with `torch.load(weights_only=True)`)."""
        return {
            "fbank": self.fbank.state_dict(),
            "encoder": self.encoder.state_dict(),
            "adapter": self.adapter.state_dict(),
            "cache": cache_state_dict(self.cache),
            "positions": self.positions,
            "in_turn": self.in_turn,
            "last_hidden": self.last_hidden,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> InputState:
        return cls(
            StreamingFbank.from_state_dict(d["fbank"]),
            EncoderState.from_state_dict(d["encoder"]),
            AdapterState.from_state_dict(d["adapter"]),
            cache_from_state_dict(d["cache"]),
            int(d["positions"]),
            bool(d["in_turn"]),
            d["last_hidden"],
        )


# --- the streaming step -----------------------------------------------------------------------
class StreamingInput:
    """Chunk-wise streaming prefill of spoken user turns into the frozen LLM (one model, many states)."""

    def __init__(self, model: SpeechLLM, task: str = PROMPT_TASK):
        self.model, self.task = model.eval(), task

    @torch.inference_mode()
    def prefill(self, state: InputState, emb: torch.Tensor) -> torch.Tensor:
        """Append emb [n, D] to the LLM cache; returns logits [n, V]."""
        n = emb.shape[0]
        pos = torch.arange(state.positions, state.positions + n, device=emb.device)[None]
        out = self.model.llm(
            inputs_embeds=emb[None],
            position_ids=pos,
            past_key_values=state.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        state.positions += n
        state.last_hidden = out.hidden_states[-1][0, -1]
        return out.logits[0]

    def start(self) -> InputState:
        """A new conversation: the system turn is prefilled."""
        m = self.model
        state = InputState(StreamingFbank(), m.encoder.init_state(), m.adapter.init_state())
        self.prefill(state, m.embed_ids(m.layout.system))
        return state

    @torch.inference_mode()
    def _speech(self, state: InputState, wav: np.ndarray, final: bool) -> torch.Tensor:
        m = self.model
        feats = state.fbank.finish() if final and len(wav) == 0 else state.fbank.accept(wav)
        if final and len(wav):
            feats = np.concatenate([feats, state.fbank.finish()])
        x = torch.from_numpy(feats)[None].to(m.encoder.cmvn_mean.device)
        enc, state.encoder = m.encoder.stream(x, state.encoder, final=final)
        emb, state.adapter = m.adapter.stream(enc, state.adapter)
        return emb[0]

    def accept_audio(self, state: InputState, wav: np.ndarray) -> int:
        """Feed 16 kHz mono audio (any length, e.g. 160 ms); returns speech embeddings prefilled."""
        emb = self._speech(state, wav, final=False)
        parts = []
        if not state.in_turn:
            parts.append(self.model.user_turn_start(self.task))
            state.in_turn = True
        if len(emb):
            parts.append(emb.to(parts[0].dtype if parts else emb.dtype))
        if parts:
            self.prefill(state, torch.cat(parts))
        return len(emb)

    @torch.inference_mode()
    def close_turn(self, state: InputState) -> torch.Tensor:
        """Flush the user's speech and prefill the speech-end vector and the assistant header;
        returns the logits [n, V] (the last row predicts the reply's first token)."""
        if not state.in_turn:
            raise RuntimeError("close_turn() without speech in this turn")
        tail = self._speech(state, np.zeros(0, dtype=np.float32), final=True)
        close = self.model.user_turn_end()
        return self.prefill(state, torch.cat([tail.to(close.dtype), close]))

    def reset_turn(self, state: InputState) -> None:
        """Fresh fbank, encoder and adapter state for the next user turn (the KV cache stays)."""
        m = self.model
        state.fbank = StreamingFbank()
        state.encoder, state.adapter = m.encoder.init_state(), m.adapter.init_state()
        state.in_turn = False

    @torch.inference_mode()
    def reply(
        self,
        state: InputState,
        max_new_tokens: int | None = None,
        force: list[int] | None = None,
        on_token: Callable[[list[int], torch.Tensor], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> list[int]:
        """Close the user turn, decode the reply greedily (`greedy_loop`) into the cache and close
        the assistant turn; returns the reply's ids. The reply and its end stay in the cache.

        `on_token(ids so far, hidden [D])` runs after each token is in the cache; `hidden` is the
        LLM state that predicted that token; `on_end()` runs once the reply is decoded, before
        the assistant turn's end is prefilled. `force`: fixed ids instead of the greedy choices.
        """
        m = self.model
        logits = self.close_turn(state)
        ids: list[int] = []

        def step(nxt: torch.Tensor) -> torch.Tensor:
            ids.append(int(nxt[0]))
            hidden = state.last_hidden
            out = self.prefill(state, m.embed_ids(ids[-1:]))
            if on_token is not None:
                on_token(ids, hidden)
            return out[-1:]

        limit = max_new_tokens or m.cfg.speech_llm.max_answer_tokens
        reply = greedy_loop(logits[-1:], step, m.layout.eos_id, limit, force)[0]
        if on_end is not None:
            on_end()
        self.prefill(state, m.embed_ids(m.layout.answer_end))
        return reply

    def end_turn(self, state: InputState, max_new_tokens: int | None = None) -> list[int]:
        """`reply`, then fresh input state for the next user turn."""
        reply = self.reply(state, max_new_tokens)
        self.reset_turn(state)
        return reply
