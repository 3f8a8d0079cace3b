"""Shard writer / readers, per-sample processors, skipping, bucketing and node/worker splitting."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from datamodules.audio import encode_flac
from datamodules.shards.manifests import read_jsonl_manifest, read_kaldi_dir
from datamodules.shards.reader import (
    ShardDataset,
    SkipCounter,
    SkipSample,
    append_silence,
    bucket_batches,
    build_stages,
    check_frames,
    collate_asr,
    compute_fbank,
    decode_sample,
    filter_sample,
    resolve_shards,
    split_at_fbank,
)
from datamodules.shards.writer import make_key, write_shards

SR = 22050


def tone(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    f0 = 120 + 30 * (seed % 5)
    return (0.3 * np.sin(2 * np.pi * (f0 + 200 * t) * t) + 0.01 * rng.standard_normal(t.shape[0])).astype(np.float32)


def make_asr_corpus(root: Path, n: int = 12, wav_every: int = 5) -> tuple[Path, list[dict]]:
    """Write n utterances (FLAC at 22050 Hz; every ``wav_every``-th a 16 kHz WAV) and a JSONL manifest."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        seconds = 0.4 + 0.15 * (i % 7)
        if wav_every and i % wav_every == wav_every - 1:
            rel, sr = f"audio/u{i:03d}.wav", 16000
        else:
            rel, sr = f"audio/u{i:03d}.flac", SR
        wav = tone(seconds, sr, seed=i)
        sf.write(root / rel, wav, sr, subtype="PCM_16")
        records.append(
            {
                "id": f"utt.{i:03d}" if i == 0 else f"utt{i:03d}",  # the first id has a dot on purpose
                "audio": rel,
                "text": f"sentence number {i}",
                "speaker": f"spk{i % 3}",
                "language": "en",
                "duration": len(wav) / sr,
                "sample_rate": sr,
                "split": "train",
            }
        )
    manifest = root / "asr.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest, records


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def raw_samples(shards) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(resolve_shards(shards)), wds.tarfile_to_samples()))


# ================================================================================================ writer


