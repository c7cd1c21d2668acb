"""Scoring `datasets` datasets: `QualityScorer` in `datasets.map`, and `score_dataset` / `qualiclip score --dataset`
on every input kind, with corrupt rows, killed and resumed (many processes: tests/test_ray_scoring.py). The
reference scores are those of `score_files` on the same images saved as files."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qualiclip_hf import QualityScorer
from qualiclip_hf.backends import auto_precision
from qualiclip_hf.backends.onnx import model_cache_key
from qualiclip_hf.cli import main
from qualiclip_hf.scoring import score_files
from qualiclip_hf.scoring.dataset import RUN_FILE, open_dataset, read_scores, score_dataset

from .conftest import REPO_ROOT, image_bytes, photo

ATOL = 1e-5  # scores of one image in different batches differ by float rounding (tests/test_determinism.py)


def jpeg_bytes(image: Image.Image) -> bytes:
    return image_bytes(image, "JPEG", quality=90)


def mixed_photos(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [photo(int(rng.integers(40, 96)), int(rng.integers(40, 96)), seed=seed * 1000 + i) for i in range(count)]


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    """Eight JPEG files of mixed sizes, the images of every dataset below."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for index, image in enumerate(mixed_photos(8)):
        path = folder / f"photo_{index}.jpg"
        path.write_bytes(jpeg_bytes(image))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def file_scores(photo_files, demo) -> list[float]:
    """The scores of the files, as `qualiclip score` gives them."""
    model, processor = demo
    results = list(score_files(photo_files, model, processor, batch_size=1, num_workers=0))
    assert all(result.error is None for result in results)
    return [result.score for result in results]


def image_table(paths: list[Path]) -> datasets.Dataset:
    """The files as a dataset with an `Image` column (bytes) and a `name` column."""
    rows = {"image": [{"bytes": path.read_bytes(), "path": None} for path in paths], "name": [p.stem for p in paths]}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def write_parquet_folder(dataset: datasets.Dataset, folder: Path, files: int = 2) -> Path:
    folder.mkdir(parents=True)
    for index in range(files):
        dataset.shard(files, index, contiguous=True).to_parquet(str(folder / f"data-{index:02d}.parquet"))
    return folder


