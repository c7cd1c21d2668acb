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
Units are positions in the dataset, so a resumed run first checks that the rows are still where the run found them
(`_check_rows_unchanged`: the ids of every part file written against the dataset's ids there) and refuses a dataset
that changed, rather than score its rows under other rows' ids.

The run's bookkeeping (`.run.json`, `.manifest/`, `.manifest.json`) has names that start with a dot, so
that the folder reads as one Parquet dataset: `pyarrow.parquet.read_table(folder)`, `pandas.read_parquet(folder)` and
`datasets.load_dataset("parquet", data_dir=folder)` skip hidden files (pyarrow also those starting with `_`, datasets
does not).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import time
import warnings
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
from ..outputs import atomic_path, write_json_atomic
from ..processing_qualiclip import QualiCLIPProcessor
from .core import DecodedImage, ImageScore, score_images
from .resources import choose_thread_counts, prepare_worker, usable_cores

__all__ = ["DatasetScoringSummary", "QualityScorer", "open_dataset", "read_scores", "score_dataset"]

# Columns a dataset carries as its own row key (WebDataset's sample key); the first one present is the default id.
KEY_COLUMNS = ("__key__",)
RUN_FILE = ".run.json"
MANIFEST_DIR = ".manifest"
SUMMARY_FILE = ".manifest.json"


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

# Whether this process was forked from the one that imported this module (a `datasets.map(num_proc=N)` worker, say):
# noted by a fork hook, not by comparing process ids, which would differ in every session and so change the
# fingerprint `datasets` computes of a `QualityScorer`, and with it the cache of `map`.
_in_forked_child = False


def _note_fork() -> None:
    global _in_forked_child
    _in_forked_child = True


os.register_at_fork(after_in_child=_note_fork)


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
        device: Where to run the model (default: `loading.select_device()`: CUDA, else MPS, else the CPU); ignored
            for a loaded model.
        max_size: Downscale images whose longest side exceeds this many pixels (default: full resolution).
        max_pixels: Refuse images of more pixels before decoding them (default: Pillow's limit; `None`: no limit).
        save_embeddings: Also add the `image_embeds` column.
        image_root: The folder that relative image paths are read from (the dataset's folder; default: the current
            working directory).

    `map(..., num_proc=N)` works on the CPU: a scorer made from a model name travels to the worker processes as that
    name and its settings (so `datasets` also fingerprints it in milliseconds) and loads the model again there, on
    first use; a loaded model travels whole. In a forked process, the scorer sets PyTorch to one thread before it
    scores: a forked child that enters the thread pool its parent already used hangs; the `num_proc` workers are the
    parallelism. On a GPU, use one process and a larger `batch_size` (CUDA cannot be used again in a forked child).
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
        image_root: str | os.PathLike | None = None,
    ) -> None:
        # A scorer made from a name is rebuilt from it in other processes (`__getstate__`).
        self._model_name = model if isinstance(model, str) else None
        if isinstance(model, str):
            from ..loading import load_model_and_processor, select_device

            model, processor = load_model_and_processor(model, device or select_device())
        elif processor is None:
            raise ValueError("a loaded model needs its processor: QualityScorer(model, processor)")
        self._device = device
        self.model = model.eval()
        self.processor = processor
        self.image_column = image_column
        self.max_size = max_size
        self.max_pixels = max_pixels
        self.save_embeddings = save_embeddings
        self.image_root = None if image_root is None else Path(image_root).absolute()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._model_name is not None:  # loaded again from its name where it is unpickled, on first use
            state["model"] = state["processor"] = None
        return state

    def _ready(self) -> None:
        if _in_forked_child and torch.get_num_threads() > 1:
            # A forked `map(num_proc=N)` worker: entering the parent's used thread pool would hang (see the class).
            torch.set_num_threads(1)
        if self.model is None:
            from ..loading import load_model_and_processor

            model, self.processor = load_model_and_processor(self._model_name, self._device or "cpu")
            self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        """
        Scores a batch of rows (`map(batched=True)`; `with_indices=True` makes errors name the row index).

        Raises:
            KeyError: when the batch has no `image_column`, naming the columns it has.
            TypeError: when called on one row (`map` without `batched=True`).
        """
        if self.image_column not in batch:
            raise KeyError(
                f"no image column {self.image_column!r} in the dataset; its columns are {', '.join(batch)} "
                "(QualityScorer(..., image_column=NAME))"
            )
        values = batch[self.image_column]
        if (
            isinstance(indices, int)
            or not isinstance(values, (list, tuple, np.ndarray, torch.Tensor))
            or (isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim == 3)
        ):
            raise TypeError(
                "QualityScorer scores batches of rows: call dataset.map(scorer, batched=True), not one row at a time"
            )
        self._ready()
        labels = [f"row {index}" for index in indices] if indices is not None else ["image"] * len(values)
        decoded = decode_values([_rooted(value, self.image_root) for value in values], labels, self.max_pixels)
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
        ValueError: when the dataset or split cannot be opened, with `datasets`' reason; at once, without retries, for
            a streamed Hub id when the Hub cannot be reached (offline, or `HF_HUB_OFFLINE` set).
    """
    import datasets

    local = Path(source)
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        # A path, not a Hub id (NAME or ORG/NAME): datasets would ask the Hub for it all the same.
        raise ValueError(f"cannot open dataset {source!r}: no such file or folder")
    if streaming is None:
        streaming = not local.exists()
    if not local.exists() and streaming:
        # `datasets` retries an unreachable Hub for half a minute, and a streamed dataset needs the Hub: stop at once,
        # as model names do (`loading.hub_unreachable_reason`).
        from ..loading import hub_unreachable_reason

        unreachable = hub_unreachable_reason()
        if unreachable is not None:
            raise ValueError(
                f"cannot open dataset {source!r}: {unreachable}, and a Hub dataset is streamed from the Hub; download "
                f"it where you can (`hf download {source} --repo-type dataset --local-dir DIR`) and pass DIR"
            )
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
        with atomic_path(path) as temporary:
            pq.write_table(table, temporary)
        self.ids, self.outcomes = [], []


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
    image_root: Path | None = None,
) -> Iterator[tuple[_Batch, list[Any]]]:
    """
    The rows of `units`, as batches that never cross a part file: batch boundaries depend only on the dataset, so the
    same rows meet in a batch wherever a run was resumed. Complete units and complete parts are skipped. A row
    without an id (`id_column` given) is refused; relative image paths are read from `image_root` (`_rooted`).
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
                    if key is None and id_column:
                        # Checked up front for a map-style dataset (`_check_ids`); a streamed one is known only now.
                        raise ValueError(
                            f"row {position} of shard {unit.index}: no id in the id column {id_column!r}; every row "
                            "needs one, to join its score back"
                        )
                    if key is None:
                        key = unit.start + position if unit.start is not None else f"{unit.index}/{position}"
                    pending_ids.append(key)
                    pending_values.append(_rooted(value, image_root))
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


def _rooted(value: Any, image_root: Path | None) -> Any:
    """
    An image value whose relative path is made absolute under `image_root`, the dataset's folder: a path stored in a
    dataset is relative to the dataset, not to the folder the command runs from. Bytes, images, absolute paths and
    URLs are left alone; so is everything when `image_root` is `None`.
    """
    if image_root is None:
        return value
    if isinstance(value, dict) and value.get("bytes") is None and isinstance(value.get("path"), str):
        return {**value, "path": _rooted(value["path"], image_root)}
    if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
        return str(image_root / value)
    return value


def _check_ids(dataset: Any, id_column: str) -> None:
    """
    Refuses a map-style dataset whose `id_column` has missing or repeated values, naming the first rows: the ids are
    what joins the scores back to the data, so two rows with one id, or a row without one, would mislabel scores. (A
    streamed dataset is checked for missing ids as its rows are read; repeats are not looked for.)

    Raises:
        ValueError: naming the column, how many rows are affected and the first few.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        return
    ids = dataset.select_columns([id_column]).with_format("arrow")[:].column(id_column).combine_chunks()
    hint = f"the id column {id_column!r} must name every row once (leave out --id-column / id_column for row numbers)"
    if ids.null_count:
        rows = pc.indices_nonzero(ids.is_null()).to_pylist()
        raise ValueError(f"{hint}: {len(rows)} rows have no id (rows {_first(rows)})")
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        values = repeated.field("values")
        positions = pc.indices_nonzero(pc.is_in(ids, value_set=values)).to_pylist()
        first = pa.array(values).slice(0, 3).to_pylist()
        raise ValueError(
            f"{hint}: {len(values)} ids are repeated, on {len(positions)} rows (ids {_first(first)}; rows "
            f"{_first(positions)})"
        )


def _first(items: list, count: int = 3) -> str:
    return ", ".join(map(repr if items and isinstance(items[0], str) else str, items[:count])) + (
        ", ..." if len(items) > count else ""
    )


def _check_rows_unchanged(dataset: Any, output_dir: Path, units: list[_Unit], id_column: str | None) -> None:
    """
    On resume, refuses a map-style dataset whose rows are no longer those the run scored so far: every part file
    written is compared, id by id, with the dataset's ids at the rows it covers (the row numbers themselves without
    an id column), and every complete unit's row count with the unit's size now. Rows added, removed or reordered
    since the run began would otherwise be scored under other rows' ids, or never. A streamed dataset's shards are
    taken as they were. Without an id column, a row replaced in place (same position) cannot be noticed.

    Raises:
        ValueError: saying how the dataset changed (rows now; the first part that no longer matches; with an id
            column, how many scored ids are gone from it and how many of its ids are new).
    """
    import pyarrow.parquet as pq
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset) or not units:
        return
    ids = dataset.select_columns([id_column]) if id_column else None
    ends = [unit.start for unit in units[1:]] + [len(dataset)]
    mismatches: list[str] = []
    scored: list[Any] = []
    for unit, end in zip(units, ends, strict=True):
        marker = _unit_marker(output_dir, unit.index)
        if marker.is_file():
            rows = json.loads(marker.read_text(encoding="utf-8"))["rows"]
            if rows != end - unit.start:
                mismatches.append(f"unit {unit.index} scored {rows} rows and now holds {end - unit.start}")
        start = unit.start
        for part in _existing_parts(output_dir, unit.index):
            written = pq.read_table(part, columns=["id"]).column("id").to_pylist()
            scored.extend(written)
            stop = min(start + len(written), len(dataset))
            now = ids[start:stop][id_column] if ids is not None else list(range(start, stop))
            if now != written:
                mismatches.append(
                    f"{part.name} scored the ids {_first(written, 2)} to {written[-1]!r}, and rows {start} to "
                    f"{start + len(written) - 1} now hold " + (f"{_first(now, 2)}" if now else "nothing")
                )
            start += len(written)
    if not mismatches:
        return
    counts = ""
    if ids is not None:
        present = set(ids[:][id_column])
        gone = len(set(scored) - present)
        counts = f" ({gone} scored ids are gone from it, {len(present - set(scored))} of its ids are not scored)"
    raise ValueError(
        f"{output_dir}: the dataset changed since this run began: it now has {len(dataset)} rows{counts}, and what "
        f"the run scored no longer matches its rows ({mismatches[0]}"
        + (f"; {len(mismatches) - 1} more such differences" if len(mismatches) > 1 else "")
        + "); resuming would write scores under other rows' ids: score it into a new folder"
    )


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
    image_root: str | os.PathLike | None = None,
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
            must be those of the stopped run. A part file that does not read as Parquet (damaged by a crash or a full
            disk) is named in a warning, set aside as `.damaged-part-...` and its rows are scored again.
        settings: Extra settings recorded in `.run.json` and checked on resume (the CLI passes the dataset's name,
            split and the model's name).
        progress: Show a progress bar.
        image_root: The folder that relative image paths in the image column are read from: the dataset's own folder
            (`qualiclip score --dataset FOLDER` passes it). Default: the current working directory.

    Returns:
        The [`DatasetScoringSummary`].

    Raises:
        ValueError: for an output folder holding another run, a missing column, an id column with missing or
            repeated ids, settings that differ from the stopped run's on resume, or a dataset whose rows changed since
            the run began (`_check_rows_unchanged`).
    """
    output_dir = Path(output_dir)
    image_column = _image_column(dataset, image_column)
    if id_column is None:
        columns = list(dataset.features or {}) or list(dataset.column_names or [])
        id_column = next((name for name in KEY_COLUMNS if name in columns), None)
    elif dataset.features and id_column not in dataset.features:
        raise ValueError(f"no id column {id_column!r}; the dataset's columns are {', '.join(dataset.features)}")
    if id_column is not None:
        _check_ids(dataset, id_column)
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
    if resume:
        _check_rows_unchanged(dataset, output_dir, units, id_column)

    # Image embeddings live in the space of the stored prompt embeddings.
    embed_dim = int(model.prompt_embeds.shape[-1]) if save_embeddings else None
    started = time.perf_counter()
    bar = _progress_bar(output_dir, dataset, units) if progress else None
    rows_this_run = 0
    root = None if image_root is None else Path(image_root).absolute()
    batches = _batches(dataset, units, len(units), output_dir, image_column, id_column, rows_per_file, batch_size, root)
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
    if run_file.is_file():
        stored = json.loads(run_file.read_text(encoding="utf-8"))
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
        _set_aside_damaged_parts(output_dir)
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty and holds no run ({RUN_FILE}); use an empty or new folder")
    else:
        (output_dir / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, run)


