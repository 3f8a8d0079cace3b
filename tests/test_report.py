"""evaluation/report.py: the report's keys, its nulls, its values, and the README block rewrite."""

from __future__ import annotations

import json

import pytest

from evaluation.report import README_BEGIN, README_END, build_report, replace_readme_block, rewrite_readme, write_report

KEYS = {
    "experiment": None,
    "commit": None,
    "cpu": None,
    "text_qa_accuracy": None,
    "asr_wer": {"ctc_full", "ctc_chunk4", "llm_full", "llm_chunk4"},
    "spoken_qa": {"speech_accuracy", "text_accuracy"},
    "speech_output": {"judge", "floor_wer", "codec_wer", "best_wer"},
    "dialogue": {"s2s_accuracy", "s2t_accuracy", "t2t_accuracy", "answered"},
    "state": {"answered_after_end", "cut_in", "false_answer", "endpoint_delay_ms_p50"},
    "latency_ms": {"decision_to_first_pcm"},
}


def assert_keys(report: dict) -> None:
    assert set(report) == set(KEYS)
    for key, sub in KEYS.items():
        if sub is not None:
            assert set(report[key]) == sub, key
    assert set(report["latency_ms"]["decision_to_first_pcm"]) == {"avg", "p50", "p90"}


def _write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def fake_eval(exp_dir, dialogue: bool = False) -> None:
    """Small evaluation files in the shapes the evaluations write (only the fields the report reads
    and a few it must ignore)."""
    _write(exp_dir / "llm_text" / "metrics.json", {"text_qa_accuracy": 0.5, "text_qa_turns": 10})
    _write(exp_dir / "eval" / "asr.json", {"chunk_frames": 4, "rows": [
        {"decoder": "CTC", "variant": "", "wer_chunk_full": 0.4, "wer_chunk_4": 0.3},
        {"decoder": "LLM", "variant": "", "wer_chunk_full": 0.6, "wer_chunk_4": 0.7},
        {"decoder": "CTC", "variant": "dynamic", "wer_chunk_full": 0.9, "wer_chunk_4": 0.9},
    ]})  # fmt: skip
    _write(exp_dir / "eval" / "spoken_qa.json", {"speech_accuracy": 0.25, "text_accuracy": 0.5})
    _write(exp_dir / "eval" / "speech_output.json",
           {"judge": "stage judge: full-context CTC greedy", "floor_wer": 0.2, "codec_resynthesis_wer": 0.35, "best_wer": 0.3})  # fmt: skip
    _write(exp_dir / "eval" / "state.json", {"answered_questions": 0.75, "cut_in_rate": 0.125,
           "false_answer_rate": 0.0625, "endpoint_delay_ms": {"n": 3, "avg": 500.0, "p50": 480.0, "p90": 600.0}})  # fmt: skip
    _write(exp_dir / "chat" / "answer.json", {"turns": [{"latency_ms": {"total": t}} for t in (100.0, 200.0, 300.0)]})
    if dialogue:
        _write(exp_dir / "eval" / "dialogue.json", {
            "answered": 0.9, "speech_to_speech_accuracy": 0.1, "speech_to_text_accuracy": 0.2,
            "text_to_text_accuracy": 0.3,
            "records": [{"latency_ms": {"total": 10.0}}, {"latency_ms": {}}, {"latency_ms": {"total": 30.0}}],
        })  # fmt: skip


def test_empty_run_has_every_key_and_only_nulls(tmp_path):
    report = build_report(tmp_path, "demo")
    assert_keys(report)
    assert report["experiment"] == "demo"
    for key, sub in KEYS.items():
        if key == "experiment":
            continue
        if key == "latency_ms":
            assert set(report[key]["decision_to_first_pcm"].values()) == {None}
        elif sub is None:
            assert report[key] is None, key
        else:
            assert set(report[key].values()) == {None}, key


def test_values_come_from_the_evaluation_files(tmp_path):
    fake_eval(tmp_path)
    report = build_report(tmp_path, "tiny", commit="abc1234", cpu="Test CPU")
    assert_keys(report)
    assert report["commit"] == "abc1234" and report["cpu"] == "Test CPU"
    assert report["text_qa_accuracy"] == 0.5
    assert report["asr_wer"] == {"ctc_full": 0.4, "ctc_chunk4": 0.3, "llm_full": 0.6, "llm_chunk4": 0.7}
    assert report["spoken_qa"] == {"speech_accuracy": 0.25, "text_accuracy": 0.5}
    assert report["speech_output"]["floor_wer"] == 0.2
    assert report["speech_output"]["codec_wer"] == 0.35
    assert report["speech_output"]["best_wer"] == 0.3
    assert report["speech_output"]["judge"] == "stage judge: full-context CTC greedy"
    assert report["state"] == {"answered_after_end": 0.75, "cut_in": 0.125, "false_answer": 0.0625,
                               "endpoint_delay_ms_p50": 480.0}  # fmt: skip
    assert set(report["dialogue"].values()) == {None}  # eval_dialogue was not run
    # the spoken exchange's three answers
    assert report["latency_ms"]["decision_to_first_pcm"] == {"avg": 200.0, "p50": 200.0, "p90": pytest.approx(280.0)}


