"""The streaming engine: one speech-in / speech-out pipeline over per-conversation `Session`s.

`DuplexModel` holds the models (speech LLM with its state head, speech decoder, codec, VAD) and
no conversation state (`server.session`), so one engine serves any number of sessions. Its API,
used by `infer.py chat`, `eval_dialogue`, the streaming spoken-QA evaluation (Table 3) and the
benchmarks:

* `new_session()`: a conversation with the system turn prefilled.
* `prefill(session, pcm)`: 16 kHz audio of the open user turn through fbank -> encoder ->
  adapter -> LLM prefill (the paper's chunk-wise prefill); opens the turn if none is open.
* `decide(session)`: the state head on the LLM's last hidden state: listen, answer or drop.
* `generate(session)`: close the turn and reply: text (the one greedy loop of
  `modules.speech_llm.streaming`) and, with a decoder, speech.
* `feed(session, pcm)`: the duplex state machine over those three (VAD, pre-roll, decisions).

The state machine follows the release (reference section 2), without its bugs:

* idle: each 160 ms chunk goes through silero-vad (its model ships in the wheel); the last
  `preroll_chunks` chunks are kept. Speech opens a user turn: the pre-roll and the chunk are
  prefilled (decisions during the pre-roll are ignored, as the release does).
* listen: every chunk is prefilled into the LLM's cache and the state head decides on the last
  hidden state: P(drop) > threshold drops the turn (the cache is cropped back to where the turn
  began: no copy of the cache anywhere), else P(answer) > threshold answers. After
  `vad_end_chunks` chunks without speech the turn is dropped (the release's VAD time-out).
* answer: the turn is closed and `generate` replies: a text producer thread (the LLM decoding
  token by token into the same cache, cutting segments at punctuation) and the speech consumer
  (speech decoder with the reply's hidden states as prefix, token FIFO, codec) run concurrently,
  so text keeps flowing while audio is synthesised. The reply and its end stay in the cache:
  the next turn sees the whole conversation.
* barge-in: a new user turn that reaches "answer" while the assistant still speaks stops the old
  reply's audio at that moment (the caller's timeline, see `infer.py chat`).

`generate` measures the paper's Table 4 rows per answer: state-1 decision -> first text segment ->
speech-decoder prefill -> first speech-token window -> first PCM.

The frozen LLM is loaded once: the speech decoder shares the speech LLM's copy. The codec is
built for inference only (no discriminators), and the stage-1 CTC model that prints the user's
words is built only when `transcribe_user` asks for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import torch
from omegaconf import DictConfig

from datamodules.corpus.turns import ANSWER, DROP, LISTEN
from modules.speech_llm.model import ALIGN, CHUNK_SAMPLES, PROMPT, STATE, SpeechLLM
from modules.speech_llm.streaming import StreamingInput
from server.fifo import ReplyText, TextSegmenter, TokenFIFO
from server.session import Decision, Event, Reply, Session
from server.vad import VADGate

log = logging.getLogger(__name__)


class DuplexModel:
    """The models of the streaming pipeline and its API (module docstring); no conversation state.

    `decoder`, `codec` and `voice` are None for a text-only engine (spoken QA); `judge` (the
    stage-1 CTC model) only transcribes the user's words for printing.
    """

    def __init__(self, cfg: DictConfig, speech_llm: SpeechLLM, decoder=None, codec=None, voice=None, judge=None):
        self.cfg = cfg
        self.llm = speech_llm.eval()
        self.stream = StreamingInput(self.llm, PROMPT)
        self.decoder, self.codec, self.voice, self.judge = decoder, codec, voice, judge
        self.vad = VADGate(cfg.duplex.vad_threshold)
        self.answer_threshold = float(cfg.speech_llm.state_answer_threshold)
        self.drop_threshold = float(cfg.speech_llm.state_drop_threshold)

    @classmethod
    def load(
        cls,
        cfg: DictConfig,
        transcribe_user: bool = False,
        speech_output: bool = True,
        stages: tuple[str, ...] = (ALIGN, PROMPT, STATE),
    ) -> DuplexModel:
        """The trained chain of `cfg`'s experiment: speech input (`stages`), and with `speech_output`
        the decoder + prefix and the codec; with `transcribe_user` the stage-1 CTC model."""
        from modules.codec.stage import load_codec, voice_tokens
        from modules.encoder.ctc import load_encoder_ctc
        from modules.speech_decoder.stage import load_speech_decoder
        from modules.speech_llm.model import load_speech_llm

        speech_llm = load_speech_llm(cfg, list(stages))
        decoder = codec = voice = None
        if speech_output:
            decoder, codec, voice = (
                load_speech_decoder(cfg, llm=(speech_llm.llm, speech_llm.tokenizer)),
                load_codec(cfg),
                voice_tokens(cfg),
            )
        judge = load_encoder_ctc(cfg) if transcribe_user else None
        return cls(cfg, speech_llm, decoder, codec, voice, judge)

    @classmethod
    def untrained(cls, cfg: DictConfig) -> DuplexModel:
        """`cfg`'s architecture with fresh weights (tests, benchmarks): only `llm.path` must exist."""
        from modules.codec.stage import Codec
        from modules.speech_decoder.stage import SpeechDecoder
        from modules.speech_llm.model import build as build_speech_llm

        speech_llm = build_speech_llm(cfg)
        decoder = SpeechDecoder(cfg, speech_llm.llm, speech_llm.tokenizer).eval()  # the one copy of the LLM
        voice = torch.zeros(cfg.codec.global_groups, dtype=torch.long)
        return cls(cfg, speech_llm, decoder, Codec(cfg, with_discriminators=False).eval(), voice)

    def new_session(self) -> Session:
        return Session(self.stream.start(), self.vad.init_state())

    # --- the API: prefill, decide, generate ----------------------------------------------------------
    def prefill(self, s: Session, pcm: np.ndarray) -> int:
        """Prefill 16 kHz audio (e.g. one 160 ms chunk) of the open user turn into the LLM, opening
        the turn if none is open; returns the speech embeddings it prefilled (the state head has
        a new reading only when > 0)."""
        emitted = self.stream.accept_audio(s.input, pcm)
        s.turn_chunks += 1
        s.turn_audio.append(pcm)
        return emitted

    @torch.inference_mode()
    def decide(self, s: Session) -> Decision:
        """The state head's decision on the session's latest LLM state: drop when P(drop) > the
        drop threshold, else answer when P(answer) > the answer threshold, else listen."""
        p = [round(float(x), 4) for x in self.llm.state_probs(s.input.last_hidden)]
        if p[DROP] > self.drop_threshold:
            return Decision(DROP, p)
        return Decision(ANSWER if p[ANSWER] > self.answer_threshold else LISTEN, p)

    def generate(self, s: Session, force_ids: list[int] | None = None) -> Reply:
        """Close the open user turn and reply (module docstring): the text, and speech when the
        engine has a decoder; the session then listens again, with the reply in its context.
        `force_ids` replaces the LLM's greedy choices with a fixed reply (benchmarks and tests
        of untrained models)."""
        if not s.input.in_turn:
            raise RuntimeError(f"generate() needs an open user turn; the session is {s.mode!r} with none open")
        user = self.user_text(s)
        t0 = time.perf_counter()
        marks: dict = {}
        segments: queue.Queue = queue.Queue()
        spoken, pcm = [], []
        if self.decoder is None:  # text only: no consumer to overlap with
            self._produce_text(s, segments, marks, t0, force_ids)
            while (item := segments.get()) is not None:
                spoken.append(item[0])
        else:
            producer = threading.Thread(
                target=self._produce_text, args=(s, segments, marks, t0, force_ids), daemon=True
            )
            producer.start()

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

    def drop_turn(self, s: Session) -> None:
        """Forget the open turn: crop the cache back to where it began (no copy)."""
        extra = s.input.positions - s.turn_start
        if extra:
            s.input.cache.crop(-extra)  # a view of the first turn_start positions (transformers 5: negative = remove)
        s.input.positions = s.turn_start
        self._reset_turn(s)

    def extend_context(self, s: Session, ids: list[int]) -> None:
        """Prefill LLM token ids into the session's context as they are (a dialogue history)."""
        self.stream.prefill(s.input, self.llm.embed_ids(ids))

    # --- the duplex state machine ------------------------------------------------------------------
    def _reset_turn(self, s: Session) -> None:
        self.stream.reset_turn(s.input)
        s.mode, s.turn_chunks, s.quiet_chunks, s.turn_audio = "idle", 0, 0, []

    @torch.inference_mode()
    def feed(self, s: Session, audio: np.ndarray) -> list[Event]:
        """Feed 16 kHz mono audio (any length); returns the events of the chunks it completes.
        After an "answer" event call `generate` before feeding more audio."""
        if s.mode == "answer":
            raise RuntimeError("the session's turn reached 'answer': call generate() before feeding more audio")
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
                    self.prefill(s, c)
                chunk, s.preroll = s.preroll[-1], []
            s.quiet_chunks = 0 if speech else s.quiet_chunks + 1
            if self.prefill(s, chunk):
                decision = self.decide(s)
                if decision.state == DROP:
                    events.append(Event("drop", k, decision.probs))
                    self.drop_turn(s)
                    continue
                if decision.state == ANSWER:
                    events.append(Event("answer", k, decision.probs))
                    s.mode = "answer"
                    break
            if s.quiet_chunks >= d.vad_end_chunks:
                events.append(Event("vad_timeout", k))
                self.drop_turn(s)
        return events

    def user_text(self, s: Session) -> str:
        """The open turn's words, as the stage-1 CTC model hears them (for printing; "" unless the
        engine was built with `transcribe_user`)."""
        if self.judge is None or not s.turn_audio:
            return ""
        from modules.encoder.ctc import transcribe

        return transcribe(self.judge, [np.concatenate(s.turn_audio)], 16000, int(self.cfg.encoder.chunk_frames))[0]

    # --- output -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _produce_text(self, s: Session, out: queue.Queue, marks: dict, t0: float, force: list[int] | None) -> None:
        """Producer: close the user turn, decode the reply token by token into the session's
        cache (`StreamingInput.reply`), put (segment, hidden states [n, D]) on `out` as segments
        complete, then None."""
        try:
            m = self.llm
            d = self.cfg.duplex
            seg = TextSegmenter(d.segment_min_tokens, d.segment_comma_after, d.segment_clauses)
            reply, run = ReplyText(m.tokenizer), {"hidden": []}

            def on_token(ids: list[int], hidden: torch.Tensor) -> None:
                run["hidden"].append(hidden.float())  # the state that predicted this token
                piece = reply.piece(ids)
                if piece is None:  # an incomplete character: wait for the next token
                    return
                done = seg.feed(piece)
                if done:
                    marks.setdefault("text", time.perf_counter() - t0)
                    out.put((done, torch.stack(run["hidden"])))
                    run["hidden"] = []

            def on_end() -> None:  # the last segment goes out before the assistant turn is closed
                rest = seg.flush()
                if rest:
                    marks.setdefault("text", time.perf_counter() - t0)
                    out.put((rest, torch.stack(run["hidden"]) if run["hidden"] else None))

            ids = self.stream.reply(s.input, force=force, on_token=on_token, on_end=on_end)
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
        dec.generate(emb, valid, h, hv, max_tokens=cap, on_token=on_token, on_prefill=on_prefill, generator=gen,
                     phonemes=dec.phoneme_inputs([text]))  # fmt: skip
        rest = fifo.flush()
        if len(rest):
            marks.setdefault("tokens", time.perf_counter() - t0)
            marks.setdefault("pcm", time.perf_counter() - t0)
            emit(rest)
        marks["segments_spoken"] = marks.get("segments_spoken", 0) + 1