def test_write_shards_from_jsonl_round_trip(tmp_path):
    manifest, records = make_asr_corpus(tmp_path / "corpus", n=12)
    out = tmp_path / "shards"
    index = write_shards(
        read_jsonl_manifest(manifest), manifest.parent, out, prefix="train", max_shard_samples=5, progress=False
    )
    assert [s["path"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]
    assert [s["num_samples"] for s in index["shards"]] == [5, 5, 2]
    assert index["num_samples"] == 12
    expected_hours = sum(r["duration"] for r in records) / 3600
    assert index["hours"] == pytest.approx(expected_hours, rel=1e-4)
    assert sum(s["hours"] for s in index["shards"]) == pytest.approx(expected_hours, rel=1e-4)
    assert index["speakers"] == 3
    assert json.loads((out / "index.json").read_text()) == index

    names = tar_members(out / "train-000000.tar")
    assert names[:2] == ["utt_000.flac", "utt_000.json"]  # the dot in the id became "_"
    samples = raw_samples(out)
    assert len(samples) == 12
    by_id = {json.loads(s["json"])["id"]: s for s in samples}
    for rec in records:
        meta = json.loads(by_id[rec["id"]]["json"])
        assert "audio" not in meta
        assert meta["text"] == rec["text"] and meta["speaker"] == rec["speaker"]
        assert meta["sample_rate"] == rec["sample_rate"]  # kept at the SOURCE rate
        assert meta["num_samples"] == round(rec["duration"] * rec["sample_rate"])
        assert meta["duration"] == pytest.approx(rec["duration"], abs=1e-5)
        info = sf.info(io.BytesIO(by_id[rec["id"]]["flac"]))
        assert info.format == "FLAC" and info.samplerate == rec["sample_rate"]
    # FLAC sources are copied byte for byte
    assert by_id["utt001"]["flac"] == (manifest.parent / "audio/u001.flac").read_bytes()

    # re-writing the same prefix replaces its shards; another prefix is added to the index
    index2 = write_shards(
        read_jsonl_manifest(manifest), manifest.parent, out, prefix="train", max_shard_samples=20, progress=False
    )
    assert [s["path"] for s in index2["shards"]] == ["train-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    index3 = write_shards(iter(records[:4]), manifest.parent, out, prefix="extra", progress=False)
    assert index3["num_samples"] == 16 and len(index3["shards"]) == 2
    assert index3["hours"] == pytest.approx(index2["hours"] + index3["parts"]["extra"]["hours"])


def test_write_shards_skips_unreadable_and_duplicates(tmp_path, caplog):
    manifest, records = make_asr_corpus(tmp_path / "corpus", n=4, wav_every=0)
    bad = [*records, {**records[1]}, {**records[2], "id": "ghost", "audio": "audio/missing.flac"}]
    with caplog.at_level(logging.WARNING):
        index = write_shards(bad, manifest.parent, tmp_path / "out", prefix="p", progress=False)
    assert index["num_samples"] == 4
    assert index["parts"]["p"]["skipped"] == {"duplicate_id": 1, "unreadable_audio": 1}
    assert "missing.flac" in caplog.text
    with pytest.raises(Exception, match=r"missing\.flac.*no such file"):
        write_shards(bad[-1:], manifest.parent, tmp_path / "out2", prefix="p", progress=False, strict=True)
    with pytest.raises(ValueError):
        write_shards(records, manifest.parent, tmp_path / "out3", prefix="a.b", progress=False)


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.startswith(".staging") or p.name.endswith(".partial"))


def test_failed_write_leaves_previous_shards_and_index(tmp_path, monkeypatch):
    manifest, records = make_asr_corpus(tmp_path / "corpus", n=12)
    root, out = manifest.parent, tmp_path / "shards"
    write_shards(records, root, out, prefix="train", max_shard_samples=2, progress=False)
    write_shards(records[:3], root, out, prefix="extra", progress=False)
    before = _snapshot(out)
    assert "index.json" in before and len([n for n in before if n.endswith(".tar")]) == 7

    # strict=True: an unreadable record after several good ones (some staged shards already closed)
    ghost = {**records[2], "id": "ghost", "audio": "audio/missing.flac"}
    with pytest.raises(Exception, match=r"missing\.flac"):
        write_shards(
            [*records[::-1][:7], ghost, *records[:3]],
            root,
            out,
            prefix="train",
            max_shard_samples=3,
            progress=False,
            strict=True,
        )
    assert _snapshot(out) == before
    assert _temporaries(out) == []

    # an interrupt (Ctrl-C) raised by the record source midway
    def interrupted():
        yield from records[:5]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(interrupted(), root, out, prefix="train", max_shard_samples=2, progress=False)
    assert _snapshot(out) == before
    assert _temporaries(out) == []

    # a failure after every record was written (e.g. disk full while writing the index)
    import datamodules.shards.writer as shard_writer

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_writer, "_merge_index", boom)
    with pytest.raises(OSError, match="No space left"):
        write_shards(records[:4], root, out, prefix="train", progress=False)
    assert _snapshot(out) == before
    assert _temporaries(out) == []
    monkeypatch.undo()

    # and a later successful write still replaces the old shards
    index = write_shards(records[:4], root, out, prefix="train", progress=False)
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"]
    assert index["num_samples"] == 7 and index["parts"]["train"]["num_samples"] == 4
    assert _temporaries(out) == []


def test_stray_temporaries_of_a_crashed_write_are_removed(tmp_path, caplog):
    manifest, records = make_asr_corpus(tmp_path / "corpus", n=4, wav_every=0)
    out = tmp_path / "shards"
    out.mkdir()
    # what a killed run of prefix "train" leaves, plus a crashed run of another prefix (kept)
    (out / ".staging-train").mkdir()
    (out / ".staging-train" / "train-000000.tar").write_bytes(b"half a tar")
    (out / ".staging-train" / "index.json").write_text("{")
    (out / "train-000001.tar.partial").write_bytes(b"old-style partial shard")
    (out / ".staging-other").mkdir()
    (out / ".staging-other" / "other-000000.tar").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        index = write_shards(records, manifest.parent, out, prefix="train", progress=False)
    assert "interrupted earlier write" in caplog.text
    assert index["num_samples"] == 4
    assert not (out / ".staging-train").exists()
    assert not (out / "train-000001.tar.partial").exists()
    assert (out / ".staging-other" / "other-000000.tar").exists()
    assert sorted(p.name for p in out.iterdir()) == [".staging-other", "index.json", "train-000000.tar"]
    assert len(raw_samples(out)) == 4


