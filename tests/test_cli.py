"""`qualiclip score`: every file gets a row, bad files get an error, the run goes on, exit status 1 on failures."""

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qualiclip_hf import QualiCLIPModel
from qualiclip_hf.cli import main

from .conftest import REPO_ROOT, direct_scores, photo


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    photo(64, 96, seed=1).save(images / "a.jpg", quality=95)
    photo(80, 40, seed=2).save(images / "b.png")
    photo(70, 70, seed=3).save(images / "sub" / "c.jpg")
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("not an image")
    full = tmp_path / "full.jpg"
    photo(120, 120, seed=4).save(full, quality=90)
    (images / "truncated.jpg").write_bytes(full.read_bytes()[:300])
    photo(8, 8, seed=5).save(images / "tiny.png")
    (images / "readme.txt").write_text("ignored: no image extension")
    return images


def expected_score(tiny, path) -> float:
    from PIL import Image

    return direct_scores(*tiny, Image.open(path)).item()


def test_csv_has_a_row_per_file_and_errors_do_not_stop_the_run(folder, tiny_model_dir, tiny, tmp_path, capsys):
    output = tmp_path / "scores.csv"
    status = main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(output), "--batch-size", "3"])
    assert status == 1
    rows = {row["path"].split("/")[-1]: row for row in csv.DictReader(output.open())}
    assert set(rows) == {"a.jpg", "b.png", "empty.jpg", "notes.jpg", "truncated.jpg", "tiny.png"}
    for name in ("a.jpg", "b.png"):
        assert rows[name]["error"] == ""
        assert float(rows[name]["score"]) == pytest.approx(expected_score(tiny, folder / name), abs=1e-6)
    for name in ("empty.jpg", "notes.jpg", "truncated.jpg", "tiny.png"):
        assert rows[name]["score"] == ""
        assert name in rows[name]["error"]
    assert "not an image" in rows["notes.jpg"]["error"]
    assert "below the model's 32x32 minimum" in rows["tiny.png"]["error"]
    assert "4 of 6 files failed" in capsys.readouterr().err


