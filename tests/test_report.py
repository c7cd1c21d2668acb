"""`qualiclip report` and `qualiclip filter`: the percentile rule, the cut, the keep-list and the HTML page, on score
sets made up here (expected values known by construction) and on the outputs of real scoring runs with the demo
model (a results CSV and a `--dataset` Parquet folder)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import datasets
import numpy as np
import pytest

from qualiclip_hf.cli import main
from qualiclip_hf.report import (
    as_score_table,
    decile_of,
    keep_ids,
    keep_rows,
    percentile_table,
    read_score_table,
    render_report,
    select,
)
from qualiclip_hf.scoring.dataset import score_dataset

from .conftest import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "examples" / "images").glob("*.jpg"))


# ------------------------------------------------------------------------------------------ score sets made up here


def test_the_percentile_table_of_a_uniform_grid_is_the_grid():
    # 101 scores 0.00, 0.01, ..., 1.00, shuffled: with numpy's linear rule the p-th percentile is p / 100 exactly
    # (index (n - 1) * p / 100 = p falls on a grid point). Failed rows do not count.
    grid = np.random.default_rng(0).permutation(101) / 100
    scores = [*grid.tolist(), None, None]
    table = percentile_table(scores, percentiles=[0, 1, 5, 10, 25, 50, 75, 90, 99, 100])
    for percentile, score in table:
        assert score == pytest.approx(percentile / 100, abs=1e-12)


def test_dropping_the_bottom_10_percent_of_100_distinct_scores_keeps_the_90_highest():
    scores = np.random.default_rng(1).permutation(np.arange(100) * 0.01 + 0.003)
    selection = select(scores.tolist(), drop_bottom=0.10)
    assert (selection.kept, selection.dropped, selection.failed) == (90, 10, 0)
    assert set(scores[selection.keep]) == set(np.sort(scores)[10:])
    # The same cut said the other way round, and as a threshold between the 10th and 11th lowest scores.
    assert np.array_equal(select(scores.tolist(), keep_top=0.90).keep, selection.keep)
    assert np.array_equal(select(scores.tolist(), min_score=0.10).keep, selection.keep)
    assert np.sort(scores)[9] < selection.threshold <= np.sort(scores)[10]
    # Rows are returned in the input's order.
    assert keep_rows(scores.tolist(), drop_bottom=0.1).tolist() == sorted(np.flatnonzero(scores >= 0.1).tolist())


def test_equal_scores_are_kept_or_dropped_together_whatever_the_order():
    # Ten rows, four tied at 0.2: the 30th percentile falls inside the tie (index 2.7, between two 0.2s), so the
    # whole tie is kept and only the two lower rows are dropped (20 %, not 30 %).
    scores = [0.0, 0.1, 0.2, 0.2, 0.2, 0.2, 0.5, 0.6, 0.7, 0.8]
    ids = [f"img{index}" for index in range(10)]
    expected = set(ids[2:])
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(10)
        table = {"id": [ids[i] for i in order], "score": [scores[i] for i in order]}
        assert set(keep_ids(table, drop_bottom=0.3)) == expected
    # A tie at the lowest score: nothing below it, nothing dropped.
    tied = [0.3] * 4 + [0.4 + index / 100 for index in range(16)]
    assert select(tied, drop_bottom=0.1).dropped == 0


def test_rows_without_a_score_are_counted_and_never_kept():
    table = {
        "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
        "score": [0.9, None, 0.5, float("nan"), 0.7],
        "error": [None, "b.jpg: truncated", None, None, None],
    }
    selection = select(table, keep_top=1.0)
    assert (selection.kept, selection.dropped, selection.failed) == (3, 0, 2)
    assert keep_ids(table, min_score=0.0) == ["a.jpg", "c.jpg", "e.jpg"]
    read = as_score_table(table)
    assert read.errors == [None, "b.jpg: truncated", None, "no score", None]
    assert percentile_table(table, [50]) == [(50.0, 0.7)]


def test_deciles_split_the_rows_in_tenths_and_decile_1_is_what_drop_bottom_10_percent_drops():
    scores = np.random.default_rng(2).permutation(200) / 200
    table = as_score_table(scores.tolist())
    deciles = decile_of(table)
    assert np.bincount(deciles, minlength=11)[1:].tolist() == [20] * 10
    assert np.array_equal(deciles == 1, ~select(table, drop_bottom=0.1).keep)
    assert all(scores[deciles == d].max() < scores[deciles == d + 1].min() for d in range(1, 10))


def test_a_datasets_table_its_column_and_a_pandas_frame_give_the_same_cut():
    scores = [0.4, None, 0.9, 0.1, 0.6]
    dataset = datasets.Dataset.from_dict({"quality_score": scores, "quality_error": [None, "x", None, None, None]})
    assert keep_rows(dataset, drop_bottom=0.5).tolist() == [2, 4]
    assert keep_rows(dataset["quality_score"], drop_bottom=0.5).tolist() == [2, 4]
    assert keep_rows(dataset.to_pandas(), drop_bottom=0.5).tolist() == [2, 4]
    assert len(dataset.select(keep_rows(dataset, drop_bottom=0.5))) == 2


@pytest.mark.parametrize(
    ("rule", "message"),
    [({}, "exactly one"), ({"drop_bottom": 0.1, "min_score": 0.5}, "exactly one"), ({"drop_bottom": 1.0}, "[0, 1)"),
     ({"keep_top": 0.0}, "(0, 1]")],
)  # fmt: skip
def test_a_bad_rule_is_refused(rule, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        select([0.1, 0.2], **rule)


# ------------------------------------------------------------------------------------------------ the HTML page


class _PageParser(HTMLParser):
    """Collects what the tests look at, and checks that every element opened is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "line", "rect", "polyline", "circle", "path"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.images: list[str] = []
        self.h2: list[str] = []
        self.text: list[str] = []
        self._in_h2 = False
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        self._in_h2 = tag == "h2"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()
        self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data.strip())


