"""The benchmarks still import: they are scripts, not tests, so a moved name would otherwise break them silently."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"

# Imports every benchmark as `python -m benchmarks.NAME` does from the repository's root (without running main()).
IMPORT_ALL = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(f"benchmarks.{name}")
    except Exception as error:
        failed.append(f"benchmarks.{name}: {type(error).__name__}: {error}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_imports_as_a_module_of_the_package():
    pytest.importorskip("pyiqa")
    pytest.importorskip("clip")
    names = sorted(path.stem for path in BENCHMARKS.glob("*.py") if path.stem != "__init__")
    assert len(names) >= 6
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *names], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_no_benchmark_edits_the_import_path():
    for path in BENCHMARKS.glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name}: run it with `python -m benchmarks.{path.stem}`"
