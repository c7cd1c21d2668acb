"""Every row keeps its identity: resumed runs know files by what they are, not by the string that named them; ids,
relative paths inside datasets and odd file names are never lost, doubled or swapped."""

from __future__ import annotations

import csv
import http.server
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

import qualiclip_hf.scoring
from qualiclip_hf import QualityScorer
from qualiclip_hf.cli import main
from qualiclip_hf.image_reader import find_image_files
from qualiclip_hf.report import read_score_table
from qualiclip_hf.scoring import ScoreResult, score_files
from qualiclip_hf.scoring.dataset import read_scores, score_dataset
from qualiclip_hf.scoring.results import ResultWriter

from .conftest import REPO_ROOT, photo

EXAMPLES = REPO_ROOT / "examples" / "images"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        photo(48 + 8 * index, 64, seed=index).save(folder / f"{index}.png")
    return folder


@pytest.fixture
def scored(monkeypatch) -> list[str]:
    """The paths each run hands to `score_files`, in order."""
    original = qualiclip_hf.scoring.score_files
    seen: list[str] = []

    def score_files(paths, *args, **kwargs):
        seen.extend(os.fsdecode(path) for path in paths)
        return original(paths, *args, **kwargs)

    monkeypatch.setattr(qualiclip_hf.scoring, "score_files", score_files)
    return seen


def _score(inputs: list[str], model_dir: Path, output: Path, *options: str) -> int:
    return main(["score", *inputs, "--model", str(model_dir), "--output", str(output), *options])


def _csv_rows(output: Path) -> list[dict]:
    with open(output, encoding="utf-8", errors="surrogateescape", newline="") as file:
        return list(csv.DictReader(file))


# ------------------------------------------------------------------------------------------------- resume of files


def test_resume_from_another_folder_or_through_a_link_scores_nothing_twice(
    photos, tiny_model_dir, tmp_path, monkeypatch, scored, capsys
):
    output = tmp_path / "scores.csv"
    monkeypatch.chdir(photos.parent)
    assert _score(["photos"], tiny_model_dir, output) == 0
    first = output.read_text()
    scored.clear()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "link").symlink_to(photos)
    for inputs in (["../photos"], [str(tmp_path / "link")], ["../link/0.png", "../photos/1.png"]):
        assert _score(inputs, tiny_model_dir, output, "--resume") == 0
        assert scored == []
        assert output.read_text() == first
    assert "2 already scored, 0 new, 1 gone (their rows kept), 0 changed" in capsys.readouterr().err


def test_resume_scores_new_and_changed_files_and_says_so(photos, tiny_model_dir, tmp_path, scored, capsys):
    output = tmp_path / "scores.jsonl"
    assert _score([str(photos)], tiny_model_dir, output) == 0
    before = {row["path"]: row for row in map(json.loads, output.read_text().splitlines())}
    photo(90, 90, seed=9).save(photos / "new.png")
    photo(70, 50, seed=8).save(photos / "1.png")  # rewritten since it was scored
    (photos / "2.png").unlink()
    scored.clear()
    assert _score([str(photos)], tiny_model_dir, output, "--resume") == 0
    assert sorted(Path(path).name for path in scored) == ["1.png", "new.png"]
    assert "1 already scored, 1 new, 1 gone (their rows kept), 1 changed (rescored)" in capsys.readouterr().err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    by_name = {Path(row["path"]).name: row for row in rows}
    assert sorted(by_name) == ["0.png", "1.png", "2.png", "new.png"] and len(rows) == 4  # one row per file
    assert by_name["0.png"] == before[str(photos / "0.png")]
    assert by_name["1.png"]["score"] != before[str(photos / "1.png")]["score"]
    assert by_name["1.png"]["size"] == (photos / "1.png").stat().st_size


def test_a_file_missing_when_scored_is_scored_once_it_is_there(photos, tiny_model_dir, tmp_path, scored, capsys):
    output = tmp_path / "scores.json"
    late = photos / "late.png"
    assert _score([str(photos / "0.png"), str(late)], tiny_model_dir, output) == 1  # its row holds the error
    photo(64, 64, seed=7).save(late)
    scored.clear()
    assert _score([str(photos / "0.png"), str(late)], tiny_model_dir, output, "--resume") == 0
    assert scored == [str(late)]
    assert "1 already scored, 0 new, 0 gone (their rows kept), 1 changed (rescored)" in capsys.readouterr().err
    assert [row["error"] for row in json.loads(output.read_text())] == [None, None]


