"""Speech into the frozen LLM: stages `input_2_align` and `input_3_prompt`.

Glossary: B examples, N utterances, S speech embeddings (12.5 Hz), L sequence positions,
D the LLM width. Components: `encoder` (from input_1_ctc), `adapter`, `specials` (speech
begin/end vectors), `prompt` (N learned vectors) and the frozen `llm`.

A dialogue is laid out in the LLM's own chat template (`ChatLayout`), with the speech span of
each user turn in place of its text:

    system | user_prefix [prompt] [instruction] <begin> speech <end> user_suffix | answer <eos> ...

* input_2_align (ASR data): trains encoder, adapter and specials so that the frozen LLM,
  given "Repeat after me: " + speech, emits the transcript.
* input_3_prompt (spoken multi-round QA): trains only the prompt vectors so that the frozen
  LLM answers the spoken question with the answer it gives to the text of the same question
  (targets cached by `tools.make_llm_answers`, see `llm_answers`).

The streaming input path (chunk-wise prefill of spoken turns) and the greedy decoding loop live
in `modules.speech_llm.streaming`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.asr import ASRDataModule
from datamodules.spoken_qa import PairedDataModule, SpokenQADataModule
from datamodules.text_qa import IGNORE_INDEX, SYSTEM_PROMPT
from datamodules.transcripts import LLMTokenUnits
from modules.adapter import SpeechAdapter
from modules.encoder.ctc import CTCUnits, Decoder, ctc_loss, encoder_data_config, evaluate_wer, units_from_json
from modules.encoder.network import SpeechEncoder
from modules.llm.hf import load_llm, next_token_loss
from modules.speech_llm.embeddings import PromptEmbedding, SpeechSpecials
from modules.stage import StageModule, StageRun, StageSpec, load_stage_outputs, make_optimizer, read_stage_output
from modules.state_classifier import StateClassifier

log = logging.getLogger(__name__)

ALIGN, PROMPT, STATE = "input_2_align", "input_3_prompt", "input_4_state"
PAIRED_TASKS = {"asr": ALIGN, "qa": PROMPT}  # the parts of a stage-2 batch with the QA term, and their layouts
CHUNK_SAMPLES = 2560  # the streaming chunk: 160 ms of 16 kHz audio


# --- the chat template around speech ----------------------------------------------------------
@dataclass
class ChatLayout:
    """Token ids of the LLM's chat template around user turns, derived from the tokenizer."""

    system: list[int]  # system turn, closed
    user_prefix: list[int]  # opens a user turn
    user_suffix: list[int]  # closes it and opens the assistant turn
    answer_end: list[int]  # closes an assistant turn; its first token is the one the LLM must emit
    eos_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, system_prompt: str = SYSTEM_PROMPT) -> ChatLayout:
        marks = ["@@U1@@", "@@A1@@", "@@U2@@", "@@A2@@"]
        messages = [{"role": "system", "content": system_prompt}]
        messages += [{"role": r, "content": m} for r, m in zip(["user", "assistant"] * 2, marks)]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        try:
            head, rest = text.split(marks[0])
            user_suffix, rest = rest.split(marks[1])
            between, rest = rest.split(marks[2])
            _, answer_end = rest.split(marks[3])
        except ValueError:
            raise ValueError("the chat template does not render plain user/assistant contents in order") from None
        if not between.startswith(answer_end) or not head.endswith(between[len(answer_end) :]):
            raise ValueError(f"cannot locate the user-turn prefix in the chat template: {text!r}")
        user_prefix = between[len(answer_end) :]
        system = head[: len(head) - len(user_prefix)]

        def ids(s: str) -> list[int]:
            return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

        layout = cls(ids(system), ids(user_prefix), ids(user_suffix), ids(answer_end), int(tokenizer.eos_token_id))
        if not layout.answer_end or layout.answer_end[0] != layout.eos_id:
            raise ValueError(f"the assistant turn does not end with the eos token {tokenizer.eos_token!r}")
        return layout


@dataclass
class Turn:
    """One user turn of a training/eval sequence: speech index (into the batch's speech) + target text."""

    speech: int
    target: str | None  # None: the sequence ends with this turn's assistant header (generation)