def write_tar_shards(paths: list[Path], folder: Path, shards: int = 2) -> Path:
    """WebDataset shards: `KEY.jpg` members, keys in file order."""
    folder.mkdir(parents=True)
    per_shard = -(-len(paths) // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for index in range(shard * per_shard, min(len(paths), (shard + 1) * per_shard)):
                tar.add(paths[index], arcname=f"sample{index:04d}.jpg")
    return folder


def scores_of(output: Path) -> tuple[list, list[float | None], list[str | None]]:
    table = read_scores(output)
    return table.column("id").to_pylist(), table.column("quality_score").to_pylist(), table.column("error").to_pylist()


# ------------------------------------------------------------------------------------------------- QualityScorer


def test_quality_scorer_in_map_on_decoded_images_matches_file_scores(photo_files, file_scores, demo, tmp_path):
    # An imagefolder dataset decodes its images into PIL images; the scorer reads them as files are read.
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in photo_files:
        (folder / path.name).write_bytes(path.read_bytes())
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    by_name = {Path(p).name: score for p, score in zip(photo_files, file_scores, strict=True)}
    names = [Path(item["path"]).name for item in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    scored = ds.map(QualityScorer(*demo), batched=True, batch_size=3)
    assert scored.column_names == ["image", "quality_score", "quality_error"]
    assert scored["quality_error"] == [None] * len(photo_files)
    np.testing.assert_allclose(scored["quality_score"], [by_name[name] for name in names], atol=ATOL)
    good = scored.filter(lambda row: row["quality_score"] >= float(np.median(file_scores)))
    assert len(good) == sum(score >= float(np.median(file_scores)) for score in file_scores)


def test_quality_scorer_reads_bytes_and_paths_and_keeps_going_past_bad_rows(photo_files, file_scores, demo, tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (16, 16)).save(tiny)
    values = [
        {"bytes": photo_files[0].read_bytes(), "path": None},  # Image(decode=False)
        photo_files[1].read_bytes(),  # raw bytes
        str(photo_files[2]),  # a local path
        b"not an image",
        str(tmp_path / "missing.jpg"),
        str(tiny),
        photo_files[0].read_bytes()[:300],  # truncated
    ]
    scorer = QualityScorer(*demo, image_column="picture", save_embeddings=True)
    out = scorer({"picture": values}, indices=list(range(10, 17)))
    np.testing.assert_allclose(out["quality_score"][:3], file_scores[:3], atol=ATOL)
    assert out["quality_error"][:3] == [None] * 3
    assert out["quality_score"][3:] == [None] * 4
    errors = out["quality_error"]
    assert errors[3].startswith("row 13: <12 bytes>: not an image file")
    assert errors[4] == f"row 14: {tmp_path / 'missing.jpg'}: no such file"
    assert errors[5].startswith("row 15: 16x16 pixels is below the model's 32x32 minimum")
    assert errors[6].startswith("row 16: <300 bytes>: ")
    # The embeddings are the model's own for that image.
    model, processor = demo
    with torch.no_grad():
        expected = model(**processor(images=[Image.open(photo_files[2])], return_tensors="pt")).image_embeds[0]
    np.testing.assert_allclose(out["image_embeds"][2], expected.numpy(), atol=1e-5)
    assert out["image_embeds"][3] is None
    with pytest.raises(KeyError, match=r"no image column 'picture'.*image"):
        scorer({"image": values})


# ------------------------------------------------------------------------------------------------- input kinds


def test_every_input_kind_gives_the_file_scores(photo_files, file_scores, demo, tmp_path):
    """Parquet and Arrow folders, imagefolder, WebDataset tars (prepared and streamed), streamed Parquet, a column of
    paths: the same scores as the files, ids that join back to the rows."""
    model, processor = demo
    table = image_table(photo_files)
    parquet = write_parquet_folder(table, tmp_path / "parquet")
    arrow = tmp_path / "arrow"
    arrow.mkdir()
    with pa.OSFile(str(arrow / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.data.table.schema) as out:
        out.write_table(table.data.table)
    imagefolder = tmp_path / "imagefolder"
    imagefolder.mkdir()
    for index, path in enumerate(photo_files):
        (imagefolder / f"{index:02d}.jpg").write_bytes(path.read_bytes())
    tars = write_tar_shards(photo_files, tmp_path / "tars", shards=2)
    paths = tmp_path / "paths"
    paths.mkdir()
    pq.write_table(pa.table({"file": [str(p) for p in photo_files]}), paths / "files.parquet")

    row_ids = list(range(len(photo_files)))
    keys = [f"sample{index:04d}" for index in row_ids]
    cases = [
        ("parquet", parquet, {}, {}, row_ids),
        ("parquet, id column", parquet, {}, {"id_column": "name"}, [p.stem for p in photo_files]),
        ("arrow", arrow, {}, {}, row_ids),
        ("imagefolder", imagefolder, {}, {}, row_ids),
        ("webdataset", tars, {}, {}, keys),
        ("webdataset, streamed", tars, {"streaming": True}, {}, keys),
        ("parquet, streamed", parquet, {"streaming": True}, {}, [f"{s}/{r}" for s in (0, 1) for r in range(4)]),
        ("paths", paths, {}, {"image_column": "file"}, row_ids),
    ]
    for name, source, open_options, options, ids in cases:
        output = tmp_path / "out" / name
        dataset = open_dataset(str(source), "train", **open_options)
        summary = score_dataset(
            dataset, output, model, processor, rows_per_file=3, batch_size=2, num_workers=1, progress=False, **options
        )
        assert (summary.rows, summary.failed) == (len(photo_files), 0), name
        got_ids, scores, errors = scores_of(output)
        assert got_ids == ids, name
        assert errors == [None] * len(photo_files), name
        np.testing.assert_allclose(scores, file_scores, atol=ATOL, err_msg=name)
        sizes = read_scores(output).select(["height", "width"]).to_pylist()
        assert sizes == [{"height": Image.open(p).height, "width": Image.open(p).width} for p in photo_files], name


def test_a_hub_id_is_streamed_and_a_local_folder_is_prepared(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("qualiclip_hf.loading.hub_unreachable_reason", lambda: None)  # as if online
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)))
    open_dataset("someone/photos", "validation")
    open_dataset(str(tmp_path), "train")
    assert calls == [
        (("someone/photos",), {"split": "validation", "streaming": True}),
        ((str(tmp_path),), {"split": "train", "streaming": False}),
    ]


# ------------------------------------------------------------------------------------------------- corrupt rows


def test_corrupt_rows_get_their_error_and_the_run_goes_on(photo_files, file_scores, tmp_path, capsys):
    good = [{"bytes": path.read_bytes(), "path": None} for path in photo_files[:4]]
    tiny = io.BytesIO()
    Image.new("RGB", (20, 60)).save(tiny, "PNG")
    bad = [
        {"bytes": b"\x00" * 50, "path": None},
        {"bytes": photo_files[4].read_bytes()[:200], "path": None},
        {"bytes": tiny.getvalue(), "path": None},
        {"bytes": b"", "path": None},
    ]
    rows = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3]]
    dataset = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    write_parquet_folder(dataset, tmp_path / "data", files=1)
    status = main(
        [
            "score",
            "--dataset",
            str(tmp_path / "data"),
            "--model",
            "demo",
            "--output",
            str(tmp_path / "out"),
            "--batch-size",
            "2",
        ]
    )
    assert status == 0  # the run is complete; the failures are in the error column
    assert "holds 8 rows, 4 failed" in capsys.readouterr().err
    ids, scores, errors = scores_of(tmp_path / "out")
    assert ids == list(range(8))
    np.testing.assert_allclose([scores[i] for i in (0, 2, 4, 6)], file_scores[:4], atol=ATOL)
    assert [scores[i] for i in (1, 3, 5, 7)] == [None] * 4
    assert errors[1] == "row 1: <50 bytes>: not an image file, a damaged one, or a format no installed reader supports"
    assert errors[3].startswith("row 3: <200 bytes>: ")
    assert errors[5].startswith("row 5: 20x60 pixels is below the model's 32x32 minimum")
    assert errors[7] == "row 7: <0 bytes>: empty file (0 bytes)"


