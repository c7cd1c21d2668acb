"""Scoring on Ray Data (`qualiclip_hf.scoring.ray_data`, `qualiclip score --dataset ... --engine ray`) on a local Ray
cluster of 2 CPUs: the scores of `score_files` on every input kind, the ids of the one-process path, corrupt rows,
fewer input files than actors, a killed actor, and a killed-then-resumed driver. The reference scores are those of
`score_files` on the same images saved as files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qualiclip_hf.scoring import score_files
from qualiclip_hf.scoring.dataset import open_dataset, read_scores, score_dataset

from .conftest import REPO_ROOT, image_bytes, photo

ray = pytest.importorskip("ray")

from qualiclip_hf.scoring.ray_data import (  # noqa: E402
    WORKER_SETUP_HOOK,
    QualiCLIPPredictor,
    decode_images,
    score_dataset_ray,
)

ATOL = 1e-5  # scores of one image in different batches differ by float rounding (tests/test_determinism.py)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local Ray of 2 CPUs for the whole file (no dashboard, no auth token in the home folder)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK},
    )
    # Small blocks, so that a few small files stream through the stages in many blocks as large data would.
    ray.data.DataContext.get_current().target_max_block_size = 4096
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    """Eight JPEG files of mixed sizes: the images of every input below."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(8):
        path = folder / f"photo_{index}.jpg"
        image = photo(int(rng.integers(40, 96)), int(rng.integers(40, 96)), seed=index)
        path.write_bytes(image_bytes(image, "JPEG", quality=90))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def file_scores(photo_files, demo) -> list[float]:
    model, processor = demo
    results = list(score_files(photo_files, model, processor, batch_size=1, num_workers=0))
    assert all(result.error is None for result in results)
    return [result.score for result in results]