# --- the module -------------------------------------------------------------------------------
class SpeechLLM(StageModule):
    """Encoder + adapter + speech vectors + prompt in front of a frozen causal LM."""

    def __init__(
        self,
        cfg: DictConfig,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ctc_units: CTCUnits | None = None,
    ):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.layout = ChatLayout.from_tokenizer(tokenizer)
        width = llm.get_input_embeddings().weight.shape[1]
        reference = llm.get_input_embeddings().weight.detach()
        self.encoder = SpeechEncoder(OmegaConf.to_object(cfg.encoder))
        self.ctc_units = ctc_units  # the stage-1 CTC units (adapter.lexical only)
        num_units = len(ctc_units) if ctc_units is not None else 0
        self.adapter = SpeechAdapter(OmegaConf.to_object(cfg.adapter), self.encoder.output_dim, width, num_units)
        self.specials = SpeechSpecials(width, reference)
        self.prompt = PromptEmbedding(cfg.speech_llm.prompt_num, width, reference)
        # The chunk-level state classifier on the LLM's last hidden state (stage input_4_state).
        self.state_head = StateClassifier(width)
        self.llm = llm
        self.instruction = tokenizer(cfg.speech_llm.align_instruction, add_special_tokens=False)["input_ids"]

    def components(self) -> dict[str, nn.Module]:
        return {
            "encoder": self.encoder,
            "adapter": self.adapter,
            "specials": self.specials,
            "prompt": self.prompt,
            "state_head": self.state_head,
            "llm": self.llm,
        }

    @property
    def task(self) -> str:
        return self.cfg.stage.name if self.cfg.stage.name in (PROMPT, STATE) else ALIGN

    # --- building sequences -------------------------------------------------------------------
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))

    def speech_embeddings(
        self, feats: torch.Tensor, feats_lens: torch.Tensor, chunk_frames: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [N, T, 80] raw fbank -> (speech [N, S, D], speech_lens [N])."""
        enc, enc_lens = self.encoder(feats, feats_lens, chunk_frames)
        return self.adapter(enc, enc_lens)

    def user_turn_start(self, task: str) -> torch.Tensor:
        """Everything of a user turn before its speech, [n, D]."""
        parts = [self.embed_ids(self.layout.user_prefix)]
        if task == PROMPT:
            parts.append(self.prompt())
        elif self.instruction:
            parts.append(self.embed_ids(self.instruction))
        parts.append(self.specials(SpeechSpecials.BEGIN))
        return torch.cat(parts)

    def user_turn_end(self) -> torch.Tensor:
        """The speech-end vector and the assistant header, [n, D]."""
        return torch.cat([self.specials(SpeechSpecials.END), self.embed_ids(self.layout.user_suffix)])

    def build_sequences(
        self, speech: torch.Tensor, speech_lens: torch.Tensor, dialogues: list[list[Turn]], task: str, left_pad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings [B, L, D], attention mask [B, L] and labels [B, L] of `dialogues`.

        Labels cover every target answer and its eos token (IGNORE_INDEX elsewhere).
        """
        system = self.embed_ids(self.layout.system)
        end = self.user_turn_end()
        start = self.user_turn_start(task)
        seqs, labels = [], []
        for turns in dialogues:
            parts, lab = [system], [IGNORE_INDEX] * len(system)
            for turn in turns:
                s = speech[turn.speech, : int(speech_lens[turn.speech])]
                parts += [start, s.to(start.dtype), end]
                lab += [IGNORE_INDEX] * (len(start) + len(s) + len(end))
                if turn.target is not None:
                    ids = self.tokenizer(turn.target, add_special_tokens=False)["input_ids"] + self.layout.answer_end
                    parts.append(self.embed_ids(ids))
                    n_label = len(ids) - len(self.layout.answer_end) + 1  # the answer and its eos
                    lab += ids[:n_label] + [IGNORE_INDEX] * (len(ids) - n_label)
            seqs.append(torch.cat(parts))
            labels.append(torch.tensor(lab, dtype=torch.long))
        longest = max(len(s) for s in seqs)
        dev = system.device
        emb = system.new_zeros(len(seqs), longest, system.shape[1])
        mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=dev)
        lab_out = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long, device=dev)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            sl = slice(longest - len(s), longest) if left_pad else slice(0, len(s))
            emb[i, sl] = s
            mask[i, sl] = 1
            lab_out[i, sl] = lab.to(dev)
        return emb, mask, lab_out

    def sequence_loss(self, emb, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean CE over labelled positions and token accuracy."""
        return next_token_loss(self.llm, labels, mask, inputs_embeds=emb, ignore_index=IGNORE_INDEX)

    # --- batches of the two stages ------------------------------------------------------------
    def dialogues_of(self, batch: dict, task: str) -> list[list[Turn]]:
        if task == ALIGN:
            return [[Turn(i, t)] for i, t in enumerate(batch["texts"])]
        answers = self.llm_answers
        out: list[list[Turn]] = [[] for _ in batch["keys"]]
        for n, (d, k) in enumerate(zip(batch["dialogue_index"].tolist(), batch["turn_index"].tolist())):
            key = batch["keys"][d]
            if key not in answers:
                raise KeyError(f"no cached LLM answer for dialogue {key}; rerun tools.make_llm_answers")
            out[d].append(Turn(n, answers[key][k]))
        return out

    def embedding_ctc_loss(self, speech: torch.Tensor, lens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CTC of speech frames [N, S, D] against each text's LLM tokens (see SpeechLLMConfig).

        A frame's score for token v is its cosine to the LLM's input embedding of v; the blank's
        is its cosine to minus the mean embedding (a direction no token points to); both times
        `embedding_ctc_scale`.
        """
        table = self.llm.get_input_embeddings().weight.detach().float()
        keys = nn.functional.normalize(torch.cat([-table.mean(0, keepdim=True), table]), dim=-1)
        sim = nn.functional.normalize(speech.float(), dim=-1) @ keys.T  # [N, S, 1 + V], blank first
        targets = [[i + 1 for i in self.tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]
        return ctc_loss((sim * self.cfg.speech_llm.embedding_ctc_scale).log_softmax(-1), lens, targets)

    def _task_loss(self, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """CE of one batch laid out for `task`, its token accuracy and its number of sequences."""
        speech, lens = self.speech_embeddings(batch["feats"], batch["feats_lens"])
        dialogues = self.dialogues_of(batch, task)
        emb, mask, labels = self.build_sequences(speech, lens, dialogues, task, left_pad=False)
        loss, acc = self.sequence_loss(emb, mask, labels)
        weight = float(self.cfg.speech_llm.embedding_ctc_weight)
        if weight > 0 and task == ALIGN:
            loss = loss + weight * self.embedding_ctc_loss(speech, lens, batch["texts"])
        return loss, acc, len(dialogues)

    def _parts(self, batch: dict) -> list[tuple[dict, str]]:
        """(batch, task) of each part of a paired stage-2 batch (`PairedDataModule`), else of the batch."""
        return [(batch[p], task) for p, task in PAIRED_TASKS.items() if p in batch] or [(batch, self.task)]

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, torch.Tensor]]:
        """(loss, token accuracy, sequences, extra metrics) of a training or validation batch.

        With `speech_llm.align_qa_weight` (stage input_2_align) a batch is {"asr": .., "qa": ..}
        (`PairedDataModule`; "asr" only while align_asr_weight > 0) and the loss is the weighted
        sum of the transcript and spoken-QA answer losses; accuracy and size are the first part's.
        """
        if not set(batch) <= set(PAIRED_TASKS):
            return *self._task_loss(batch, self.task), {}
        weights = {"asr": self.cfg.speech_llm.align_asr_weight, "qa": self.cfg.speech_llm.align_qa_weight}
        total, extra, first = 0.0, {}, None
        for part, task in PAIRED_TASKS.items():
            if part in batch:
                loss, acc, n = self._task_loss(batch[part], task)
                total = total + float(weights[part]) * loss
                extra.update({f"{part}_loss": loss, f"{part}_token_acc": acc})
                first = first or (acc, n)
        return total, first[0], first[1], extra

    def state_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(listen, answer, drop) [..., 3] from LLM last hidden states [..., D] (`StateClassifier.probs`)."""
        return self.state_head.probs(hidden)

    def state_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Stage input_4_state: the head's loss on a batch of recorded chunk-end states
        (`StateClassifier.loss`): CE, accuracy over the three states, labelled chunks."""
        return self.state_head.loss(batch["hidden"], batch["labels"])

    def _state_step(self, batch: dict, split: str) -> torch.Tensor:
        loss, acc, n = self.state_loss(batch)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=n)
        self.log(f"{split}/state_acc", acc, prog_bar=split == "val", batch_size=n)
        return loss

    def training_step(self, batch, batch_idx):
        if self.task == STATE:
            return self._state_step(batch, "train")
        loss, acc, n, extra = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/token_acc", acc, batch_size=n)
        for name, value in extra.items():
            self.log(f"train/{name}", value, batch_size=n)
        for part, _ in self._parts(batch):
            for reason, count in part["skipped"].items():
                self.log(f"data/skipped_{reason}", float(count), reduce_fx="sum", batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        if self.task == STATE:
            return self._state_step(batch, "val")
        loss, acc, n, extra = self._step(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log("val/token_acc", acc, prog_bar=True, batch_size=n)
        for name, value in extra.items():
            self.log(f"val/{name}", value, prog_bar=name == "qa_token_acc", batch_size=n)
        if batch_idx == 0 and not self.trainer.sanity_checking and hasattr(self.logger, "experiment"):
            self._log_samples(batch)

    def _log_samples(self, batch: dict) -> None:
        for part, task in self._parts(batch):
            if task == ALIGN:
                feats, lens = part["feats"][:4], part["feats_lens"][:4]
                refs = part["texts"][:4]
            else:
                first = (part["turn_index"] == 0).nonzero().flatten()[:4]
                feats, lens = part["feats"][first], part["feats_lens"][first]
                refs = [part["questions"][int(part["dialogue_index"][i])][0] for i in first]
            hyps = self.generate(feats, lens, task)
            text = "\n\n".join(f"SPOKEN: {r}  \nLLM: {h}" for r, h in zip(refs, hyps))
            self.logger.experiment.add_text(f"samples/{task}", text, self.global_step)

    def configure_optimizers(self):
        return make_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)

    # --- decoding -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, feats: torch.Tensor, feats_lens: torch.Tensor, task: str, chunk_frames: int | None = None):
        """Greedy single-turn replies to N utterances (offline encoder at `chunk_frames`)."""
        speech, lens = self.speech_embeddings(feats, feats_lens, chunk_frames)
        dialogues = [[Turn(i, None)] for i in range(len(feats))]
        emb, mask, _ = self.build_sequences(speech, lens, dialogues, task, left_pad=True)
        from modules.speech_llm.streaming import greedy_generate  # the one greedy loop (imports this module)

        ids = greedy_generate(self.llm, emb, mask, self.layout.eos_id, self.cfg.speech_llm.max_answer_tokens)
        return [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]


# --- cached LLM answers (targets of input_3_prompt) ---------------------------------------------
def llm_answers_path(cfg: DictConfig, split: str) -> Path:
    return Path(cfg.speech_llm.answers_dir) / f"{split}.jsonl"


def read_llm_answers(cfg: DictConfig, split: str) -> dict[str, list[str]]:
    path = llm_answers_path(cfg, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: generate the frozen LLM's answers once with "
            f"`python -m tools.make_llm_answers experiment={cfg.experiment}`"
        )
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["id"]] = rec["replies"]
    return out


