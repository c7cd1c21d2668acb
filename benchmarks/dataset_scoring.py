"""Dataset scoring in one process (`qualiclip score --dataset`, `score_dataset`): images/s against the decode-only
and model-only rates of the same rows. Many processes (Ray Data): `python -m benchmarks.ray_scoring`.

    python -m benchmarks.dataset_scoring [--rows 2000] [--batch-size 1] [--device cpu|cuda] [--competing-load]
                                         [--inputs parquet webdataset] [--model demo]

Writes `--rows` JPEGs of mixed sizes (smooth random pictures, 128 to 512 px on the long side, quality 90) as the bytes
of an `Image` column in 4 Parquet files, and as 4 WebDataset `.tar` shards, then measures in one run, on the same rows:

- model only: the processor and the model on the rows decoded beforehand, in batches of `--batch-size`, in this
  process (all its torch threads);
- decode only, per input: the rows read from the dataset (`datasets`: the Parquet files prepared, the tars streamed)
  and decoded by the project's reader in the decoding workers `score_dataset` would use in one process, no model;
- 1 process: `score_dataset` in this process.

A pipeline can at best reach the slower of decoding and the model; the ratio columns say how close it gets.

With `--competing-load` it measures instead the thread choice `qualiclip score --dataset` now shares with file
scoring (`choose_thread_counts`, set by the command's one preparation step) against PyTorch's default of one thread
per core (what dataset runs used before), `score_dataset` on the Parquet input, alternately, on the machine as found
and with one CPU-bound process started beside it:

    python -m benchmarks.dataset_scoring --competing-load [--rows 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from benchmarks.threads import compare_thread_counts
from qualiclip_hf.backends.precision import cpu_description
from qualiclip_hf.image_reader import open_image_value
from qualiclip_hf.loading import load_model_and_processor
from qualiclip_hf.scoring.dataset import (
    _batches,
    _Decoder,
    _image_column,
    _units,
    _without_decoding,
    open_dataset,
    score_dataset,
)

LONG_SIDES = (128, 192, 256, 320, 384, 448, 512)
ASPECTS = (4 / 3, 3 / 2, 1.0, 3 / 4)


def jpeg_rows(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        long_side, aspect = int(rng.choice(LONG_SIDES)), float(rng.choice(ASPECTS))
        width, height = long_side, round(long_side / aspect)
        if aspect < 1:
            width, height = round(long_side * aspect), long_side
        coarse = (rng.random((max(2, height // 24), max(2, width // 24), 3)) * 255).astype(np.uint8)
        picture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        picture = np.clip(picture + rng.normal(0, 6, picture.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, "JPEG", quality=90)
        rows.append(buffer.getvalue())
    return rows


def write_inputs(rows: list[bytes], folder: Path, files: int = 4) -> dict[str, Path]:
    table = datasets.Dataset.from_dict({"image": [{"bytes": row, "path": None} for row in rows]})
    table = table.cast_column("image", datasets.Image())
    parquet, tars = folder / "parquet", folder / "webdataset"
    parquet.mkdir()
    tars.mkdir()
    for index in range(files):
        table.shard(files, index, contiguous=True).to_parquet(str(parquet / f"data-{index:02d}.parquet"))
    per_file = -(-len(rows) // files)
    for index in range(files):
        with tarfile.open(tars / f"shard-{index:03d}.tar", "w") as tar:
            for row in range(index * per_file, min(len(rows), (index + 1) * per_file)):
                info = tarfile.TarInfo(f"{row:06d}.jpg")
                info.size = len(rows[row])
                tar.addfile(info, io.BytesIO(rows[row]))
    return {"parquet": parquet, "webdataset": tars}


def open_input(kind: str, path: Path) -> object:
    # Parquet folders are prepared (memory-mapped Arrow, the CLI's default for local data); tars are streamed.
    return open_dataset(str(path), "train", streaming=kind == "webdataset")


def decode_only(dataset: object, batch_size: int, output: Path) -> float:
    """The rows of the dataset read and decoded as `score_dataset` does in one process, without the model."""
    column = _image_column(dataset, None)
    dataset = _without_decoding(dataset, column)
    units = _units(dataset, 10_000)
    output.mkdir()
    count = 0
    started = time.perf_counter()
    with _Decoder(None, None) as decoder:
        batches = _batches(dataset, units, len(units), output, column, None, 10_000, batch_size)
        for batch in decoder.decode_ahead(batches):
            decoded = batch.decoded.result() if hasattr(batch.decoded, "result") else batch.decoded
            count += sum(not isinstance(item, str) for item in decoded)
    return count / (time.perf_counter() - started)


@torch.inference_mode()
def model_only(rows: list[bytes], model: object, processor: object, batch_size: int) -> float:
    images = [torch.from_numpy(np.array(open_image_value(row))).permute(2, 0, 1) for row in rows]
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        inputs = processor(images=images[start : start + batch_size], return_tensors="pt").to(model.device)
        model(**inputs).quality_score.cpu()
    return len(images) / (time.perf_counter() - started)


def thread_choice(path: Path, folder: Path, model: object, processor: object, batch_size: int, repeats: int) -> None:
    """`score_dataset` rates with the old and the new thread count (`benchmarks.threads`), as
    `benchmarks.folder_scoring --competing-load` measures files."""

    def run(repeat: int, workers: int, competing: bool) -> float:
        output = folder / f"threads-{int(competing)}-{torch.get_num_threads()}-{repeat}"
        summary = score_dataset(
            open_input("parquet", path), output, model, processor, batch_size=batch_size, progress=False
        )
        return summary.images_per_second

    compare_thread_counts(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=1, help="1: the CLI's default on a CPU; 8 on CUDA")
    parser.add_argument("--inputs", nargs="+", default=["parquet", "webdataset"], choices=("parquet", "webdataset"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the scoring process (default: torch's own); 1 on a machine busy with other work, "
        "where spinning threads wait for each other",
    )
    parser.add_argument(
        "--competing-load", action="store_true", help="measure the thread choice instead (see the description)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="with --competing-load: runs of each, alternately")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model, processor = load_model_and_processor(args.model, args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
    print(
        f"# {where}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"datasets {datasets.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; model {args.model}, batch "
        f"{args.batch_size}; load average at the start {os.getloadavg()[0]:.1f}"
    )
    rows = jpeg_rows(args.rows)
    pixels = [Image.open(io.BytesIO(row)).size for row in rows]
    print(
        f"# {args.rows} rows, JPEG bytes, mean {np.mean([w * h for w, h in pixels]) / 1e6:.3f} megapixels, "
        f"mean {np.mean([len(row) for row in rows]) / 1024:.0f} KiB\n"
    )
    results = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        inputs = write_inputs(rows, folder)
        if args.competing_load:
            thread_choice(inputs["parquet"], folder, model, processor, args.batch_size, args.repeats)
            return
        model_rate = model_only(rows, model, processor, args.batch_size)
        for kind in args.inputs:
            dataset = open_input(kind, inputs[kind])
            decode_rate = decode_only(dataset, args.batch_size, folder / f"decode-{kind}")
            summary = score_dataset(
                open_input(kind, inputs[kind]), folder / f"one-{kind}", model, processor,
                batch_size=args.batch_size, progress=False,
            )  # fmt: skip
            assert summary.rows == args.rows and summary.failed == 0, summary
            results.append((kind, decode_rate, {1: summary.images_per_second}))
    print("| input | decode only img/s | model only img/s | processes | scoring img/s | / min(decode, model) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, decode_rate, rates in results:
        bound = min(decode_rate, model_rate)
        for processes, rate in rates.items():
            print(f"| {kind} | {decode_rate:.1f} | {model_rate:.1f} | {processes} | {rate:.1f} | {rate / bound:.0%} |")
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
