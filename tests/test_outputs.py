"""`qualiclip_hf.outputs`: atomic writes, the output check, and one run per output."""

import os
import subprocess
import sys

import pytest

from qualiclip_hf.outputs import (
    OutputInUseError,
    OutputLock,
    atomic_path,
    check_output_location,
    write_json_atomic,
    write_text_atomic,
)


def test_a_failed_write_leaves_the_target_as_it_was_and_no_temporary(tmp_path):
    target = tmp_path / "scores.json"
    write_json_atomic(target, {"rows": 1})
    kept = target.read_text()
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text('{"rows": ')  # half written
        raise RuntimeError("disk full")
    assert target.read_text() == kept
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.json"]
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and len(list(tmp_path.iterdir())) == 1


def test_a_folder_is_staged_and_renamed_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target) as staging:
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        assert not target.exists()  # nothing is visible before the end
    assert (target / "config.json").read_text() == "{}"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_the_output_check_names_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file is a file, so the file .* cannot be created under it"):
        check_output_location(tmp_path / "file" / "sub" / "scores.csv")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_location(tmp_path / "file", folder=True)
    with pytest.raises(ValueError, match="is a folder; name a file"):
        check_output_location(tmp_path, folder=False)
    check_output_location(tmp_path / "new" / "deeper" / "scores.csv")  # created later, under a writable folder
    assert not (tmp_path / "new").exists()


def test_a_lock_is_exclusive_across_processes_and_released_when_its_holder_dies(tmp_path):
    output = tmp_path / "scores.csv"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from qualiclip_hf.outputs import OutputLock;"
         f"lock = OutputLock({str(output)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUseError, match=rf"being written by another run \(process {holder.pid}\)"):
            OutputLock(output).acquire()
    finally:
        holder.kill()  # as SIGKILL ends a run: no clean-up code runs
        holder.wait()
    with OutputLock(output):  # the kernel released it
        pass