# --- the adapter's lexical path -----------------------------------------------------------------
def unit_lexicon(units: CTCUnits, tokenizer: PreTrainedTokenizerBase, table: torch.Tensor) -> torch.Tensor:
    """[V, D]: per CTC unit, the mean of the LLM input embeddings of its text (row 0, the blank: zeros);
    for units that are LLM tokens (`ctc.units=llm`), exactly their embeddings.

    A word-initial piece ("▁scarf") reads as the word after a space (" scarf").
    """
    lexicon = table.new_zeros(len(units), table.shape[1])
    if isinstance(units, LLMTokenUnits):  # units are the LLM's tokens: their own embeddings
        tokens = tokenizer.convert_ids_to_tokens(units.token_ids)
        wrong = [(i, u, t) for i, u, t in zip(units.token_ids, units.units[1:], tokens) if u != t]
        if wrong:
            raise ValueError(
                f"the stage-1 CTC units are tokens of another tokenizer than this LLM's ({len(wrong)} of "
                f"{len(tokens)} differ, e.g. id {wrong[0][0]}: {wrong[0][1]!r} vs {wrong[0][2]!r}); "
                "retrain input_1_ctc with this llm.path"
            )
        lexicon[1:] = table[torch.tensor(units.token_ids)]
        return lexicon
    for i, unit in enumerate(units.units[1:], start=1):
        ids = tokenizer(unit.replace("\u2581", " "), add_special_tokens=False)["input_ids"]
        if ids:
            lexicon[i] = table[ids].float().mean(0).to(table.dtype)
    return lexicon


