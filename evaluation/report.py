"""One experiment's headline numbers in one place (`python infer.py report experiment=demo`).

Reads what the evaluations wrote under runs/<exp>/ and writes runs/<exp>/report.json (a fixed
set of keys, null where a part was not run) and runs/<exp>/report.md (one row per paper table
with the command that produced it, the CPU, the commit and the date). Nothing is recomputed:
every number is copied from its evaluation file, except the latency percentiles, which are taken
over the per-answer latencies those files hold.

Sources (all under runs/<exp>/):

| key | file | field |
|---|---|---|
| text_qa_accuracy | llm_text/metrics.json | text_qa_accuracy |
| asr_wer | eval/asr.json | the main chain's rows (variant ""): wer_chunk_full, wer_chunk_4 |
| spoken_qa | eval/spoken_qa.json | speech_accuracy, text_accuracy |
| speech_output | eval/speech_output.json | judge, floor_wer, codec_resynthesis_wer, best_wer |
| dialogue | eval/dialogue.json | speech_to_speech/speech_to_text/text_to_text_accuracy, answered |
| state | eval/state.json (else dialogue.json's state_classifier) | answered_questions, cut_in_rate, false_answer_rate, endpoint_delay_ms.p50 |
| latency_ms | eval/dialogue.json records (else chat/answer.json turns) | latency_ms.total of every answer |

`--readme` also rewrites the block of README.md between `<!-- results:begin -->` and
`<!-- results:end -->` from the report.md files of the `demo` and `tiny` experiments.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from server.latency import percentiles

ROOT = Path(__file__).resolve().parent.parent
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
README_EXPERIMENTS = ("demo", "tiny")
# The Table 1 keys name the paper's streaming chunk (4 frames = 160 ms); a run at another chunk
# size leaves them null (its asr.md still has the numbers).
ASR_CHUNK_FRAMES = 4

# The command that writes each source file (`{exp}`: the experiment).
COMMANDS = {
    "text_qa": "python infer.py eval_text_qa experiment={exp}",
    "asr": "python infer.py eval_asr experiment={exp}",
    "speech_output": "python infer.py eval_speech_output experiment={exp}",
    "spoken_qa": "python infer.py eval_spoken_qa experiment={exp}",
    "dialogue": "python infer.py eval_dialogue experiment={exp}",
    "state": "python infer.py eval_state experiment={exp}",
    "chat": "python infer.py chat experiment={exp} input_wav=runs/{exp}/chat/question.wav "
    "output_wav=runs/{exp}/chat/answer.wav",
}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _get(d: dict | None, *keys: str):
    """d[k0][k1]... or None where any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def git_commit(root: Path = ROOT) -> str | None:
    """`git rev-parse --short HEAD` of the project, None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def cpu_name() -> str | None:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows, with the vector
    instructions torch uses and whether `precision: auto` trains in bf16 there: one model name
    (e.g. "AMD EPYC") covers machines whose demo times differ by 1.5x."""
    name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or None
    if name is None:
        return None
    import torch

    from modules.stage import native_bf16

    isa = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({isa}, {'bf16' if native_bf16('cpu') else 'fp32'})"


def read_sources(exp_dir: Path) -> dict[str, dict | None]:
    """The evaluation files of one experiment folder (runs/<exp>), None for each one not written."""
    ev = exp_dir / "eval"
    return {
        "text_qa": _read(exp_dir / "llm_text" / "metrics.json"),
        "asr": _read(ev / "asr.json"),
        "spoken_qa": _read(ev / "spoken_qa.json"),
        "speech_output": _read(ev / "speech_output.json"),
        "dialogue": _read(ev / "dialogue.json"),
        "state": _read(ev / "state.json"),
        "chat": _read(exp_dir / "chat" / "answer.json"),
    }


def _asr_wer(asr: dict | None) -> dict:
    out = dict.fromkeys(("ctc_full", "ctc_chunk4", "llm_full", "llm_chunk4"))
    for row in (asr or {}).get("rows", []):
        if row.get("variant"):  # the dynamic-chunk chain is a Table 1 row of its own, not the headline
            continue
        d = row["decoder"].lower()
        out[f"{d}_full"] = row.get("wer_chunk_full")
        out[f"{d}_chunk4"] = row.get(f"wer_chunk_{ASR_CHUNK_FRAMES}")
    return out


def answer_latencies_ms(sources: dict[str, dict | None]) -> tuple[list[float], str | None]:
    """Decision -> first PCM (ms) of every answer, and the source ("dialogue", "chat" or None).

    The end-to-end evaluation answers every test question, so it is preferred over the
    spoken exchange of `infer.py chat` (a few answers) when both exist.
    """
    if sources["dialogue"] is not None:
        values = [r["latency_ms"]["total"] for r in sources["dialogue"].get("records", []) if r.get("latency_ms")]
        return values, "dialogue"
    if sources["chat"] is not None:
        return [t["latency_ms"]["total"] for t in sources["chat"].get("turns", []) if t.get("latency_ms")], "chat"
    return [], None