def test_recursive_json_and_jsonl(folder, tiny_model_dir, tmp_path):
    good = [str(folder / "a.jpg"), str(folder / "sub")]
    assert main(["score", *good, "--model", str(tiny_model_dir), "--output", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [row["path"].split("/")[-1] for row in rows] == ["a.jpg", "c.jpg"]
    assert all(0 <= row["score"] <= 1 and row["error"] is None for row in rows)

    status = main(
        ["score", str(folder), "--recursive", "--model", str(tiny_model_dir), "--output", str(tmp_path / "s.jsonl")]
    )
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert status == 1
    assert any(line["path"].endswith("sub/c.jpg") and line["score"] is not None for line in lines)


def test_table_on_stdout_and_missing_paths_reported(folder, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich folds cells to the terminal's width, interleaving long paths
    status = main(["score", str(folder / "a.jpg"), str(tmp_path / "nope.jpg"), "--model", str(tiny_model_dir)])
    out = capsys.readouterr()
    assert status == 1
    assert "a.jpg" in out.out and "nope.jpg" in out.out and "no such file" in out.out


def test_bad_arguments_are_explained(folder, tiny_model_dir, tmp_path, capsys):
    assert main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(tmp_path / "x.xml")]) == 2
    assert main(["score", str(folder), "--model", str(tmp_path / "no_model_here")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", str(folder), "--batch-size", "0"])


def test_max_size_is_applied(folder, tiny_model_dir, tmp_path):
    capped_path, full_path = tmp_path / "capped.json", tmp_path / "full.json"
    options = ["--model", str(tiny_model_dir), "--output"]
    main(["score", str(folder / "a.jpg"), "--max-size", "48", *options, str(capped_path)])
    capped = json.loads(capped_path.read_text())[0]["score"]
    main(["score", str(folder / "a.jpg"), *options, str(full_path)])
    full = json.loads(full_path.read_text())[0]["score"]
    assert capped != pytest.approx(full, abs=1e-9)


def test_precision_and_decode_place_reach_the_model(folder, tiny_model_dir, tmp_path):
    def scores(*options: str) -> dict[str, float | None]:
        output = tmp_path / f"scores{len(list(tmp_path.glob('scores*.json')))}.json"
        main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(output), *options])
        return {Path(row["path"]).name: row["score"] for row in json.loads(output.read_text())}

    full = scores()
    assert scores("--decode-on", "device") == pytest.approx(full, abs=1e-6)
    half = scores("--precision", "bf16")
    assert half.keys() == full.keys()
    scored = [name for name, score in full.items() if score is not None]
    assert scored and any(half[name] != full[name] for name in scored)
    assert all(half[name] == pytest.approx(full[name], abs=0.1) for name in scored)


def test_decoding_on_the_device_without_torchcodec_says_what_to_install(folder, tiny_model_dir, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def import_without_torchcodec(name, *args, **kwargs):
        if name.startswith("torchcodec"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_torchcodec)
    assert main(["score", str(folder), "--model", str(tiny_model_dir), "--decode-on", "device"]) == 2
    assert 'needs TorchCodec, for this torch (pip install "qualiclip-hf[decode]")' in capsys.readouterr().err


def test_running_out_of_memory_on_one_image_says_how_to_downscale(tiny_model_dir, tmp_path, monkeypatch):
    photo(64, 96, seed=1).save(tmp_path / "small.jpg", quality=95)
    photo(300, 200, seed=2).save(tmp_path / "large.jpg", quality=95)
    photo(70, 70, seed=3).save(tmp_path / "square.jpg", quality=95)
    original_forward = QualiCLIPModel.forward

    def forward_with_little_memory(self, pixel_values, image_sizes=None, **kwargs):
        sizes = pixel_values.shape[-2:] if image_sizes is None else image_sizes.max(dim=0).values
        if int(sizes[0]) * int(sizes[1]) > 150 * 150:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original_forward(self, pixel_values, image_sizes=image_sizes, **kwargs)

    monkeypatch.setattr(QualiCLIPModel, "forward", forward_with_little_memory)
    output = tmp_path / "scores.json"
    assert main(["score", str(tmp_path), "--model", str(tiny_model_dir), "--output", str(output)]) == 1
    rows = {Path(row["path"]).name: row for row in json.loads(output.read_text())}
    assert rows["small.jpg"]["score"] is not None and rows["square.jpg"]["score"] is not None
    assert rows["large.jpg"]["score"] is None
    assert "large.jpg: not enough memory to score 200x300 pixels" in rows["large.jpg"]["error"]
    assert "--max-size" in rows["large.jpg"]["error"]
    # With the advice followed, the same run succeeds.
    assert main(["score", str(tmp_path), "--model", str(tiny_model_dir), "--max-size", "128"]) == 0


def _rows(output: Path) -> list[dict]:
    if output.suffix == ".csv":
        return list(csv.DictReader(output.open()))
    if output.suffix == ".jsonl":
        return [json.loads(line) for line in output.read_text().splitlines()]
    return json.loads(output.read_text())


def _interrupt_after(monkeypatch, calls: int) -> list[int]:
    """Makes the model's forward raise KeyboardInterrupt (as Ctrl-C does) on call number `calls + 1`."""
    original_forward = QualiCLIPModel.forward
    seen = []

    def forward(self, *args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise KeyboardInterrupt
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(QualiCLIPModel, "forward", forward)
    return seen


@pytest.fixture
def good_folder(tmp_path):
    images = tmp_path / "good"
    images.mkdir()
    for index in range(6):
        photo(48 + 8 * index, 64, seed=index).save(images / f"{index}.png")
    return images


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_ctrl_c_keeps_what_was_scored_and_resume_finishes_the_run(
    good_folder, tiny_model_dir, tiny, tmp_path, monkeypatch, capsys, suffix
):
    output = tmp_path / "out" / f"scores{suffix}"
    command = ["score", str(good_folder), "--model", str(tiny_model_dir), "--output", str(output)]
    _interrupt_after(monkeypatch, 2)
    assert main(command) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"interrupted after 2 of 6 files; their results are in {output}" in err and "--resume" in err
    first = _rows(output)
    assert [Path(row["path"]).name for row in first] == ["0.png", "1.png"]

    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, 100)
    assert main([*command, "--resume"]) == 0
    assert len(calls) == 4  # only the files not yet in the output
    rows = _rows(output)
    assert sorted(Path(row["path"]).name for row in rows) == [f"{i}.png" for i in range(6)]
    assert rows[:2] == first
    assert "2 already scored, 4 new" in capsys.readouterr().err
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected_score(tiny, row["path"]), abs=1e-6)


def test_rows_reach_the_file_before_the_run_ends(good_folder, tiny_model_dir, tmp_path, monkeypatch):
    output = tmp_path / "scores.csv"
    original_forward = QualiCLIPModel.forward
    rows_seen_at_each_forward = []

    def forward(self, *args, **kwargs):
        rows_seen_at_each_forward.append(len(_rows(output)) if output.exists() else 0)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(QualiCLIPModel, "forward", forward)
    assert main(["score", str(good_folder), "--model", str(tiny_model_dir), "--output", str(output)]) == 0
    assert rows_seen_at_each_forward == list(range(6))  # batch size 1 on a CPU: each row flushed as scored


def test_every_row_and_run_names_the_model(good_folder, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "scores.json"
    assert main(["score", str(good_folder), "--model", str(tiny_model_dir), "--output", str(output)]) == 0
    assert {row["model"] for row in _rows(output)} == {str(tiny_model_dir)}
    err = capsys.readouterr().err
    assert err.startswith(f"model: {tiny_model_dir} (the model folder ")


def test_resume_refuses_a_file_scored_by_another_model(good_folder, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "scores.jsonl"
    output.write_text(json.dumps({"path": str(good_folder / "0.png"), "score": 0.5, "error": None, "model": "demo"}))
    command = ["score", str(good_folder), "--model", str(tiny_model_dir), "--output", str(output), "--resume"]
    assert main(command) == 2
    assert "holds scores of the model 'demo'" in capsys.readouterr().err
    assert json.loads(output.read_text())["model"] == "demo"  # untouched


def test_resume_drops_a_row_cut_off_mid_write(good_folder, tiny_model_dir, tmp_path):
    output = tmp_path / "scores.csv"
    main(["score", str(good_folder), "--model", str(tiny_model_dir), "--output", str(output)])
    text = output.read_text()
    output.write_text(text[: text.rindex("\n", 0, -1) + 12])  # the last row cut after a few characters
    assert main(["score", str(good_folder), "--model", str(tiny_model_dir), "--output", str(output), "--resume"]) == 0
    assert output.read_text() == text


def test_an_output_that_cannot_be_written_stops_before_the_model_loads(good_folder, tmp_path, monkeypatch, capsys):
    from qualiclip_hf import loading

    monkeypatch.setattr(loading, "load_model_and_processor", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "a_file").write_text("")
    output = tmp_path / "a_file" / "scores.csv"  # its folder would have to be a file
    assert main(["score", str(good_folder), "--model", "demo", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write --output {output}" in err and "Traceback" not in err


def test_plain_messages_for_bad_arguments(folder, good_folder, tmp_path, capsys):
    assert main(["score", str(good_folder), "--model", "demo", "--max-size", "10"]) == 2
    assert "--max-size 10 is below the model's minimum image size of 32 pixels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", str(good_folder), "--batch-size", "abc"])
    assert "argument --batch-size: expected a whole number, got 'abc'" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "no_such_folder"), "--model", "demo"]) == 1
    assert "no_such_folder: no such file or folder" in capsys.readouterr().err
    (tmp_path / "only_sub" / "inner").mkdir(parents=True)
    photo(40, 40).save(tmp_path / "only_sub" / "inner" / "a.png")
    assert main(["score", str(tmp_path / "only_sub"), "--model", "demo"]) == 1
    assert "no image files found" in (err := capsys.readouterr().err) and "add --recursive" in err
    assert main(["score", str(good_folder), "--resume", "--model", "demo"]) == 2
    assert "--resume continues an --output file" in capsys.readouterr().err