def _set_aside_damaged_parts(output_dir: Path) -> None:
    """
    Before a resume: each part file that does not read as Parquet (a run killed mid-write by the system, a full disk,
    a copy cut short) is renamed `.damaged-NAME` (hidden: readers of the folder skip it), its unit is marked
    incomplete, and the unit's later parts, which a resume writes again, are removed; a warning names each file. A
    unit marked complete whose parts are not all there is scored again, with a warning naming the missing files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in sorted(output_dir.glob("part-*.parquet")):
        if not path.is_file():  # removed below, as a later part of a damaged one's unit
            continue
        try:
            pq.ParquetFile(path)  # reads the footer: the file's end, where a cut-off write shows
        except (OSError, pa.ArrowException) as error:
            aside = path.with_name(f".damaged-{path.name}")
            os.replace(path, aside)
            unit = int(path.name.split("-")[1])
            later = [part for part in sorted(output_dir.glob(f"part-{unit:06d}-*.parquet")) if part.name > path.name]
            for part in later:
                part.unlink()
            _unit_marker(output_dir, unit).unlink(missing_ok=True)
            (output_dir / SUMMARY_FILE).unlink(missing_ok=True)
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            warnings.warn(
                f"{path}: not a readable Parquet file ({reason}); set aside as {aside.name}, and its rows"
                + (f" and those of the {len(later)} later part(s) of its unit" if later else "")
                + " are scored again",
                stacklevel=2,
            )
    # A part missing from a unit that its marker calls complete (deleted, or lost in a copy): the unit is scored again,
    # rather than the run reporting rows that are not on disk.
    for marker in sorted((output_dir / MANIFEST_DIR).glob("unit-*.json")):
        try:
            listed = json.loads(marker.read_text(encoding="utf-8"))["parts"]
        except (OSError, ValueError, KeyError, TypeError):
            listed = None  # an unreadable marker proves nothing: its unit is scored again too
        missing = [name for name in listed or [] if not (output_dir / name).is_file()]
        if listed is not None and not missing:
            continue
        unit = int(marker.stem.split("-")[1])
        for part in sorted(output_dir.glob(f"part-{unit:06d}-*.parquet")):
            part.unlink()
        marker.unlink()
        (output_dir / SUMMARY_FILE).unlink(missing_ok=True)
        cause = f"{', '.join(missing)} missing" if missing else f"its marker {marker.name} unreadable"
        warnings.warn(f"{output_dir}: unit {unit} is incomplete ({cause}); its rows are scored again", stacklevel=2)


def _finish_unit(output_dir: Path, unit: int) -> None:
    parts = _existing_parts(output_dir, unit)
    import pyarrow.parquet as pq

    rows = sum(_parquet_rows(path) for path in parts)
    without_error = sum(pq.read_table(path, columns=["error"]).column("error").null_count for path in parts)
    write_json_atomic(
        _unit_marker(output_dir, unit),
        {"unit": unit, "rows": rows, "failed": rows - without_error, "parts": [path.name for path in parts]},
    )


def _summarize(output_dir: Path, units: list[_Unit], rows_this_run: int, seconds: float) -> Any:
    markers = [_unit_marker(output_dir, unit.index) for unit in units]
    done = [json.loads(path.read_text(encoding="utf-8")) for path in markers if path.is_file()]
    rows = sum(item["rows"] for item in done)
    failed = sum(item["failed"] for item in done)
    if len(done) == len(units):
        write_json_atomic(
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
            self.executor = ProcessPoolExecutor(
                num_workers,
                mp_context=multiprocessing.get_context(method),
                initializer=prepare_worker,
                initargs=(os.getpid(),),
            )

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
    if require_complete and not (output_dir / SUMMARY_FILE).is_file():
        raise ValueError(f"{output_dir}: the run is not complete (no {SUMMARY_FILE}); finish it with --resume")
    parts = sorted(output_dir.glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"{output_dir}: no part files")
    return pa.concat_tables([pq.read_table(path) for path in parts])


def local_dataset_folder(source: str) -> Path | None:
    """The folder of a local dataset (a folder, or a data file's folder), which relative image paths are read from;
    `None` for a Hub id."""
    path = Path(source)
    return path if path.is_dir() else path.parent if path.is_file() else None