def build_report(exp_dir: Path, experiment: str, commit: str | None = None, cpu: str | None = None) -> dict:
    """The report of runs/<exp> (`exp_dir`): exactly the keys of the module docstring's table."""
    s = read_sources(exp_dir)
    so, dlg = s["speech_output"], s["dialogue"]
    state = s["state"] if s["state"] is not None else _get(dlg, "state_classifier")
    judge = so.get("judge") if so is not None else None
    lat = percentiles(answer_latencies_ms(s)[0])
    return {
        "experiment": experiment,
        "commit": commit,
        "cpu": cpu,
        "text_qa_accuracy": _get(s["text_qa"], "text_qa_accuracy"),
        "asr_wer": _asr_wer(s["asr"]),
        "spoken_qa": {
            "speech_accuracy": _get(s["spoken_qa"], "speech_accuracy"),
            "text_accuracy": _get(s["spoken_qa"], "text_accuracy"),
        },
        "speech_output": {
            "judge": judge,
            "floor_wer": _get(so, "floor_wer"),
            "codec_wer": _get(so, "codec_resynthesis_wer"),
            "best_wer": _get(so, "best_wer"),
        },
        "dialogue": {
            "s2s_accuracy": _get(dlg, "speech_to_speech_accuracy"),
            "s2t_accuracy": _get(dlg, "speech_to_text_accuracy"),
            "t2t_accuracy": _get(dlg, "text_to_text_accuracy"),
            "answered": _get(dlg, "answered"),
        },
        "state": {
            "answered_after_end": _get(state, "answered_questions"),
            "cut_in": _get(state, "cut_in_rate"),
            "false_answer": _get(state, "false_answer_rate"),
            "endpoint_delay_ms_p50": _get(state, "endpoint_delay_ms", "p50"),
        },
        "latency_ms": {"decision_to_first_pcm": {k: lat.get(k) for k in ("avg", "p50", "p90")}},
    }


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def _ms(x) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _file_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d")


TABLE_HEADER = ["| table | exp | result | command | CPU | commit | date |", "|---|---|---|---|---|---|---|"]
PAPER_TABLES = ("1:", "2:", "3:", "4:")  # the rows the README's results block takes


def report_rows(report: dict, exp_dir: Path) -> list[tuple[str, str, str, Path]]:
    """(table, result, source key, source file) of every part that was run: Tables 1-4 first
    (labels "1:" .. "4:"), then the frozen LLM's text QA and the state classifier."""
    ev = exp_dir / "eval"
    sources = read_sources(exp_dir)
    a, so, sq, d, st = (report[k] for k in ("asr_wer", "speech_output", "spoken_qa", "dialogue", "state"))
    lat = report["latency_ms"]["decision_to_first_pcm"]
    rows = []
    if sources["asr"] is not None:
        rows.append(("1: ASR WER at 160 ms (full context)",
                     f"CTC {_pct(a['ctc_chunk4'])} ({_pct(a['ctc_full'])}); LLM {_pct(a['llm_chunk4'])} "
                     f"({_pct(a['llm_full'])})", "asr", ev / "asr.json"))  # fmt: skip
    if so["best_wer"] is not None:
        floor, best = so["floor_wer"], so["best_wer"]
        ratio = f" ({best / floor:.2f}x)" if floor else ""
        rows.append(("2: judge WER on the decoder's speech",
                     f"best {_pct(best)}, floor {_pct(floor)}{ratio}; codec resynthesis {_pct(so['codec_wer'])}",
                     "speech_output", ev / "speech_output.json"))  # fmt: skip
    if sq["speech_accuracy"] is not None:
        s, t = sq["speech_accuracy"], sq["text_accuracy"]
        ratio = f" = {s / t:.3f}" if t else ""
        rows.append(
            ("3: spoken QA, speech / text", f"{_num(s)} / {_num(t)}{ratio}", "spoken_qa", ev / "spoken_qa.json")
        )
    values, lat_source = answer_latencies_ms(sources)
    if lat_source is not None:
        result = f"{_ms(lat['avg'])} ms avg (p50 {_ms(lat['p50'])}, p90 {_ms(lat['p90'])}) over {len(values)} answers"
        if lat_source == "dialogue":
            result += (f"; speech -> speech {_num(d['s2s_accuracy'])}, speech -> text {_num(d['s2t_accuracy'])}, "
                       f"text -> text {_num(d['t2t_accuracy'])}, answered {_pct(d['answered'])}")  # fmt: skip
            path = ev / "dialogue.json"
        else:
            result += " of the spoken exchange (`eval_dialogue` not run)"
            path = exp_dir / "chat" / "answer.json"
        rows.append(("4: decision -> first PCM", result, lat_source, path))
    if report["text_qa_accuracy"] is not None:
        rows.append(("text QA of the frozen LLM", _num(report["text_qa_accuracy"]), "text_qa",
                     exp_dir / "llm_text" / "metrics.json"))  # fmt: skip
    if st["answered_after_end"] is not None:
        key = "state" if sources["state"] is not None else "dialogue"
        rows.append(("state classifier",
                     f"answered after the end {_pct(st['answered_after_end'])}, cut in {_pct(st['cut_in'])}, "
                     f"false answers {_pct(st['false_answer'])}, endpoint delay p50 {_ms(st['endpoint_delay_ms_p50'])} ms",
                     key, ev / f"{key}.json"))  # fmt: skip
    return rows