# --------------------------------------------------------------------------------------------------- odd file names


def test_a_name_that_is_not_utf8_is_written_and_resumed_exactly(photos, tiny_model_dir, tmp_path, scored, capsys):
    odd = os.path.join(os.fsencode(photos), b"caf\xe9.png")
    photo(60, 60, seed=5).save(odd)
    output = tmp_path / "scores.csv"
    assert _score([str(photos)], tiny_model_dir, output) == 0
    rows = _csv_rows(output)
    assert len(rows) == 4 and all(row["score"] for row in rows)
    assert os.fsencode(rows[-1]["path"]) == odd  # the name's bytes, as the file system holds them
    scored.clear()
    assert _score([str(photos)], tiny_model_dir, output, "--resume") == 0
    assert scored == [] and len(_csv_rows(output)) == 4
    capsys.readouterr()
    assert main(["score", str(photos), "--model", str(tiny_model_dir)]) == 0  # the table, on a UTF-8 stdout
    assert "caf\\xe9.png" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_names_with_line_separators_survive_resume(tiny_model_dir, tmp_path, scored, suffix):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["a\u2028b.png", "c\u0085d.png", "e\x0cf.png", "g\rh.png", "i\nj.png", "plain.png"]
    for index, name in enumerate(names):
        photo(50, 50, seed=index).save(folder / name, format="PNG")
    output = tmp_path / f"scores{suffix}"
    assert _score([str(folder)], tiny_model_dir, output) == 0
    scored.clear()
    assert _score([str(folder)], tiny_model_dir, output, "--resume") == 0
    assert scored == []
    if suffix == ".csv":
        rows = _csv_rows(output)
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in output.read_text().split("\n") if line]
    else:
        rows = json.loads(output.read_text())
    assert sorted(Path(row["path"]).name for row in rows) == sorted(names)


# ---------------------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for index in range(6):
        paths.append(folder / f"p{index}.png")
        photo(48 + 8 * index, 56, seed=20 + index).save(paths[-1])
    return paths


def _table(paths: list[Path], **columns: list) -> datasets.Dataset:
    rows = {"image": [{"bytes": path.read_bytes(), "path": None} for path in paths], **columns}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([1, None, 3, 4, None, 6], "2 rows have no id (rows 1, 4)"),
        (["a", None, "c", "d", "e", "f"], "1 rows have no id (rows 1)"),
        (["a", "b", "a", "c", "b", "d"], "2 ids are repeated, on 4 rows (ids 'a', 'b'; rows 0, 1, 2, ...)"),
    ],
)
def test_missing_or_repeated_ids_are_refused_before_anything_is_written(pictures, demo, tmp_path, keys, message):
    dataset = _table(pictures, key=keys)
    with pytest.raises(ValueError, match="the id column 'key' must name every row once") as error:
        score_dataset(dataset, tmp_path / "out", *demo, id_column="key", progress=False, num_workers=0)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_streamed_row_without_an_id_stops_the_run_naming_it(pictures, demo, tmp_path):
    dataset = _table(pictures, key=["a", "b", None, "d", "e", "f"]).to_iterable_dataset(num_shards=2)
    with pytest.raises(ValueError, match=r"row 2 of shard 0: no id in the id column 'key'"):
        score_dataset(dataset, tmp_path / "out", *demo, id_column="key", progress=False, num_workers=0, batch_size=1)