def test_ctrl_c_in_a_real_process_answers_in_one_line(good_folder, tiny_model_dir, tmp_path):
    """SIGINT to a running `qualiclip score` (DataLoader workers included): one line, exit 130, rows kept."""
    import signal
    import subprocess
    import sys
    import time

    slow_cli = (
        "import sys, time\n"
        "from qualiclip_hf import QualiCLIPModel\n"
        "forward = QualiCLIPModel.forward\n"
        "QualiCLIPModel.forward = lambda self, *a, **k: (time.sleep(0.5), forward(self, *a, **k))[1]\n"
        "from qualiclip_hf.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    output = tmp_path / "scores.csv"
    process = subprocess.Popen(
        [sys.executable, "-c", slow_cli, "score", str(good_folder), "--model", str(tiny_model_dir),
         "--output", str(output)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (output.exists() and len(_rows(output)) >= 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    interrupted = [line for line in err.splitlines() if "interrupted" in line]
    assert len(interrupted) == 1 and "--resume" in interrupted[0]
    assert 1 <= len(_rows(output)) < 6


QUALICLIP_SCRIPT = Path(__import__("sys").executable).parent / "qualiclip"


@pytest.mark.skipif(not QUALICLIP_SCRIPT.is_file(), reason="the qualiclip console script is not installed")
@pytest.mark.parametrize("option", ["--help", "--version", "score --help"])
def test_help_and_version_import_neither_torch_nor_transformers(option):
    import subprocess

    done = subprocess.run(
        [str(QUALICLIP_SCRIPT), *option.split()],
        capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "qualiclip_hf.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers", "numpy")}
    assert ("qualiclip-hf 0.1.0" in done.stdout) == (option == "--version")


@pytest.mark.skipif(not QUALICLIP_SCRIPT.is_file(), reason="the qualiclip console script is not installed")
def test_library_progress_bars_only_with_verbose(tmp_path):
    import subprocess

    photo(48, 48).save(tmp_path / "a.png")
    command = [str(QUALICLIP_SCRIPT), "score", str(tmp_path / "a.png"), "--model", "demo"]
    quiet = subprocess.run(command, capture_output=True, text=True)
    verbose = subprocess.run([*command, "--verbose"], capture_output=True, text=True)
    assert quiet.returncode == verbose.returncode == 0
    assert "Loading weights" in verbose.stderr
    assert "Loading weights" not in quiet.stderr
    assert quiet.stderr.splitlines()[0].startswith("model: demo (the embedded demo model")


def test_push_without_network_is_one_line_and_exit_1(monkeypatch, capsys):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", "--model-dir", "demo", "--repo-id", "someone/qualiclip-demo"]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and captured.out == ""
    assert err.startswith("qualiclip: cannot push to someone/qualiclip-demo: HF_HUB_OFFLINE is set; nothing was")


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 0.0, (1, 2)), (2, 1.0, (1, 1)), (2, 6.0, (1, 1)), (8, 2.2, (4, 6)), (1, 0.0, (0, 1))],
)
def test_thread_counts_leave_busy_cores_alone(cores, load, expected):
    from qualiclip_hf.scoring import choose_thread_counts

    assert choose_thread_counts(cores=cores, load=load) == expected


