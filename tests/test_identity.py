"""Every row keeps its identity: resumed runs know files by what they are, not by the string that named them; ids,
relative paths inside datasets and odd file names are never lost, doubled or swapped."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

import qualiclip_hf.scoring
from qualiclip_hf.cli import main

from .conftest import photo


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


# --------------------------------------------------------------------------------------------------- odd file names


def test_a_name_that_is_not_utf8_is_written_and_resumed_exactly(photos, tiny_model_dir, tmp_path, scored):
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