def test_relative_image_paths_are_read_from_the_datasets_folder(demo, tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "images").mkdir(parents=True)
    # Other pictures under the same names in the folder the command runs from.
    ours, theirs = ["coffee.jpg", "chelsea.jpg"], ["coffee_jpeg_q5.jpg", "coffee_blurred.jpg"]
    for mine, other in zip(ours, theirs, strict=True):
        shutil.copy(EXAMPLES / mine, data / "images" / mine)
        shutil.copy(EXAMPLES / other, elsewhere / "images" / mine)
    datasets.Dataset.from_dict({"image": [f"images/{name}" for name in ours]}).to_parquet(str(data / "rows.parquet"))
    monkeypatch.chdir(elsewhere)
    expected = [result.score for result in score_files([EXAMPLES / name for name in ours], *demo, num_workers=0)]
    for source in (data, data / "rows.parquet"):
        output = tmp_path / f"out-{source.name}"
        assert main(["score", "--dataset", str(source), "--model", "demo", "--output", str(output)]) == 0
        np.testing.assert_allclose(read_scores(output).column("quality_score").to_pylist(), expected, atol=1e-5)
    rows = datasets.load_dataset("parquet", data_files=str(data / "rows.parquet"), split="train")
    scored = rows.map(QualityScorer(*demo, image_root=data), batched=True, load_from_cache_file=False)
    np.testing.assert_allclose(scored["quality_score"], expected, atol=1e-5)


@pytest.mark.parametrize("with_ids", [True, False])
def test_resuming_a_dataset_whose_rows_changed_says_so_instead_of_mislabelling(pictures, demo, tmp_path, with_ids):
    before = _table(pictures[:5], key=[f"k{i}" for i in range(5)])
    options = {"id_column": "key"} if with_ids else {}
    output = tmp_path / "out"
    score_dataset(before, output, *demo, rows_per_file=2, progress=False, num_workers=0, **options)
    # Two photos added at the front: as many units (3), other rows in each.
    after = _table([pictures[5], *pictures[:5]], key=["k5", *[f"k{i}" for i in range(5)]])
    with pytest.raises(ValueError, match="the dataset changed since this run began: it now has 6 rows") as error:
        score_dataset(after, output, *demo, rows_per_file=2, progress=False, num_workers=0, resume=True, **options)
    if with_ids:
        assert "(0 scored ids are gone from it, 1 of its ids are not scored)" in str(error.value)
    # The same rows resume (nothing left to do), whichever way they are given.
    summary = score_dataset(before, output, *demo, rows_per_file=2, progress=False, resume=True, **options)
    assert summary.rows == 5 and summary.rows_this_run == 0


# ------------------------------------------------------------------------------------------ QualityScorer in map


def _example_rows(count: int) -> datasets.Dataset:
    files = sorted(EXAMPLES.glob("*.jpg"))[:count]
    rows = {"image": [{"bytes": path.read_bytes(), "path": None} for path in files]}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def test_quality_scorer_refuses_one_row_at_a_time_clearly():
    scorer = QualityScorer("demo", device="cpu")
    with pytest.raises(TypeError, match=r"scores batches of rows: call dataset.map\(scorer, batched=True\)"):
        _example_rows(2).map(scorer, load_from_cache_file=False)
    with pytest.raises(TypeError, match="batched=True"):
        _example_rows(2).map(scorer, with_indices=True, load_from_cache_file=False)


def test_a_scorer_made_from_a_name_travels_as_its_name():
    scorer = QualityScorer("demo", device="cpu")
    copy = pickle.loads(pickle.dumps(scorer))  # as `datasets` hands it to a worker
    assert copy.model is None and len(pickle.dumps(scorer)) < 10_000  # no weights: `datasets` hashes it at once
    batch = _example_rows(2)[:]
    assert copy(batch)["quality_score"] == pytest.approx(scorer(batch)["quality_score"], abs=1e-6)


NUM_PROC_SCRIPT = """
import datasets, sys
from pathlib import Path
from qualiclip_hf import QualityScorer, load_model_and_processor
files = sorted(Path(sys.argv[1]).glob("*.jpg"))[:6]
rows = {"image": [{"bytes": path.read_bytes(), "path": None} for path in files]}
ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
for scorer in (QualityScorer("demo", device="cpu"), QualityScorer(*load_model_and_processor("demo", "cpu"))):
    one = ds.map(scorer, batched=True, batch_size=2, load_from_cache_file=False)["quality_score"]
    two = ds.map(scorer, batched=True, batch_size=2, num_proc=2, load_from_cache_file=False)["quality_score"]
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one, two)
print("same scores")
print("fingerprint", datasets.fingerprint.Hasher.hash(QualityScorer("demo", device="cpu")))
"""


