"""Duplex dialogue: per-conversation `Session`s and the streaming speech-in / speech-out pipeline.

The models (`DuplexModel`: speech LLM with its state head, speech decoder, codec, VAD) hold no
conversation state: everything of one conversation lives in its `Session` (fbank tail, encoder
and adapter caches, the LLM's KV cache, the VAD's recurrent state and context, the dialogue
mode, pre-roll and turn audio, the history), so one model serves any number of sessions, and a
session saved to a file (`Session.save` / `Session.load`, tensors only) continues exactly as the
original would.

The state machine follows the release (reference section 2), without its bugs:

* idle: each 160 ms chunk goes through silero-vad (its model ships in the wheel); the last
  `preroll_chunks` chunks are kept. Speech opens a user turn: the pre-roll and the chunk are
  prefilled (decisions during the pre-roll are ignored, as the release does).
* listen: every chunk is prefilled into the LLM's cache and the state head decides on the last
  hidden state: P(drop) > threshold drops the turn (the cache is cropped back to where the turn
  began: no copy of the cache anywhere), else P(answer) > threshold answers. After
  `vad_end_chunks` chunks without speech the turn is dropped (the release's VAD time-out).
* answer: the turn is closed and `respond` generates the reply: a text producer thread (the LLM
  decoding token by token into the same cache, cutting segments at punctuation) and the speech
  consumer (speech decoder with the reply's hidden states as prefix, token FIFO, codec) run
  concurrently, so text keeps flowing while audio is synthesised. The reply and its end stay in
  the cache: the next turn sees the whole conversation.
* barge-in: a new user turn that reaches "answer" while the assistant still speaks stops the old
  reply's audio at that moment (the caller's timeline, see `infer.py chat`).

`respond` measures the paper's Table 4 rows per answer: state-1 decision -> first text segment ->
speech-decoder prefill -> first speech-token window -> first PCM.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import DynamicCache

from datamodules.corpus.turns import ANSWER, DROP
from datamodules.features import StreamingFbank
from modules.adapter import AdapterState
from modules.encoder.network import EncoderState
from modules.speech_llm.model import ALIGN, CHUNK_SAMPLES, PROMPT, STATE, InputState, SpeechLLM, StreamingInput
from server.fifo import TextSegmenter, TokenFIFO
from server.vad import VADGate

log = logging.getLogger(__name__)
SESSION_FORMAT = 1


# --- the session ------------------------------------------------------------------------------------
@dataclass
class Session:
    """All state of one conversation (module docstring)."""

    input: InputState
    vad: dict[str, torch.Tensor]
    mode: str = "idle"  # idle | listen | answer (until respond())
    clock: int = 0  # 160 ms input chunks consumed
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # < 160 ms not yet consumed
    preroll: list[np.ndarray] = field(default_factory=list)  # the last chunks heard while idle
    turn_start: int = 0  # LLM positions before the open user turn
    turn_chunks: int = 0  # chunks of the open turn (pre-roll included)
    quiet_chunks: int = 0  # consecutive chunks without speech in the open turn
    turn_audio: list[np.ndarray] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # {"role", "text"} of finished turns

    # --- save / restore: tensors and plain values only (torch.load with weights_only=True) -------
    def state_dict(self) -> dict:
        s = self.input
        return {
            "format": SESSION_FORMAT,
            "fbank": {k: torch.as_tensor(v) for k, v in s.fbank.state().items()},
            "encoder": {
                "pending": s.encoder.pending,
                "cache": s.encoder.cache,
                "frames_out": s.encoder.frames_out,
                "conv_cache": s.encoder.conv_cache,
            },
            "adapter": s.adapter.buffer,
            "cache": [(layer.keys, layer.values) for layer in s.cache.layers if layer.is_initialized],
            "positions": s.positions,
            "in_turn": s.in_turn,
            "last_hidden": s.last_hidden,
            "vad": dict(self.vad),
            "mode": self.mode,
            "clock": self.clock,
            "pending": torch.from_numpy(self.pending.copy()),
            "preroll": [torch.from_numpy(c.copy()) for c in self.preroll],
            "turn_start": self.turn_start,
            "turn_chunks": self.turn_chunks,
            "quiet_chunks": self.quiet_chunks,
            "turn_audio": [torch.from_numpy(c.copy()) for c in self.turn_audio],
            "history": list(self.history),
        }

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def from_state_dict(cls, d: dict) -> Session:
        if d.get("format") != SESSION_FORMAT:
            raise ValueError(f"session file format {d.get('format')!r}; this code reads format {SESSION_FORMAT}")
        cache = DynamicCache()
        for i, (k, v) in enumerate(d["cache"]):
            cache.update(k, v, i)
        enc = d["encoder"]
        state = InputState(
            StreamingFbank.from_state({"tail": d["fbank"]["tail"].numpy(), "frames": int(d["fbank"]["frames"])}),
            EncoderState(enc["pending"], enc["cache"], int(enc["frames_out"]), enc["conv_cache"]),
            AdapterState(d["adapter"]),
            cache,
            int(d["positions"]),
            bool(d["in_turn"]),
            d["last_hidden"],
        )
        return cls(
            state, dict(d["vad"]), d["mode"], int(d["clock"]), d["pending"].numpy(),
            [c.numpy() for c in d["preroll"]], int(d["turn_start"]), int(d["turn_chunks"]),
            int(d["quiet_chunks"]), [c.numpy() for c in d["turn_audio"]], list(d["history"]),
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> Session:
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


@dataclass
class Event:
    kind: str  # turn_start | answer | drop | vad_timeout
    chunk: int  # input chunk index (its end is at (chunk + 1) * 160 ms of input audio)
    probs: list[float] | None = None


@dataclass
class Reply:
    text: str
    segments: list[str]
    audio: np.ndarray  # 24 kHz
    pcm_chunks: list[tuple[float, np.ndarray]]  # (seconds after the decision, chunk) as they were produced
    latency_ms: dict[str, float]
    tokens: int


# --- the pipeline -----------------------------------------------------------------------------------
class DuplexModel:
    """The models of the duplex pipeline (no conversation state; see the module docstring)."""

    def __init__(self, cfg: DictConfig, speech_llm: SpeechLLM, decoder, codec, voice: torch.Tensor, judge=None):
        self.cfg = cfg
        self.llm = speech_llm.eval()
        self.stream = StreamingInput(self.llm, PROMPT)
        self.decoder, self.codec, self.voice, self.judge = decoder, codec, voice, judge
        self.vad = VADGate(cfg.duplex.vad_threshold)
        self.answer_threshold = float(cfg.speech_llm.state_answer_threshold)
        self.drop_threshold = float(cfg.speech_llm.state_drop_threshold)

    @classmethod
    def load(cls, cfg: DictConfig, with_judge: bool = True) -> DuplexModel:
        """The trained chain of `cfg`'s experiment: speech input (stages 2-4), decoder + prefix, codec."""
        from modules.codec.stage import load_codec, voice_tokens
        from modules.encoder.ctc import load_encoder_ctc
        from modules.speech_decoder.stage import load_speech_decoder
        from modules.speech_llm.model import load_speech_llm

        speech_llm = load_speech_llm(cfg, [ALIGN, PROMPT, STATE])
        decoder = load_speech_decoder(cfg)
        decoder.llm = speech_llm.llm  # one copy of the frozen LLM
        judge = load_encoder_ctc(cfg) if with_judge else None
        return cls(cfg, speech_llm, decoder, load_codec(cfg), voice_tokens(cfg), judge)

    @classmethod
    def untrained(cls, cfg: DictConfig) -> DuplexModel:
        """`cfg`'s architecture with fresh weights (tests, benchmarks): only `llm.path` must exist."""
        from modules.codec.stage import Codec
        from modules.speech_decoder.stage import build as build_decoder
        from modules.speech_llm.model import build as build_speech_llm

        speech_llm = build_speech_llm(cfg)
        decoder = build_decoder(cfg).eval()
        decoder.llm = speech_llm.llm  # one copy of the frozen LLM
        voice = torch.zeros(cfg.codec.global_groups, dtype=torch.long)
        return cls(cfg, speech_llm, decoder, Codec(cfg).eval(), voice)

    def new_session(self) -> Session:
        return Session(self.stream.start(), self.vad.init_state())

    # --- input ----------------------------------------------------------------------------------
    def _reset_turn(self, s: Session) -> None:
        self.stream.reset_turn(s.input)
        s.mode, s.turn_chunks, s.quiet_chunks, s.turn_audio = "idle", 0, 0, []

    def _drop(self, s: Session) -> None:
        """Forget the open turn: crop the cache back to where it began (no copy)."""
        extra = s.input.positions - s.turn_start
        if extra:
            s.input.cache.crop(-extra)  # a view of the first turn_start positions (transformers 5: negative = remove)
        s.input.positions = s.turn_start
        self._reset_turn(s)

    def _prefill_chunk(self, s: Session, chunk: np.ndarray) -> torch.Tensor | None:
        emitted = self.stream.accept_audio(s.input, chunk)
        s.turn_chunks += 1
        s.turn_audio.append(chunk)
        return self.llm.state_probs(s.input.last_hidden) if emitted else None

    @torch.inference_mode()
    def feed(self, s: Session, audio: np.ndarray) -> list[Event]:
        """Feed 16 kHz mono audio (any length); returns the events of the chunks it completes.
        After an "answer" event call `respond` before feeding more audio."""
        if s.mode == "answer":
            raise RuntimeError("the session's turn reached 'answer': call respond() before feeding more audio")
        s.pending = np.concatenate([s.pending, np.asarray(audio, np.float32)])
        events: list[Event] = []
        d = self.cfg.duplex
        while len(s.pending) >= CHUNK_SAMPLES:
            chunk, s.pending = s.pending[:CHUNK_SAMPLES], s.pending[CHUNK_SAMPLES:]
            k, s.clock = s.clock, s.clock + 1
            speech = self.vad.speech_prob(s.vad, chunk) >= self.vad.threshold
            if s.mode == "idle":
                s.preroll = [*s.preroll, chunk][-d.preroll_chunks :]
                if not speech:
                    continue
                s.mode, s.turn_start = "listen", s.input.positions
                events.append(Event("turn_start", k))
                for c in s.preroll[:-1]:  # decisions during the pre-roll are ignored
                    self._prefill_chunk(s, c)
                chunk, s.preroll = s.preroll[-1], []
            s.quiet_chunks = 0 if speech else s.quiet_chunks + 1
            probs = self._prefill_chunk(s, chunk)
            if probs is not None:
                p = [round(float(x), 4) for x in probs]
                if p[DROP] > self.drop_threshold:
                    events.append(Event("drop", k, p))
                    self._drop(s)
                    continue
                if p[ANSWER] > self.answer_threshold:
                    events.append(Event("answer", k, p))
                    s.mode = "answer"
                    break
            if s.quiet_chunks >= d.vad_end_chunks:
                events.append(Event("vad_timeout", k))
                self._drop(s)
        return events

    def user_text(self, s: Session) -> str:
        """The open turn's words, as the stage-1 CTC model hears them (for printing)."""
        if self.judge is None or not s.turn_audio:
            return ""
        from modules.encoder.ctc import transcribe

        return transcribe(self.judge, [np.concatenate(s.turn_audio)], 16000, int(self.cfg.encoder.chunk_frames))[0]

    # --- output ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _produce_text(self, s: Session, out: queue.Queue, marks: dict, t0: float, force: list[int] | None) -> None:
        """Producer: close the user turn, decode the reply token by token into the session's
        cache, put (segment, hidden states [n, W]) on `out` as segments complete, then None.
        `force`: the reply's ids instead of the greedy choice (each still costs its LLM step)."""
        try:
            m, st = self.llm, s.input
            logits = self.stream.close_turn(st)
            seg = TextSegmenter(self.cfg.duplex.segment_min_tokens, self.cfg.duplex.segment_comma_after)
            ids, text, seg_hidden = [], "", []
            limit = m.cfg.speech_llm.max_answer_tokens if force is None else len(force)
            while len(ids) < limit:
                nxt = int(logits[-1].argmax()) if force is None else force[len(ids)]
                if nxt == m.layout.eos_id:
                    break
                ids.append(nxt)
                seg_hidden.append(st.last_hidden.float())  # the state that predicted this token
                logits = self.stream._prefill(st, m.embed_ids([nxt]))
                new = m.tokenizer.decode(ids, skip_special_tokens=True)
                piece, text = new[len(text) :], new
                if "\ufffd" in piece:  # an incomplete character: wait for the next token
                    text = text[: len(text) - len(piece)]
                    continue
                done = seg.feed(piece)
                if done:
                    marks.setdefault("text", time.perf_counter() - t0)
                    out.put((done, torch.stack(seg_hidden)))
                    seg_hidden = []
            rest = seg.flush()
            if rest:
                marks.setdefault("text", time.perf_counter() - t0)
                out.put((rest, torch.stack(seg_hidden) if seg_hidden else None))
            self.stream._prefill(st, m.embed_ids(m.layout.answer_end))
            marks["reply"] = m.tokenizer.decode(ids, skip_special_tokens=True).strip()
            marks["reply_tokens"] = len(ids)
        except BaseException as exn:  # handed to the consumer, re-raised there
            marks["error"] = exn
        finally:
            out.put(None)

    @torch.inference_mode()
    def _speak(self, text: str, hidden: torch.Tensor | None, marks: dict, t0: float, emit) -> None:
        """Consumer side: one segment through decoder (+ prefix) -> token FIFO -> codec."""
        dec, d = self.decoder, self.cfg.duplex
        emb, valid = dec.text_inputs([text])
        h = hv = None
        if hidden is not None and dec.prefix is not None:
            h, hv = hidden[None].to(emb.device), torch.ones(1, len(hidden), dtype=torch.bool, device=emb.device)

        def decode(tokens: list[int]) -> np.ndarray:
            codes = torch.tensor([tokens], dtype=torch.long, device=emb.device)
            return self.codec.decode(codes, self.voice)[0, 0].cpu().numpy()

        first = not marks.get("segments_spoken")
        fifo = TokenFIFO(decode, self.codec.hop, d.first_chunk_tokens if first else d.chunk_tokens, d.chunk_tokens,
                         d.context_tokens)  # fmt: skip

        def on_prefill():
            marks.setdefault("prefill", time.perf_counter() - t0)

        def on_token(step: int, token: torch.Tensor) -> None:
            tok = int(token[0])
            if tok >= self.codec.codec_cfg.codebook_size:  # EOS (the decoder's specials)
                return
            before = time.perf_counter() - t0
            for pcm in fifo.push(tok):
                marks.setdefault("tokens", before)
                marks.setdefault("pcm", time.perf_counter() - t0)
                emit(pcm)

        gen = torch.Generator(device=emb.device).manual_seed(int(self.cfg.seed) + marks.get("segments_spoken", 0))
        cap = min(int(dec.dcfg.max_tokens), 20 + int(d.max_tokens_per_char * len(text)))
        dec.generate(emb, valid, h, hv, max_tokens=cap, on_token=on_token, on_prefill=on_prefill, generator=gen)
        rest = fifo.flush()
        if len(rest):
            marks.setdefault("tokens", time.perf_counter() - t0)
            marks.setdefault("pcm", time.perf_counter() - t0)
            emit(rest)
        marks["segments_spoken"] = marks.get("segments_spoken", 0) + 1

    def respond(self, s: Session, force_ids: list[int] | None = None) -> Reply:
        """Answer the turn that ended in an "answer" event (module docstring); the session then
        listens again, with the reply in its context. `force_ids` replaces the LLM's greedy
        choices with a fixed reply (benchmarks and tests of untrained models)."""
        if s.mode != "answer":
            raise RuntimeError(f"respond() needs a turn that reached 'answer'; the session is {s.mode!r}")
        user = self.user_text(s)
        t0 = time.perf_counter()
        marks: dict = {}
        segments: queue.Queue = queue.Queue()
        producer = threading.Thread(target=self._produce_text, args=(s, segments, marks, t0, force_ids), daemon=True)
        producer.start()
        spoken, pcm = [], []

        def emit(chunk: np.ndarray) -> None:
            pcm.append((time.perf_counter() - t0, chunk))

        while (item := segments.get()) is not None:
            text, hidden = item
            spoken.append(text)
            self._speak(text, hidden, marks, t0, emit)
        producer.join()
        if "error" in marks:
            raise marks["error"]
        s.history += [{"role": "user", "text": user}, {"role": "assistant", "text": marks.get("reply", "")}]
        self._reset_turn(s)
        latency = {}
        if "pcm" in marks:
            latency = {"text": marks["text"], "prefill": marks["prefill"] - marks["text"],
                       "tokens": marks["tokens"] - marks["prefill"], "pcm": marks["pcm"] - marks["tokens"],
                       "total": marks["pcm"]}  # fmt: skip
            latency = {k: round(1000 * v, 1) for k, v in latency.items()}
        audio = np.concatenate([c for _, c in pcm]) if pcm else np.zeros(0, np.float32)
        return Reply(marks.get("reply", ""), spoken, audio, pcm, latency, int(marks.get("reply_tokens", 0)))