@pytest.mark.parametrize(("options", "expected"), [([], 1), (["--threads", "3"], 3)])
def test_score_sets_the_chosen_thread_count(good_folder, tiny_model_dir, monkeypatch, options, expected):
    from qualiclip_hf.scoring import resources

    monkeypatch.setattr(resources, "usable_cores", lambda: 2)
    monkeypatch.setattr(resources, "runnable_elsewhere", lambda: 1.0)  # one other busy process on the 2 cores
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)  # keeps this test process's own setting
    assert main(["score", str(good_folder), "--model", str(tiny_model_dir), "--device", "cpu", *options]) == 0
    assert chosen == [expected]


def test_the_installed_command_scores_a_dataset_without_asking_for_remote_code(tmp_path):
    # The console script registers the Auto classes lazily; the dataset path must register them too, or loading the
    # demo folder (which declares `auto_map`) would stop at transformers' remote-code prompt.
    pytest.importorskip("datasets")
    output = tmp_path / "scores"
    command = [str(QUALICLIP_SCRIPT), "score", "--dataset", str(REPO_ROOT / "examples/images"), "--model", "demo"]
    done = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    from qualiclip_hf.scoring.dataset import read_scores

    table = read_scores(output)
    assert table.num_rows == len(list((REPO_ROOT / "examples/images").glob("*.jpg")))
    assert all(score is not None for score in table.column("quality_score").to_pylist())