def image_struct(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": None}


def write_parquet(rows: list[dict], folder: Path, files: int) -> Path:
    """`rows` (dicts of columns) split into `files` Parquet files, in order."""
    folder.mkdir(parents=True)
    per_file = -(-len(rows) // files)
    for index in range(files):
        chunk = rows[index * per_file : (index + 1) * per_file]
        pq.write_table(pa.Table.from_pylist(chunk), folder / f"data-{index:02d}.parquet")
    return folder


def scores_of(output: Path) -> pa.Table:
    """The Ray run's files, in name order (its inputs' order)."""
    return pa.concat_tables([pq.read_table(path) for path in sorted(output.glob("*.parquet"))])


def test_every_input_kind_gives_the_file_scores_and_the_one_process_ids(photo_files, file_scores, demo, tmp_path):
    junk = {"image": {"bytes": b"not an image", "path": None}}
    parquet = write_parquet([{"image": image_struct(p)} for p in photo_files] + [junk], tmp_path / "parquet", files=3)
    tars = tmp_path / "tars"
    tars.mkdir()
    for shard in range(2):
        with tarfile.open(tars / f"shard-{shard:03d}.tar", "w") as tar:
            for index in range(shard * 4, shard * 4 + 4):
                tar.add(photo_files[index], arcname=f"sample{index:04d}.jpg")
    folder = tmp_path / "images"
    folder.mkdir()
    for index, path in enumerate(photo_files):
        (folder / f"{index:02d}.jpg").write_bytes(path.read_bytes())

    cases = [
        ("parquet", parquet, [*range(9)], ["data-00.parquet", "data-01.parquet", "data-02.parquet"]),
        ("webdataset", tars, [f"sample{index:04d}" for index in range(8)], ["shard-000.parquet", "shard-001.parquet"]),
        ("images", folder, [*range(8)], ["images-000000.parquet", "images-000001.parquet"]),
    ]
    for name, source, ids, outputs in cases:
        output = tmp_path / "out" / name
        summary = score_dataset_ray(str(source), str(output), rows_per_file=5, batch_size=2, num_actors=1)
        assert sorted(path.name for path in output.glob("*.parquet")) == outputs, name
        table = scores_of(output)
        assert table.column("id").to_pylist() == ids, name
        scores, errors = table.column("quality_score").to_pylist(), table.column("error").to_pylist()
        np.testing.assert_allclose(scores[:8], file_scores, atol=ATOL, err_msg=name)
        assert errors[:8] == [None] * 8, name
        sizes = table.select(["height", "width"]).to_pylist()[:8]
        assert sizes == [{"height": p_h, "width": p_w} for p_w, p_h in (photo_size(p) for p in photo_files)], name
        assert (summary.rows, summary.failed) == (len(ids), len(ids) - 8), name
    # The corrupt row: no score, its error names the row and the cause; the others were scored.
    table = scores_of(tmp_path / "out" / "parquet")
    assert table.column("quality_score")[8].as_py() is None
    assert table.column("error")[8].as_py().startswith("row 8: ")

    # The one-process path on the same Parquet folder: the same columns and ids.
    model, processor = demo
    one = tmp_path / "one"
    score_dataset(open_dataset(str(parquet)), one, model, processor, batch_size=2, num_workers=0, progress=False)
    expected = read_scores(one)
    assert table.schema == expected.schema
    assert table.column("id").equals(expected.column("id"))
    assert table.column("error").to_pylist()[8].split(": ")[0] == expected.column("error").to_pylist()[8].split(": ")[0]


def photo_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_predictor_in_map_batches_passes_columns_through_with_fewer_files_than_actors(photo_files, file_scores, demo):
    # One Parquet file, two actors (half a CPU each on this 2-CPU cluster); the snippet, with the decode stage
    # in CPU tasks for the pyarrow run and decoding in the actors for the numpy run.
    rows = [{"id": f"p{index}", "image": image_struct(path), "note": index} for index, path in enumerate(photo_files)]
    source = write_parquet(rows, Path(str(photo_files[0].parent) + "-one-file"), files=1)
    for batch_format, decode_first in (("numpy", False), ("pyarrow", True)):
        ds = ray.data.read_parquet(str(source))
        if decode_first:
            ds = ds.map_batches(decode_images, batch_format="pyarrow", batch_size=3, num_cpus=0.25)
        ds = ds.map_batches(
            QualiCLIPPredictor,
            fn_constructor_kwargs={"model": "demo", "device": "cpu", "save_embeddings": True},
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=0.5,
            batch_size=3,
            batch_format=batch_format,
        )
        got = sorted(ds.take_all(), key=lambda row: row["note"])
        assert [row["id"] for row in got] == [row["id"] for row in rows], batch_format
        assert "__qualiclip_pixels" not in got[0], batch_format
        np.testing.assert_allclose([row["quality_score"] for row in got], file_scores, atol=ATOL, err_msg=batch_format)
        assert [row["quality_error"] for row in got] == [None] * 8, batch_format
        dim = demo[0].prompt_embeds.shape[-1]  # the space of the stored prompt embeddings
        assert all(np.asarray(row["image_embeds"]).shape == (dim,) for row in got), batch_format


def test_a_killed_actor_is_restarted_and_no_row_is_lost_or_duplicated(photo_files, file_scores, tmp_path):
    marker = tmp_path / "killed"

    class DiesOnce(QualiCLIPPredictor):
        # The first actor to score a batch dies as if killed (SIGKILL), taking its batch with it.
        def __call__(self, batch):
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    rows = [{"id": index, "image": image_struct(path)} for index, path in enumerate(photo_files)]
    ds = ray.data.from_items(rows, override_num_blocks=4).map_batches(
        DiesOnce,
        fn_constructor_kwargs={"model": "demo", "device": "cpu"},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=2,
        batch_format="pyarrow",
    )
    got = sorted(ds.take_all(), key=lambda row: row["id"])
    assert marker.exists()
    assert [row["id"] for row in got] == list(range(8))
    np.testing.assert_allclose([row["quality_score"] for row in got], file_scores, atol=ATOL)


SLOW_WRITES = """
import time
from qualiclip_hf.cli import main
from qualiclip_hf.scoring.ray_data import _OutputFolder
write_table = _OutputFolder.write_table
def slow_write_table(self, name, table):
    write_table(self, name, table)
    time.sleep(1.0)
_OutputFolder.write_table = slow_write_table
"""


def test_a_killed_driver_resumed_gives_the_uninterrupted_rows(photo_files, tmp_path):
    # 12 Parquet files of 4 rows (3 corrupt); the driver, a CLI process joined to this cluster, is killed with
    # SIGKILL once some outputs are written, then resumed: the same rows as a run never interrupted.
    values = [image_struct(photo_files[index % 8]) for index in range(45)] + [{"bytes": b"junk", "path": None}] * 3
    source = write_parquet([{"image": value} for value in values], tmp_path / "shards", files=12)
    uninterrupted = tmp_path / "uninterrupted"
    # Two actors on 2 CPUs: more slots than the cluster has unless the stages shrink theirs (they did hang).
    score_dataset_ray(str(source), str(uninterrupted), num_actors=2, batch_size=1)

    output = tmp_path / "killed"
    arguments = ["score", "--dataset", str(source), "--engine", "ray", "--model", "demo", "--output", str(output),
                 "--batch-size", "1", "--num-actors", "1"]  # fmt: skip
    # The CLI, its writes slowed to one a second so that the kill lands mid-run: scoring these small images takes
    # less time than this test takes to notice the first file.
    command = [sys.executable, "-c", SLOW_WRITES + f"raise SystemExit(main({arguments!r}))"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(output.glob("data-*.parquet")):
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written = sorted(path.name for path in output.glob("data-*.parquet"))
    assert 1 <= len(written) < 12, "the run ended before its driver was killed"
    assert not (output / ".manifest.json").exists()

    with pytest.raises(ValueError, match="already holds a run"):
        score_dataset_ray(str(source), str(output), num_actors=1, batch_size=1)
    with pytest.raises(ValueError, match="other settings"):
        score_dataset_ray(str(source), str(output), num_actors=1, batch_size=1, max_size=64, resume=True)
    score_dataset_ray(
        str(source), str(output), num_actors=1, batch_size=1, resume=True,
        settings={"dataset": str(source), "split": "train", "model": "demo"},
    )  # fmt: skip
    assert not list(output.glob(".*.tmp"))
    resumed, expected = scores_of(output), scores_of(uninterrupted)
    assert resumed.column("id").to_pylist() == list(range(48)) == expected.column("id").to_pylist()
    assert resumed.column("error").to_pylist() == expected.column("error").to_pylist()
    np.testing.assert_allclose(
        resumed.column("quality_score").to_numpy(zero_copy_only=False).astype(float),
        expected.column("quality_score").to_numpy(zero_copy_only=False).astype(float),
        atol=ATOL,
    )
    assert sum(error is not None for error in resumed.column("error").to_pylist()) == 3


def test_a_corrupt_value_in_a_user_pipeline_gets_its_error(photo_files):
    ds = ray.data.from_items([{"id": 7, "image": b"junk"}, {"id": 8, "image": photo_files[0].read_bytes()}])
    batch = decode_images(ds.take_batch(2, batch_format="pyarrow"))
    assert batch.column("quality_error").to_pylist()[0].startswith("row 7: ")
    assert batch.column("height").to_pylist()[0] is None and batch.column("height").to_pylist()[1] > 0


def test_importing_the_package_never_imports_ray():
    code = "import sys, qualiclip_hf, qualiclip_hf.cli, qualiclip_hf.scoring.dataset; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