def test_index_drops_parts_whose_shards_are_gone(tmp_path, caplog):
    manifest, records = make_asr_corpus(tmp_path / "corpus", n=6, wav_every=0)
    root, out = manifest.parent, tmp_path / "shards"
    write_shards(records[:2], root, out, prefix="a", progress=False)
    write_shards([{**r, "speaker": "only_b"} for r in records[2:5]], root, out, prefix="b", progress=False)
    index = write_shards(records[5:], root, out, prefix="c", progress=False)
    assert index["num_samples"] == 6 and set(index["parts"]) == {"a", "b", "c"}
    (out / "b-000000.tar").unlink()
    with caplog.at_level(logging.WARNING):
        index = write_shards(records[:2], root, out, prefix="a", progress=False)
    assert "'b'" in caplog.text and "b-000000.tar" in caplog.text
    assert set(index["parts"]) == {"a", "c"}
    assert [s["path"] for s in index["shards"]] == ["c-000000.tar", "a-000000.tar"]
    assert index["num_samples"] == 3
    assert index["hours"] == pytest.approx(index["parts"]["a"]["hours"] + index["parts"]["c"]["hours"])
    assert "only_b" not in index["speaker_ids"]
    assert len(raw_samples(out)) == 3


def test_write_and_decode_spoken_qa(tmp_path):
    root = tmp_path / "qa"
    (root / "audio").mkdir(parents=True)
    records = []
    for d in range(3):
        turns = []
        for k in range(2):
            rel = f"audio/q{d}-t{k}.flac"
            wav = tone(0.5 + 0.2 * k, SR, seed=10 * d + k)
            sf.write(root / rel, wav, SR, subtype="PCM_16")
            turns.append(
                {
                    "question": f"what is {d} plus {k}?",
                    "answer": f"It is {d + k}.",
                    "gold": [str(d + k)],
                    "family": "arith",
                    "audio": rel,
                    "duration": len(wav) / SR,
                    "sample_rate": SR,
                }
            )
        records.append({"id": f"dlg{d}", "speaker": "s1", "language": "en", "split": "dev", "turns": turns})
    manifest = root / "qa.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "qa_shards"
    index = write_shards(read_jsonl_manifest(manifest), root, out, prefix="qa", progress=False)
    assert index["num_samples"] == 3 and index["kinds"] == ["spoken_qa"]
    assert index["hours"] == pytest.approx(sum(t["duration"] for r in records for t in r["turns"]) / 3600, rel=1e-4)
    assert tar_members(out / "qa-000000.tar")[:3] == ["dlg0.json", "dlg0.t0.flac", "dlg0.t1.flac"]
    raw = raw_samples(out)
    sample = decode_sample(raw[0], kind="spoken_qa")
    assert len(sample["turns"]) == 2
    turn = sample["turns"][1]
    assert turn["sr"] == 16000 and turn["wav"].dtype == np.float32
    assert abs(turn["wav"].shape[0] - 0.7 * 16000) <= 2
    assert turn["question"] == "what is 0 plus 1?" and turn["gold"] == ["1"] and turn["family"] == "arith"
    meta_turn = json.loads(raw[0]["json"])["turns"][0]
    assert "audio" not in meta_turn and meta_turn["num_samples"] == round(0.5 * SR)
    with pytest.raises(ValueError, match="spoken_qa"):
        decode_sample(raw[0], kind="asr")
    compute_fbank(sample)
    assert [t["feats"].shape[1] for t in sample["turns"]] == [80, 80]


# ================================================================================================ readers