def test_an_existing_results_file_is_never_replaced_silently(folder, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "scores.csv"
    assert main(["score", str(folder / "a.jpg"), "--model", str(tiny_model_dir), "--output", str(output)]) == 0
    kept = output.read_text()
    assert main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and "--resume" in err
    assert output.read_text() == kept
    assert oct(output.stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_nothing_to_score_is_said_at_once(capsys):
    assert main(["score"]) == 2
    assert main(["score", "a.jpg", "--dataset", "some/folder"]) == 2
    assert capsys.readouterr().err.count("give image files or folders, or --dataset") == 2


def _command(folder: Path, model_dir: Path, output: Path, *options: str) -> list[str]:
    return ["score", str(folder), "--model", str(model_dir), "--output", str(output), *options]


def _resume_command(folder: Path, model_dir: Path, output: Path, *options: str) -> list[str]:
    return _command(folder, model_dir, output, "--resume", *options)


def _interrupted_run(folder: Path, model_dir: Path, output: Path, monkeypatch, capsys, *options: str) -> str:
    """Scores `folder` into `output` with `options`, Ctrl-C after two files; returns what the file then holds."""
    _interrupt_after(monkeypatch, 2)
    assert main(_command(folder, model_dir, output, *options)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    return output.read_text()


def test_rows_record_the_settings_that_change_scores(good_folder, tiny, tiny_model_dir, tmp_path, small_probe_set):
    from qualiclip_hf.backends.auto_precision import choose_precision
    from qualiclip_hf.backends.onnx import model_cache_key

    weights = model_cache_key(tiny[0])
    for suffix in (".csv", ".jsonl", ".json"):
        output = tmp_path / f"scores{suffix}"
        assert main(_command(good_folder, tiny_model_dir, output, "--max-size", "48", "--precision", "bf16")) == 0
        rows = _rows(output)
        assert len(rows) == 6
        settings = {(row["precision"], row["backend"], str(row["max_size"]), row["weights"]) for row in rows}
        assert settings == {("bf16", "torch", "48", weights)}  # the weights as loaded, not as reduced to bf16
    # `auto` is recorded as the format it chose, never as "auto"; no --max-size as full resolution (null).
    output = tmp_path / "auto.json"
    assert main(_command(good_folder, tiny_model_dir, output, "--precision", "auto")) == 0
    verdict = choose_precision(*tiny, "torch", fuse=True)
    assert verdict.cached  # what the run measured
    assert {(row["precision"], row["max_size"]) for row in _rows(output)} == {(verdict.chosen, None)}


def test_resume_refuses_a_file_scored_with_another_max_size(good_folder, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from qualiclip_hf import loading

    output = tmp_path / "scores.csv"
    kept = _interrupted_run(good_folder, tiny_model_dir, output, monkeypatch, capsys, "--max-size", "48")

    # Refused before the model loads: the arguments say what the run would use.
    load = loading.load_model_and_processor
    monkeypatch.setattr(loading, "load_model_and_processor", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(_resume_command(good_folder, tiny_model_dir, output)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("model: ")  # the model line, then one line that says why
    assert "computed with --max-size 48, and this run uses no --max-size" in err[1]
    assert "continue it with --max-size 48" in err[1]
    assert main(_resume_command(good_folder, tiny_model_dir, output, "--max-size", "64")) == 2
    assert "with --max-size 48, and this run uses --max-size 64" in capsys.readouterr().err
    assert output.read_text() == kept  # untouched

    monkeypatch.setattr(loading, "load_model_and_processor", load)
    assert main(_resume_command(good_folder, tiny_model_dir, output, "--max-size", "48")) == 0
    rows = _rows(output)
    assert sorted(Path(row["path"]).name for row in rows) == [f"{i}.png" for i in range(6)]
    assert {row["max_size"] for row in rows} == {"48"}


def test_resume_refuses_a_file_scored_in_another_precision(
    good_folder, tiny_model_dir, tmp_path, monkeypatch, capsys, small_probe_set
):
    from qualiclip_hf.backends import auto_precision

    output = tmp_path / "scores.json"
    kept = _interrupted_run(good_folder, tiny_model_dir, output, monkeypatch, capsys, "--precision", "bf16")
    # `_interrupted_run` undid the fixture's patches: the small probe set and the cache folder again.
    monkeypatch.setattr(auto_precision, "PROBE_DIR", small_probe_set)
    monkeypatch.setenv("QUALICLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(auto_precision, "native_formats", lambda device: set())  # auto then measures fp32 only
    refused = [[], ["--precision", "fp32"]]
    refused.append(["--precision", "auto"])  # refused once the model is loaded and auto has chosen fp32
    for options in refused:
        assert main(_resume_command(good_folder, tiny_model_dir, output, *options)) == 2
        err = capsys.readouterr().err
        assert "computed with --precision bf16, and this run uses --precision fp32" in err, options
        assert "continue it with --precision bf16" in err
        assert output.read_text() == kept
    assert main(_resume_command(good_folder, tiny_model_dir, output, "--precision", "bf16")) == 0
    assert len(_rows(output)) == 6


def test_resume_refuses_rows_of_other_weights(good_folder, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from qualiclip_hf import QualiCLIPModel

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    output = tmp_path / "scores.csv"
    kept = _interrupted_run(good_folder, model_dir, output, monkeypatch, capsys)
    recorded = {row["weights"] for row in _rows(output)}
    assert len(recorded) == 1 and None not in recorded
    # Retrained in place: the same folder, so the same model name, other weights.
    model = QualiCLIPModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.prompt_embeds.mul_(-1)
    model.save_pretrained(model_dir)
    assert main(_resume_command(good_folder, model_dir, output)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    (old,) = recorded
    # Refused once the model is loaded (its weights are hashed then), in one line naming both hashes.
    assert err[-1].startswith(f"qualiclip: cannot write --output {output}: ")
    assert f"computed with the weights of hash {old}, and this run uses the weights of hash " in err[-1]
    assert "continue it with the model files of those weights" in err[-1]
    assert output.read_text() == kept


def test_resume_refuses_a_file_scored_by_another_backend(good_folder, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "scores.jsonl"
    row = {"path": str(good_folder / "0.png"), "score": 0.5, "error": None, "model": str(tiny_model_dir)}
    output.write_text(json.dumps({**row, "precision": "fp32", "backend": "openvino", "max_size": None}) + "\n")
    kept = output.read_text()
    assert main(_resume_command(good_folder, tiny_model_dir, output)) == 2
    assert "computed with --backend openvino, and this run uses --backend torch" in capsys.readouterr().err
    assert output.read_text() == kept


def test_resume_refuses_rows_that_record_no_settings(good_folder, tiny_model_dir, tmp_path, capsys):
    # Rows without the settings that change scores cannot be checked: continuing would mix scores computed two ways.
    output = tmp_path / "scores.csv"
    kept = f"path,score,error,model\n{good_folder / '0.png'},0.5,,{tiny_model_dir}\n"
    output.write_text(kept)
    assert main(_resume_command(good_folder, tiny_model_dir, output, "--max-size", "64")) == 2
    assert "write to another --output" in capsys.readouterr().err
    assert output.read_text() == kept


def test_decoding_on_the_device_says_when_that_device_is_the_cpu(folder, tiny_model_dir, capsys):
    command = ["score", str(folder / "a.jpg"), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main([*command, "--decode-on", "device"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "--decode-on device" in warnings[0] and "decodes on the CPU" in warnings[0]
    assert "the device is the CPU" in warnings[0]
    assert main(command) == 0
    assert "decodes on the CPU" not in capsys.readouterr().err


def test_files_skipped_in_a_folder_are_reported_once(tmp_path, caplog, capsys):
    import logging

    folder = tmp_path / "only_sub"
    (folder / "inner").mkdir(parents=True)
    photo(40, 40).save(folder / "inner" / "a.png")
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        assert main(["score", str(folder), "--model", "demo"]) == 1
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(skipped) == 1, skipped
    assert "skipped 1 file(s) that are not images (notes.txt)" in skipped[0]
    assert "add --recursive" in capsys.readouterr().err


# ------------------------------------------------------------------------------ one validation of every option


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dataset", "D", "--output", "out", "--max-size", "16"], "--max-size 16 is below the model's minimum"),
        (["--dataset", "D", "--output", "out", "--decode-on", "device"], "--decode-on applies to image files"),
        (["--dataset", "D", "--output", "out", "--recursive"], "--recursive applies to image files and folders"),
        (["--dataset", "D", "--output", "scores.csv"], "--dataset writes a folder of Parquet files"),
        (["--dataset", "D", "--output", "out", "--backend", "onnxruntime"], "--dataset runs the PyTorch model"),
        (["--dataset", "D", "--output", "out", "--calibration-images", "x"], "it does not apply to --precision fp32"),
        (["PHOTOS", "--calibration-images", "x", "--precision", "bf16"], "it does not apply to --precision bf16"),
        (["PHOTOS", "--split", "test"], "--split applies to --dataset only"),
        (["PHOTOS", "--save-embeddings"], "--save-embeddings applies to --dataset only"),
        (["PHOTOS", "--max-size", "1"], "--max-size 1 is below the model's minimum"),
        (["PHOTOS", "--decode-on", "gpu"], "--decode-on must be one of workers, device"),
    ],
)
def test_every_option_is_checked_in_one_line_before_anything_loads(
    good_folder, tmp_path, monkeypatch, capsys, options, message
):
    from qualiclip_hf import loading
    from qualiclip_hf.scoring import dataset

    monkeypatch.setattr(loading, "resolve_model", lambda *a, **k: pytest.fail("resolved the model"))
    monkeypatch.setattr(dataset, "open_dataset", lambda *a, **k: pytest.fail("opened the dataset"))
    monkeypatch.chdir(tmp_path)
    options = [str(good_folder) if option == "PHOTOS" else option for option in options]
    assert main(["score", *options, "--model", "demo"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("mode", ["files", "dataset"])
def test_an_output_under_a_file_is_explained(good_folder, tmp_path, capsys, mode):
    (tmp_path / "a_file").write_text("")
    output = tmp_path / "a_file" / ("scores.csv" if mode == "files" else "scores")
    source = [str(good_folder)] if mode == "files" else ["--dataset", str(good_folder)]
    assert main(["score", *source, "--model", "demo", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a_file'} is a file, so the" in err and "Traceback" not in err


def test_dataset_output_that_is_a_file_is_refused(good_folder, tmp_path, capsys):
    (tmp_path / "scores").write_text("mine")
    assert main(["score", "--dataset", str(good_folder), "--model", "demo", "--output", str(tmp_path / "scores")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "scores").read_text() == "mine"


@pytest.mark.parametrize(("options", "expected"), [([], 1), (["--threads", "3"], 3)])
def test_dataset_scoring_sets_the_thread_count_as_file_scoring_does(
    good_folder, tiny_model_dir, tmp_path, monkeypatch, options, expected
):
    pytest.importorskip("datasets")
    from qualiclip_hf.scoring import resources

    monkeypatch.setattr(resources, "usable_cores", lambda: 2)
    monkeypatch.setattr(resources, "runnable_elsewhere", lambda: 1.0)  # one other busy process on the 2 cores
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    command = ["score", "--dataset", str(good_folder), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main([*command, "--output", str(tmp_path / "out"), "--num-workers", "0", *options]) == 0
    assert chosen == [expected]


@pytest.mark.parametrize("mode", ["files", "dataset"])
def test_a_second_run_on_the_same_output_is_refused(good_folder, tiny_model_dir, tmp_path, monkeypatch, capsys, mode):
    from qualiclip_hf.outputs import OutputInUseError, OutputLock

    output = tmp_path / ("scores.csv" if mode == "files" else "scores")
    source = [str(good_folder)] if mode == "files" else ["--dataset", str(good_folder), "--num-workers", "0"]
    command = ["score", *source, "--model", str(tiny_model_dir), "--output", str(output)]
    # Another run holds the output: this one stops at once, in one line naming it, and writes nothing.
    with OutputLock(output):
        assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{output} is being written by another run (process {os.getpid()})" in err
    assert not output.exists()
    # While a run scores, its output is locked; once it ends, it is not.
    held = []

    def forward(self, *args, **kwargs):
        if not held:
            with pytest.raises(OutputInUseError):
                OutputLock(output).acquire()
            held.append(True)
        return original_forward(self, *args, **kwargs)

    original_forward = QualiCLIPModel.forward
    monkeypatch.setattr(QualiCLIPModel, "forward", forward)
    assert main(command) == 0
    assert held == [True]
    OutputLock(output).acquire().release()


def test_every_command_defaults_to_the_same_model():
    from qualiclip_hf.cli import DEFAULT_MODEL, build_parser

    parser = build_parser()
    for argv in (["score", "a.jpg"], ["explain", "a.jpg", "--output", "a.png"], ["export", "onnx", "--output", "o"]):
        assert parser.parse_args(argv).model == DEFAULT_MODEL, argv


def test_export_refuses_a_folder_of_other_files(tmp_path, monkeypatch, capsys):
    from qualiclip_hf import loading

    monkeypatch.setattr(loading, "resolve_model", lambda *a, **k: pytest.fail("resolved the model"))
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(40, 40).save(photos / "config.json.png")
    (photos / "tokenizer.json").write_text("mine")  # a name an export writes
    assert main(["export", "onnx", "--model", "demo", "--output", str(photos)]) == 2
    err = capsys.readouterr().err
    assert f"--output {photos} is a folder with other files and no previous export (model.onnx)" in err
    assert (photos / "tokenizer.json").read_text() == "mine"
    (tmp_path / "a_file").write_text("")
    assert main(["export", "onnx", "--model", "demo", "--output", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["export", "onnx", "--output", str(tmp_path / "new"), "--calibration-images", str(photos)]) == 2
    assert "it does not apply to --precision fp32" in capsys.readouterr().err


@pytest.mark.skipif(not QUALICLIP_SCRIPT.is_file(), reason="the qualiclip console script is not installed")
def test_dataset_library_progress_bars_only_with_verbose(tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "data"
    data.mkdir()
    photo(48, 48).save(data / "a.png")
    errs = []
    for options in ([], ["--verbose"]):
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / f"cache{len(errs)}"), "HF_HUB_OFFLINE": "1"}
        output = str(tmp_path / f"out{len(errs)}")
        command = [str(QUALICLIP_SCRIPT), "score", "--dataset", str(data), "--model", "demo", "--output", output]
        done = subprocess.run([*command, *options], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        errs.append(done.stderr)
    quiet, verbose = errs
    assert "Generating train split" in verbose
    assert "Generating train split" not in quiet


def test_a_dataset_output_in_a_folder_that_cannot_be_written_is_one_line(good_folder, tmp_path, monkeypatch, capsys):
    from qualiclip_hf import outputs

    locked = tmp_path / "read_only"
    locked.mkdir()
    # As `chmod a-w` would, also where the tests run as root (who may write anywhere).
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != locked)
    output = locked / "scores"
    assert main(["score", "--dataset", str(good_folder), "--model", "demo", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write --output {output}: {locked} cannot be written (permission denied)" in err
    assert "Traceback" not in err and not output.exists()
