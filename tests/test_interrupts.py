"""Stopping a dataset run from outside: Ctrl-C (SIGINT to the process group, as a terminal sends it) at many moments,
and SIGKILL, which must leave no decode worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

pytest.importorskip("datasets")

EXAMPLES = REPO_ROOT / "examples/images"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Enough photos (the examples, linked 20 times over) that a run is still going when it is interrupted."""
    folder = tmp_path_factory.mktemp("photos")
    for copy in range(20):
        for path in sorted(EXAMPLES.glob("*.jpg")):
            os.link(path, folder / f"{copy}_{path.name}")
    return folder


def _start(photos: Path, output: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "qualiclip_hf.cli", "score", "--dataset", str(photos), "--model", "demo"]
    # Its own process group, as a shell gives a command: SIGINT to the group reaches the workers too, as Ctrl-C does.
    return subprocess.Popen(
        [*command, "--output", str(output), "--batch-size", "1", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=REPO_ROOT,
    )


def _wait_for_first_part(output: Path, process: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while not list(output.glob("part-*.parquet")) and process.poll() is None:
        assert time.monotonic() < deadline, "no part file was written"
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    """Processes whose parent is `pid`, and theirs, from /proc (Linux)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children + [grandchild for child in children for grandchild in _descendants(child)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc are Linux's")
@pytest.mark.parametrize("delay_s", [0.0, 0.5])
def test_ctrl_c_at_any_moment_ends_with_one_line_and_resume_finishes(photos, tmp_path, delay_s):
    # The moments count from the first part file on disk: the model is loaded, workers are decoding ahead, rows are
    # being written. Every run ends within seconds, prints no traceback, and says how to continue; --resume then
    # finishes with every row once.
    output = tmp_path / "scores"
    process = _start(photos, output, "--rows-per-file", "1", "--num-workers", "2")
    _wait_for_first_part(output, process)
    time.sleep(delay_s)
    assert process.poll() is None, "the run ended before it could be interrupted; give it more photos"
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the run did not end within 60 s of Ctrl-C")
    assert "Traceback" not in err, err
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "interrupted" in last and "--resume" in last, err
    resumed = _start(photos, output, "--rows-per-file", "1", "--num-workers", "2", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    from qualiclip_hf.scoring.dataset import read_scores

    ids = read_scores(output).column("id").to_pylist()
    assert sorted(ids) == list(range(len(list(photos.glob("*.jpg")))))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
def test_a_killed_run_leaves_no_decode_worker_behind(photos, tmp_path):
    output = tmp_path / "scores"
    process = _start(photos, output, "--rows-per-file", "1", "--num-workers", "2")
    _wait_for_first_part(output, process)
    workers = _descendants(process.pid)
    assert workers, "the run should decode in worker processes"
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert not alive, f"decode workers {alive} outlived their killed parent"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
