"""The house's arrows run one way: entry points and tools/ -> server/, evaluation/ -> modules/ -> datamodules/.

Reads every import statement (function-level ones included) of the project's packages and fails
on an import that runs the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("datamodules", "modules", "evaluation", "server", "tools")
# package -> the project packages it must never import
NEVER = {
    "datamodules": {"modules", "evaluation", "server", "tools"},
    "modules": {"evaluation", "server", "tools"},
    "server": {"evaluation", "tools"},
    "evaluation": {"tools"},
}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of a project package in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def wrong_way_imports(root: Path = ROOT) -> list[str]:
    wrong = []
    for package, never in NEVER.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, name in project_imports(path):
                if name.split(".")[0] in never:
                    wrong.append(f"{path.relative_to(root)}:{line} imports {name}")
    return wrong


def test_imports_run_one_way():
    assert wrong_way_imports() == []


def test_the_check_sees_a_wrong_way_import(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "modules" / "ok.py").write_text("from datamodules.audio import load_audio\n")
    (tmp_path / "modules" / "bad.py").write_text("def f():\n    from evaluation.asr import evaluate_asr\n")
    (tmp_path / "datamodules" / "bad.py").write_text("import modules.stage\n")
    assert wrong_way_imports(tmp_path) == [
        "datamodules/bad.py:1 imports modules.stage",
        "modules/bad.py:2 imports evaluation.asr",
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_a_folder_with_an_init(package):
    assert (ROOT / package / "__init__.py").is_file()


def test_modules_holds_no_flat_files_beyond_the_card():
    """modules/: one package or file per component plus the stage base and the config loader."""
    flat = sorted(p.name for p in (ROOT / "modules").glob("*.py"))
    assert flat == ["__init__.py", "adapter.py", "config.py", "stage.py", "state_classifier.py", "tb.py"]