def report_markdown(report: dict, exp_dir: Path) -> str:
    """report.md: one row per paper table (then text QA and the state classifier), each with the
    command that wrote its numbers, the CPU, the commit and the date of its file (UTC)."""
    exp = report["experiment"]
    cpu = f"{os.cpu_count()}-core {report['cpu']}" if report["cpu"] else "unknown"
    commit = report["commit"] or "n/a"
    lines = [
        f"### Results of experiment `{exp}`",
        "",
        f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from runs/{exp} "
        f"(`python infer.py report experiment={exp}`); CPU: {cpu}; commit: {commit}.",
        "",
        *TABLE_HEADER,
    ]
    rows = report_rows(report, exp_dir)
    for table, result, key, path in rows:
        lines.append(f"| {table} | {exp} | {result} | `{COMMANDS[key].format(exp=exp)}` | {cpu} | {commit} | "
                     f"{_file_date(path)} |")  # fmt: skip
    if not rows:
        lines.append(f"| (no evaluation run yet) | {exp} | | | {cpu} | {commit} | |")
    return "\n".join(lines) + "\n"


def write_report(run_root: Path | str, experiment: str) -> dict:
    """Write runs/<exp>/report.{json,md}; returns the report."""
    exp_dir = Path(run_root) / experiment
    if not exp_dir.is_dir():
        raise FileNotFoundError(f"{exp_dir} does not exist: run the experiment's stages and evaluations first")
    report = build_report(exp_dir, experiment, commit=git_commit(), cpu=cpu_name())
    (exp_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (exp_dir / "report.md").write_text(report_markdown(report, exp_dir))
    return report


def _block_bounds(text: str) -> tuple[int, int]:
    """Where the results markers start in `text`; a ValueError when it has no such block."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no '{README_BEGIN}' ... '{README_END}' block")
    return start, end


def replace_readme_block(text: str, block: str) -> str:
    """`text` with everything between the results markers replaced by `block` (markers kept)."""
    start, end = _block_bounds(text)
    return text[: start + len(README_BEGIN)] + "\n" + block.strip("\n") + "\n" + text[end:]


def readme_block(reports: list[str]) -> str:
    """One table of the Tables 1-4 rows of several report.md texts, grouped by table, in the
    order of `reports` within each table."""
    rows = [line for text in reports for line in text.splitlines() if line.startswith("| ")]
    block = list(TABLE_HEADER)
    for prefix in PAPER_TABLES:
        block += [r for r in rows if r.startswith(f"| {prefix}")]
    return "\n".join(block) + "\n"


def _block_rows(text: str, experiment: str) -> str:
    """The rows of `experiment` in the README's current results block ("" when none)."""
    start, end = _block_bounds(text)
    rows = text[start:end].splitlines()
    return "\n".join(r for r in rows if r.startswith("| ") and r.split("|")[2].strip() == experiment)


def rewrite_readme(readme: Path | str, run_root: Path | str, experiments=README_EXPERIMENTS) -> str:
    """Rewrite the README's results block from runs/<exp>/report.md of each experiment that has
    one; an experiment without a report under `run_root` keeps its rows (a `make demo` does not
    erase the full recipe's)."""
    readme = Path(readme)
    text = readme.read_text()
    paths = {e: Path(run_root) / e / "report.md" for e in experiments}
    if not any(p.is_file() for p in paths.values()):
        raise FileNotFoundError(f"no report.md under {run_root} for {', '.join(experiments)}: run `make report` first")
    reports = [p.read_text() if p.is_file() else _block_rows(text, e) for e, p in paths.items()]
    text = replace_readme_block(text, readme_block(reports))
    readme.write_text(text)
    return text


def main(argv: list[str]) -> dict:
    """`experiment=<exp> [run_root=runs] [--readme]`."""
    from modules.config import ConfigError, load_config

    readme = "--readme" in argv
    cfg = load_config([a for a in argv if a != "--readme"], stage="llm_text")
    exp_dir = Path(cfg.run_root) / cfg.experiment
    try:
        report = write_report(cfg.run_root, cfg.experiment)
        print((exp_dir / "report.md").read_text())
        print(f"written to {exp_dir / 'report.json'} and {exp_dir / 'report.md'}")
        if readme:
            rewrite_readme(ROOT / "README.md", cfg.run_root)
            print(f"rewrote the results block of {ROOT / 'README.md'}")
    except (FileNotFoundError, ValueError) as e:  # no runs yet, or a README without the block
        raise ConfigError(str(e)) from e
    return report


if __name__ == "__main__":
    from modules.config import run_cli

    run_cli(lambda: main(sys.argv[1:]), error_prefix="error")