def test_dialogue_evaluation_gives_table_4_and_its_latencies(tmp_path):
    fake_eval(tmp_path, dialogue=True)
    report = build_report(tmp_path, "tiny")
    assert report["dialogue"] == {"s2s_accuracy": 0.1, "s2t_accuracy": 0.2, "t2t_accuracy": 0.3, "answered": 0.9}
    # every answered test question (the unanswered one has no latency), not the spoken exchange
    assert report["latency_ms"]["decision_to_first_pcm"] == {"avg": 20.0, "p50": 20.0, "p90": pytest.approx(28.0)}


def test_another_chunk_size_leaves_the_chunk4_keys_null(tmp_path):
    _write(tmp_path / "eval" / "asr.json", {"chunk_frames": 8, "rows": [
        {"decoder": "CTC", "variant": "", "wer_chunk_full": 0.4, "wer_chunk_8": 0.3}]})  # fmt: skip
    assert build_report(tmp_path, "tiny")["asr_wer"] == {"ctc_full": 0.4, "ctc_chunk4": None, "llm_full": None,
                                                         "llm_chunk4": None}  # fmt: skip


def test_write_report_writes_json_and_markdown(tmp_path):
    fake_eval(tmp_path / "runs" / "tiny")
    report = write_report(tmp_path / "runs", "tiny")
    on_disk = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert on_disk == report
    assert_keys(on_disk)
    md = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    for table in ("1:", "2:", "3:", "4:"):
        assert sum(line.startswith(f"| {table}") for line in md.splitlines()) == 1, table
    assert (
        "| 3: spoken QA, speech / text | tiny | 0.250 / 0.500 = 0.500 | `python infer.py eval_spoken_qa experiment=tiny` |"
        in md
    )
    assert "| 4: decision -> first PCM | tiny | 200 ms avg (p50 200, p90 280) over 3 answers" in md
    assert "`python infer.py eval_dialogue" not in md  # Table 4 came from the spoken exchange
    assert "date" not in report and "command" not in report
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "runs", "demo")


def test_readme_block_rewrite_replaces_only_the_block(tmp_path):
    before, after = "# Title\n\nIntro.\n\n", "\n\n## Later\n\nText.\n"
    text = before + README_BEGIN + "\nold table\n| a | b |\n" + README_END + after
    new = replace_readme_block(text, "new block\n")
    assert new == before + README_BEGIN + "\nnew block\n" + README_END + after
    assert replace_readme_block(new, "new block") == new  # idempotent
    with pytest.raises(ValueError):
        replace_readme_block("# no markers\n", "x")


def test_rewrite_readme_reads_the_demo_and_tiny_reports(tmp_path):
    runs = tmp_path / "runs"
    for exp in ("demo", "tiny", "small"):
        (runs / exp).mkdir(parents=True)
        rows = [f"| {t} | {exp} | r | `c` | cpu | abc | 2026-01-01 |" for t in ("1: a", "2: b", "text QA")]
        (runs / exp / "report.md").write_text(f"### Results of experiment `{exp}`\n\n" + "\n".join(rows) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{README_BEGIN}\nstale\n{README_END}\nbottom\n")
    rewrite_readme(readme, runs)
    assert readme.read_text().splitlines() == [
        "top",
        README_BEGIN,
        "| table | exp | result | command | CPU | commit | date |",
        "|---|---|---|---|---|---|---|",
        "| 1: a | demo | r | `c` | cpu | abc | 2026-01-01 |",  # grouped by table, demo before tiny
        "| 1: a | tiny | r | `c` | cpu | abc | 2026-01-01 |",
        "| 2: b | demo | r | `c` | cpu | abc | 2026-01-01 |",
        "| 2: b | tiny | r | `c` | cpu | abc | 2026-01-01 |",
        README_END,  # only the paper's Tables 1-4; `small` is not a README experiment
        "bottom",
    ]
    # A new demo report alone replaces the demo rows and keeps the full recipe's.
    (runs / "tiny" / "report.md").unlink()
    (runs / "demo" / "report.md").write_text("| 2: b | demo | new | `c` | cpu | def | 2026-01-02 |\n")
    rewrite_readme(readme, runs)
    assert [r.split(" | ")[1:3] for r in readme.read_text().splitlines()[4:-2]] == [
        ["tiny", "r"],
        ["demo", "new"],
        ["tiny", "r"],
    ]


def test_cpu_name_says_which_vector_unit_and_precision(monkeypatch):
    """Two EPYCs, one with AVX512-BF16 and one with AVX2 only, run the demo 1.5x apart: the CPU
    column names the instructions torch uses and the precision `auto` picks there."""
    import torch

    import evaluation.report as report

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    name = report.cpu_name()
    assert name is not None and name.endswith("(AVX2, fp32)")  # no bf16 without AVX512