def test_read_kaldi_dir_round_trip(tmp_path, caplog):
    manifest, records = make_asr_corpus(tmp_path / "corpus", n=6)
    kdir = tmp_path / "data" / "train"
    kdir.mkdir(parents=True)
    ids = [make_key(r["id"]) for r in records]
    (kdir / "wav.scp").write_text("".join(f"{u} {r['audio']}\n" for u, r in zip(ids, records)))
    (kdir / "text").write_text("".join(f"{u} {r['text']}\n" for u, r in list(zip(ids, records))[:-1]))  # last: none
    (kdir / "utt2spk").write_text("".join(f"{u} {r['speaker']}\n" for u, r in zip(ids, records)))
    with caplog.at_level(logging.WARNING):
        krecords = list(read_kaldi_dir(kdir, audio_root=manifest.parent, language="en"))
    assert [r["id"] for r in krecords] == ids[:-1]
    assert "1 of 6 utterances" in caplog.text and ids[-1] in caplog.text
    assert krecords[1]["speaker"] == records[1]["speaker"] and krecords[1]["text"] == records[1]["text"]
    assert Path(krecords[1]["audio"]).is_absolute()

    index = write_shards(krecords, tmp_path, tmp_path / "kshards", prefix="k", progress=False)
    assert index["num_samples"] == 5 and index["speakers"] == 3
    assert index["hours"] == pytest.approx(sum(r["duration"] for r in records[:-1]) / 3600, rel=1e-4)

    (kdir / "wav.scp").write_text(f"{ids[0]} sox in.wav -t wav - |\n")
    with pytest.raises(ValueError, match="pipe"):
        list(read_kaldi_dir(kdir))
    (kdir / "wav.scp").write_text(f"{ids[0]} a.flac\n{ids[0]} b.flac\n")
    with pytest.raises(ValueError, match="duplicate"):
        list(read_kaldi_dir(kdir))
    with pytest.raises(FileNotFoundError, match=r"wav\.scp"):
        list(read_kaldi_dir(tmp_path))


def test_read_jsonl_manifest_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "audio": "x.flac"}\n\n{"id": "b", "audio": \n')
    with pytest.raises(ValueError, match=r"m\.jsonl:3"):
        list(read_jsonl_manifest(path))
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="neither"):
        list(read_jsonl_manifest(path))


