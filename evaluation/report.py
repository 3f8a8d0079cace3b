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
| speech_output | eval/speech_output.json | judge_chunk_frames, floor_wer, codec_resynthesis_wer, best_wer |
| dialogue | eval/dialogue.json | speech_to_speech/speech_to_text/text_to_text_accuracy, answered |
| state | eval/state.json (else dialogue.json's state_classifier) | answered_questions, cut_in_rate, false_answer_rate, endpoint_delay_ms.p50 |
| latency_ms | eval/dialogue.json records (else chat/answer.json turns) | latency_ms.total of every answer |

`--readme` also rewrites the block of README.md between `<!-- results:begin -->` and
`<!-- results:end -->` from the report.md files of the `demo` and `tiny` experiments.
"""

from __future__ import annotations

import json
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
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


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
    judge = None
    if so is not None:
        frames = so.get("judge_chunk_frames")
        judge = f"input_1_ctc CTC greedy, chunk {frames} ({40 * frames} ms)" if frames else "input_1_ctc CTC greedy"
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


def _ms(x) -> str:
    return "n/a" if x is None else f"{x:.0f} ms"


def _file_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def report_markdown(report: dict, exp_dir: Path) -> str:
    """report.md: one row per paper table (and the text QA and state rows), each with its command
    and the date its file was written; the CPU and commit are the report's."""
    exp = report["experiment"]
    ev = exp_dir / "eval"
    a, so, d, st = report["asr_wer"], report["speech_output"], report["dialogue"], report["state"]
    lat = report["latency_ms"]["decision_to_first_pcm"]
    sources = read_sources(exp_dir)
    lat_source = answer_latencies_ms(sources)[1]
    rows = []  # (table, result, source key, file)
    if a["ctc_full"] is not None or a["llm_full"] is not None:
        rows.append(("Table 1: ASR WER (test voices)",
                     f"CTC {_pct(a['ctc_full'])} full / {_pct(a['ctc_chunk4'])} chunk 4; "
                     f"LLM {_pct(a['llm_full'])} full / {_pct(a['llm_chunk4'])} chunk 4", "asr", ev / "asr.json"))  # fmt: skip
    if so["best_wer"] is not None:
        rows.append(("Table 2: speech output WER",
                     f"best {_pct(so['best_wer'])}, floor {_pct(so['floor_wer'])}, codec {_pct(so['codec_wer'])} "
                     f"(judge: {so['judge']})", "speech_output", ev / "speech_output.json"))  # fmt: skip
    sq = report["spoken_qa"]
    if sq["speech_accuracy"] is not None:
        rows.append(("Table 3: spoken QA accuracy",
                     f"speech {_pct(sq['speech_accuracy'])}, text {_pct(sq['text_accuracy'])}", "spoken_qa",
                     ev / "spoken_qa.json"))  # fmt: skip
    if lat_source is not None:
        result = f"decision -> first PCM avg {_ms(lat['avg'])}, p50 {_ms(lat['p50'])}, p90 {_ms(lat['p90'])}"
        if lat_source == "dialogue":
            result += (f"; speech->speech {_pct(d['s2s_accuracy'])}, speech->text {_pct(d['s2t_accuracy'])}, "
                       f"text->text {_pct(d['t2t_accuracy'])}, answered {_pct(d['answered'])}")  # fmt: skip
            path = ev / "dialogue.json"
        else:
            result += " (the answers of one spoken exchange)"
            path = exp_dir / "chat" / "answer.json"
        rows.append(("Table 4: latency", result, lat_source, path))
    if report["text_qa_accuracy"] is not None:
        rows.append(("Text QA (the frozen LLM)", _pct(report["text_qa_accuracy"]), "text_qa",
                     exp_dir / "llm_text" / "metrics.json"))  # fmt: skip
    if st["answered_after_end"] is not None:
        state_path = ev / "state.json" if sources["state"] is not None else ev / "dialogue.json"
        rows.append(("State classifier",
                     f"answered after the end {_pct(st['answered_after_end'])}, cut in {_pct(st['cut_in'])}, "
                     f"false answers {_pct(st['false_answer'])}, endpoint delay p50 {_ms(st['endpoint_delay_ms_p50'])}",
                     "state" if sources["state"] is not None else "dialogue", state_path))  # fmt: skip
    lines = [
        f"### Results of experiment `{exp}`",
        "",
        f"CPU: {report['cpu'] or 'unknown'}; commit: {report['commit'] or 'not a git checkout'}; "
        f"report written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "| table | result | command | CPU | commit | date |",
        "|---|---|---|---|---|---|",
    ]
    for table, result, key, path in rows:
        command = COMMANDS[key].format(exp=exp)
        lines.append(f"| {table} | {result} | `{command}` | {report['cpu'] or 'unknown'} | "
                     f"{report['commit'] or 'n/a'} | {_file_date(path)} |")  # fmt: skip
    if not rows:
        lines.append("| (no evaluation has been run) | | | | | |")
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


def replace_readme_block(text: str, block: str) -> str:
    """`text` with everything between the results markers replaced by `block` (markers kept)."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no '{README_BEGIN}' ... '{README_END}' block")
    return text[: start + len(README_BEGIN)] + "\n" + block.strip("\n") + "\n" + text[end:]


def rewrite_readme(readme: Path | str, run_root: Path | str, experiments=README_EXPERIMENTS) -> str:
    """Rewrite the README's results block from runs/<exp>/report.md of each experiment that has one."""
    readme = Path(readme)
    parts = [(Path(run_root) / e / "report.md") for e in experiments]
    parts = [p.read_text().strip("\n") for p in parts if p.is_file()]
    if not parts:
        raise FileNotFoundError(f"no report.md under {run_root} for {', '.join(experiments)}: run `make report` first")
    text = replace_readme_block(readme.read_text(), "\n\n".join(parts))
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
