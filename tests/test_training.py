"""The shared stage mechanics: freezing, trainable-only checkpoints, size checks."""

import lightning as L
import pytest
import torch
from torch import nn

from modules import stage as training
from modules.config import load_config
from modules.stage import StageModule, make_optimizer, resolve_precision


class TwoParts(StageModule):
    def __init__(self, cfg, width=8):
        super().__init__(cfg)
        self.encoder = nn.Sequential(nn.Linear(4, width), nn.Dropout(0.5), nn.LayerNorm(width))
        self.head = nn.Linear(width, 3)

    def components(self):
        return {"encoder": self.encoder, "head": self.head}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.encoder(x)), y)

    def configure_optimizers(self):
        return make_optimizer(self, self.cfg.optim, 10)


@pytest.fixture
def cfg(tmp_path):
    return load_config(["stage=llm_text", "experiment=tiny", f"run_root={tmp_path}"])


def _module(cfg, trainable, width=8):
    m = TwoParts(cfg, width)
    m.apply_freezing(trainable)
    return m


def test_frozen_weights_unchanged_trainable_ones_get_gradients(cfg):
    m = _module(cfg, ["head"])
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    grads = {}

    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads.update({n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters()})

    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Grab()]).fit(
        m, torch.utils.data.DataLoader(data, batch_size=8)
    )
    for k, v in m.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-identical
    assert all(grads[n] for n in grads if n.startswith("head."))
    assert not any(grads[n] for n in grads if n.startswith("encoder."))
    m.train()
    assert not m.encoder.training and m.head.training  # frozen stays in eval mode


def test_checkpoint_holds_trainable_weights_and_config(cfg, tmp_path):
    m = _module(cfg, ["head"])
    ckpt = {}
    m.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {"head.weight", "head.bias"}
    assert ckpt["run_config"]["stage"]["name"] == "llm_text"
    torch.save(ckpt, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    _module(cfg, ["head"]).on_load_checkpoint(loaded)  # accepted


def test_incompatible_checkpoint_names_both_sizes(cfg):
    ckpt = {}
    _module(cfg, ["head", "encoder"], width=8).on_save_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(3, 8\) vs model \(3, 16\)"):
        _module(cfg, ["head", "encoder"], width=16).on_load_checkpoint(ckpt)
    partial = {}
    _module(cfg, ["head"]).on_save_checkpoint(partial)
    with pytest.raises(ValueError, match=r"lacks trainable weights.*encoder"):
        _module(cfg, ["head", "encoder"]).on_load_checkpoint(partial)


def test_unknown_trainable_component_is_an_error(cfg):
    with pytest.raises(ValueError, match=r"unknown components \['adapter'\].*\['encoder', 'head'\]"):
        _module(cfg, ["adapter"])


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch, caplog, native):
    monkeypatch.setattr(training, "native_bf16", lambda accelerator: native)
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if native else "32-true")
    assert resolve_precision("32-true", "cpu") == "32-true"
    with caplog.at_level("WARNING", logger="modules.stage"):
        assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # an explicit choice stands
    assert ("emulates" in caplog.text) == (not native)


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, avx512 in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v, raising=False)
        for isa in ["AVX512", "AVX2"]:  # ATen held to AVX2 (ATEN_CPU_CAPABILITY=avx2) counts as an AVX2 CPU
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda v=isa: v)
            assert training.native_bf16("cpu") == ((amx or avx512) and isa == "AVX512")


def test_saved_parts_left_out_only_where_named(cfg):
    """`leave_out` names the saved parts a module may skip (e.g. the codec's discriminators at
    inference); any other saved tensor it lacks is an error."""
    saved = {"state_dict": {**_module(cfg, ["head", "encoder"]).trainable_state_dict(), "extra.weight": torch.ones(2)}}
    m = _module(cfg, ["head"])
    loaded = training.load_saved_weights(cfg, m, "llm_text", saved, leave_out=("extra",))
    assert "extra.weight" not in loaded and "head.weight" in loaded
    with pytest.raises(ValueError, match=r"extra.weight: not in this model"):
        training.load_saved_weights(cfg, m, "llm_text", saved, leave_out=())


CHAIN = [
    "llm_text",
    "input_1_ctc",
    "judge",  # outside the chain; the evaluations of speech output need it
    "input_2_align",
    "input_3_prompt",
    "input_4_state",
    "output_1_codec",
    "output_2_decoder",
    "output_3_prefix",
]


def test_the_registry_lists_the_stages_in_chain_order():
    from modules.config import CONFIG_DIR

    assert list(training.STAGES) == CHAIN and len(training.STAGES) == 9
    assert set(CHAIN) == {p.stem for p in (CONFIG_DIR / "stage").glob("*.yaml")}  # a config file per stage
    for name in CHAIN:  # every component module declares its spec
        spec = training.STAGES[name]
        assert callable(spec.build) and callable(spec.data) and callable(spec.save), name
    with pytest.raises(KeyError, match="unknown stage 'input_5'"):
        training.STAGES["input_5"]


def test_train_runs_every_stage_through_run_stage(monkeypatch, tmp_path):
    import train
    from modules.config import ConfigError

    seen = []

    def fake_run_stage(cfg):
        seen.append((cfg.stage.name, cfg.experiment, cfg.run_root))
        return {"stage": cfg.stage.name}

    monkeypatch.setattr(train, "run_stage", fake_run_stage)
    out = train.main(["stage=all", "experiment=tiny", f"run_root={tmp_path}"])
    assert list(out) == CHAIN and seen == [(s, "tiny", str(tmp_path)) for s in CHAIN]
    assert out["input_4_state"] == {"stage": "input_4_state"}
    seen.clear()
    assert train.main(["stage=output_1_codec", "experiment=demo"]) == {"stage": "output_1_codec"}
    assert seen == [("output_1_codec", "demo", "runs")]
    with pytest.raises(ConfigError, match=r"unknown stage 'input_9'.*llm_text.*all"):
        train.main(["stage=input_9", "experiment=tiny"])