def test_an_output_folder_is_not_overwritten_and_resume_checks_the_settings(
    photo_files, tmp_path, capsys, demo, monkeypatch, small_probe_set
):
    write_parquet_folder(image_table(photo_files[:2]), tmp_path / "data", files=1)
    command = ["score", "--dataset", str(tmp_path / "data"), "--model", "demo", "--output", str(tmp_path / "out")]
    assert main(command) == 0
    assert main(command) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main([*command, "--resume", "--max-size", "64"]) == 2
    assert "max_size was None, now 64" in capsys.readouterr().err
    assert main([*command, "--resume"]) == 0  # complete: nothing left to do
    assert "scored 0 rows" in capsys.readouterr().err
    # `auto` is the precision it chooses: fp32 here, so it continues an fp32 run, and the run records no "auto".
    monkeypatch.setattr(auto_precision, "native_formats", lambda device: set())  # auto then measures fp32 only
    assert main([*command, "--resume", "--precision", "auto"]) == 0
    run = json.loads((tmp_path / "out" / RUN_FILE).read_text())
    assert run["precision"] == "fp32"
    assert run["weights"] == model_cache_key(demo[0])  # the name stays when the weights change; the hash does not
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert (
        main(["score", "--dataset", str(tmp_path / "data"), "--model", "demo", "--output", str(tmp_path / "other")])
        == 2
    )
    assert "is not empty and holds no run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ killed, resumed, two processes


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory) -> Path:
    """60 rows of mixed-size JPEG bytes in 4 Parquet files, 3 of them corrupt."""
    folder = tmp_path_factory.mktemp("many")
    images = [{"bytes": jpeg_bytes(image), "path": None} for image in mixed_photos(60, seed=7)]
    for index in (11, 30, 47):
        images[index] = {"bytes": images[index]["bytes"][:150], "path": None}
    table = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    return write_parquet_folder(table, folder / "data", files=4)


