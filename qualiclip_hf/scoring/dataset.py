"""Scoring whole `datasets` datasets in one process: one column for `datasets.map`, or resumable Parquet files.

Two entry points:

- [`QualityScorer`]: a callable for `dataset.map(scorer, batched=True)` that adds `quality_score` and
  `quality_error` columns.
- [`score_dataset`] (and `qualiclip score --dataset`): scores a dataset into Parquet files under an output folder,
  in this process, resumable after a crash.

Many processes, GPUs or machines: `qualiclip score --dataset ... --engine ray` (`qualiclip_hf.scoring.ray_data`), where
Ray Data assigns the work, balances it, retries a failed worker's share and reports progress.

How the work is cut, and why. The dataset is divided into *units*: a streamed (iterable) dataset's units are its
shards (files), a map-style dataset's units are contiguous blocks of at most `rows_per_file` rows. Each unit is read
with `datasets.distributed.split_dataset_by_node(dataset, rank=unit, world_size=num_units)`. Each unit is written as
`part-UUUUUU-KKKKKK.parquet` files of `rows_per_file` rows, each written to a temporary name and renamed, and a
`.manifest/unit-UUUUUU.json` marks the unit complete. Since names, row order and batch boundaries depend only on the
dataset, the files in name order are the dataset's rows in order, and a run killed at any moment and resumed
(`resume=True`, `--resume`) ends with the same files as one never interrupted.

The run's bookkeeping (`.run.json`, `.manifest/`, `.manifest.json`) has names that start with a dot, so
that the folder reads as one Parquet dataset: `pyarrow.parquet.read_table(folder)`, `pandas.read_parquet(folder)` and
`datasets.load_dataset("parquet", data_dir=folder)` skip hidden files (pyarrow also those starting with `_`, datasets
does not). A folder written under the previous names (`run.json`, `manifest/`, `manifest.json`) is read, and its
files are renamed when it is resumed.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..image_reader import DEFAULT_MAX_PIXELS, open_image_value
from ..modeling_qualiclip import QualiCLIPModel
from ..processing_qualiclip import QualiCLIPProcessor
from .core import DecodedImage, ImageScore, score_images
from .resources import choose_thread_counts, default_batch_size, usable_cores

__all__ = ["DatasetScoringSummary", "QualityScorer", "open_dataset", "read_scores", "score_dataset"]

# Columns a dataset carries as its own row key (WebDataset's sample key); the first one present is the default id.
KEY_COLUMNS = ("__key__",)
RUN_FILE = ".run.json"
MANIFEST_DIR = ".manifest"
SUMMARY_FILE = ".manifest.json"
# The previous version's names, which readers of the folder took for data files: read, and renamed on resume (the
# run file last, so that a rename cut short is done again).
_OLD_RUN_FILE, _OLD_SUMMARY_FILE, _OLD_PROGRESS_DIR = "run.json", "manifest.json", "_progress"
_OLD_NAMES = {"manifest": MANIFEST_DIR, _OLD_SUMMARY_FILE: SUMMARY_FILE, _OLD_RUN_FILE: RUN_FILE}


# ------------------------------------------------------------------------------------------------------ decoding


def decode_values(values: Sequence[Any], labels: Sequence[str], max_pixels: int | None) -> list[DecodedImage]:
    """
    Decodes a batch of image-column values with the project's reader (`image_reader.open_image_value`), in a worker
    process or a Ray task: `(height, width, 3)` uint8 arrays, or error messages naming each value's label.
    """
    decoded: list[DecodedImage] = []
    for value, label in zip(values, labels, strict=True):
        try:
            decoded.append(np.array(open_image_value(value, max_pixels)))  # a writable copy, for torch
        except ValueError as error:
            decoded.append(f"{label}: {error}")
    return decoded


# --------------------------------------------------------------------------------------------------- scoring rows


class QualityScorer:
    """
    A callable for `datasets.Dataset.map(scorer, batched=True)` that adds the QualiCLIP score of each row's image.

    Example:

    ```python
    ds = load_dataset("imagefolder", data_dir="photos", split="train")
    ds = ds.map(QualityScorer("demo"), batched=True, batch_size=32)
    good = ds.filter(lambda row: row["quality_score"] is not None and row["quality_score"] >= 0.6)
    ```

    Added columns: `quality_score` (float in [0, 1], higher is better; `None` where the image could not be scored)
    and `quality_error` (`None`, or the cause naming the row, with `with_indices=True`, or the file). With
    `save_embeddings=True`, also `image_embeds` (1024 floats for the official model, normalised).

    The image column may hold decoded images, `Image(decode=False)` values, image bytes or local paths; they are read
    by the project's image reader, as `qualiclip score` reads files. A row that cannot be read or scored gets its
    error and the others are scored. For scoring a whole dataset to files, resumably, see [`score_dataset`]; with many
    processes or machines, `qualiclip_hf.scoring.ray_data`.

    Args:
        model: A model name (`"demo"`, `"official"`, a folder, a Hub id) or a loaded [`QualiCLIPModel`].
        processor: The processor, when `model` is a loaded model (else loaded with it).
        image_column: The column that holds the images.
        device: Where to run the model (default: CUDA when available, else the CPU); ignored for a loaded model.
        max_size: Downscale images whose longest side exceeds this many pixels (default: full resolution).
        max_pixels: Refuse images of more pixels before decoding them (default: Pillow's limit; `None`: no limit).
        save_embeddings: Also add the `image_embeds` column.
    """

    def __init__(
        self,
        model: str | QualiCLIPModel = "demo",
        processor: QualiCLIPProcessor | None = None,
        image_column: str = "image",
        device: str | torch.device | None = None,
        max_size: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        save_embeddings: bool = False,
    ) -> None:
        if isinstance(model, str):
            from ..loading import load_model_and_processor

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, processor = load_model_and_processor(model, device)
        elif processor is None:
            raise ValueError("a loaded model needs its processor: QualityScorer(model, processor)")
        self.model = model.eval()
        self.processor = processor
        self.image_column = image_column
        self.max_size = max_size
        self.max_pixels = max_pixels
        self.save_embeddings = save_embeddings

    @torch.inference_mode()
    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        """
        Scores a batch of rows (`map(batched=True)`; `with_indices=True` makes errors name the row index).

        Raises:
            KeyError: when the batch has no `image_column`, naming the columns it has.
        """
        if self.image_column not in batch:
            raise KeyError(
                f"no image column {self.image_column!r} in the dataset; its columns are {', '.join(batch)} "
                "(QualityScorer(..., image_column=NAME))"
            )
        values = batch[self.image_column]
        labels = [f"row {index}" for index in indices] if indices is not None else ["image"] * len(values)
        decoded = decode_values(values, labels, self.max_pixels)
        outcomes = score_images(decoded, self.model, self.processor, labels, self.max_size, self.save_embeddings)
        columns: dict[str, list] = {
            "quality_score": [outcome.score for outcome in outcomes],
            "quality_error": [outcome.error for outcome in outcomes],
        }
        if self.save_embeddings:
            columns["image_embeds"] = [outcome.image_embeds for outcome in outcomes]
        return columns


# ------------------------------------------------------------------------------------------------ opening datasets


def open_dataset(source: str, split: str = "train", streaming: bool | None = None) -> Any:
    """
    Opens a dataset for scoring with `datasets.load_dataset`.

    Args:
        source: A Hub dataset id (`ORG/NAME`), or a local folder of Parquet or Arrow files, of images (`imagefolder`)
            or of WebDataset `.tar` shards (the builder is inferred from the files), or one such file.
        split: The split to read.
        streaming: Stream the rows instead of preparing them (the default for Hub ids; local data is prepared once
            into `datasets`' cache, memory-mapped, unless `True`).

    Returns:
        A `datasets.Dataset`, or a `datasets.IterableDataset` when streaming.

    Raises:
        ValueError: when the dataset or split cannot be opened, with `datasets`' reason.
    """
    import datasets

    local = Path(source)
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        # A path, not a Hub id (NAME or ORG/NAME): datasets would ask the Hub for it all the same.
        raise ValueError(f"cannot open dataset {source!r}: no such file or folder")
    if streaming is None:
        streaming = not local.exists()
    try:
        if local.is_file():
            builder = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"{source}: a file given as --dataset must be .parquet, .arrow or .tar")
            return datasets.load_dataset(builder, data_files={split: str(local)}, split=split, streaming=streaming)
        return datasets.load_dataset(source, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        # ConnectionError: a Hub id with the Hub unreachable (offline mode, no network, not in the cache).
        raise ValueError(f"cannot open dataset {source!r} (split {split!r}): {error}") from None


def _image_column(dataset: Any, requested: str | None) -> str:
    from datasets import Image as ImageFeature

    features = dataset.features or {}
    columns = list(features) or list(dataset.column_names or [])
    if requested is not None:
        if columns and requested not in columns:
            raise ValueError(f"no image column {requested!r}; the dataset's columns are {', '.join(columns)}")
        return requested
    image_columns = [name for name, feature in features.items() if isinstance(feature, ImageFeature)]
    if len(image_columns) == 1:
        return image_columns[0]
    if "image" in columns:
        return "image"
    raise ValueError(
        f"cannot tell which column holds the images (columns: {', '.join(columns)}); name it with --image-column"
    )


def _without_decoding(dataset: Any, column: str) -> Any:
    # Images are decoded by the scoring workers with the project's reader, not by `datasets` in the reading process.
    from datasets import Image as ImageFeature

    feature = (dataset.features or {}).get(column)
    if isinstance(feature, ImageFeature) and feature.decode:
        return dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


# ---------------------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class _Unit:
    index: int
    start: int | None  # the global row index of the unit's first row (map-style datasets), else None


def _units(dataset: Any, rows_per_file: int) -> list[_Unit]:
    """The dataset's units of work (see the module's docstring)."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        return [_Unit(index, None) for index in range(dataset.num_shards)]
    count = math.ceil(len(dataset) / rows_per_file)
    # `split_dataset_by_node` gives map-style node `i` of `n` the contiguous block starting at this row.
    div, mod = divmod(len(dataset), count) if count else (0, 0)
    return [_Unit(index, div * index + min(index, mod)) for index in range(count)]


def _unit_dataset(dataset: Any, unit: _Unit, num_units: int) -> Any:
    from datasets.distributed import split_dataset_by_node

    # A streamed dataset's units are its shards: with as many "nodes" as shards, `split_dataset_by_node` gives each
    # one shard (it splits by shards whenever their number is a multiple of the number of nodes).
    return split_dataset_by_node(dataset, rank=unit.index, world_size=num_units)


def _part_name(unit: int, part: int) -> str:
    return f"part-{unit:06d}-{part:06d}.parquet"


def _unit_marker(output_dir: Path, unit: int) -> Path:
    return output_dir / MANIFEST_DIR / f"unit-{unit:06d}.json"


def _existing_parts(output_dir: Path, unit: int) -> list[Path]:
    parts = []
    while (path := output_dir / _part_name(unit, len(parts))).is_file():
        parts.append(path)
    return parts


# ---------------------------------------------------------------------------------------------------------- writing


def _schema(id_type: Any, embed_dim: int | None) -> Any:
    import pyarrow as pa

    fields = [
        pa.field("id", id_type),
        pa.field("quality_score", pa.float32()),
        pa.field("error", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
    ]
    if embed_dim is not None:
        fields.append(pa.field("image_embeds", pa.list_(pa.float32(), embed_dim)))
    return pa.schema(fields)


class _PartBuffer:
    """The rows of one part file, written atomically (temporary name in the same folder, then rename)."""

    def __init__(self) -> None:
        self.ids: list[Any] = []
        self.outcomes: list[ImageScore] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: list[Any], outcomes: list[ImageScore]) -> None:
        self.ids.extend(ids)
        self.outcomes.extend(outcomes)

    def write(self, path: Path, embed_dim: int | None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def column(name: str) -> list:
            return [getattr(outcome, name) for outcome in self.outcomes]

        ids = pa.array(self.ids)
        columns = [ids, column("score"), column("error"), column("height"), column("width")]
        if embed_dim is not None:
            columns.append(column("image_embeds"))
        table = pa.Table.from_arrays(columns, schema=_schema(ids.type, embed_dim))
        temporary = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, path)
        self.ids, self.outcomes = [], []


def _write_json(path: Path, content: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------- running


@dataclass
class DatasetScoringSummary:
    """
    What [`score_dataset`] did: `rows` scored in the output (all runs), of which `failed` have an
    error; `rows_this_run` and `seconds` of this run (`images_per_second` = their ratio).
    """

    rows: int
    failed: int
    rows_this_run: int
    seconds: float
    output_dir: Path

    @property
    def images_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Batch:
    unit: _Unit
    part: int
    ids: list[Any]
    labels: list[str]
    end_of_part: bool
    end_of_unit: bool
    decoded: Future | list | None = None


def _batches(
    dataset: Any,
    units: list[_Unit],
    num_units: int,
    output_dir: Path,
    image_column: str,
    id_column: str | None,
    rows_per_file: int,
    batch_size: int,
) -> Iterator[tuple[_Batch, list[Any]]]:
    """
    The rows of `units`, as batches that never cross a part file: batch boundaries depend only on the dataset, so the
    same rows meet in a batch wherever a run was resumed. Complete units and complete parts are skipped.
    """
    for unit in units:
        if _unit_marker(output_dir, unit.index).is_file():
            continue
        parts = _existing_parts(output_dir, unit.index)
        done = sum(_parquet_rows(path) for path in parts)
        part, in_part = len(parts), 0
        columns = [image_column] + ([id_column] if id_column else [])
        rows = _unit_dataset(dataset, unit, num_units).select_columns(columns)
        pending_ids: list[Any] = []
        pending_values: list[Any] = []
        position = 0
        for chunk in rows.iter(batch_size=batch_size):
            values = chunk[image_column]
            keys = chunk[id_column] if id_column else [None] * len(values)
            for value, key in zip(values, keys, strict=True):
                if position >= done:
                    if key is None:
                        key = unit.start + position if unit.start is not None else f"{unit.index}/{position}"
                    pending_ids.append(key)
                    pending_values.append(value)
                    in_part += 1
                    if len(pending_ids) == batch_size or in_part == rows_per_file:
                        yield _batch(unit, part, pending_ids, in_part == rows_per_file, False), pending_values
                        pending_ids, pending_values = [], []
                        if in_part == rows_per_file:
                            part, in_part = part + 1, 0
                position += 1
        yield _batch(unit, part, pending_ids, in_part > 0, True), pending_values


def _batch(unit: _Unit, part: int, ids: list[Any], end_of_part: bool, end_of_unit: bool) -> _Batch:
    return _Batch(unit, part, ids, [f"row {key}" for key in ids], end_of_part, end_of_unit)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def score_dataset(
    dataset: Any,
    output_dir: str | os.PathLike,
    model: QualiCLIPModel,
    processor: QualiCLIPProcessor,
    image_column: str | None = None,
    id_column: str | None = None,
    rows_per_file: int = 10_000,
    batch_size: int = 8,
    num_workers: int | None = None,
    max_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    save_embeddings: bool = False,
    resume: bool = False,
    settings: dict | None = None,
    progress: bool = True,
) -> DatasetScoringSummary:
    """
    Scores every row of a dataset into Parquet files under `output_dir`, in this process (decoding in `num_workers`
    worker processes). Many processes or machines: `qualiclip_hf.scoring.ray_data.score_dataset_ray`.

    Output (see the module's docstring for the layout): `part-UUUUUU-KKKKKK.parquet` files with the columns `id`,
    `quality_score` (float32 in [0, 1], null on error), `error` (null, or the cause naming the row), `height`,
    `width` (of the decoded image, before `max_size`), and with `save_embeddings` `image_embeds` (fixed-size lists of
    float32); `.manifest/unit-UUUUUU.json` for each complete unit; `.run.json` with the run's settings; and, when all
    units are complete, `.manifest.json` with the totals and the file list. Those names start with a dot, so the
    folder also reads as one Parquet dataset (`pyarrow.parquet.read_table(folder)`, `pandas.read_parquet`,
    `datasets.load_dataset("parquet", data_dir=folder)`), in an order of its own; [`read_scores`] reads the scores
    back in the dataset's order.

    Args:
        dataset: A `datasets.Dataset` or `datasets.IterableDataset` (see [`open_dataset`]).
        output_dir: The folder to write; it must be empty or absent unless `resume`.
        image_column: The column of images (decoded images, bytes, `Image(decode=False)` values or local paths);
            default: the dataset's only `Image` column, else `"image"`.
        id_column: The column copied to `id`, to join the scores back to the data; default: the dataset's own key
            (WebDataset's `__key__`), else the row index (for a streamed dataset, `"SHARD/ROW"`: the shard's index
            and the row's position in it).
        rows_per_file: Rows per Parquet file; also the size of a map-style dataset's units of work.
        batch_size: Images per forward pass.
        num_workers: Processes that decode images beside the scoring process (default: up to 4, one per spare core;
            0: decode in the scoring process).
        max_size: Downscale images whose longest side exceeds this many pixels.
        max_pixels: Refuse images of more pixels before decoding them (`None`: no limit).
        save_embeddings: Also write the image embeddings.
        resume: Finish a run that stopped: complete units and part files are kept, the rest is scored. The settings
            must be those of the stopped run. A run of the previous version (`run.json`, `manifest/`) is resumed
            too; its files are renamed.
        settings: Extra settings recorded in `.run.json` and checked on resume (the CLI passes the dataset's name,
            split and the model's name).
        progress: Show a progress bar.

    Returns:
        The [`DatasetScoringSummary`].

    Raises:
        ValueError: for an output folder holding another run, a missing column, or settings that differ from the
            stopped run's on resume.
    """
    output_dir = Path(output_dir)
    image_column = _image_column(dataset, image_column)
    if id_column is None:
        columns = list(dataset.features or {}) or list(dataset.column_names or [])
        id_column = next((name for name in KEY_COLUMNS if name in columns), None)
    elif dataset.features and id_column not in dataset.features:
        raise ValueError(f"no id column {id_column!r}; the dataset's columns are {', '.join(dataset.features)}")
    dataset = _without_decoding(dataset, image_column)
    units = _units(dataset, rows_per_file)
    run = {
        **(settings or {}),
        "image_column": image_column,
        "id_column": id_column,
        "rows_per_file": rows_per_file,
        "num_units": len(units),
        "max_size": max_size,
        "max_pixels": max_pixels,
        "save_embeddings": save_embeddings,
    }
    _start_run(output_dir, run, resume)

    # Image embeddings live in the space of the stored prompt embeddings.
    embed_dim = int(model.prompt_embeds.shape[-1]) if save_embeddings else None
    started = time.perf_counter()
    bar = _progress_bar(output_dir, dataset, units) if progress else None
    rows_this_run = 0
    batches = _batches(dataset, units, len(units), output_dir, image_column, id_column, rows_per_file, batch_size)
    buffer = _PartBuffer()
    with _Decoder(num_workers, max_pixels) as decoder:
        for batch in decoder.decode_ahead(batches):
            decoded = batch.decoded.result() if isinstance(batch.decoded, Future) else batch.decoded
            if batch.ids:
                buffer.add(batch.ids, score_images(decoded, model, processor, batch.labels, max_size, save_embeddings))
                rows_this_run += len(batch.ids)
                if bar is not None:
                    bar.update(len(batch.ids))
            if batch.end_of_part:
                buffer.write(output_dir / _part_name(batch.unit.index, batch.part), embed_dim)
            if batch.end_of_unit:
                _finish_unit(output_dir, batch.unit.index)
    if bar is not None:
        bar.close()
    return _summarize(output_dir, units, rows_this_run, time.perf_counter() - started)


def _start_run(output_dir: Path, run: dict, resume: bool) -> None:
    run_file = output_dir / RUN_FILE
    old_run_file = output_dir / _OLD_RUN_FILE
    found = run_file if run_file.is_file() else old_run_file if old_run_file.is_file() else None
    if found is not None:
        stored = json.loads(found.read_text(encoding="utf-8"))
        if not resume:
            raise ValueError(
                f"{output_dir} already holds a run; pass --resume (resume=True) to finish it, or use a new one"
            )
        if stored != json.loads(json.dumps(run)):
            changed = sorted(key for key in set(stored) | set(run) if stored.get(key) != run.get(key))
            raise ValueError(
                f"{output_dir} holds a run with other settings ({', '.join(changed)}: "
                + "; ".join(f"{key} was {stored.get(key)!r}, now {run.get(key)!r}" for key in changed)
                + "); resume it with its settings, or use a new folder"
            )
        if found == old_run_file:
            _rename_old_files(output_dir)
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty and holds no run ({RUN_FILE}); use an empty or new folder")
    else:
        (output_dir / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        _write_json(run_file, run)


def _rename_old_files(output_dir: Path) -> None:
    """Gives a run of the previous version this version's names (`_OLD_NAMES`); its progress counts are dropped."""
    shutil.rmtree(output_dir / _OLD_PROGRESS_DIR, ignore_errors=True)
    for old, new in _OLD_NAMES.items():
        if (output_dir / old).exists() and not (output_dir / new).exists():
            os.replace(output_dir / old, output_dir / new)
    (output_dir / MANIFEST_DIR).mkdir(exist_ok=True)


def _finish_unit(output_dir: Path, unit: int) -> None:
    parts = _existing_parts(output_dir, unit)
    import pyarrow.parquet as pq

    rows = sum(_parquet_rows(path) for path in parts)
    without_error = sum(pq.read_table(path, columns=["error"]).column("error").null_count for path in parts)
    _write_json(
        _unit_marker(output_dir, unit),
        {"unit": unit, "rows": rows, "failed": rows - without_error, "parts": [path.name for path in parts]},
    )


def _summarize(output_dir: Path, units: list[_Unit], rows_this_run: int, seconds: float) -> Any:
    markers = [_unit_marker(output_dir, unit.index) for unit in units]
    done = [json.loads(path.read_text(encoding="utf-8")) for path in markers if path.is_file()]
    rows = sum(item["rows"] for item in done)
    failed = sum(item["failed"] for item in done)
    if len(done) == len(units):
        _write_json(
            output_dir / SUMMARY_FILE,
            {"complete": True, "rows": rows, "failed": failed, "parts": [p for item in done for p in item["parts"]]},
        )
    return DatasetScoringSummary(rows, failed, rows_this_run, seconds, output_dir)


# -------------------------------------------------------------------------------------------------- decoding ahead


class _Decoder:
    """
    Decodes batches of column values in `num_workers` worker processes (default: up to 4, one per spare core), a few
    batches ahead of the model; 0 decodes in the scoring process.
    """

    def __init__(self, num_workers: int | None, max_pixels: int | None) -> None:
        if num_workers is None:
            # The cores this process may run on (its affinity mask), as file scoring counts them.
            num_workers = choose_thread_counts(cores=usable_cores(), load=0)[0]
        self.max_pixels = max_pixels
        # Enough batches in flight to keep every worker busy while the model runs, without reading far ahead.
        self.ahead = 2 * num_workers + 1
        self.executor = None
        if num_workers > 0:
            # As torch's DataLoader workers on Linux: forked, so that they start at once without importing again.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            self.executor = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context(method))

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)

    def decode_ahead(self, batches: Iterator[tuple[_Batch, list[Any]]]) -> Iterator[_Batch]:
        """Hands the batches back in order, each with its `decoded` values (or a future of them)."""
        queue: deque[_Batch] = deque()
        for batch, values in batches:
            if self.executor is None or not values:
                batch.decoded = decode_values(values, batch.labels, self.max_pixels)
            else:
                batch.decoded = self.executor.submit(decode_values, values, batch.labels, self.max_pixels)
            queue.append(batch)
            if len(queue) >= self.ahead:
                yield queue.popleft()
        yield from queue


# -------------------------------------------------------------------------------------------------------- progress


def _progress_bar(output_dir: Path, dataset: Any, units: list[_Unit]) -> Any:
    """A bar of the dataset's rows, starting at those already in the output folder (a resumed run)."""
    from tqdm.auto import tqdm

    initial = sum(
        json.loads(path.read_text(encoding="utf-8"))["rows"]
        for path in (_unit_marker(output_dir, unit.index) for unit in units)
        if path.is_file()
    ) + sum(_parquet_rows(path) for path in output_dir.glob("part-*.parquet") if not _in_complete_unit(path))
    total = _row_count(dataset)
    return tqdm(total=total, initial=initial, unit="img", desc="scoring", disable=None, file=sys.stderr)


def _in_complete_unit(part: Path) -> bool:
    unit = int(part.name.split("-")[1])
    return _unit_marker(part.parent, unit).is_file()


def _row_count(dataset: Any) -> int | None:
    from datasets import IterableDataset

    if not isinstance(dataset, IterableDataset):
        return len(dataset)
    splits = dataset.info.splits or {}
    split = splits.get(str(dataset.split)) if dataset.split is not None else None
    return split.num_examples if split is not None and split.num_examples else None


# --------------------------------------------------------------------------------------------------------- reading


def read_scores(output_dir: str | os.PathLike, require_complete: bool = True) -> Any:
    """
    Reads the scores of [`score_dataset`] into one `pyarrow.Table`, in the dataset's row order.

    Args:
        output_dir: The folder `score_dataset` wrote.
        require_complete: Refuse a run that is not finished (default); `False` reads the part files written so far.

    Raises:
        ValueError: when the run is not complete and `require_complete`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    output_dir = Path(output_dir)
    complete = (output_dir / SUMMARY_FILE).is_file() or (output_dir / _OLD_SUMMARY_FILE).is_file()
    if require_complete and not complete:
        raise ValueError(f"{output_dir}: the run is not complete (no {SUMMARY_FILE}); finish it with --resume")
    parts = sorted(output_dir.glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"{output_dir}: no part files")
    return pa.concat_tables([pq.read_table(path) for path in parts])


# ------------------------------------------------------------------------------------------------- command line


def score_dataset_command(args: Any) -> int:
    """
    `qualiclip score --dataset ...` (`--engine local`, one process): the command's arguments to [`score_dataset`].
    Returns the exit status: 0 when the run is complete (rows that failed are counted in the summary and have their
    `error`), 2 for bad arguments.
    """
    from ..backends.precision import prepare_scorer, runtime_for
    from ..loading import load_model_and_processor, resolve_model, select_device

    def fail(message: str, status: int = 2) -> int:
        print(f"qualiclip: {message}", file=sys.stderr)
        return status

    if args.output is None:
        return fail("--dataset needs --output FOLDER, where the Parquet files of scores go")
    try:
        device = select_device(args.device)
        dataset = open_dataset(args.dataset, args.split, streaming=True if args.streaming else None)
    except ValueError as error:
        return fail(str(error))
    if runtime_for(args.backend, args.precision) != "torch":
        return fail("--dataset runs the PyTorch model: --precision fp32, bf16, fp16 or auto, --backend torch")
    try:
        resolved = resolve_model(args.model)
        print(f"model: {resolved.name} ({resolved.description})", file=sys.stderr)
        model, processor = load_model_and_processor(resolved, device)
        # Bulk scoring, as `qualiclip score` on files (fuse: BatchNorm folded, CPU chunks in fp32).
        model, chosen = prepare_scorer(model, processor, args.precision, fuse=True)
    except (OSError, ValueError) as error:
        return fail(f"cannot load model {args.model!r}: {error}")
    # The precision that runs, never "auto": a resumed run must compute its rows the same way.
    settings = {"dataset": args.dataset, "split": args.split, "model": args.model, "precision": chosen}
    try:
        summary = score_dataset(
            dataset,
            args.output,
            model,
            processor,
            image_column=args.image_column,
            id_column=args.id_column,
            rows_per_file=args.rows_per_file,
            batch_size=args.batch_size or default_batch_size(device),
            num_workers=args.num_workers,
            max_size=args.max_size,
            max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None),
            save_embeddings=args.save_embeddings,
            resume=args.resume,
            settings=settings,
        )
    except ValueError as error:
        return fail(str(error))
    print(
        f"scored {summary.rows_this_run} rows in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s); "
        f"{args.output} holds {summary.rows} rows, {summary.failed} failed (see the error column)",
        file=sys.stderr,
    )
    # Failed rows are data (their `error` column), not a failure of the run.
    return 0
