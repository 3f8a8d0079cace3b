"""Learned vectors placed in the frozen LLM's input around the speech embeddings.

A user turn that carries speech is laid out as (D = the LLM width)

    <user prefix tokens> [prompt x N] [instruction tokens] <speech-begin> speech... <speech-end> <user suffix tokens>

* `SpeechSpecials`: the speech-begin / speech-end vectors, trained with the adapter in stage
  input_2_align (the paper's "speech special embeddings").
* `PromptEmbedding`: N learned vectors (paper: 25) before the speech, the only weights of
  stage input_3_prompt; they turn "transcribe what you heard" into "answer what you heard".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SpeechLLMConfig:
    prompt_num: int = 25  # learned prompt vectors per user turn (stage input_3_prompt)
    # Text before the speech in the user turn of stage input_2_align: the frozen LLM already
    # copies text after it, so the adapter only has to make speech read like text.
    align_instruction: str = "Repeat after me: "
    max_answer_tokens: int = 64  # greedy decoding limit (transcripts and answers)
    # > 0 (stage input_2_align, training only): add this weight times a CTC loss of the speech
    # embeddings against the transcript's LLM tokens, each frame scored by its cosine to the
    # frozen LLM's input embeddings (blank: to minus their mean), times embedding_ctc_scale.
    # It pulls the adapter's output toward the token embeddings the LLM already reads.
    # Inference is unchanged.
    embedding_ctc_weight: float = 0.0
    embedding_ctc_scale: float = 16.0
    # Stage input_2_align's objective: align_asr_weight x the transcript CE ("Repeat after me")
    # + align_qa_weight x the CE of the frozen LLM's own answers to spoken QA (stage
    # input_3_prompt's targets and layout, with the prompt vectors as they start), each on its own
    # batch every step. The QA term teaches the encoder and adapter to carry what the LLM needs
    # to answer, not only to repeat (behaviour alignment). The paper's stage 2: 1 and 0.
    align_asr_weight: float = 1.0
    align_qa_weight: float = 0.0
    # Stage input_3_prompt targets: the frozen LLM's own answers to the text questions,
    # generated once (tools.make_llm_answers) and cached here.
    answers_dir: str = "${run_root}/${experiment}/llm_answers"
    # The state classifier's rule (stage input_4_state): drop the turn when P(drop) exceeds
    # state_drop_threshold, else answer when P(answer) exceeds state_answer_threshold.
    state_answer_threshold: float = 0.5
    state_drop_threshold: float = 0.5


def _init_like(weight: torch.Tensor, reference: torch.Tensor | None) -> None:
    std = float(reference.float().std()) if reference is not None else 0.02
    nn.init.normal_(weight, std=std)


class SpeechSpecials(nn.Module):
    """Two vectors: index 0 opens the speech span, index 1 closes it."""

    BEGIN, END = 0, 1

    def __init__(self, dim: int, reference: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, dim))
        _init_like(self.weight.data, reference)

    def forward(self, which: int) -> torch.Tensor:
        """[1, D]"""
        return self.weight[which : which + 1]


class PromptEmbedding(nn.Module):
    """N learned prompt vectors, [N, D]."""

    def __init__(self, num: int, dim: int, reference: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))
        _init_like(self.weight.data, reference)

    def forward(self) -> torch.Tensor:
        return self.weight
