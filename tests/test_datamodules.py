"""ASR and spoken-QA data modules end to end, and the shard / CMVN / benchmark tools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.asr import ASRDataConfig, ASRDataModule
from datamodules.features import GlobalCMVN
from datamodules.spoken_qa import SpokenQADataConfig, SpokenQADataModule
from tools import bench_data, compute_cmvn, write_shards

SR = 22050
N_ASR = 30
N_QA = 6


def _tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (
        0.3 * np.sin(2 * np.pi * (140 + 15 * (seed % 9) + 250 * t) * t) + 0.02 * rng.standard_normal(t.shape[0])
    ).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tiny corpus laid out like tools.make_corpus, sharded with the CLI, plus its CMVN."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "manifests").mkdir()
    (root / "audio").mkdir()
    asr = []
    for i in range(N_ASR):
        rel = f"audio/a{i:03d}.flac"
        wav = _tone(0.3 + 0.1 * (i % 11), i)
        sf.write(root / rel, wav, SR, subtype="PCM_16")
        asr.append(
            {
                "id": f"a{i:03d}",
                "audio": rel,
                "text": f"utterance {i}",
                "speaker": f"s{i % 5}",
                "language": "en",
                "duration": len(wav) / SR,
                "sample_rate": SR,
                "split": "train",
            }
        )
    (root / "manifests" / "asr_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in asr))
    qa = []
    for d in range(N_QA):
        turns = []
        for k in range(1 + d % 3):
            rel = f"audio/q{d}-t{k}.flac"
            wav = _tone(0.4 + 0.2 * k, 100 + 10 * d + k)
            sf.write(root / rel, wav, SR, subtype="PCM_16")
            turns.append(
                {
                    "question": f"question {d}.{k}",
                    "answer": f"answer {d}.{k}",
                    "gold": [f"{d}{k}"],
                    "family": "fam",
                    "audio": rel,
                    "duration": len(wav) / SR,
                    "sample_rate": SR,
                }
            )
        qa.append({"id": f"d{d}", "speaker": "s9", "language": "en", "split": "dev", "turns": turns})
    (root / "manifests" / "qa_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))

    shards = root / "shards"
    assert (
        write_shards.main(
            [
                "--manifest",
                str(root / "manifests" / "asr_train.jsonl"),
                "--out",
                str(shards / "asr"),
                "--max-shard-samples",
                "8",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        write_shards.main(
            [
                "--manifest",
                str(root / "manifests" / "qa_dev.jsonl"),
                "--out",
                str(shards / "qa"),
                "--max-shard-samples",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    cmvn = root / "cmvn.json"
    assert compute_cmvn.main(["--shards", str(shards / "asr"), "--out", str(cmvn), "--quiet"]) == 0
    return {"root": root, "asr": shards / "asr", "qa": shards / "qa", "cmvn": cmvn}


def test_cli_outputs(data):
    index = json.loads((data["asr"] / "index.json").read_text())
    assert index["num_samples"] == N_ASR and len(index["shards"]) == 4 and index["speakers"] == 5
    cmvn = json.loads(data["cmvn"].read_text())
    assert set(cmvn) == {"mean_stat", "var_stat", "frame_num"} and len(cmvn["mean_stat"]) == 80
    assert cmvn["frame_num"] > 1000


def test_cmvn_workers_equal_one_process(data):
    """Shards shared out over processes give the statistics of one process reading them all."""
    one, used_one, _ = compute_cmvn.compute_cmvn(str(data["asr"]), progress=False)
    two, used_two, skipped = compute_cmvn.compute_cmvn(str(data["asr"]), progress=False, workers=2)
    assert used_one == used_two == N_ASR and skipped == {} and one.frame_num == two.frame_num
    np.testing.assert_allclose(two.mean_stat, one.mean_stat, rtol=1e-12)
    np.testing.assert_allclose(two.var_stat, one.var_stat, rtol=1e-12)


def _check_asr_batch(batch: dict, max_frames: int) -> None:
    feats, lens = batch["feats"], batch["feats_lens"]
    assert feats.dtype == torch.float32 and feats.ndim == 3 and feats.shape[2] == 80
    assert lens.dtype == torch.int64 and lens.shape == (feats.shape[0],)
    assert int(lens.max()) == feats.shape[1] and feats.shape[0] * feats.shape[1] <= max_frames
    assert len(batch["texts"]) == len(batch["keys"]) == len(batch["speakers"]) == feats.shape[0]
    assert batch["durations"].shape == (feats.shape[0],)
    assert isinstance(batch["skipped"], dict)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_asr_datamodule_batches(data, num_workers):
    config = ASRDataConfig(
        train_shards=str(data["asr"]),
        dev_shards=f"{data['asr']}/asr_train-*.tar",
        cmvn_path=str(data["cmvn"]),
        num_workers=num_workers,
        max_frames_per_batch=600,
        bucket_buffer=10,
        shuffle_buffer=10,
        min_duration_s=0.1,
    )
    dm = ASRDataModule(config)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = []
    for _ in range(2):
        keys = []
        for batch in loader:
            _check_asr_batch(batch, 600)
            keys += batch["keys"]
        assert sorted(keys) == [f"a{i:03d}" for i in range(N_ASR)]
        epochs.append(keys)
    assert epochs[0] != epochs[1]  # reshuffled each epoch

    dev = [b for b in dm.val_dataloader()]
    for b in dev:
        _check_asr_batch(b, 600)
    dev_again = [b for b in dm.val_dataloader()]
    assert [b["keys"] for b in dev] == [b["keys"] for b in dev_again]  # no shuffling
    torch.testing.assert_close(dev[0]["feats"], dev_again[0]["feats"])  # no SpecAugment
    # CMVN applied: valid dev frames are about zero-mean / unit-variance
    frames = torch.cat([b["feats"][i, : b["feats_lens"][i]] for b in dev for i in range(len(b["keys"]))])
    assert frames.mean(0).abs().max() < 1e-2 and (frames.std(0) - 1).abs().max() < 0.05
    with pytest.raises(ValueError, match="test_shards"):
        dm.test_dataloader()


def test_asr_datamodule_without_cmvn_and_rank_split(data):
    common = dict(train_shards=str(data["asr"]), num_workers=0, max_frames_per_batch=800, spec_augment=False)
    keys = []
    for rank in range(2):
        dm = ASRDataModule(ASRDataConfig(**common), rank=rank, world_size=2)
        for b in dm.train_dataloader():
            keys += b["keys"]
            assert b["feats"][0, 0].mean() > 0  # raw log-mel (int16 scale), not normalised
    assert sorted(keys) == [f"a{i:03d}" for i in range(N_ASR)]
    assert GlobalCMVN.load(data["cmvn"]).dim == 80


@pytest.mark.parametrize("num_workers", [0, 2])
def test_spoken_qa_datamodule_batches(data, num_workers):
    config = SpokenQADataConfig(
        dev_shards=str(data["qa"]),
        cmvn_path=str(data["cmvn"]),
        num_workers=num_workers,
        max_frames_per_batch=500,
        keep_wav=True,
    )
    dm = SpokenQADataModule(config)
    seen = {}
    for batch in dm.val_dataloader():
        n_turns = int(batch["turn_counts"].sum())
        feats = batch["feats"]
        assert feats.shape[0] == n_turns and feats.shape[2] == 80 and batch["feats_lens"].shape == (n_turns,)
        assert batch["dialogue_index"].tolist() == [
            d for d, c in enumerate(batch["turn_counts"].tolist()) for _ in range(c)
        ]
        assert len(batch["wavs"]) == n_turns and batch["durations"].shape == (n_turns,)
        totals = torch.zeros(len(batch["keys"]), dtype=torch.long).index_add_(
            0, batch["dialogue_index"], batch["feats_lens"]
        )
        assert len(batch["keys"]) * int(totals.max()) <= 500
        for b, key in enumerate(batch["keys"]):
            seen[key] = (batch["questions"][b], batch["answers"][b], batch["gold"][b])
        for i in range(n_turns):
            assert abs(batch["wavs"][i].shape[0] / 16000 - float(batch["durations"][i])) < 1e-3
    assert sorted(seen) == [f"d{d}" for d in range(N_QA)]
    assert seen["d2"] == (
        ["question 2.0", "question 2.1", "question 2.2"],
        ["answer 2.0", "answer 2.1", "answer 2.2"],
        [["20"], ["21"], ["22"]],
    )


def test_wrong_shard_kind_is_an_error(data):
    dm = SpokenQADataModule(SpokenQADataConfig(dev_shards=str(data["asr"]), num_workers=0))
    with pytest.raises(ValueError, match="asr sample"):
        next(iter(dm.val_dataloader()))


def test_bench_data_runs(data, capsys):
    assert bench_data.main(["--shards", str(data["asr"]), "--workers", "0", "--max-utts", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = result["rows"][0]
    assert row["workers"] == 0 and row["utts"] >= 10 and row["bound_audio_s_per_s"] > 0 and row["ratio_to_bound"] > 0


def test_cache_samples_datamodule_asr_and_spoken_qa(data):
    config = ASRDataConfig(
        train_shards=str(data["asr"]),
        dev_shards=str(data["asr"]),
        cmvn_path=str(data["cmvn"]),
        num_workers=0,
        max_frames_per_batch=600,
        cache_samples=True,
    )
    dm = ASRDataModule(config)
    train, dev = dm.make_dataset("train"), dm.make_dataset("dev")
    assert train.cache_samples and not dev.cache_samples  # training split only
    epochs = [[k for b in train for k in b["keys"]] for _ in range(2)]
    assert train.cache_complete and sorted(epochs[0]) == sorted(epochs[1]) == [f"a{i:03d}" for i in range(N_ASR)]

    # spoken QA (turns) with keep_wav, CMVN and SpecAugment on the cached raw fbank
    qa = SpokenQADataModule(
        SpokenQADataConfig(
            train_shards=str(data["qa"]),
            cmvn_path=str(data["cmvn"]),
            num_workers=0,
            max_frames_per_batch=500,
            keep_wav=True,
            spec_augment=True,
            cache_samples=True,
        )
    )
    ds = qa.make_dataset("train")
    first = list(ds)
    assert ds.cache_complete
    raw = {(s["key"], i): t["feats"].clone() for s in ds.cached_samples for i, t in enumerate(s["turns"])}
    second = list(ds)
    for batches in (first, second):
        assert sorted(k for b in batches for k in b["keys"]) == [f"d{d}" for d in range(N_QA)]
        for b in batches:
            assert len(b["wavs"]) == int(b["turn_counts"].sum()) == b["feats"].shape[0]
            for w, dur in zip(b["wavs"], b["durations"].tolist(), strict=True):
                assert abs(w.shape[0] / 16000 - dur) < 1e-3
    assert all(torch.equal(t["feats"], raw[(s["key"], i)]) for s in ds.cached_samples for i, t in enumerate(s["turns"]))
    assert all("wav" in t and "feats" in t for s in ds.cached_samples for t in s["turns"])
    assert second[0]["questions"] and second[0]["gold"]
