"""Scoring at cluster scale on Ray Data: a decode stage and a scoring actor pool for `Dataset.map_batches`, and
`qualiclip score --dataset ... --engine ray`.

Ray Data assigns the work, balances it between actors, retries the share of a worker that died and shows progress;
this module adds what is QualiCLIP's:

- [`decode_images`]: a CPU stage (Ray tasks) that reads each row's image with the project's reader
  (`image_reader.open_image_value`: ICC, EXIF, 16-bit and alpha rules, size limit), which Ray's own `read_images`
  does not apply;
- [`QualiCLIPPredictor`]: a callable class for an actor pool (`num_gpus=1` per actor on GPUs) that scores with the
  scoring core ([`score_images`]) and adds `quality_score`, `quality_error`, `height`, `width` (and `image_embeds`);
- [`score_dataset_ray`]: the whole run behind `--engine ray`: Parquet files, WebDataset shards, image folders or a Hub
  dataset in; one Parquet file out per input file (per `rows_per_file` images of a folder), written atomically, so
  that `resume=True` skips what is complete (img2dataset's and datatrove's grain).

```python
import ray
from qualiclip_hf.scoring.ray_data import QualiCLIPPredictor, decode_images

ds = ray.data.read_parquet("shards/")
ds = ds.map_batches(decode_images, batch_format="pyarrow")  # optional: decode in CPU tasks, apart from the model
ds = ds.map_batches(QualiCLIPPredictor, fn_constructor_kwargs={"model": "demo"},
                    compute=ray.data.ActorPoolStrategy(size=2), batch_size=32)
ds.write_parquet("scores/")
```

Needs the `[ray]` extra (`ray[data]`); importing `qualiclip_hf` never imports Ray.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from ..image_reader import DEFAULT_MAX_PIXELS
from .core import DecodedImage, score_images
from .dataset import KEY_COLUMNS, RUN_FILE, SUMMARY_FILE, _schema, decode_values

__all__ = [
    "PIXELS_COLUMN",
    "WORKER_SETUP_HOOK",
    "QualiCLIPPredictor",
    "RayScoringSummary",
    "decode_images",
    "score_dataset_ray",
    "start_ray",
]

# The decoded `(height, width, 3)` uint8 pixels of a row, as raw bytes (`height` and `width` give the shape), from
# `decode_images` to `QualiCLIPPredictor`, which drops it. Large binary: a batch of big images passes 2 GiB.
PIXELS_COLUMN = "__qualiclip_pixels"


def _mark_http_filesystem_missing() -> None:
    """
    Ray 2.60 lists files from several threads, each importing fsspec's HTTP filesystem, and takes "not installed"
    (ModuleNotFoundError, without aiohttp) for "not HTTP"; but a thread racing another's failing import gets a plain
    ImportError, which fails the whole read (seen with 8 and 12 Parquet files). Where the module cannot be imported,
    it is marked as missing once, so that every later import fails the same way: at import of this module (the
    driver), and in each Ray worker as its setup hook ([`start_ray`]). Installing aiohttp (the `[ray]` extra) makes
    the import succeed instead.
    """
    try:
        import fsspec.implementations.http  # noqa: F401
    except ImportError:
        sys.modules.setdefault("fsspec.implementations.http", None)


_mark_http_filesystem_missing()
# What each Ray worker runs first (`runtime_env`'s `worker_process_setup_hook`, set by `start_ray`).
WORKER_SETUP_HOOK = f"{__name__}._mark_http_filesystem_missing"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


# ------------------------------------------------------------------------------------------------- batch helpers


def _columns(batch: pa.Table | dict[str, np.ndarray]) -> list[str]:
    return batch.column_names if isinstance(batch, pa.Table) else list(batch)


def _values(batch: pa.Table | dict[str, np.ndarray], column: str) -> list[Any]:
    return batch.column(column).to_pylist() if isinstance(batch, pa.Table) else list(batch[column])


def _num_rows(batch: pa.Table | dict[str, np.ndarray]) -> int:
    return batch.num_rows if isinstance(batch, pa.Table) else len(next(iter(batch.values()), []))


def _labels(batch: pa.Table | dict[str, np.ndarray], label_column: str | None) -> list[str]:
    # As the one-process path names rows: "row ID".
    if label_column is not None and label_column in _columns(batch):
        return [f"row {value}" for value in _values(batch, label_column)]
    return ["image"] * _num_rows(batch)


def _with_columns(batch: pa.Table | dict[str, np.ndarray], columns: dict[str, pa.Array], drop: Sequence[str]) -> Any:
    """`batch` less `drop` and the names of `columns`, plus `columns`; a table stays a table, a dict a dict."""
    if isinstance(batch, pa.Table):
        table = batch.drop_columns([name for name in batch.column_names if name in drop or name in columns])
        for name, array in columns.items():
            table = table.append_column(name, array)
        return table
    out = {name: array for name, array in batch.items() if name not in drop and name not in columns}
    for name, array in columns.items():
        if array.null_count:
            # An object array of Python values (None where null), which Ray turns back into Arrow.
            out[name] = np.empty(len(array), object)
            for index, value in enumerate(array.to_pylist()):
                out[name][index] = value
        elif pa.types.is_fixed_size_list(array.type):  # embeddings: a (B, D) array
            out[name] = array.flatten().to_numpy().reshape(len(array), array.type.list_size)
        else:
            out[name] = array.to_numpy(zero_copy_only=False)
    return out


# ------------------------------------------------------------------------------------------------------ decoding


def decode_images(
    batch: pa.Table | dict[str, np.ndarray],
    image_column: str = "image",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    label_column: str | None = "id",
    drop_image_column: bool = False,
) -> pa.Table | dict[str, np.ndarray]:
    """
    The decode stage: reads each row's image with the project's reader, for a later [`QualiCLIPPredictor`].

    Run it as Ray tasks on CPUs (`ds.map_batches(decode_images, fn_kwargs={...}, batch_format="pyarrow")`), so that
    decoding scales apart from the scoring actors and never holds a GPU.

    Args:
        batch: Rows with an image column of image bytes, `{"bytes", "path"}` structs (Parquet exports of `datasets`
            image datasets) or local paths.
        image_column: The column that holds the images.
        max_pixels: Refuse images of more pixels before decoding them (default: Pillow's limit; `None`: no limit).
        label_column: The column that names rows in error messages (`row ID`), when present.
        drop_image_column: Drop the encoded images once decoded (the scores need only the pixels).

    Returns:
        The batch with `PIXELS_COLUMN` (raw `(height, width, 3)` uint8 bytes, null where the image could not be
        decoded), `height`, `width` (int32, null on error) and `quality_error` (null, or the cause naming the row).

    Raises:
        KeyError: when the batch has no `image_column`, naming the columns it has.
    """
    if image_column not in _columns(batch):
        raise KeyError(f"no image column {image_column!r}; the columns are {', '.join(_columns(batch))}")
    decoded = decode_values(_values(batch, image_column), _labels(batch, label_column), max_pixels)
    arrays = [None if isinstance(image, str) else image for image in decoded]
    columns = {
        PIXELS_COLUMN: pa.array([None if a is None else a.tobytes() for a in arrays], pa.large_binary()),
        "height": pa.array([None if a is None else a.shape[0] for a in arrays], pa.int32()),
        "width": pa.array([None if a is None else a.shape[1] for a in arrays], pa.int32()),
        "quality_error": pa.array([image if isinstance(image, str) else None for image in decoded], pa.string()),
    }
    return _with_columns(batch, columns, [image_column] if drop_image_column else [])


def _decoded_images(batch: pa.Table | dict[str, np.ndarray]) -> list[DecodedImage]:
    """The images of a batch that went through [`decode_images`]: arrays, or the decode errors."""
    pixels, errors = _values(batch, PIXELS_COLUMN), _values(batch, "quality_error")
    heights, widths = _values(batch, "height"), _values(batch, "width")
    return [
        error if data is None else np.frombuffer(bytearray(data), np.uint8).reshape(int(height), int(width), 3)
        for data, error, height, width in zip(pixels, errors, heights, widths, strict=True)
    ]


# ------------------------------------------------------------------------------------------------------- scoring


class QualiCLIPPredictor:
    """
    A callable class for `ray.data.Dataset.map_batches` that adds the QualiCLIP score of each row's image; each actor
    of the pool loads the model once.

    ```python
    ds = ds.map_batches(QualiCLIPPredictor, fn_constructor_kwargs={"model": "demo"},
                        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=32)
    ```

    Rows that went through [`decode_images`] are scored from their pixels; other rows are decoded here first (with
    the same reader). Every column passes through (`id` above all), except the decoded pixels, and these are added:
    `quality_score` (float32 in [0, 1], higher is better; null where the image could not be scored), `quality_error`
    (null, or the cause naming the row), `height`, `width` (int32: the decoded size, before `max_size`), and with
    `save_embeddings=True` `image_embeds` (normalised; 1024 float32 for the official model). A row that cannot be
    read or scored gets its error and the others are scored.

    Args:
        model: A model name (`"demo"`, `"official"`, a folder, a Hub id), as `qualiclip score --model`.
        image_column: The column of images (when not decoded by [`decode_images`]).
        device: Where to run the model (default: CUDA when the actor has a GPU, else the CPU).
        precision: `"fp32"` (default), `"auto"`, `"bf16"` or `"fp16"`, as `qualiclip score --precision` (PyTorch).
        max_size: Downscale images whose longest side exceeds this many pixels (default: full resolution).
        max_pixels: Refuse images of more pixels before decoding them (default: Pillow's limit; `None`: no limit).
        save_embeddings: Also add the `image_embeds` column.
        label_column: The column that names rows in error messages (`row ID`), when present.
        num_threads: PyTorch threads on a CPU (default: the CPUs Ray gave this actor, at least 1).
    """

    def __init__(
        self,
        model: str = "demo",
        image_column: str = "image",
        device: str | None = None,
        precision: str = "fp32",
        max_size: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        save_embeddings: bool = False,
        label_column: str | None = "id",
        num_threads: int | None = None,
    ) -> None:
        import torch

        from ..backends.precision import prepare_scorer
        from ..loading import load_model_and_processor
        from .resources import choose_thread_counts

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cpu":
            # Ray has already shared the cores out between actors: this actor's share is not competed for.
            torch.set_num_threads(num_threads or choose_thread_counts(cores=_assigned_cpus(), load=0)[1])
        scorer, processor = load_model_and_processor(model, device)
        # Bulk scoring, as `qualiclip score` on files and datasets (fuse: BatchNorm folded, CPU chunks in fp32).
        self.scorer, self.precision = prepare_scorer(scorer.eval(), processor, precision, fuse=True)
        self.processor = processor
        self.image_column = image_column
        self.max_size = max_size
        self.max_pixels = max_pixels
        self.save_embeddings = save_embeddings
        self.label_column = label_column
        self.embed_dim = int(scorer.prompt_embeds.shape[-1])

    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> pa.Table | dict[str, np.ndarray]:
        """
        Scores a batch of rows (a `pyarrow.Table` or a dict of numpy arrays; the same kind comes back).

        Raises:
            KeyError: when the batch has neither decoded pixels nor `image_column`, naming the columns it has.
        """
        labels = _labels(batch, self.label_column)
        if PIXELS_COLUMN in _columns(batch):
            images = _decoded_images(batch)
        elif self.image_column in _columns(batch):
            images = decode_values(_values(batch, self.image_column), labels, self.max_pixels)
        else:
            raise KeyError(
                f"no image column {self.image_column!r}; the columns are {', '.join(_columns(batch))} "
                "(QualiCLIPPredictor(..., image_column=NAME))"
            )
        outcomes = score_images(images, self.scorer, self.processor, labels, self.max_size, self.save_embeddings)
        columns = {
            "quality_score": pa.array([outcome.score for outcome in outcomes], pa.float32()),
            "quality_error": pa.array([outcome.error for outcome in outcomes], pa.string()),
            "height": pa.array([outcome.height for outcome in outcomes], pa.int32()),
            "width": pa.array([outcome.width for outcome in outcomes], pa.int32()),
        }
        if self.save_embeddings:
            embeds = [outcome.image_embeds for outcome in outcomes]
            columns["image_embeds"] = pa.array(embeds, pa.list_(pa.float32(), self.embed_dim))
        return _with_columns(batch, columns, [PIXELS_COLUMN])


def _assigned_cpus() -> int:
    """The whole CPUs Ray gave this actor (at least 1; a fractional share counts as 1)."""
    import ray

    if not ray.is_initialized():  # not in a Ray worker (asking would start a Ray)
        return 1
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))


# ------------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Input:
    """One output file's worth of input: a Parquet file, a `.tar` shard, or a group of image files."""

    index: int  # its place among the source's inputs (the shard of "SHARD/ROW" ids)
    name: str  # the output file's name, after the input's
    paths: tuple[str, ...]  # as Ray reports them in its `path` column
    first_row: int | None  # the global index of its first row (ids of a prepared dataset), else None


@dataclass(frozen=True)
class _Source:
    kind: str  # "parquet", "webdataset" or "images"
    inputs: list[_Input]
    filesystem: Any  # a pyarrow or fsspec filesystem, or None for the local one
    streamed: bool  # ids as a streamed `datasets` dataset gives them ("FILE/ROW")


def _resolve_source(source: str, split: str, rows_per_file: int, streaming: bool | None) -> _Source:
    """
    The input files of `source` in the order `datasets` reads them: a local folder or file and a Hub id through
    `datasets.load_dataset_builder` (the one-process path's rules), an object store URI (`s3://`, `gs://`, ...) by
    listing it with PyArrow.

    Raises:
        ValueError: when the source cannot be listed, holds no Parquet, `.tar` or image files, or holds Arrow files.
    """
    import pyarrow.fs as pafs

    filesystem = None
    if "://" in source and not source.startswith("hf://"):
        try:
            filesystem, root = pafs.FileSystem.from_uri(source)
            infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot list {source!r}: {error}") from None
        files = sorted(info.path for info in infos if info.type == pafs.FileType.File)
        streamed = True if streaming is None else streaming
    else:
        import datasets

        local = os.path.exists(source)
        if not local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
            raise ValueError(f"cannot open dataset {source!r}: no such file or folder")
        try:
            builder = datasets.load_dataset_builder(source)
            files = [str(path) for path in builder.config.data_files[split]]
        except (FileNotFoundError, ValueError, KeyError, ConnectionError) as error:
            raise ValueError(f"cannot open dataset {source!r} (split {split!r}): {error}") from None
        if not local:
            from huggingface_hub import HfFileSystem

            filesystem = HfFileSystem()
            files = [path.removeprefix("hf://") for path in files]
        streamed = (not local) if streaming is None else streaming
    suffixes = {PurePosixPath(path).suffix.lower() for path in files}
    if ".arrow" in suffixes:
        raise ValueError(
            f"{source}: Arrow files are read by --engine local only; --engine ray reads Parquet, .tar, images"
        )
    kinds = {"parquet": {".parquet"}, "webdataset": {".tar"}, "images": set(IMAGE_SUFFIXES)}
    kind = next((kind for kind, wanted in kinds.items() if suffixes & wanted), None)
    chosen = [path for path in files if kind and PurePosixPath(path).suffix.lower() in kinds[kind]]
    if kind is None:
        raise ValueError(f"{source}: no Parquet, WebDataset .tar or image files to score (split {split!r})")
    return _Source(kind, _inputs(kind, chosen, filesystem, rows_per_file, streamed), filesystem, streamed)


def _inputs(kind: str, files: list[str], filesystem: Any, rows_per_file: int, streamed: bool) -> list[_Input]:
    if kind == "images":
        # One row per file: `rows_per_file` files make one output.
        groups = [files[start : start + rows_per_file] for start in range(0, len(files), rows_per_file)]
        return [
            _Input(index, f"images-{index:06d}.parquet", tuple(group), index * rows_per_file)
            for index, group in enumerate(groups)
        ]
    root = os.path.commonpath(files) if len(files) > 1 else str(PurePosixPath(files[0]).parent)
    names = [
        str(PurePosixPath(os.path.relpath(path, root)).with_suffix(".parquet")).replace("/", "--") for path in files
    ]
    first_rows: list[int | None] = [None] * len(files)
    if kind == "parquet" and not streamed:
        # A prepared dataset's ids are global row indices: each file starts after the rows of those before it.
        import pyarrow.parquet as pq

        counts = [pq.ParquetFile(path, filesystem=filesystem).metadata.num_rows for path in files]
        first_rows = [int(sum(counts[:index])) for index in range(len(files))]
    return [
        _Input(index, name, (path,), first)
        for index, (name, path, first) in enumerate(zip(names, files, first_rows, strict=True))
    ]


def _image_column_of(source: _Source, requested: str | None) -> str:
    """The image column: `requested`, else the Parquet files' only `datasets` Image column or `image`, else the
    first image suffix of a WebDataset shard, else (an image folder) Ray's `bytes`."""
    if source.kind == "images":
        return "bytes"
    if requested is not None:
        return requested
    first = source.inputs[0].paths[0]
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(first, filesystem=source.filesystem)
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
        images = [
            name for name, feature in features.items() if isinstance(feature, dict) and feature.get("_type") == "Image"
        ]
        if len(images) == 1:
            return images[0]
        if "image" in schema.names:
            return "image"
        raise ValueError(
            f"cannot tell which column holds the images (columns: {', '.join(schema.names)}); "
            "name it with --image-column"
        )
    import tarfile

    if source.filesystem is None:
        opened = open(first, "rb")  # noqa: SIM115
    elif hasattr(source.filesystem, "open_input_stream"):  # PyArrow's (object stores)
        opened = source.filesystem.open_input_stream(first)
    else:  # fsspec's (the Hub)
        opened = source.filesystem.open(first, "rb")
    with opened as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            suffix = PurePosixPath(member.name).name.partition(".")[2].lower()
            if "." + suffix.rsplit(".", 1)[-1] in IMAGE_SUFFIXES:
                return suffix
    raise ValueError(f"{first}: no image member (.jpg, .png, ...) in the shard; name the column with --image-column")


# ----------------------------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class _Plan:
    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float


def _plan(cluster_cpus: float, cluster_gpus: float, use_gpus: bool, actors: int | None) -> _Plan:
    """
    How many scoring actors, and the CPU slots of each stage, so that they fit the cluster.

    On GPUs: one actor per GPU; on CPUs: one per core, less one core in eight (at least one) left to decoding, which
    is about ten times as fast per core as the model (`benchmarks/RESULTS.md`). Stages that ask for more slots than
    the cluster has wait for each other for ever (seen with 2 CPUs: two 1-CPU actors, and Ray Data's own 1-CPU
    file-listing task never started). So one whole CPU is always left beside the actors, for listing, reading and
    decoding; when the actors do not fit in the rest, their slots shrink to fractions that do.
    """
    if use_gpus:
        actors = actors or max(1, int(cluster_gpus))
    else:
        actors = actors or max(1, int(cluster_cpus) - max(1, int(cluster_cpus) // 8))
    actor_cpus = 1.0
    if actors * actor_cpus + 1.0 > cluster_cpus:
        actor_cpus = max(cluster_cpus - 1.0, cluster_cpus / 2) / actors
    decode_cpus = min(1.0, cluster_cpus - actors * actor_cpus)
    # A decode task asks for a hair less than an actor: Ray Data fuses stages of equal resources (see the caller).
    return _Plan(actors, round(actor_cpus, 3), 1.0 if use_gpus else 0.0, round(decode_cpus * 0.999, 3))


def start_ray(num_cpus: int | None = None) -> bool:
    """
    Connects to the cluster of `RAY_ADDRESS` when set (`auto`, `ray://HOST:10001`, ...), else starts a local Ray with
    this machine's usable cores (no dashboard, no auth token written to the home folder). Returns whether this call
    started or joined Ray (and so should shut it down), `False` when Ray was already initialised.
    """
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=False)
        return True
    from .resources import usable_cores

    # A local cluster for this run only: Ray 2.60 otherwise writes an auth token under the home folder.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus or usable_cores(), include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    return True


# ------------------------------------------------------------------------------------------------------- writing


class _OutputFolder:
    """The output folder, local or in an object store, through a PyArrow filesystem; files written atomically."""

    def __init__(self, output: str) -> None:
        import pyarrow.fs as pafs

        if "://" in output:
            self.fs, self.root = pafs.FileSystem.from_uri(output)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(output)
        self.fs.create_dir(self.root, recursive=True)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def names(self) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [PurePosixPath(info.path).name for info in infos]

    def read_json(self, name: str) -> dict:
        with self.fs.open_input_stream(self.path(name)) as stream:
            return json.loads(stream.read().decode("utf-8"))

    def write_json(self, name: str, content: dict) -> None:
        self._atomic(name, lambda path: self._write_bytes(path, (json.dumps(content, indent=2) + "\n").encode()))

    def write_table(self, name: str, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        self._atomic(name, lambda path: pq.write_table(table, path, filesystem=self.fs))

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def _atomic(self, name: str, write: Any) -> None:
        # A temporary name in the same folder, then a rename: a reader (or a resumed run) sees the whole file or none.
        # On object stores the move is a copy of a complete object, which appears at once.
        temporary = self.path(f".{name}.tmp")
        write(temporary)
        self.fs.move(temporary, self.path(name))


class _Writer:
    """
    Gathers the scored rows, which arrive in input order (`preserve_order`), and writes each input's output file as
    soon as its last row is in: the driver holds at most one input's scores, whatever the number of rows.
    """

    def __init__(
        self, folder: _OutputFolder, inputs: list[_Input], source: _Source, id_column: str | None, embed_dim: int | None
    ) -> None:
        self.folder, self.inputs, self.source = folder, inputs, source
        self.id_column, self.embed_dim = id_column, embed_dim
        self.by_path = {_path_key(path): index for index, item in enumerate(inputs) for path in item.paths}
        self.current = 0
        self.pending: list[pa.Table] = []
        self.rows = 0

    def add(self, batch: pa.Table) -> None:
        paths = batch.column("path").to_pylist()
        start = 0
        for end in range(1, len(paths) + 1):
            if end == len(paths) or self._index(paths[end]) != self._index(paths[start]):
                self._add_run(self._index(paths[start]), batch.slice(start, end - start))
                start = end

    def finish(self) -> None:
        self._flush_until(len(self.inputs))

    def _index(self, path: str) -> int:
        try:
            return self.by_path[_path_key(path)]
        except KeyError:
            raise RuntimeError(f"Ray returned rows of {path!r}, which is not an input of this run") from None

    def _add_run(self, index: int, rows: pa.Table) -> None:
        self._flush_until(index)
        self.pending.append(rows)
        self.rows += rows.num_rows

    def _flush_until(self, index: int) -> None:
        # Inputs before `index` are complete (an input with no rows yields an empty file).
        while self.current < index:
            self.folder.write_table(self.inputs[self.current].name, self._table(self.inputs[self.current]))
            self.pending = []
            self.current += 1

    def _table(self, item: _Input) -> pa.Table:
        rows = pa.concat_tables(self.pending) if self.pending else None
        count = rows.num_rows if rows is not None else 0
        if self.id_column is not None:
            ids = rows.column(self.id_column).combine_chunks() if rows is not None else pa.array([], pa.string())
        elif item.first_row is not None and not self.source.streamed:
            ids = pa.array(range(item.first_row, item.first_row + count), pa.int64())
        else:
            # As a streamed `datasets` dataset numbers rows: "SHARD/ROW", the shard being the input file.
            ids = pa.array([f"{item.index}/{row}" for row in range(count)], pa.string())
        columns = {
            name: (rows.column(name).combine_chunks() if rows is not None else pa.array([], pa.null()))
            for name in ("quality_score", "quality_error", "height", "width")
        }
        errors = columns["quality_error"].to_pylist()
        if self.id_column is None:
            # Workers could only say "image": the row's id is known here, where rows arrive in order.
            errors = [
                None if e is None else f"row {key}: {e.removeprefix('image: ')}" if e.startswith("image: ") else e
                for e, key in zip(errors, ids.to_pylist(), strict=True)
            ]
        arrays = [ids, columns["quality_score"], pa.array(errors, pa.string()), columns["height"], columns["width"]]
        if self.embed_dim is not None:
            arrays.append(
                rows.column("image_embeds").combine_chunks()
                if rows is not None
                else pa.array([], pa.list_(pa.float32(), self.embed_dim))
            )
        schema = _schema(ids.type, self.embed_dim)
        return pa.Table.from_arrays(
            [array.cast(field.type) for array, field in zip(arrays, schema, strict=True)], schema=schema
        )


def _path_key(path: str) -> str:
    # Ray reports local paths as given, object-store paths without their scheme.
    return os.path.normpath(path.split("://", 1)[-1])


# ------------------------------------------------------------------------------------------------------- running


@dataclass
class RayScoringSummary:
    """
    What [`score_dataset_ray`] did: `rows` in the output (all runs), of which `failed` have an error; `rows_this_run`
    and `seconds` of this run (`images_per_second` = their ratio), with `actors` scoring actors.
    """

    rows: int
    failed: int
    rows_this_run: int
    seconds: float
    actors: int
    output: str

    @property
    def images_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0


def score_dataset_ray(
    source: str,
    output: str,
    model: str = "demo",
    split: str = "train",
    image_column: str | None = None,
    id_column: str | None = None,
    streaming: bool | None = None,
    rows_per_file: int = 10_000,
    batch_size: int | None = None,
    num_actors: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    max_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    save_embeddings: bool = False,
    resume: bool = False,
    settings: dict | None = None,
) -> RayScoringSummary:
    """
    Scores a dataset on Ray Data into one Parquet file per input file, with the columns and ids of the one-process
    path ([`score_dataset`](qualiclip_hf.scoring.dataset.score_dataset)): `id`, `quality_score`, `error`, `height`,
    `width` (and `image_embeds`). Runs on the cluster of `RAY_ADDRESS`, else on a local Ray started for the run (see
    [`start_ray`]), or in the Ray already initialised.

    Images are decoded by Ray tasks on CPUs ([`decode_images`]) and scored by an actor pool ([`QualiCLIPPredictor`];
    one GPU per actor when `device` is CUDA or auto on a cluster with GPUs); Ray restarts a dead actor and runs its
    batches again. The rows come back to this process in input order, and each input's file is written (atomically)
    as soon as its last row is in, so that a run killed at any moment and resumed ends with the same files as one
    never interrupted.

    Args:
        source: A local folder or file (Parquet, WebDataset `.tar` shards, images), an object-store folder
            (`s3://bucket/shards/`, read with PyArrow), or a Hub dataset id (read through `hf://`).
        output: The folder to write (local or `s3://...`); empty or absent unless `resume`.
        split: The split of a local folder or Hub dataset (`datasets`' file patterns decide which files).
        image_column: As `score_dataset` (a WebDataset shard's column is its image suffix, `jpg` say).
        id_column: As `score_dataset`; default: WebDataset's `__key__`, else the row index (`FILE/ROW` when
            streamed: Hub ids, object stores, `streaming=True`).
        streaming: Number rows as a streamed dataset does (default: for Hub ids and object stores).
        rows_per_file: Images of a folder per output file.
        batch_size: Images per forward pass (default: `default_batch_size` of the device).
        num_actors: Scoring actors (default: one per GPU, or on CPUs one per core less one in eight for decoding).
        device: `"auto"` (GPUs when the cluster has some), `"cuda"` or `"cpu"`.
        precision, max_size, max_pixels, save_embeddings: As `qualiclip score`.
        resume: Keep the complete output files of a stopped run and score the other inputs; the settings must match.
        settings: Extra settings recorded in `.run.json` and checked on resume.

    Returns:
        The [`RayScoringSummary`].

    Raises:
        ValueError: for a source that cannot be read, an output folder holding another run, or changed settings on
            resume.
    """
    import ray

    from .resources import default_batch_size

    resolved = _resolve_source(source, split, rows_per_file, streaming)
    image_column = _image_column_of(resolved, image_column)
    if id_column is None and resolved.kind == "webdataset":
        id_column = KEY_COLUMNS[0]
    folder = _OutputFolder(output)
    run = {
        **(settings or {}),
        "engine": "ray",
        "image_column": image_column,
        "id_column": id_column,
        "rows_per_file": rows_per_file,
        "max_size": max_size,
        "max_pixels": max_pixels,
        "precision": precision,
        "save_embeddings": save_embeddings,
        "inputs": [item.name for item in resolved.inputs],
    }
    _start_run(folder, run, resume)
    pending = [item for item in resolved.inputs if not folder.exists(item.name)]
    if not pending:  # a complete run resumed: nothing for Ray to do
        return _summarize(folder, resolved.inputs, 0, 0.0, 0)

    started_ray = start_ray()
    try:
        cluster = ray.cluster_resources()
        use_gpus = device == "cuda" or (device == "auto" and cluster.get("GPU", 0) > 0)
        if device == "cuda" and cluster.get("GPU", 0) == 0:
            raise ValueError("--device cuda was asked for, but the Ray cluster has no GPU")
        plan = _plan(cluster.get("CPU", 1.0), cluster.get("GPU", 0.0), use_gpus, num_actors)
        batch_size = batch_size or default_batch_size("cuda" if use_gpus else "cpu")
        writer = None
        started = time.perf_counter()
        dataset = _read(resolved, pending, image_column, id_column, plan.decode_cpus)
        dataset = dataset.map_batches(
            decode_images,
            fn_kwargs={"image_column": image_column, "max_pixels": max_pixels, "label_column": id_column,
                       "drop_image_column": True},
            batch_format="pyarrow",
            batch_size=batch_size,
            # Fewer CPU slots than an actor's (see `_plan`): Ray Data fuses stages of equal resources, and fused
            # into the scoring actors, decoding would take turns with the model instead of running beside it.
            num_cpus=plan.decode_cpus,
        )  # fmt: skip
        dataset = dataset.map_batches(
            QualiCLIPPredictor,
            fn_constructor_kwargs={
                "model": model, "device": "cuda" if use_gpus else "cpu", "precision": precision,
                "max_size": max_size, "max_pixels": max_pixels, "save_embeddings": save_embeddings,
                "label_column": id_column,
            },
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.actor_cpus,
            num_gpus=plan.actor_gpus,
            batch_size=batch_size,
            batch_format="pyarrow",
        )  # fmt: skip
        # Rows in input order, so that each input's rows come back together and its file can be written at once.
        dataset.context.execution_options.preserve_order = True
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None:
                embed_dim = batch.schema.field("image_embeds").type.list_size if save_embeddings else None
                writer = _Writer(folder, pending, resolved, id_column, embed_dim)
            writer.add(batch)
        if writer is None:  # no rows at all: empty files
            writer = _Writer(folder, pending, resolved, id_column, None)
        writer.finish()
        seconds = time.perf_counter() - started
    finally:
        if started_ray:
            ray.shutdown()
    return _summarize(folder, resolved.inputs, writer.rows, seconds, plan.actors)


def _read(source: _Source, pending: list[_Input], image_column: str, id_column: str | None, num_cpus: float) -> Any:
    """
    The pending inputs as a Ray dataset with a `path` column, read by Ray's own readers (image bytes undecoded), in
    tasks of `num_cpus` slots (the decode stage's, into which Ray fuses them).
    """
    import ray

    paths = [path for item in pending for path in item.paths]
    options = {"filesystem": source.filesystem, "include_paths": True, "num_cpus": num_cpus}
    if source.kind == "parquet":
        columns = [image_column] + ([id_column] if id_column else [])
        return ray.data.read_parquet(paths, **options).select_columns(["path", *columns])
    if source.kind == "webdataset":
        dataset = ray.data.read_webdataset(paths, decoder=None, **options)
        return dataset.select_columns(["path", image_column] + ([id_column] if id_column else []))
    return ray.data.read_binary_files(paths, **options)


def _start_run(folder: _OutputFolder, run: dict, resume: bool) -> None:
    """Refuses an output folder that holds another run, or this run with other settings; records a new run."""
    if folder.exists(RUN_FILE):
        stored = folder.read_json(RUN_FILE)
        if not resume:
            raise ValueError(f"{folder.root} already holds a run; pass --resume to finish it, or use a new folder")
        if stored != json.loads(json.dumps(run)):
            changed = sorted(key for key in set(stored) | set(run) if stored.get(key) != run.get(key))
            raise ValueError(
                f"{folder.root} holds a run with other settings ({', '.join(changed)}); resume it with its settings, "
                "or use a new folder"
            )
    elif folder.names():
        raise ValueError(f"{folder.root} is not empty and holds no run ({RUN_FILE}); use an empty or new folder")
    else:
        folder.write_json(RUN_FILE, run)


def _summarize(folder: _OutputFolder, inputs: list[_Input], rows_this_run: int, seconds: float, actors: int) -> Any:
    import pyarrow.parquet as pq

    rows = failed = 0
    for item in inputs:
        errors = pq.read_table(folder.path(item.name), columns=["error"], filesystem=folder.fs).column("error")
        rows += len(errors)
        failed += len(errors) - errors.null_count
    folder.write_json(
        SUMMARY_FILE, {"complete": True, "rows": rows, "failed": failed, "parts": [i.name for i in inputs]}
    )
    return RayScoringSummary(rows, failed, rows_this_run, seconds, actors, folder.root)


# ------------------------------------------------------------------------------------------------- command line
