"""The speech decoder: LLM text (and hidden states) -> codec tokens, NAR prefill then AR generation.

Reference section 4 (`LLM2TTSCodecAR`), rebuilt:

    text      LLM input embeddings of the answer text [m, W] -> W/d frames of width d each (the
              "reshape trick": 3584 = 4 x 896) or a learned projection when W is no multiple of d
              -> pre-network (2 bidirectional layers) -> prepend BOS            = conditioning
    prefix    LLM hidden states of the generated answer [n, W] -> frames -> prefix decoder
              (4 bidirectional layers); layer i's keys/values are the KV prefix of shared layer i
    shared    4 layers: the conditioning is prefilled with full attention over prefix +
              conditioning (NAR), then codec tokens are generated one by one from SOS with a KV
              cache (AR), each attending to prefix + conditioning + earlier tokens
    output    RMSNorm -> Linear to 1024 codes + 4 specials (BOS 1024, SOS 1025, EOS 1026, PAD 1027)

Training (`modules.speech_decoder.stage`, stages output_2_decoder and output_3_prefix): input
[BOS, pre-net(text)] ++ [SOS, y_1..y_T], targets y_1..y_T, EOS on the speech part, mean
cross-entropy over target tokens. Generation masks BOS/SOS/PAD, samples from the top k of codes +
EOS, stops at EOS or `max_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from modules.layers.llama import KV, LayerStack, RMSNorm
from modules.speech_decoder.alignment import NO_PHONEME, NUM_PHONEME_IDS


@dataclass
class SpeechDecoderConfig:
    dim: int = 896
    num_heads: int = 14
    ffn_dim: int = 4864
    num_layers: int = 4  # the shared NAR/AR stack
    pre_net_layers: int = 2  # 0 = no pre-network (the paper's ablation)
    prefix_layers: int = 4  # must equal num_layers: one KV prefix per shared layer
    codebook_size: int = 1024
    dropout: float = 0.1
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    # LLM width -> decoder width: "auto" reshapes when the LLM width is a multiple of `dim`
    # (3584 = 4 x 896), else learns a projection; "linear" always projects.
    llm_projection: str = "auto"
    max_tokens: int = 1000  # generated tokens per segment at most (25 s at 40 Hz)
    # Rotary positions of the shared stack. 0 (the release): the conditioning at 0..c-1, the
    # speech tokens after it at c, c+1, ... > 0: the speech tokens at 0, 1, 2, ... and conditioning
    # frame j at j x stride, so that a speech token and the text it speaks sit at nearby positions
    # when stride is the mean number of codec tokens per conditioning frame.
    text_position_stride: float = 0.0
    # Rotary positions from durations (overrides the stride): the speech tokens at 0, 1, 2, ...
    # and the frames of text token i spread over [start_i, start_i + duration_i) in codec tokens,
    # so that each speech token sits at the position of the text it speaks. Training takes the
    # durations from eSpeak's word timings (`modules.speech_decoder.alignment`); a duration head on
    # the pre-network learns them (log(1 + tokens), mean squared error) and generation uses its
    # predictions unless durations are given.
    duration_positions: bool = False
    duration_weight: float = 1.0  # of the duration loss beside the codec-token cross-entropy
    # With duration_positions: > 0 lets a speech token see only the text frames within this many
    # codec tokens of its own position (and BOS), so that it reads the text it speaks and nothing
    # far away; generation also ends a reply at 1.3 x its predicted length + 10 tokens. 0 = all.
    attention_window: float = 0.0
    # An RMSNorm (with its weight) on the text frames before the pre-network. An LLM's input
    # embeddings are small (the tiny stand-in's RMS is 0.06, the decoder's own token embeddings'
    # 1.0): without it the pre-network's first attention output drowns which token a frame is.
    # Off = the release.
    text_input_norm: bool = False
    # With duration_positions: each speech input also carries the conditioning frame of the text
    # its position falls in (by the durations; nothing past the text's end), added to the token
    # embedding through a linear layer, so that what to say reaches every step directly, not
    # only through attention. Off = the release.
    aligned_text: bool = False
    # With duration_positions: > 0 gives each text token eSpeak's phonemes of its text (at most
    # this many; `modules.speech_decoder.alignment.TokenPhonemes`), as a bag added to its text
    # frames and, one phoneme at a time, to the speech inputs: a token's codec tokens are split
    # evenly over its phonemes, so each step is told the sound it makes. Sounds are shared across
    # words where LLM tokens are not, so a word seen once or never in training is still spoken
    # from its sounds. 0 = off (the release).
    aligned_phonemes: int = 0
    # Tokenize every text the decoder speaks as if a word came before it (" Twelve plus two ...").
    # The engine speaks a reply sentence by sentence, and a BPE spells a word at a text's start
    # differently from the same word after a space ("Tw" "elve" against " Twelve"): the first
    # word of a later sentence is then a token the decoder rarely or never saw. With a leading
    # space every word has the one spelling it has inside a sentence. Off = the release.
    leading_space: bool = False
    top_k: int = 2  # the release's decoder_top_k


def special_ids(codebook_size: int) -> dict[str, int]:
    k = codebook_size
    return {"bos": k, "sos": k + 1, "eos": k + 2, "pad": k + 3}


class LLMToDecoder(nn.Module):
    """[B, n, W] LLM vectors -> [B, r n, d] decoder frames: a reshape (W = r d) or a Linear (r = 1)."""

    def __init__(self, llm_width: int, dim: int, mode: str = "auto"):
        super().__init__()
        if mode not in ("auto", "linear"):
            raise ValueError(f"speech_decoder.llm_projection must be 'auto' or 'linear', not {mode!r}")
        self.reshape = mode == "auto" and llm_width % dim == 0
        self.ratio = llm_width // dim if self.reshape else 1
        self.dim = dim
        self.proj = None if self.reshape else nn.Linear(llm_width, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Also expands the validity mask [B, n] -> [B, r n]."""
        if self.proj is not None:
            return self.proj(x), mask
        b, n, _ = x.shape
        return x.reshape(b, n * self.ratio, self.dim), mask.repeat_interleave(self.ratio, 1)


