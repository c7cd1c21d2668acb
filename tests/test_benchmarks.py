"""The benchmarks still import: they are scripts, not tests, so a moved name would otherwise break them silently."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Imports every script as `python benchmarks/<name>.py` would (its folder first on sys.path), without running main().
IMPORT_ALL = """
import importlib.util, sys
sys.path.insert(0, sys.argv[1])
failed = []
for path in sys.argv[2:]:
    spec = importlib.util.spec_from_file_location("benchmark_" + path.rsplit("/", 1)[-1][:-3], path)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as error:
        failed.append(f"{path}: {type(error).__name__}: {error}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_imports():
    pytest.importorskip("pyiqa")
    pytest.importorskip("clip")
    scripts = sorted(str(path) for path in BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 6
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, str(BENCHMARKS), *scripts], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