def test_quality_scorer_with_num_proc_after_use_in_the_parent_finishes_with_the_same_scores(tmp_path):
    # In a child process with a deadline: a hang (forked workers entering the parent's thread pool) fails the test.
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    try:
        done = subprocess.run(
            [sys.executable, "-c", NUM_PROC_SCRIPT, str(EXAMPLES)],
            capture_output=True,
            text=True,
            timeout=240,
            env=environment,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("dataset.map(QualityScorer, num_proc=2) did not finish within 240 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same scores" in done.stdout
    # The fingerprint `datasets` caches `map` by is the same in another session.
    fingerprint = datasets.fingerprint.Hasher.hash(QualityScorer("demo", device="cpu"))
    assert f"fingerprint {fingerprint}" in done.stdout


# ------------------------------------------------------------------------------------------------------------ folders


def test_recursive_follows_linked_folders_once_and_ends_on_loops(tmp_path, caplog):
    top, outside = tmp_path / "top", tmp_path / "outside"
    (top / "sub").mkdir(parents=True)
    outside.mkdir()
    photo(40, 40).save(top / "a.png")
    photo(40, 40).save(top / "sub" / "b.png")
    photo(40, 40).save(outside / "c.png")
    (top / "linked").symlink_to(outside)
    (top / "sub" / "again").symlink_to(outside)  # the same folder by a second link
    (top / "sub" / "loop").symlink_to(top)  # back up: a loop
    with caplog.at_level("WARNING"):
        images, _ = find_image_files(top, recursive=True)
    assert [path.relative_to(top).as_posix() for path in images] == ["a.png", "linked/c.png", "sub/b.png"]
    assert "a symbolic link to a folder already walked" in caplog.text
    assert find_image_files(top)[0] == [top / "a.png"]


# ------------------------------------------------------------------------------------------------ pipeline on URLs


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/photo.png":
            data = (EXAMPLES / "coffee.jpg").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/silent.png":
            time.sleep(5)  # longer than the timeout the test sets
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def judge(tiny_model_dir):
    from transformers import pipeline

    from qualiclip_hf import IMAGE_QUALITY_TASK, QualiCLIPImageProcessor, QualiCLIPModel

    model = QualiCLIPModel.from_pretrained(tiny_model_dir)
    return pipeline(
        IMAGE_QUALITY_TASK, model=model, image_processor=QualiCLIPImageProcessor.from_pretrained(tiny_model_dir)
    )


def test_url_errors_are_one_line_and_a_silent_server_times_out_by_default(judge, server, monkeypatch):
    from qualiclip_hf import pipeline_qualiclip

    assert judge(f"{server}/photo.png")[0]["label"] == "good"
    with pytest.raises(ValueError, match=r"cannot read image '.*/missing.png': the server answered HTTP 404 Not Found"):
        judge(f"{server}/missing.png")
    with pytest.raises(ValueError, match=r"/silent.png': no answer within 0.5 s"):
        judge(f"{server}/silent.png", timeout=0.5)
    monkeypatch.setattr(pipeline_qualiclip, "URL_TIMEOUT_S", 0.5)  # the default applies without `timeout`
    with pytest.raises(ValueError, match=r"no answer within 0\.5 s"):
        judge(f"{server}/silent.png")
    with pytest.raises(ValueError, match="cannot fetch it: "):
        judge("http://127.0.0.1:9/photo.png")  # the discard port: nothing listens there


def test_offline_mode_fetches_local_addresses_only(judge, server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert judge(f"{server}/photo.png")[0]["label"] == "good"
    with pytest.raises(ValueError, match=r"offline mode .* local addresses only, and example\.com is not one"):
        judge("https://example.com/photo.jpg")


def test_the_report_reads_odd_names_of_a_results_file_back_exactly(tmp_path):
    names = [os.fsdecode(b"caf\xe9.png"), "a\u2028b.png", "e\x0cf.png", "g\rh.png", "plain.png"]
    writer = ResultWriter(tmp_path / "scores.csv", "demo")
    writer.start({"precision": "fp32", "backend": "torch", "max_size": None, "calibration": None, "weights": None})
    for index, name in enumerate(names):
        writer.write(ScoreResult(name, score=index / 10))
    writer.close()
    table = read_score_table(tmp_path / "scores.csv")
    assert table.ids == names
    assert table.scores.tolist() == [0.0, 0.1, 0.2, 0.3, 0.4]