# --- the stages ----------------------------------------------------------------------------------
def build(cfg: DictConfig) -> SpeechLLM:
    """The module with a frozen LLM; with `adapter.lexical`, its lexical path starts from stage 1.

    The lexical path's CTC layer and units come from the input_1_ctc output (a later stage's
    saved adapter then replaces them with their trained values).
    """
    llm, tokenizer = load_llm(cfg.llm)
    if not cfg.adapter.lexical:
        return SpeechLLM(cfg, llm, tokenizer)
    stage1 = read_stage_output(cfg, "input_1_ctc")
    module = SpeechLLM(cfg, llm, tokenizer, units_from_json(stage1.get("ctc_units")))
    head = stage1["state_dict"]
    lexicon = unit_lexicon(module.ctc_units, tokenizer, llm.get_input_embeddings().weight.detach())
    module.adapter.init_lexical(head["ctc_head.out.weight"], head["ctc_head.out.bias"], lexicon)
    return module


def read_answers_for_training(run: StageRun) -> None:
    """Check the loss weights of input_2_align and give the module the cached LLM answers its
    QA targets are (input_3_prompt, and input_2_align with the QA term)."""
    cfg, module = run.cfg, run.module
    qa_term = module.task == ALIGN and cfg.speech_llm.align_qa_weight > 0
    if module.task == ALIGN and cfg.speech_llm.align_asr_weight <= 0 and not qa_term:
        raise ValueError("stage input_2_align needs speech_llm.align_asr_weight > 0 or align_qa_weight > 0")
    if module.task == PROMPT or qa_term:
        from modules.llm.answers import ensure_llm_answers

        ensure_llm_answers(cfg)
        module.llm_answers = {**read_llm_answers(cfg, "train"), **read_llm_answers(cfg, "dev")}