def parse_page(text: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(text)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


def test_the_page_has_its_sections_references_nothing_outside_and_escapes_data():
    table = {"path": ["<script>alert(1)</script>.jpg", "b.jpg"], "score": [None, 0.5], "error": ["bad <b>", None]}
    page = render_report(as_score_table(table))
    parsed = parse_page(page)
    assert parsed.h2[:3] == ["Distribution", "Keep the top X %", "Percentiles"]
    assert [f"decile-{decile}" for decile in range(1, 11)] == [i for i in parsed.ids if i.startswith("decile-")]
    assert "<script" not in page and "&lt;script&gt;" in page and "bad &lt;b&gt;" in page
    assert "http" not in page and "src=" not in page.replace('src="data:', "")


# ------------------------------------------------------------------------------ real runs: a CSV and a Parquet folder


@pytest.fixture(scope="session")
def file_results(tmp_path_factory) -> Path:
    """`qualiclip score` on the example photos and one truncated file, with the demo model: a results CSV whose
    paths are absolute (so the page finds them from any folder), one row with an error."""
    folder = tmp_path_factory.mktemp("photos")
    for path in EXAMPLES:
        shutil.copy(path, folder / path.name)
    (folder / "truncated.jpg").write_bytes(EXAMPLES[0].read_bytes()[:2000])
    output = folder.parent / "file_results" / "scores.csv"
    assert main(["score", str(folder), "--model", "demo", "--output", str(output)]) == 1  # one file failed
    return output


@pytest.fixture(scope="session")
def dataset_results(tmp_path_factory, demo) -> Path:
    """`score_dataset` with the demo model on the example photos and one row of junk: a `--dataset` output folder."""
    rows = [{"bytes": path.read_bytes(), "path": None} for path in EXAMPLES] + [{"bytes": b"junk", "path": None}]
    dataset = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    output = tmp_path_factory.mktemp("dataset_results") / "scores"
    model, processor = demo
    score_dataset(dataset, output, model, processor, rows_per_file=4, batch_size=2, num_workers=0, progress=False)
    return output


def test_a_results_csv_reads_with_its_paths_errors_and_model(file_results):
    table = read_score_table(file_results)
    assert len(table) == len(EXAMPLES) + 1 and table.failed == 1
    assert table.id_column == "path" and table.models == ("demo",)
    (failed,) = [row for row, error in enumerate(table.errors) if error is not None]
    assert Path(table.ids[failed]).name == "truncated.jpg" and "truncated.jpg" in table.errors[failed]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_results_read_as_the_csv_does(file_results, tmp_path, suffix):
    import csv
    import json

    with open(file_results, encoding="utf-8") as file:
        rows = [{key: value or None for key, value in row.items()} for row in csv.DictReader(file)]
    for row in rows:
        row["score"] = None if row["score"] is None else float(row["score"])
    path = tmp_path / f"scores{suffix}"
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(row) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    from_json, from_csv = read_score_table(path), read_score_table(file_results)
    assert from_json.ids == from_csv.ids and from_json.errors == from_csv.errors
    np.testing.assert_array_equal(from_json.scores, from_csv.scores)


def test_one_parquet_part_reads_alone(dataset_results):
    (first, *_) = sorted(dataset_results.glob("part-*.parquet"))
    assert read_score_table(first).ids == [0, 1, 2, 3]  # rows_per_file=4


def test_a_dataset_folder_reads_with_its_ids_and_errors(dataset_results):
    table = read_score_table(dataset_results)
    assert table.ids == list(range(len(EXAMPLES) + 1)) and table.id_column == "id"
    assert table.failed == 1 and table.errors[-1] is not None and np.isnan(table.scores[-1])
    assert np.isfinite(table.scores[:-1]).all()


def test_report_on_a_results_csv_shows_pictures_per_decile(file_results, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pictures found by their absolute paths, not from the folder the command runs in
    output = tmp_path / "pages" / "report.html"
    assert main(["report", str(file_results), "--output", str(output)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "percentile\tscore" and len(out.splitlines()) == 18
    assert f"{len(EXAMPLES) + 1} rows, {len(EXAMPLES)} scored, 1 without a score" in err
    page = output.read_text(encoding="utf-8")
    parsed = parse_page(page)
    assert len(parsed.images) == len(EXAMPLES)  # one per scored photo: the deciles of 6 rows hold 1 or 0 each
    assert all(src.startswith("data:image/jpeg;base64,") for src in parsed.images)
    assert "http" not in page
    assert "demo model, which is not QualiCLIP" in " ".join(parsed.text)
    assert "Rows without a score (1)" in parsed.h2
    assert [path.name for path in output.parent.iterdir()] == ["report.html"]  # no temporary file left


def test_report_on_a_dataset_folder_says_why_it_has_no_pictures(dataset_results, tmp_path, capsys):
    assert main(["report", str(dataset_results), "--output", str(tmp_path / "report.html")]) == 0
    parsed = parse_page((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert parsed.images == []
    assert "No pictures: its ids are not paths" in " ".join(parsed.text)
    # The default page goes beside the folder, not into it (where Parquet readers would meet it).
    assert main(["report", str(dataset_results)]) == 0
    assert (dataset_results.parent / "scores.html").is_file()
    assert not list(dataset_results.glob("*.html"))


def test_an_existing_page_or_list_is_refused_unless_overwrite(file_results, tmp_path, capsys):
    output = tmp_path / "report.html"
    output.write_text("mine", encoding="utf-8")
    assert main(["report", str(file_results), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err and output.read_text() == "mine"
    assert main(["report", str(file_results), "--output", str(output), "--overwrite"]) == 0
    assert output.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    keep = tmp_path / "keep.txt"
    keep.write_text("mine", encoding="utf-8")
    assert main(["filter", str(file_results), "--min-score", "0", "--output", str(keep)]) == 2
    assert keep.read_text() == "mine"


def test_filter_writes_the_kept_paths_and_counts_kept_dropped_and_failed(file_results, tmp_path, capsys):
    keep = tmp_path / "lists" / "keep.txt"
    assert main(["filter", str(file_results), "--keep-top", "50%", "--output", str(keep)]) == 0
    err = capsys.readouterr().err
    table = read_score_table(file_results)
    ranked = np.argsort(-table.scores[table.scored])  # the 6 scored photos, best first; their scores are distinct
    best_three = {np.array(table.ids)[table.scored][row] for row in ranked[:3]}
    assert set(keep.read_text(encoding="utf-8").splitlines()) == best_three
    assert "kept 3" in err and "dropped 3" in err and "1 without a score" in err


def test_filter_on_a_dataset_folder_prints_the_kept_ids(dataset_results, capsys):
    assert main(["filter", str(dataset_results), "--drop-bottom", "50%"]) == 0
    out, err = capsys.readouterr()
    scores = read_score_table(dataset_results).scores[:-1]
    assert out.splitlines() == [str(row) for row in np.flatnonzero(scores >= np.sort(scores)[3])]
    assert "kept 3" in err and "1 without a score" in err


def test_an_unfinished_dataset_run_is_refused_unless_partial(dataset_results, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(dataset_results, unfinished)
    (unfinished / ".manifest.json").unlink()
    assert main(["filter", str(unfinished), "--min-score", "0"]) == 2
    assert "not complete" in capsys.readouterr().err
    assert main(["filter", str(unfinished), "--min-score", "0", "--partial"]) == 0


def test_a_percentage_needs_its_sign(file_results, capsys):
    with pytest.raises(SystemExit):
        main(["filter", str(file_results), "--drop-bottom", "0.1"])
    assert "a percentage such as 10%" in capsys.readouterr().err


def test_unreadable_scores_are_one_line(tmp_path, capsys):
    bad = tmp_path / "scores.csv"
    bad.write_text("path,score\na.jpg,high\n", encoding="utf-8")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qualiclip: {bad}: row 0 (a.jpg): the score 'high' is not a number"
    assert main(["filter", str(tmp_path / "missing.csv"), "--min-score", "0"]) == 2
    assert "no such file" in capsys.readouterr().err


QUALICLIP_SCRIPT = Path(sys.executable).parent / "qualiclip"


@pytest.mark.skipif(not QUALICLIP_SCRIPT.is_file(), reason="the qualiclip console script is not installed")
@pytest.mark.parametrize("command", ["report", "filter"])
def test_help_imports_neither_torch_nor_numpy(command):
    done = subprocess.run(
        [str(QUALICLIP_SCRIPT), command, "--help"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "qualiclip_hf.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers", "numpy")}
