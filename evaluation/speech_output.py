"""The paper's Table 2 on any scale: intelligibility of the generated speech.

The frozen LLM answers the *text* of the spoken-QA test questions (multi-round, greedy, its
own replies in the context); the speech decoder speaks each reply and the codec turns the
tokens into 24 kHz audio in the assistant voice. The judge is stage `judge` (a full-context CTC
model outside the chain, `evaluation/judge.py`); its WER on the replies spoken by eSpeak in the
assistant voice is the floor. Rows: the decoder without/with the LLM-hidden-state prefix, each without/with
the pre-network (the `nopre` variant of the decoder chain), over decoder top-k 1..5.

Writes runs/<exp>/eval/speech_output.json and speech_output.md, and a few generated wavs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from datamodules.corpus.espeak import ESpeak, assistant_speech
from datamodules.spoken_qa import read_dialogues
from datamodules.text_qa import chat_messages
from datamodules.transcripts import wer
from evaluation.judge import mel_cepstral_distortion
from modules.codec.stage import load_codec, voice_tokens
from modules.config import eval_dir
from modules.encoder.ctc import JUDGE_LABEL, load_judge, transcribe
from modules.llm.generate import evaluate_text_qa
from modules.llm.hf import load_llm
from modules.speech_decoder.stage import load_speech_decoder
from server.fifo import split_reply

log = logging.getLogger(__name__)
ROWS = [  # (label, decoder variant, prefix)
    ("without prefix, without pre-network", "nopre", False),
    ("without prefix, with pre-network", "", False),
    ("with prefix, without pre-network", "nopre", True),
    ("with prefix, with pre-network", "", True),
]


def test_replies(cfg: DictConfig, turns: int) -> list[dict]:
    """The frozen LLM's replies to the first test dialogues' text, `turns` non-empty ones."""
    dialogues = read_dialogues(cfg.data.spoken_qa.test_shards)
    need = []
    for d in dialogues:  # enough dialogues for `turns` turns (with margin for empty replies)
        need.append(d)
        if sum(len(x["turns"]) for x in need) >= turns * 1.2:
            break
    llm, tokenizer = load_llm(cfg.llm)
    result = evaluate_text_qa(llm, tokenizer, need, cfg.eval.batch_size, cfg.speech_llm.max_answer_tokens)
    out, history = [], {}
    for r in result["records"]:
        h = history.setdefault(r["id"], [])
        if r["reply"].strip() and len(out) < turns:
            out.append({"id": f"{r['id']}-t{r['turn']}", "messages": chat_messages(list(h), r["question"]),
                        "text": r["reply"]})  # fmt: skip
        h.append((r["question"], r["reply"]))
    return out


@torch.inference_mode()
def speak(decoder, codec, voice: torch.Tensor, items: list[dict], prefix: bool, top_k: int, seed: int,
          batch: int = 16, segments: tuple[int, int, bool] | None = None) -> list[np.ndarray]:  # fmt: skip
    """24 kHz audio of each item's text through decoder (+ prefix) and codec. `segments`
    (min_tokens, comma_after, clauses) speaks each reply segment by segment as the duplex engine does
    (`server.fifo.split_reply`; the prefix of a segment is the hidden states of its tokens) and
    joins their audio; None speaks each reply whole."""
    gen = torch.Generator().manual_seed(seed)
    parts = []  # (item index, text, LLM hidden states [n, W] or None)
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        hidden = valid = None
        if prefix:
            hidden, valid = decoder.reply_hidden_states([x["messages"] for x in chunk], [x["text"] for x in chunk])
        for j, x in enumerate(chunk):
            h = hidden[j, valid[j]] if prefix else None
            if segments is None:
                parts.append((i + j, x["text"], h))
                continue
            ids = decoder.reply_ids([x["text"]])[0]
            for text, a, b in split_reply(decoder.tokenizer, ids, *segments):
                parts.append((i + j, text, None if h is None else h[a:b]))
    audio: list[list[np.ndarray]] = [[] for _ in items]
    for i in range(0, len(parts), batch):
        chunk = parts[i : i + batch]
        cond = decoder.conditioning({"texts": [t for _, t, _ in chunk]})
        hidden = hidden_valid = None
        if prefix:
            n = max(1, max(len(h) for _, _, h in chunk))
            hidden = cond["text"].new_zeros(len(chunk), n, chunk[0][2].shape[-1])
            hidden_valid = torch.zeros(len(chunk), n, dtype=torch.bool, device=hidden.device)
            for k, (_, _, h) in enumerate(chunk):
                hidden[k, : len(h)], hidden_valid[k, : len(h)] = h, True
        codes = decoder.generate(cond["text"], cond["text_valid"], hidden, hidden_valid, top_k=top_k, generator=gen,
                                 phonemes=cond["phonemes"])  # fmt: skip
        for (item, _, _), c in zip(chunk, codes):
            if len(c):
                audio[item].append(codec.decode(c[None], voice)[0, 0].numpy())
    return [np.concatenate(a) if a else np.zeros(0, np.float32) for a in audio]


def evaluate_speech_output(cfg: DictConfig) -> dict:
    turns = cfg.eval.speech_output_turns
    top_ks = list(cfg.eval.top_ks)
    segments = None  # each reply whole, or segment by segment as the duplex engine speaks it
    if cfg.eval.speech_output_segments:
        segments = (cfg.duplex.segment_min_tokens, cfg.duplex.segment_comma_after, cfg.duplex.segment_clauses)
    items = test_replies(cfg, turns)
    refs = [x["text"] for x in items]
    judge = load_judge(cfg)
    codec = load_codec(cfg)
    rate = codec.codec_cfg.sample_rate
    voice = voice_tokens(cfg)
    tts = ESpeak()
    truth = [assistant_speech(t, rate, tts) for t in tqdm(refs, desc="eSpeak replies", unit="reply")]
    floor_heard = transcribe(judge, truth, rate)
    floor = wer(floor_heard, refs)
    resynth = [codec.decode(codec.encode(torch.from_numpy(w)[None, None])[0], voice)[0, 0].numpy() for w in truth]
    codec_heard = transcribe(judge, resynth, rate)
    codec_wer = wer(codec_heard, refs)
    codec_mcd = mel_cepstral_distortion(truth, resynth, rate)
    out_dir = eval_dir(cfg) / "speech_output"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, missing = [], []
    for label, variant, prefix in ROWS:
        if variant not in cfg.eval.decoder_variants:
            continue
        vcfg = cfg.copy()
        OmegaConf.update(vcfg, "stage.variant", variant)
        if variant == "nopre":
            OmegaConf.update(vcfg, "speech_decoder.pre_net_layers", 0)
        try:
            decoder = load_speech_decoder(vcfg, with_prefix=prefix)
        except FileNotFoundError as e:
            missing.append(f"{label}: {e}")
            log.warning("skipping row '%s': %s", label, e)
            continue
        row = {"row": label, "variant": variant, "prefix": prefix, "wer": {}}
        for k in tqdm(top_ks, desc=label, unit="top-k"):
            wavs = speak(decoder, codec, voice, items, prefix, k, cfg.seed, segments=segments)
            hyps = transcribe(judge, wavs, rate)
            row["wer"][str(k)] = wer(hyps, refs)
            row.setdefault("mcd_db", {})[str(k)] = mel_cepstral_distortion(truth, wavs, rate)
            row.setdefault("seconds", {})[str(k)] = round(sum(len(w) for w in wavs) / rate, 1)
            if k == cfg.speech_decoder.top_k:
                tag = f"{'prefix' if prefix else 'noprefix'}-{'nopre' if variant else 'prenet'}-k{k}"
                for j in range(min(3, len(wavs))):
                    sf.write(out_dir / f"{items[j]['id']}-{tag}.wav", wavs[j], rate)
                row["examples"] = [{"text": r, "heard": h} for r, h in zip(refs, hyps)]  # every reply
        rows.append(row)
    for j in range(min(3, len(truth))):
        sf.write(out_dir / f"{items[j]['id']}-espeak.wav", truth[j], rate)
    if not rows:
        raise FileNotFoundError("no trained speech decoder to evaluate: " + "; ".join(missing))
    best = min(v for r in rows for v in r["wer"].values())
    lines = [
        f"### Intelligibility of the generated speech (Table 2 shape): WER of the judge, {len(items)} replies",
        "",
        f"Floor (the replies spoken by eSpeak in the assistant voice): {100 * floor:.1f}%; "
        f"through the codec (encode + decode): {100 * codec_wer:.1f}% (MCD {codec_mcd:.2f} dB); best row "
        f"{100 * best:.1f}% = {best / max(floor, 1e-9):.2f} x the floor. Cells: judge WER (mel-cepstral "
        "distortion to eSpeak's audio, DTW-aligned). "
        + (
            "Each reply is spoken segment by segment, as the duplex engine cuts it."
            if segments
            else "Each reply is spoken whole."
        ),
        *(
            [
                "",
                f"The codec's own resynthesis is {100 * codec_wer:.0f}% WER: the judge hears no words in this "
                "codec's audio yet, so the rows say nothing about the decoder (train the codec longer: "
                "`make demo-output`).",
            ]
            if codec_wer >= 0.9
            else []
        ),
        "",
        "| decoder | " + " | ".join(f"top-k {k}" for k in top_ks) + " |",
        "|---|" + "---|" * len(top_ks),
    ]
    lines += [f"| {r['row']} | " + " | ".join(f"{100 * r['wer'][str(k)]:.1f}% ({r['mcd_db'][str(k)]:.1f} dB)"
                                             for k in top_ks) + " |" for r in rows]  # fmt: skip
    table = "\n".join(lines) + "\n"
    result = {
        "replies": len(items), "segments": segments is not None, "judge": JUDGE_LABEL, "floor_wer": floor, "codec_resynthesis_wer": codec_wer,
        "codec_resynthesis_mcd_db": codec_mcd,
        "best_wer": best, "best_over_floor": best / max(floor, 1e-9), "rows": rows, "missing": missing,
        "table": table,
        "heard": [{"text": r, "espeak": f, "codec": c} for r, f, c in zip(refs, floor_heard, codec_heard)],
    }  # fmt: skip
    path = Path(eval_dir(cfg))
    (path / "speech_output.json").write_text(json.dumps(result, indent=2) + "\n")
    (path / "speech_output.md").write_text(table)
    print(table)
    return result
