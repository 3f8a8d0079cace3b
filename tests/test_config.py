from pathlib import Path

import pytest
from omegaconf import OmegaConf

from modules.config import CONFIG_DIR, ConfigError, load_config, run_dir, save_config

STAGES = sorted(p.stem for p in (CONFIG_DIR / "stage").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_and_experiment_composes(stage, experiment):
    cfg = load_config([f"stage={stage}", f"experiment={experiment}"])
    assert cfg.stage.name == stage and cfg.experiment == experiment
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves


def test_experiments_and_stages_exist():
    assert {"tiny", "small", "paper"} <= set(EXPERIMENTS)
    assert "llm_text" in STAGES


def test_overrides_and_interpolation():
    cfg = load_config(["stage=llm_text", "experiment=tiny", "trainer.max_steps=7", "run_root=/tmp/x", "optim.lr=0.5"])
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == 0.5
    assert cfg.llm.path == "/tmp/x/tiny/llm_text/hf"
    assert run_dir(cfg) == Path("/tmp/x/tiny/llm_text")


def test_misspelled_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(["stage=llm_text", "experiment=tiny", "trainer.max_step=7"])
    msg = str(e.value)
    assert "trainer.max_step" in msg and "Did you mean 'trainer.max_steps'" in msg
    assert "accelerator" in msg and "precision" in msg  # lists the valid keys
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(["stage=llm_text", "experiment=tiny", "optimizer.lr=1"])


def test_misspelled_key_in_a_yaml_file_names_the_file(tmp_path):
    for group in ("stage", "experiment", "model", "data", "trainer"):
        (tmp_path / group).mkdir()
    (tmp_path / "stage" / "s.yaml").write_text("stage:\n  trainabel: [llm]\n")
    (tmp_path / "experiment" / "e.yaml").write_text("corpus:\n  root: /tmp\n")
    with pytest.raises(ConfigError, match=r"stage\.trainabel.*configs/stage/s\.yaml.*Did you mean 'stage\.trainable'"):
        load_config(["stage=s", "experiment=e"], config_dir=tmp_path)


def test_bad_value_type_is_an_error():
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(["stage=llm_text", "experiment=tiny", "trainer.max_steps=lots"])


def test_unknown_choices_list_the_folder():
    with pytest.raises(ConfigError, match=r"unknown trainer 'tpu'.*cpu.*gpu"):
        load_config(["stage=llm_text", "experiment=tiny", "trainer=tpu"])
    with pytest.raises(ConfigError, match=r"unknown experiment 'tinny'.*paper.*small.*tiny"):
        load_config(["stage=llm_text", "experiment=tinny"])
    with pytest.raises(ConfigError, match="missing stage="):
        load_config(["experiment=tiny"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(["stage=llm_text", "experiment=tiny", "verbose"])


def test_group_choice_from_the_command_line():
    cfg = load_config(["stage=llm_text", "experiment=tiny", "trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.defaults["trainer"] == "gpu"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["stage=llm_text", "experiment=tiny"])
    save_config(cfg, tmp_path / "config.yaml")
    again = OmegaConf.load(tmp_path / "config.yaml")
    assert again.trainer.max_steps == cfg.trainer.max_steps
    assert "${" not in (tmp_path / "config.yaml").read_text()  # stored resolved


def test_experiment_stage_blocks_apply_after_the_stage_file(tmp_path):
    for group in ("stage", "experiment", "model", "data", "trainer"):
        (tmp_path / group).mkdir()
    (tmp_path / "stage" / "s.yaml").write_text("trainer:\n  max_steps: 10\n  log_every_n_steps: 3\n")
    (tmp_path / "stage" / "t.yaml").write_text("trainer:\n  max_steps: 20\n")
    (tmp_path / "trainer" / "cpu.yaml").write_text("trainer:\n  accelerator: cpu\n  max_steps: 1\n")
    (tmp_path / "experiment" / "e.yaml").write_text(
        "defaults:\n  trainer: cpu\nllm:\n  path: /x\nstages:\n  s:\n    trainer:\n      max_steps: 99\n"
    )
    s = load_config(["stage=s", "experiment=e"], config_dir=tmp_path)
    assert (s.trainer.max_steps, s.trainer.log_every_n_steps, s.trainer.accelerator) == (99, 3, "cpu")
    assert load_config(["stage=t", "experiment=e"], config_dir=tmp_path).trainer.max_steps == 20
    assert load_config(["stage=s", "experiment=e", "trainer.max_steps=5"], config_dir=tmp_path).trainer.max_steps == 5
    (tmp_path / "experiment" / "bad.yaml").write_text(
        "llm:\n  path: /x\nstages:\n  s:\n    trainer:\n      max_step: 1\n"
    )
    with pytest.raises(ConfigError, match=r"trainer\.max_step.*stages\.s"):
        load_config(["stage=s", "experiment=bad"], config_dir=tmp_path)


def test_an_experiment_extends_another_and_a_loop_is_named(tmp_path):
    import shutil

    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    exp = tmp_path / "configs" / "experiment"
    (exp / "short.yaml").write_text(
        "extends: tiny\nseed: 5\nstages:\n  input_1_ctc:\n    trainer:\n      max_steps: 9\n"
    )
    base = load_config(["stage=input_1_ctc", "experiment=tiny"], config_dir=tmp_path / "configs")
    short = load_config(["stage=input_1_ctc", "experiment=short"], config_dir=tmp_path / "configs")
    assert short.trainer.max_steps == 9 and short.seed == 5 and short.experiment == "short"
    # everything else comes from the parent, its per-stage overrides included
    assert short.data.asr.max_frames_per_batch == base.data.asr.max_frames_per_batch
    assert short.trainer.val_check_interval == base.trainer.val_check_interval
    assert short.llm.path.endswith("short/llm_text/hf")  # the run folder is the child's
    (exp / "a.yaml").write_text("extends: b\n")
    (exp / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ConfigError, match="loop: a -> b -> a"):
        load_config(["stage=llm_text", "experiment=a"], config_dir=tmp_path / "configs")


def test_an_unknown_stage_block_names_the_stages(tmp_path):
    import shutil

    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    (tmp_path / "configs" / "experiment" / "typo.yaml").write_text(
        "extends: tiny\nstages:\n  input_1_ctcc:\n    trainer:\n      max_steps: 9\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(["stage=input_1_ctc", "experiment=typo"], config_dir=tmp_path / "configs")
    msg = str(e.value)
    assert "input_1_ctcc" in msg and "typo" in msg
    assert all(stage in msg for stage in STAGES)


def test_stage_files_hold_no_budgets_and_experiments_hold_every_stage_budget():
    """What a stage is lives in configs/stage/; optim and trainer settings in one block per stage
    of an experiment (an experiment that extends another inherits the parent's blocks)."""
    for stage in STAGES:
        body = OmegaConf.load(CONFIG_DIR / "stage" / f"{stage}.yaml")
        assert not {"optim", "trainer"} & set(body), stage
    for experiment in ("tiny", "paper"):
        blocks = OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml").stages
        assert sorted(blocks) == STAGES, experiment
        for stage in STAGES:
            assert {"optim", "trainer"} <= set(blocks[stage]), (experiment, stage)
            assert "max_steps" in blocks[stage].trainer, (experiment, stage)


def test_small_runs_the_paper_budgets_and_demo_overrides_tiny():
    for stage in STAGES:
        paper = load_config([f"stage={stage}", "experiment=paper"])
        small = load_config([f"stage={stage}", "experiment=small"])
        assert small.optim == paper.optim and small.trainer.max_steps == paper.trainer.max_steps, stage
    assert load_config(["stage=input_1_ctc", "experiment=demo"]).trainer.max_steps == 1000
    assert (
        load_config(["stage=input_1_ctc", "experiment=demo"]).optim
        == load_config(["stage=input_1_ctc", "experiment=tiny"]).optim
    )
