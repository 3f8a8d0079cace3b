"""The text LLM: one loading path for the stand-in LLM trained here and for Qwen2-7B-Instruct.

Any Hugging Face causal LM saved with `save_pretrained` (weights + tokenizer with a chat
template) loads through `load_llm`, from local files only: nothing is downloaded. The
`arch` block describes the Qwen2-architecture stand-in that stage `llm_text` builds from
scratch; it is ignored when loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LLMArchConfig:
    """Shape of the Qwen2-architecture stand-in built by stage `llm_text`."""

    vocab_size: int = 2048  # BPE vocabulary trained on the corpus text, specials included
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    # Initialisation only (not part of the saved model): make the first key/value group of
    # layer 0 attend to the previous token from step 0, half of an induction (copy) circuit.
    init_previous_token_head: bool = False


@dataclass
class LLMConfig:
    # A local directory holding config.json, the weights and the tokenizer.
    path: str = "???"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    arch: LLMArchConfig = field(default_factory=LLMArchConfig)


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{name}'; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def qwen2_config(arch: LLMArchConfig, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> Qwen2Config:
    """The Hugging Face config of the stand-in described by `arch`."""
    return Qwen2Config(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_qwen2(arch: LLMArchConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM whose vocabulary matches `tokenizer`."""
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but llm.arch.vocab_size is {arch.vocab_size}")
    model = Qwen2ForCausalLM(qwen2_config(arch, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id))
    if arch.init_previous_token_head:
        init_previous_token_head(model)
    return model


@torch.no_grad()
def init_previous_token_head(model: Qwen2ForCausalLM, scale: float = 5.0) -> None:
    """Make the query heads of layer 0's first key/value group attend to position m - 1.

    Queries and keys become input-independent (zero weights, bias only): q = a, and k = a
    rotated by one RoPE position, so the rotated dot product is a function of (m - n - 1) that
    peaks at n = m - 1. The values and outputs stay random and train as usual.
    """
    cfg = model.config
    attn = model.model.layers[0].self_attn
    d = attn.head_dim
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = torch.cos(inv_freq).repeat(2), torch.sin(inv_freq).repeat(2)
    a = torch.zeros(d)
    a[: d // 2] = scale
    rotated = torch.cat([-a[d // 2 :], a[: d // 2]])  # rotate_half(a)
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    attn.q_proj.weight[: per_group * d] = 0
    attn.q_proj.bias[: per_group * d] = a.repeat(per_group)
    attn.k_proj.weight[:d] = 0
    attn.k_proj.bias[:d] = a * cos + rotated * sin


def load_llm(cfg: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and its tokenizer from `cfg.path` (local files only)."""
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no Hugging Face model at '{path}' (config.json missing). For the tiny experiment, train "
            f"the stand-in first: `python train.py stage=llm_text experiment=tiny`; otherwise point "
            f"llm.path at a local copy of e.g. Qwen2-7B-Instruct."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer at '{path}' has no chat template; an instruct/chat model is required")
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def next_token_loss(
    llm: PreTrainedModel,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token CE over the labelled positions of a causal LM and its token accuracy.

    The output layer runs only where position t + 1 has a label (the answers: a third or less of
    a spoken-QA sequence), not over every position and the whole vocabulary as `llm(...).logits`
    does; the loss is the same. Models whose head does more than a linear map (e.g. logit
    soft-capping) take the plain path.
    """
    head = llm.get_output_embeddings()
    keep = labels[:, 1:] != ignore_index  # positions t whose next token t + 1 is labelled
    if head is None or not isinstance(head, torch.nn.Linear) or getattr(llm.config, "final_logit_softcapping", None):
        states = llm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        logits = states[:, :-1][keep]
    else:
        states = llm.base_model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        ).last_hidden_state
        logits = head(states[:, :-1][keep])
    targets = labels[:, 1:][keep]
    if len(targets) == 0:  # nothing labelled: a zero loss that still reaches every input
        zero = states.sum() * 0.0
        return zero, zero.detach()
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    acc = (logits.argmax(-1) == targets).float().mean()
    return loss, acc