def test_resolve_shards(tmp_path):
    manifest, _ = make_asr_corpus(tmp_path / "corpus", n=6)
    out = tmp_path / "s"
    write_shards(read_jsonl_manifest(manifest), manifest.parent, out, prefix="x", max_shard_samples=2, progress=False)
    expected = [str(out / f"x-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(out) == expected
    assert resolve_shards(f"{out}/x-{{000000..000002}}.tar") == expected
    assert resolve_shards(f"{out}/x-*.tar") == expected
    assert resolve_shards([expected[0], expected[2]]) == [expected[0], expected[2]]
    with pytest.raises(FileNotFoundError):
        resolve_shards(f"{out}/x-{{000000..000005}}.tar")
    with pytest.raises(FileNotFoundError):
        resolve_shards(tmp_path / "corpus" / "audio")
    # an index listing a shard that was deleted afterwards fails up front, naming the shard and the index
    (out / "x-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"x-000001\.tar") as exc:
        resolve_shards(out)
    assert str(out / "index.json") in str(exc.value) and "rewrite the shards" in str(exc.value)
    assert "x-000000.tar" not in str(exc.value)


# ================================================================================================ processors


def _asr_raw(
    key: str, wav: np.ndarray | None, text: str = "hello", duration: float | None = None, flac: bytes | None = None
) -> dict:
    if flac is None and wav is not None:
        flac = encode_flac(wav, SR)
    meta = {
        "id": key,
        "text": text,
        "speaker": "s",
        "language": "en",
        "sample_rate": SR,
        "duration": duration if duration is not None else (len(wav) / SR if wav is not None else 1.0),
    }
    raw = {"__key__": key, "__url__": "mem", "json": json.dumps(meta).encode()}
    if flac is not None:
        raw["flac"] = flac
    return raw


def test_processors_individually():
    wav = tone(1.0)
    sample = decode_sample(_asr_raw("a", wav))
    assert sample["sr"] == 16000 and abs(sample["wav"].shape[0] - 16000) <= 1 and sample["text"] == "hello"
    assert sample["duration"] == pytest.approx(1.0)
    assert filter_sample(sample, min_duration_s=0.5, max_duration_s=2.0) is sample
    feats = compute_fbank(sample)["feats"]
    assert isinstance(feats, torch.Tensor) and feats.shape == (98, 80)
    check_frames(sample, max_frames_per_batch=98)

    cases = {
        "too_many_frames": lambda: check_frames(sample, max_frames_per_batch=97),
        "too_short": lambda: filter_sample(sample, min_duration_s=1.5, max_duration_s=2.0),
        "too_long": lambda: filter_sample(sample, min_duration_s=0.1, max_duration_s=0.5),
        "empty_text": lambda: filter_sample(
            decode_sample(_asr_raw("b", wav, text="  ")), min_duration_s=0, max_duration_s=9
        ),
        "duration_mismatch": lambda: decode_sample(_asr_raw("c", wav, duration=1.2)),
        "missing_audio": lambda: decode_sample(_asr_raw("d", None)),
        "bad_json": lambda: decode_sample({"__key__": "e", "json": b"{oops", "flac": b""}),
        "decode_error": lambda: decode_sample(_asr_raw("f", None, flac=b"fLaC" + b"\x00" * 64)),
    }
    for reason, call in cases.items():
        with pytest.raises(SkipSample) as info:
            call()
        assert info.value.reason == reason
    # within the 10 % tolerance passes
    assert decode_sample(_asr_raw("g", wav, duration=1.08))["duration"] == pytest.approx(1.0)


def test_tail_silence_follows_the_speech_and_is_not_counted_in_its_duration():
    wav = tone(1.0)
    plain = build_stages(np.random.default_rng(0), kind="asr", min_duration_s=0.9, max_duration_s=1.1)
    padded = build_stages(
        np.random.default_rng(0), kind="asr", min_duration_s=0.9, max_duration_s=1.1, tail_silence_s=0.32
    )
    a, b = _asr_raw("a", wav), _asr_raw("a", wav)
    for stage in plain:
        a = stage(a)
    for stage in padded:
        b = stage(b)
    n = a["wav"].shape[0]
    assert b["wav"].shape[0] == n + round(0.32 * 16000)
    assert np.array_equal(b["wav"][:n], a["wav"]) and not b["wav"][n:].any()
    assert b["duration"] == a["duration"] == pytest.approx(1.0)  # the filter judged the speech alone
    assert b["feats"].shape[0] == a["feats"].shape[0] + 32  # 320 ms at a 10 ms shift
    assert torch.equal(b["feats"][:90], a["feats"][:90])  # frames before the tail are unchanged
    qa = {"turns": [{"wav": np.ones(100, np.float32), "sr": 16000}, {"wav": np.ones(7, np.float32), "sr": 16000}]}
    assert [t["wav"].shape[0] for t in append_silence(qa, seconds=0.01)["turns"]] == [260, 167]
    with pytest.raises(ValueError, match="tail_silence_s"):
        build_stages(np.random.default_rng(0), kind="asr", min_duration_s=0.1, max_duration_s=2, tail_silence_s=-1)


def corrupt_flac(wav: np.ndarray) -> bytes:
    data = bytearray(encode_flac(wav, SR))
    data[len(data) // 3 : len(data) // 3 + 200] = b"\x00" * 200
    return bytes(data)


def write_bad_shard(path: Path, n_good: int = 10, tag: str = "a") -> tuple[list[str], Counter]:
    """A shard mixing good samples with one of each kind of bad sample; returns (good keys, expected skips)."""
    good, expected = [], Counter()
    entries = []
    for i in range(n_good):
        entries.append(_asr_raw(f"{tag}good{i:02d}", tone(0.5 + 0.1 * i, seed=i)))
        good.append(f"{tag}good{i:02d}")
    wav = tone(1.5, seed=99)
    full = encode_flac(wav, SR)
    bad = [
        ("decode_error", _asr_raw(f"{tag}corrupt", wav, flac=corrupt_flac(wav))),
        ("decode_error", _asr_raw(f"{tag}truncated", wav, flac=full[: len(full) // 2])),
        ("empty_text", _asr_raw(f"{tag}empty", wav, text="")),
        ("duration_mismatch", _asr_raw(f"{tag}absurd", wav, duration=9999.0)),
        ("too_long", _asr_raw(f"{tag}toolong", tone(4.0, seed=5))),
        ("too_short", _asr_raw(f"{tag}tooshort", tone(0.05, seed=6))),
    ]
    for reason, raw in bad:
        expected[reason] += 1
        entries.insert(len(entries) // 2 + len(expected), raw)
    with wds.TarWriter(str(path), encoder=False) as tar:
        for raw in entries:
            tar.write({k: v for k, v in raw.items() if k != "__url__"})
    return good, expected


def _stages(max_duration_s: float = 3.0, min_duration_s: float = 0.1):
    return partial(build_stages, kind="asr", min_duration_s=min_duration_s, max_duration_s=max_duration_s)


def _merge_skips(batches) -> Counter:
    total = Counter()
    for b in batches:
        total.update(b["skipped"])
    # a truncated FLAC may be reported as "truncated" by other libsndfile versions
    total["decode_error"] += total.pop("truncated", 0)
    return total


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, caplog, num_workers):
    good, expected = write_bad_shard(tmp_path / "bad-000000.tar")
    good2, expected2 = write_bad_shard(tmp_path / "bad-000001.tar", n_good=4, tag="b")
    ds = ShardDataset(
        resolve_shards(tmp_path),
        stages_factory=_stages(),
        max_frames_per_batch=400,
        bucket_buffer=8,
        shuffle=True,
        shuffle_buffer=5,
    )
    with caplog.at_level(logging.WARNING):
        batches = list(DataLoader(ds, batch_size=None, num_workers=num_workers))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(set(good) | set(good2)) and len(keys) == len(good) + len(good2)
    assert _merge_skips(batches) == expected + expected2
    if num_workers == 0:
        assert "absurd" in caplog.text and "duration_mismatch" in caplog.text


def test_skip_counter_rate_limits_logging(caplog):
    counter = SkipCounter(log_first=2, log_every=5)
    with caplog.at_level(logging.WARNING):
        for i in range(10):
            counter.add("decode_error", f"k{i}")
    assert len(caplog.records) == 4  # 1, 2, 5, 10
    assert counter.pop_delta() == {"decode_error": 10} and counter.pop_delta() == {}
    assert counter.handle_exception(RuntimeError("boom")) is True
    assert counter.totals["tar_error"] == 1


# ================================================================================================ batching


def test_bucket_batches_respect_budget():
    rng = np.random.default_rng(0)
    samples = [{"key": str(i), "feats": torch.zeros(int(n), 80)} for i, n in enumerate(rng.integers(20, 400, 203))]
    for budget, max_bs in [(1000, None), (400, None), (3000, 4)]:
        batches = list(
            bucket_batches(
                iter(samples),
                bucket_buffer=32,
                max_frames_per_batch=budget,
                max_batch_size=max_bs,
                rng=__import__("random").Random(1),
            )
        )
        seen = [s["key"] for b in batches for s in b]
        assert sorted(seen) == sorted(s["key"] for s in samples)
        for b in batches:
            assert len(b) * max(s["feats"].shape[0] for s in b) <= budget
            assert max_bs is None or len(b) <= max_bs
        collated = collate_asr(
            [{**s, "text": "t", "speaker": "s", "language": None, "duration": 1.0} for s in batches[0]]
        )
        assert collated["feats"].shape == (len(batches[0]), int(collated["feats_lens"].max()), 80)


# ================================================================================================ node / worker split


def test_node_and_worker_split_cover_all_keys_once(tmp_path, monkeypatch):
    manifest, records = make_asr_corpus(tmp_path / "corpus", n=24, wav_every=0)
    out = tmp_path / "shards"
    write_shards(read_jsonl_manifest(manifest), manifest.parent, out, prefix="t", max_shard_samples=3, progress=False)
    shards = resolve_shards(out)
    assert len(shards) == 8
    all_keys = sorted(make_key(r["id"]) for r in records)

    def read(num_workers: int, **kw) -> list[str]:
        ds = ShardDataset(
            shards,
            stages_factory=_stages(),
            max_frames_per_batch=2000,
            bucket_buffer=6,
            shuffle=True,
            shuffle_buffer=4,
            seed=3,
            **kw,
        )
        return [k for b in DataLoader(ds, batch_size=None, num_workers=num_workers) for k in b["keys"]]

    # explicit rank / world_size, 2 workers per rank
    per_rank = [read(2, rank=r, world_size=2) for r in range(2)]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == all_keys

    # WebDataset's own detection (RANK / WORLD_SIZE environment), single process
    env_keys = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        env_keys.append(read(0))
    assert sorted(env_keys[0] + env_keys[1]) == all_keys and not set(env_keys[0]) & set(env_keys[1])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    # epoch_batches equalises ranks; resampled draws shards with replacement
    ds = ShardDataset(
        shards,
        stages_factory=_stages(),
        max_frames_per_batch=2000,
        bucket_buffer=6,
        shuffle=True,
        resampled=True,
        epoch_batches=7,
        rank=1,
        world_size=2,
    )
    assert len(list(ds)) == 7
    with pytest.raises(ValueError, match="epoch_batches"):
        ShardDataset(shards, stages_factory=_stages(), max_frames_per_batch=2000, resampled=True)


# ================================================================================================ sample cache


@pytest.fixture(scope="module")
def cache_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    manifest, _ = make_asr_corpus(root / "corpus", n=10, wav_every=0)
    out = root / "shards"
    write_shards(read_jsonl_manifest(manifest), manifest.parent, out, prefix="c", max_shard_samples=4, progress=False)
    return out


def _shard_copy(src: Path, dst: Path) -> list[str]:
    shutil.copytree(src, dst)
    return resolve_shards(dst)


def _counting_stages(decoded: list[str], **kwargs):
    """build_stages whose decode stage records every key it decodes (i.e. every sample read from a tar)."""

    def factory(rng):
        stages = build_stages(rng, kind="asr", min_duration_s=0.1, max_duration_s=3.0, **kwargs)

        def decode(raw, _decode=stages[0]):
            decoded.append(raw["__key__"])
            return _decode(raw)

        return [decode, *stages[1:]]

    return factory


def _cache_dataset(shards, stages_factory, **kwargs) -> ShardDataset:
    kwargs = {"max_frames_per_batch": 300, "bucket_buffer": 4, "cache_samples": True, **kwargs}
    return ShardDataset(shards, stages_factory=stages_factory, **kwargs)


def _hide(shards: list[str]) -> None:
    for s in shards:
        Path(s).rename(s + ".hidden")


def test_cache_samples_second_epoch_reuses_features_without_reading_tars(cache_shards, tmp_path):
    shards = _shard_copy(cache_shards, tmp_path / "s")
    decoded: list[str] = []
    ds = _cache_dataset(shards, _counting_stages(decoded))
    assert not ds.cache_complete
    first = list(ds)
    assert ds.cache_complete and len(ds.cached_samples) == 10 and sorted(decoded) == sorted(set(decoded))
    assert len(decoded) == 10
    _hide(shards)  # epoch 2 must not need the tar files
    second = list(ds)
    assert len(decoded) == 10  # nothing decoded again
    assert [b["keys"] for b in first] == [b["keys"] for b in second]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a["feats"], b["feats"], rtol=0, atol=0)
        assert torch.equal(a["feats_lens"], b["feats_lens"]) and a["texts"] == b["texts"]
        assert b["skipped"] == {}

    # shuffle=True: every cached epoch is a deterministic (seed, epoch) permutation of all samples
    def cached_epochs(name: str) -> list[list[str]]:
        ds = _cache_dataset(_shard_copy(cache_shards, tmp_path / name), _stages(), shuffle=True, seed=7)
        return [[k for b in ds for k in b["keys"]] for _ in range(3)]

    epochs = cached_epochs("shuffled")
    assert all(sorted(e) == sorted(epochs[0]) and len(e) == 10 for e in epochs)
    assert epochs[1] != epochs[2]
    assert cached_epochs("shuffled_again")[1:] == epochs[1:]


def test_cache_samples_spec_augment_leaves_cache_raw(cache_shards, tmp_path):
    shards = _shard_copy(cache_shards, tmp_path / "s")
    conf = {"num_freq_masks": 2, "freq_width": 10, "num_time_masks": 2, "time_width": 20}
    ds = _cache_dataset(shards, _counting_stages([], spec_augment_conf=conf), max_frames_per_batch=2000)

    def feats_by_key(batches) -> dict[str, torch.Tensor]:
        return {k: b["feats"][i, : b["feats_lens"][i]] for b in batches for i, k in enumerate(b["keys"])}

    first = feats_by_key(list(ds))
    cached = {s["key"]: s["feats"] for s in ds.cached_samples}
    snapshot = {k: f.clone() for k, f in cached.items()}
    _hide(shards)
    second = feats_by_key(list(ds))
    third = feats_by_key(list(ds))
    assert set(first) == set(second) == set(third) == set(cached)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # fresh masks each epoch
    assert any(not torch.equal(second[k], third[k]) for k in first)
    for k, raw in snapshot.items():
        assert ds.cached_samples is not None
        assert torch.equal(cached[k], raw)  # the cached fbank itself is never masked
        for masked in (second[k], third[k]):
            assert masked.shape == raw.shape and bool(((masked == raw) | (masked == 0)).all())
    assert {s["key"]: s["feats"] for s in ds.cached_samples} == cached  # same tensors, not replaced
    assert all("wav" in s for s in ds.cached_samples)


def test_cache_samples_partial_epoch_is_not_kept(cache_shards, tmp_path):
    shards = _shard_copy(cache_shards, tmp_path / "s")
    decoded: list[str] = []
    ds = _cache_dataset(shards, _counting_stages(decoded), max_frames_per_batch=150, bucket_buffer=2)
    it = iter(ds)
    next(it)
    it.close()  # the consumer stopped early
    assert not ds.cache_complete and ds.cached_samples is None and 0 < len(decoded) < 10
    decoded.clear()
    keys = [k for b in ds for k in b["keys"]]  # the next epoch reads the tars again and fills the cache
    assert len(keys) == 10 and len(decoded) == 10 and ds.cache_complete
    _hide(shards)
    assert sorted(k for b in ds for k in b["keys"]) == sorted(keys)


def test_cache_samples_skips_counted_once(tmp_path):
    good, expected = write_bad_shard(tmp_path / "bad-000000.tar", n_good=3)
    ds = _cache_dataset(resolve_shards(tmp_path), _stages(), max_frames_per_batch=400)
    first = list(ds)
    assert _merge_skips(first) == expected
    second = list(ds)
    assert sorted(k for b in second for k in b["keys"]) == sorted(good) and _merge_skips(second) == Counter()


def test_cache_samples_conflicts_and_fallbacks(cache_shards, tmp_path, monkeypatch, caplog):
    shards = resolve_shards(cache_shards)
    with pytest.raises(ValueError, match=r"cache_samples.*resampled"):
        _cache_dataset(shards, _stages(), resampled=True, epoch_batches=4)
    with pytest.raises(ValueError, match=r"cache_samples.*epoch_batches=4"):
        _cache_dataset(shards, _stages(), epoch_batches=4)

    # the fbank stage is found through partials; a chain without it cannot be cached
    head, tail = split_at_fbank([partial(decode_sample), partial(partial(compute_fbank)), check_frames])
    assert len(head) == 2 and tail == [check_frames]

    def no_fbank(rng):
        return [decode_sample]

    with pytest.raises(ValueError, match="compute_fbank"):
        next(iter(_cache_dataset(shards, no_fbank)))

    # inside a DataLoader worker: one warning, no cache
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    ds = _cache_dataset(shards, _stages())
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert len([k for b in ds for k in b["keys"]]) == 10
    assert not ds.cache_complete
    assert caplog.text.count("cache_samples=True has no effect in DataLoader workers") == 1