def _bidirectional_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, L] validity -> [B, L, L]: every position sees the valid keys (a padded query sees key 0)."""
    m = valid[:, None, :].expand(-1, valid.shape[1], -1).clone()
    m[:, :, 0] = True
    return m


def _positions(valid: torch.Tensor) -> torch.Tensor:
    """0, 1, 2... over the valid positions of each row; padding repeats the last."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


def _covering(starts: torch.Tensor, at: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For positions `at` [B, n]: the index of the last of `starts` [B, k] (non-decreasing) at or
    before each (0 where none is), and whether the position lies at or after the first start and
    before `end` [B, 1]."""
    at = at.float().contiguous()
    idx = torch.searchsorted(starts.float().contiguous(), at, right=True) - 1
    return idx.clamp(min=0), (idx >= 0) & (at < end)


def _stack(cfg: SpeechDecoderConfig, layers: int) -> LayerStack:
    return LayerStack(layers, cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.rms_eps, cfg.dropout, cfg.rope_theta)


class TextPreNet(nn.Module):
    """LLM text embeddings -> decoder frames -> bidirectional layers (none: frames pass through)."""

    def __init__(self, cfg: SpeechDecoderConfig, llm_width: int):
        super().__init__()
        self.text_in = LLMToDecoder(llm_width, cfg.dim, cfg.llm_projection)
        self.in_norm = RMSNorm(cfg.dim, cfg.rms_eps) if cfg.text_input_norm else None
        self.layers = _stack(cfg, cfg.pre_net_layers) if cfg.pre_net_layers else None
        self.duration = nn.Linear(cfg.dim, 1) if cfg.duration_positions else None
        self.phonemes = nn.Embedding(NUM_PHONEME_IDS, cfg.dim, padding_idx=NO_PHONEME) if cfg.aligned_phonemes else None

    def forward(
        self, text: torch.Tensor, valid: torch.Tensor, phonemes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, valid = self.text_in(text, valid)
        if self.in_norm is not None:
            x = self.in_norm(x)
        if self.phonemes is not None:
            if phonemes is None:
                raise ValueError("speech_decoder.aligned_phonemes needs the text tokens' phonemes")
            count = (phonemes != NO_PHONEME).sum(-1, keepdim=True).clamp(min=1)
            bag = self.phonemes(phonemes).sum(2) / count  # [B, m, d]: the mean of each token's sounds
            x = x + bag.repeat_interleave(self.text_in.ratio, 1).to(x.dtype)
        if self.layers is not None:
            x, _ = self.layers(x, _positions(valid), _bidirectional_mask(valid))
        return x, valid


class PrefixDecoder(nn.Module):
    """LLM hidden states -> decoder frames -> bidirectional layers whose keys/values form the KV
    prefix of the shared stack (layer i -> shared layer i)."""

    def __init__(self, cfg: SpeechDecoderConfig, llm_width: int):
        super().__init__()
        self.hidden_in = LLMToDecoder(llm_width, cfg.dim, cfg.llm_projection)
        self.layers = _stack(cfg, cfg.prefix_layers)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> tuple[list[KV], torch.Tensor]:
        x, valid = self.hidden_in(hidden, valid)
        _, kvs = self.layers(x, _positions(valid), _bidirectional_mask(valid))
        return kvs, valid


class SharedStack(nn.Module):
    """The NAR/AR layers, the final norm and the output layer over codes + specials."""

    def __init__(self, cfg: SpeechDecoderConfig):
        super().__init__()
        self.layers = _stack(cfg, cfg.num_layers)
        self.norm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.out = nn.Linear(cfg.dim, cfg.codebook_size + 4)
        self.aligned = nn.Linear(cfg.dim, cfg.dim) if cfg.aligned_text else None
        self.phoneme = nn.Embedding(NUM_PHONEME_IDS, cfg.dim, padding_idx=NO_PHONEME) if cfg.aligned_phonemes else None

    def forward(self, x, positions, mask, past=None) -> tuple[torch.Tensor, list[KV]]:
        return self.layers(x, positions, mask, past)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(h))


class SpeechDecoding:
    """The decoder's computations over four parts that the host module owns as attributes:
    `embedding`, `pre_net` (TextPreNet), `prefix` (PrefixDecoder or None) and `decoder`
    (SharedStack), plus `dcfg` (SpeechDecoderConfig) and `ids` (special ids). `SpeechDecoderNet`
    (inference, tests) and the stage module (`modules.speech_decoder.stage`) both host them.
    """

    dcfg: SpeechDecoderConfig
    ids: dict[str, int]
    embedding: nn.Embedding
    pre_net: TextPreNet
    prefix: PrefixDecoder | None
    decoder: SharedStack

    def build_parts(self, cfg: SpeechDecoderConfig, llm_width: int) -> None:
        if cfg.prefix_layers and cfg.prefix_layers != cfg.num_layers:
            raise ValueError(
                f"speech_decoder.prefix_layers ({cfg.prefix_layers}) must equal num_layers ({cfg.num_layers}): "
                "each prefix layer feeds the keys/values of one shared layer"
            )
        if cfg.aligned_text and not cfg.duration_positions:
            raise ValueError("speech_decoder.aligned_text needs duration_positions: the durations place the text")
        if cfg.aligned_phonemes and not cfg.duration_positions:
            raise ValueError("speech_decoder.aligned_phonemes needs duration_positions: the durations place the sounds")
        self.dcfg = cfg
        self.ids = special_ids(cfg.codebook_size)
        self.embedding = nn.Embedding(cfg.codebook_size + 4, cfg.dim, padding_idx=self.ids["pad"])
        self.pre_net = TextPreNet(cfg, llm_width)
        self.prefix = PrefixDecoder(cfg, llm_width) if cfg.prefix_layers else None
        self.decoder = SharedStack(cfg)

    # --- positions ------------------------------------------------------------------------------
    def cond_positions(self, cond_valid: torch.Tensor, durations: torch.Tensor | None = None) -> torch.Tensor:
        """Rotary positions [B, c] of the conditioning ([BOS, frames]); `durations` [B, m] (codec
        tokens per text token) with `duration_positions`."""
        if self.dcfg.duration_positions:
            if durations is None:
                raise ValueError("speech_decoder.duration_positions needs the text tokens' durations")
            r = self.pre_net.text_in.ratio
            starts = durations.cumsum(1) - durations
            within = torch.arange(r, device=durations.device, dtype=durations.dtype) / r
            frames = (starts[:, :, None] + within * durations[:, :, None]).flatten(1)
            return torch.cat([frames.new_zeros(frames.shape[0], 1), frames], 1)
        pos = _positions(cond_valid)
        stride = self.dcfg.text_position_stride
        return pos.float() * stride if stride else pos

    def speech_positions(self, cond_valid: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Rotary positions [B, n] of speech inputs number `steps` ([n] or [B, n]; SOS is 0)."""
        steps = steps.expand(cond_valid.shape[0], -1) if steps.dim() == 1 else steps
        if self.dcfg.text_position_stride or self.dcfg.duration_positions:
            return steps
        return cond_valid.sum(1)[:, None] + steps

    @property
    def windowed(self) -> bool:
        """Whether speech tokens see only the text frames near them (`attention_window`)."""
        return self.dcfg.duration_positions and self.dcfg.attention_window > 0

    def near_text(self, cond_pos: torch.Tensor, speech_pos: torch.Tensor) -> torch.Tensor | None:
        """[B, n, c]: which conditioning frames (BOS always) speech queries at `speech_pos` [B, n]
        may see under `attention_window`; None when every frame is visible."""
        if not self.windowed:
            return None
        near = (cond_pos[:, None, :].float() - speech_pos[:, :, None].float()).abs() <= self.dcfg.attention_window
        near[:, :, 0] = True
        return near

    def aligned_frames(
        self, cond: torch.Tensor, cond_pos: torch.Tensor, durations: torch.Tensor, speech_pos: torch.Tensor
    ) -> torch.Tensor:
        """[B, n, d] added to the speech inputs at `speech_pos` [B, n] under `aligned_text`: the
        conditioning frame ([BOS, frames] = `cond`, at `cond_pos`) whose text each position
        speaks, through the linear layer; zero past the text's end (`durations` [B, m] sum)."""
        frames = cond[:, 1:]
        idx, inside = _covering(cond_pos[:, 1:], speech_pos, durations.sum(1, keepdim=True))
        picked = frames.gather(1, idx[..., None].expand(-1, -1, frames.shape[-1]))
        return self.decoder.aligned(picked) * inside[..., None].to(picked.dtype)

    def aligned_sounds(self, phonemes: torch.Tensor, durations: torch.Tensor, speech_pos: torch.Tensor) -> torch.Tensor:
        """[B, n, d] added to the speech inputs at `speech_pos` [B, n] under `aligned_phonemes`:
        the embedding of the phoneme each position says. Text token i spans [start_i, start_i +
        durations_i) codec tokens and its phonemes ([B, m, P] ids) share that span evenly; zero
        past the text's end."""
        durations = durations.float()
        starts = durations.cumsum(1) - durations
        j, inside = _covering(starts, speech_pos, durations.sum(1, keepdim=True))
        at = speech_pos.float()
        start, length = starts.gather(1, j), durations.gather(1, j).clamp(min=1e-6)
        sounds = phonemes.gather(1, j[..., None].expand(-1, -1, phonemes.shape[-1]))  # [B, n, P]
        count = (sounds != NO_PHONEME).sum(-1).clamp(min=1)
        k = torch.minimum(((at - start) / length * count).floor().long().clamp(min=0), count - 1)
        symbol = sounds.gather(2, k[..., None])[..., 0] * inside
        return self.decoder.phoneme(symbol)

    def speech_inputs(
        self, tokens: torch.Tensor, cond: torch.Tensor, cond_pos: torch.Tensor, durations: torch.Tensor | None,
        speech_pos: torch.Tensor, phonemes: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """The speech tokens' inputs [B, n, d]: their embeddings plus, under `aligned_text` and
        `aligned_phonemes`, the text frame and the phoneme each position speaks."""
        x = self.embedding(tokens).to(cond.dtype)
        if self.dcfg.aligned_text:
            x = x + self.aligned_frames(cond, cond_pos, durations, speech_pos)
        if self.dcfg.aligned_phonemes:
            x = x + self.aligned_sounds(phonemes, durations, speech_pos).to(cond.dtype)
        return x

    def log_durations(self, cond: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        """The duration head's log(1 + codec tokens) per text token [B, m] (0 on padding), from
        the conditioning [B, 1 + r m, d]."""
        b, m = text_valid.shape
        frames = cond[:, 1:].reshape(b, m, -1, cond.shape[-1]).mean(2)
        return self.pre_net.duration(frames).squeeze(-1).float() * text_valid

    def predicted_durations(self, cond: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        """Codec tokens per text token [B, m] from the duration head (0 on padding)."""
        return self.log_durations(cond, text_valid).exp().sub(1).clamp(min=0) * text_valid

    # --- conditioning ---------------------------------------------------------------------------
    def condition(
        self, text: torch.Tensor, text_valid: torch.Tensor, phonemes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM text embeddings [B, m, W] (+ validity [B, m], phonemes [B, m, P] under
        `aligned_phonemes`) -> [BOS, pre-net(frames)] and its validity."""
        x, valid = self.pre_net(text, text_valid, phonemes)
        b = x.shape[0]
        bos = self.embedding.weight[self.ids["bos"]].expand(b, 1, -1).to(x.dtype)
        ones = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        return torch.cat([bos, x], 1), torch.cat([ones, valid], 1)

    def prefix_cache(
        self, hidden: torch.Tensor | None, hidden_valid: torch.Tensor | None
    ) -> tuple[list[KV] | None, torch.Tensor]:
        """LLM hidden states [B, n, W] -> per shared layer (keys, values) [B, H, r n, hd] and the
        keys' validity [B, r n] (empty when there is no prefix)."""
        if hidden is None or self.prefix is None:
            b = 1 if hidden is None else hidden.shape[0]
            device = self.embedding.weight.device
            return None, torch.zeros(b, 0, dtype=torch.bool, device=device)
        return self.prefix(hidden, hidden_valid)

    # --- training -------------------------------------------------------------------------------
    def teacher_forced(
        self,
        text: torch.Tensor,
        text_valid: torch.Tensor,
        codes: torch.Tensor,
        codes_lens: torch.Tensor,
        hidden: torch.Tensor | None = None,
        hidden_valid: torch.Tensor | None = None,
        durations: torch.Tensor | None = None,
        phonemes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Teacher forcing. codes [B, T] (padding anywhere >= codes_lens); `durations` [B, m] the
        text tokens' codec tokens (`duration_positions`), `phonemes` [B, m, P] their sounds
        (`aligned_phonemes`). Returns (logits of the speech positions
        [B, T + 1, vocab], targets [B, T + 1] with -100 on padding, the duration head's
        log(1 + tokens) [B, m] or None without `duration_positions`)."""
        b, t = codes.shape
        cond, cond_valid = self.condition(text, text_valid, phonemes)
        past, prefix_valid = self.prefix_cache(hidden, hidden_valid)
        if past is not None and prefix_valid.shape[0] != b:
            raise ValueError("hidden states and text batches differ in size")
        if past is None:
            prefix_valid = prefix_valid.expand(b, -1)
        ar = torch.arange(t + 1, device=codes.device)
        speech_valid = ar[None] <= codes_lens[:, None]  # SOS + T tokens
        inputs = torch.where(ar[None, 1:] <= codes_lens[:, None], codes.clamp(min=0), self.ids["pad"])
        inputs = torch.cat([torch.full((b, 1), self.ids["sos"], device=codes.device), inputs], 1)
        cond_pos, speech_pos = self.cond_positions(cond_valid, durations), self.speech_positions(cond_valid, ar)
        speech = self.speech_inputs(inputs, cond, cond_pos, durations, speech_pos, phonemes)
        x = torch.cat([cond, speech], 1)
        c = cond.shape[1]
        # keys: prefix | conditioning | speech
        n_keys = prefix_valid.shape[1] + c + t + 1
        mask = torch.zeros(b, c + t + 1, n_keys, dtype=torch.bool, device=codes.device)
        p = prefix_valid.shape[1]
        mask[:, :, :p] = prefix_valid[:, None, :]
        mask[:, :, p : p + c] = cond_valid[:, None, :]
        causal = torch.ones(t + 1, t + 1, dtype=torch.bool, device=codes.device).tril()
        mask[:, c:, p + c :] = causal[None] & speech_valid[:, None, :]
        near = self.near_text(cond_pos, speech_pos)
        if near is not None:
            mask[:, c:, p : p + c] &= near
        positions = torch.cat([cond_pos, speech_pos], 1)
        h, _ = self.decoder(x, positions, mask, past)
        logits = self.decoder.logits(h[:, c:])
        targets = torch.where(ar[None] < codes_lens[:, None], F.pad(codes, (0, 1)).clamp(min=0), -100)
        targets[torch.arange(b), codes_lens] = self.ids["eos"]
        log_dur = self.log_durations(cond, text_valid) if self.dcfg.duration_positions else None
        return logits, targets, log_dur

    # --- generation -----------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
        logits = logits.float().clone()
        logits[:, [self.ids["bos"], self.ids["sos"], self.ids["pad"]]] = float("-inf")
        if top_k <= 1:
            return logits.argmax(-1)
        vals, idx = logits.topk(top_k, -1)
        pick = torch.multinomial(vals.softmax(-1), 1, generator=generator)
        return idx.gather(1, pick)[:, 0]

    @torch.no_grad()
    def generate(
        self,
        text: torch.Tensor,
        text_valid: torch.Tensor,
        hidden: torch.Tensor | None = None,
        hidden_valid: torch.Tensor | None = None,
        top_k: int | None = None,
        max_tokens: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        on_token=None,
        on_prefill=None,
        durations: torch.Tensor | None = None,
        phonemes: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Codec tokens per batch row (without EOS). `use_cache=False` recomputes the whole
        sequence at every step (the benchmark's baseline); `on_token(step, tokens [B])` sees each
        step's tokens as they come (streaming); `on_prefill()` is called once the NAR prefill of
        the conditioning is done (latency breakdowns); `durations` [B, m] replace the duration
        head's (`duration_positions`); `phonemes` [B, m, P] (`aligned_phonemes`)."""
        top_k = self.dcfg.top_k if top_k is None else top_k
        max_tokens = self.dcfg.max_tokens if max_tokens is None else max_tokens
        cond, cond_valid = self.condition(text, text_valid, phonemes)
        b, c = cond.shape[:2]
        prefix, prefix_valid = self.prefix_cache(hidden, hidden_valid)
        prefix_valid = prefix_valid.expand(b, -1)
        p = prefix_valid.shape[1]
        device = cond.device
        if self.dcfg.duration_positions and durations is None:
            durations = self.predicted_durations(cond, text_valid)
        cond_pos = self.cond_positions(cond_valid, durations)
        # NAR prefill of the conditioning (full attention over prefix + conditioning)
        mask = torch.cat([prefix_valid[:, None].expand(-1, c, -1), cond_valid[:, None].expand(-1, c, -1)], 2)
        _, past = self.decoder(cond, cond_pos, mask, prefix)
        if on_prefill is not None:
            on_prefill()
        keys_valid = torch.cat([prefix_valid, cond_valid], 1)
        limit = (durations.sum(1) * 1.3 + 10).long() if self.windowed else None  # a window: a length limit too
        token = torch.full((b,), self.ids["sos"], device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        out: list[torch.Tensor] = []
        history = [token]
        for step in range(max_tokens):
            keys_valid = torch.cat([keys_valid, torch.ones(b, 1, dtype=torch.bool, device=device)], 1)
            if use_cache:
                pos = self.speech_positions(cond_valid, torch.tensor([step], device=device))
                x = self.speech_inputs(token[:, None], cond, cond_pos, durations, pos, phonemes)
                m = keys_valid[:, None]
                near = self.near_text(cond_pos, pos)
                if near is not None:
                    m = m.clone()
                    m[:, :, p : p + c] &= near
                h, past = self.decoder(x, pos, m, past)
            else:  # recompute conditioning + every token so far (prefix keys stay cached)
                n = len(history)
                speech_pos = self.speech_positions(cond_valid, torch.arange(n, device=device))
                seq = self.speech_inputs(torch.stack(history, 1), cond, cond_pos, durations, speech_pos, phonemes)
                full = torch.cat([cond, seq], 1)
                m = keys_valid[:, None].expand(-1, c + n, -1).clone()
                m[:, :c, p + c :] = False
                m[:, c:, p + c :] &= torch.ones(n, n, dtype=torch.bool, device=device).tril()
                near = self.near_text(cond_pos, speech_pos)
                if near is not None:
                    m[:, c:, p : p + c] &= near
                pos = torch.cat([cond_pos, speech_pos], 1)
                h, _ = self.decoder(full, pos, m, prefix)
                h = h[:, -1:]
            token = self._sample(self.decoder.logits(h[:, -1]), top_k, generator)
            if limit is not None:
                token = torch.where(step >= limit, self.ids["eos"], token)
            token = torch.where(done, self.ids["eos"], token)
            done |= token == self.ids["eos"]
            if on_token is not None:
                on_token(step, token)
            if bool(done.all()):
                break
            out.append(token)
            history.append(token)
        if not out:
            return [torch.zeros(0, dtype=torch.long, device=device) for _ in range(b)]
        seqs = torch.stack(out, 1)
        result = []
        for row in seqs:
            end = (row == self.ids["eos"]).nonzero()
            result.append(row[: int(end[0]) if len(end) else len(row)])
        return result


class SpeechDecoderNet(SpeechDecoding, nn.Module):
    """The decoder as a plain module (parameter counts, tests, inference without Lightning)."""

    def __init__(self, cfg: SpeechDecoderConfig, llm_width: int):
        nn.Module.__init__(self)
        self.build_parts(cfg, llm_width)

    def forward(self, *args, **kwargs):
        return self.teacher_forced(*args, **kwargs)