def align_data(run: StageRun) -> ASRDataModule | PairedDataModule:
    """Transcripts (align_asr_weight), spoken QA (align_qa_weight), or both paired per batch."""
    cfg = run.cfg
    if cfg.speech_llm.align_qa_weight <= 0:
        return ASRDataModule(encoder_data_config(cfg, "asr"))
    parts = {"qa": SpokenQADataModule(encoder_data_config(cfg, "spoken_qa"))}
    if cfg.speech_llm.align_asr_weight > 0:
        parts["asr"] = ASRDataModule(encoder_data_config(cfg, "asr"))
    return PairedDataModule(**parts)


STAGE_SPECS = {
    ALIGN: StageSpec(
        build=build,
        prepare=read_answers_for_training,
        data=align_data,
        evaluate=lambda run: evaluate_llm_asr(run.cfg, run.module, "dev", [run.cfg.encoder.chunk_frames]),
    ),
    PROMPT: StageSpec(
        build=build,
        prepare=read_answers_for_training,
        data=lambda run: SpokenQADataModule(encoder_data_config(run.cfg, "spoken_qa")),
    ),
}


def load_speech_llm(cfg: DictConfig, stages: list[str]) -> SpeechLLM:
    """A SpeechLLM with the outputs of `stages` loaded, in eval mode."""
    module = build(cfg)
    load_stage_outputs(cfg, module, stages)
    return module.eval()


def llm_decoder(module: SpeechLLM) -> Decoder:
    """Transcripts the frozen LLM emits for the speech (stage-2 decoding)."""

    def decode(batch: dict, chunk_frames: int) -> list[str]:
        return module.generate(batch["feats"], batch["feats_lens"], ALIGN, chunk_frames=chunk_frames)

    return decode


def evaluate_llm_asr(cfg: DictConfig, module: SpeechLLM, split: str, chunks: list[int]) -> dict:
    """WER of the transcripts the frozen LLM emits (stage-2 decoding) at each chunk size."""
    return evaluate_wer(cfg, module, "llm", llm_decoder(module), split, chunks, desc=f"LLM ASR {split}")