def command_line(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "score",
        "--dataset",
        str(data),
        "--model",
        "demo",
        "--output",
        str(output),
        "--rows-per-file",
        "4",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        # One torch thread, whatever the machine's load: the command otherwise takes the cores not busy now
        # (`choose_thread_counts`), and runs compared bit for bit must sum in the same order.
        "--threads",
        "1",
        *extra,
    ]


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    # One thread in every run compared here (with `--threads 1` above): the order in which torch's CPU kernels
    # sum depends on the number of threads, so scores are identical bit for bit only at equal thread counts.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }


CLI = [sys.executable, "-m", "qualiclip_hf.cli"]


def run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=subprocess_env(tmp_path), cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def uninterrupted(many_rows, tmp_path_factory) -> Path:
    """One process, never interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    done = run([*CLI, *command_line(many_rows, folder / "out")], folder)
    assert "holds 60 rows, 3 failed" in done.stderr
    return folder / "out"


def wait_for_parts(output: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(list(output.glob("part-*.parquet"))) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_killed_and_resumed_gives_the_uninterrupted_result(many_rows, uninterrupted, tmp_path):
    output = tmp_path / "out"
    process = subprocess.Popen(
        [*CLI, *command_line(many_rows, output)],
        env=subprocess_env(tmp_path),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_parts(output, 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output / ".manifest.json").exists(), "the run ended before it was killed"
    kept = {path.name: path.stat().st_mtime_ns for path in output.glob("part-*.parquet")}
    assert 4 <= len(kept) < 15
    done = run([*CLI, *command_line(many_rows, output, "--resume")], tmp_path)
    assert "holds 60 rows, 3 failed" in done.stderr
    assert {name: (output / name).stat().st_mtime_ns for name in kept} == kept  # complete parts were not redone
    assert read_scores(output).equals(read_scores(uninterrupted))
    assert not list(output.glob(".*.tmp"))


def test_saved_embeddings_are_the_models_and_null_for_failed_rows(photo_files, demo, tmp_path):
    model, processor = demo
    rows = [{"bytes": photo_files[0].read_bytes(), "path": None}, {"bytes": b"junk", "path": None}]
    dataset = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    summary = score_dataset(dataset, tmp_path / "out", model, processor, save_embeddings=True, progress=False)
    assert (summary.rows, summary.failed) == (2, 1)
    embeds = read_scores(tmp_path / "out").column("image_embeds")
    with torch.no_grad():
        expected = model(**processor(images=[Image.open(photo_files[0])], return_tensors="pt")).image_embeds[0]
    assert embeds.type.list_size == expected.numel()
    np.testing.assert_allclose(embeds[0].as_py(), expected.numpy(), atol=1e-5)
    assert embeds[1].as_py() is None


# --------------------------------------------------------------------------------------- the output folder as data


def test_the_output_folder_reads_as_one_parquet_dataset(photo_files, demo, tmp_path):
    # pyarrow, pandas and `datasets` read every file of a folder as data, except names that start with "." (and "_"
    # for pyarrow): the run's bookkeeping must not trip them.
    import pandas as pd

    model, processor = demo
    output = tmp_path / "out"
    options = {"rows_per_file": 3, "batch_size": 2, "num_workers": 0, "progress": False}
    score_dataset(image_table(photo_files), output, model, processor, **options)
    expected = read_scores(output)
    assert expected.num_rows == len(photo_files)
    assert pq.read_table(output).sort_by("id").equals(expected.sort_by("id"))
    assert sorted(pd.read_parquet(output)["id"]) == list(range(len(photo_files)))
    loaded = datasets.load_dataset("parquet", data_dir=str(output), split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded["id"]) == list(range(len(photo_files)))


def test_resume_sets_a_damaged_part_aside_names_it_and_scores_its_rows_again(photo_files, demo, tmp_path):
    model, processor = demo
    dataset = image_table(photo_files)  # 8 rows: with 2 rows per file, 4 units of one part each
    options = {"rows_per_file": 2, "batch_size": 2, "num_workers": 0, "progress": False}
    reference = tmp_path / "reference"
    score_dataset(dataset, reference, model, processor, **options)
    output = tmp_path / "out"
    score_dataset(dataset, output, model, processor, **options)
    parts = sorted(output.glob("part-*.parquet"))
    assert len(parts) == 4
    damaged = parts[1]  # the part of a complete unit
    cut = damaged.read_bytes()[:100]  # cut short, as by a full disk
    damaged.write_bytes(cut)
    with pytest.warns(UserWarning, match=re.escape(f"{damaged}: not a readable Parquet file")) as caught:
        summary = score_dataset(dataset, output, model, processor, resume=True, **options)
    assert f"set aside as .damaged-{damaged.name}" in str(caught[0].message)
    assert (output / f".damaged-{damaged.name}").read_bytes() == cut  # kept, for whoever wants to look
    assert (summary.rows, summary.rows_this_run) == (len(photo_files), options["rows_per_file"])
    assert read_scores(output).equals(read_scores(reference))
    assert pq.read_table(output).num_rows == len(photo_files)  # the set-aside file is hidden from readers


def test_resume_scores_again_a_unit_whose_part_was_deleted(photo_files, demo, tmp_path):
    model, processor = demo
    dataset = image_table(photo_files)
    options = {"rows_per_file": 2, "batch_size": 2, "num_workers": 0, "progress": False}
    output = tmp_path / "out"
    score_dataset(dataset, output, model, processor, **options)
    reference = read_scores(output)
    deleted = sorted(output.glob("part-*.parquet"))[2]
    deleted.unlink()  # a complete unit's only part: its marker still says complete
    with pytest.warns(UserWarning, match=re.escape(f"unit 2 is incomplete ({deleted.name} missing)")):
        summary = score_dataset(dataset, output, model, processor, resume=True, **options)
    assert (summary.rows, summary.rows_this_run) == (len(photo_files), options["rows_per_file"])
    assert read_scores(output).equals(reference)


def test_the_command_names_a_damaged_part_on_resume(photo_files, tmp_path, capsys):
    write_parquet_folder(image_table(photo_files[:2]), tmp_path / "data", files=1)
    command = ["score", "--dataset", str(tmp_path / "data"), "--model", "demo", "--output", str(tmp_path / "out")]
    assert main(command) == 0
    (part,) = (tmp_path / "out").glob("part-*.parquet")
    part.write_bytes(b"not parquet")
    capsys.readouterr()
    assert main([*command, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{part}: not a readable Parquet file" in err and "Traceback" not in err
    assert "scored 2 rows" in err and read_scores(tmp_path / "out").num_rows == 2


def test_a_hub_id_with_the_hub_unreachable_fails_at_once_without_retries(monkeypatch):
    # `datasets` would retry for half a minute; the Hub's reachability is known within a second, as for models.
    reason = "https://huggingface.co cannot be reached (no network?)"
    monkeypatch.setattr("qualiclip_hf.loading.hub_unreachable_reason", lambda: reason)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("asked datasets"))
    with pytest.raises(ValueError, match=re.escape(f"cannot open dataset 'someorg/photos': {reason}")):
        open_dataset("someorg/photos")


def test_a_missing_dataset_is_one_line_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    for source in (str(tmp_path / "nonexistent"), "./nonexistent", "someorg/not-in-the-cache"):
        with pytest.raises(ValueError, match=f"cannot open dataset '{re.escape(source)}'"):
            open_dataset(source)
