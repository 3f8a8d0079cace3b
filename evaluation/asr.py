"""The paper's Table 1 on any scale: ASR WER of the speech input, CTC vs LLM decoding.

For each trained variant of the chain (`eval.variants`: "" is the main chain, trained at
the configured chunk size; "dynamic" the one trained with dynamic chunks), decodes the ASR
test split (voices unseen in training) at full context and at the streaming chunk size:

* CTC greedy decoding of the stage input_1_ctc encoder;
* LLM decoding: the frozen LLM's greedy transcript given the speech (stage input_2_align).

Writes runs/<exp>/eval/asr.json and asr.md.
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig, OmegaConf

from datamodules.transcripts import wer
from modules.config import eval_dir, run_dir
from modules.encoder.ctc import ctc_decoder, decode_split, load_encoder_ctc
from modules.speech_llm.model import ALIGN, llm_decoder, load_speech_llm

log = logging.getLogger(__name__)


def with_variant(cfg: DictConfig, variant: str) -> DictConfig:
    cfg = cfg.copy()
    OmegaConf.update(cfg, "stage.variant", variant)
    return cfg


def variant_label(cfg: DictConfig, variant: str) -> str:
    if not variant:
        return f"chunk {cfg.encoder.chunk_frames} only"
    return "dynamic chunks" if variant == "dynamic" else variant


def decode_test(cfg: DictConfig, chunks: list[int], limit: int = 0) -> dict:
    """WER of CTC and LLM decoding of the ASR test split at each chunk size, for one variant."""
    decoders = {"ctc": ctc_decoder(load_encoder_ctc(cfg)), "llm": llm_decoder(load_speech_llm(cfg, [ALIGN]))}
    refs, hyps = decode_split(cfg, "test", decoders, chunks, limit, desc=f"ASR test ({cfg.stage.variant or 'main'})")
    examples = [{"ref": refs[i], **{k: v[i] for k, v in hyps.items()}} for i in range(min(5, len(refs)))]
    return {"utterances": len(refs), "wer": {k: wer(v, refs) for k, v in hyps.items()}, "examples": examples}


def evaluate_asr(cfg: DictConfig) -> dict:
    chunk = int(cfg.encoder.chunk_frames)
    chunks = [0, chunk]
    rows, missing = [], []
    for variant in cfg.eval.variants:
        vcfg = with_variant(cfg, variant)
        try:
            result = decode_test(vcfg, chunks, cfg.eval.limit)
        except FileNotFoundError as e:
            missing.append(f"{variant or 'main'}: {e}")
            log.warning("skipping variant '%s': %s", variant, e)
            continue
        for decoder, stage in (("CTC", "input_1_ctc"), ("LLM", ALIGN)):
            rows.append({
                "decoder": decoder,
                "training": variant_label(cfg, variant),
                "variant": variant,
                "stage_dir": str(run_dir(vcfg, stage)),
                "utterances": result["utterances"],
                "wer_chunk_full": result["wer"][f"{decoder.lower()}_0"],
                f"wer_chunk_{chunk}": result["wer"][f"{decoder.lower()}_{chunk}"],
                "examples": [{"ref": e["ref"], "full": e[f"{decoder.lower()}_0"], f"chunk_{chunk}": e[f"{decoder.lower()}_{chunk}"]} for e in result["examples"]],
            })  # fmt: skip
    if not rows:
        raise FileNotFoundError("no trained speech-input stages to evaluate: " + "; ".join(missing))
    ms = chunk * 40
    lines = [
        f"### ASR WER on unseen test voices (Table 1 shape; chunk {chunk} = {ms} ms)",
        "",
        f"| decoder | encoder trained with | chunk = full | chunk = {chunk} ({ms} ms) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['decoder']} | {r['training']} | {100 * r['wer_chunk_full']:.1f}% | {100 * r[f'wer_chunk_{chunk}']:.1f}% |"
        for r in rows
    ]
    table = "\n".join(lines) + "\n"
    out = eval_dir(cfg)
    result = {"chunk_frames": chunk, "chunk_ms": ms, "rows": rows, "missing": missing, "table": table}
    (out / "asr.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "asr.md").write_text(table)
    print(table)
    return result
