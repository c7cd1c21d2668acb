"""Scoring on Ray Data (`qualiclip score --dataset ... --engine ray`, `score_dataset_ray`): images/s with 1 and 2
scoring actors against the decode-only and model-only rates of the same rows, the start-up cost of the local Ray,
and the driver's memory over the run.

    python -m benchmarks.ray_scoring [--rows 400] [--files 8] [--actors 1 2] [--batch-size 1] [--device cpu|cuda]

Writes `--rows` JPEGs of mixed sizes (`dataset_scoring.jpeg_rows`: smooth random pictures, 128 to 512 px
on the long side) as the bytes of an `Image` column in `--files` Parquet files, starts a local Ray with this machine's
cores (as the CLI does), then measures in one run, on the same rows:

- start-up: `ray.init` of the local cluster (`start_ray`), in seconds;
- decode only: the Parquet files read and decoded by Ray Data tasks (`decode_images`), no model;
- model only: the processor and the fused model on the rows decoded beforehand, batches of `--batch-size`, in this
  process with one torch thread (one actor's share on a CPU; on CUDA, the GPU);
- N actors: `score_dataset_ray` with `num_actors=N`, from the first row read to the last file written, actor start
  included (its own summary);
- driver memory: the resident memory of this process, sampled every 0.2 s during the largest run: at the start of the
  run, halfway through it and at the end. Streaming means the last two are about equal whatever the number of rows.

A pipeline can at best reach the slower of decoding and the model times the actors; the ratio column says how close
it gets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.dataset_scoring import jpeg_rows
from qualiclip_hf.backends.precision import cpu_description, prepare_scorer
from qualiclip_hf.image_reader import open_image_value
from qualiclip_hf.loading import load_model_and_processor
from qualiclip_hf.scoring.core import score_images
from qualiclip_hf.scoring.ray_data import decode_images, score_dataset_ray, start_ray


def write_parquet(rows: list[bytes], folder: Path, files: int) -> Path:
    folder.mkdir()
    per_file = -(-len(rows) // files)
    for index in range(files):
        chunk = rows[index * per_file : (index + 1) * per_file]
        table = pa.table({"image": [{"bytes": row, "path": None} for row in chunk]})
        pq.write_table(table, folder / f"data-{index:02d}.parquet")
    return folder


def decode_only(folder: Path, batch_size: int) -> float:
    import ray

    started = time.perf_counter()
    ds = ray.data.read_parquet(str(folder)).map_batches(
        decode_images, fn_kwargs={"drop_image_column": True}, batch_format="pyarrow", batch_size=batch_size
    )
    count = sum(batch.num_rows for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    return count / (time.perf_counter() - started)


def model_only(rows: list[bytes], model: str, device: str, batch_size: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scorer, processor = load_model_and_processor(model, device)
    scorer, _ = prepare_scorer(scorer.eval(), processor, "fp32", fuse=True)
    images = [np.array(open_image_value(row)) for row in rows]
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        score_images(batch, scorer, processor, ["image"] * len(batch))
    rate = len(images) / (time.perf_counter() - started)
    torch.set_num_threads(threads)
    return rate


class MemorySampler:
    """The resident memory of this process every `interval` seconds, on a background thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        process = psutil.Process()
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), process.memory_info().rss))
            time.sleep(interval)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=1, help="1: the CLI's default on a CPU; 8 on CUDA")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import ray

    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
    print(
        f"# {where}; {os.cpu_count()} cores; torch {torch.__version__}, ray {ray.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; model {args.model} (demo weights: speed only), batch {args.batch_size}; "
        f"load average at the start {os.getloadavg()[0]:.1f}"
    )
    rows = jpeg_rows(args.rows)
    print(f"# {args.rows} rows in {args.files} Parquet files, mean {np.mean([len(r) for r in rows]) / 1024:.0f} KiB")
    started = time.perf_counter()
    start_ray()
    startup = time.perf_counter() - started
    print(f"# local Ray start-up: {startup:.1f} s ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)\n")
    try:
        with tempfile.TemporaryDirectory() as folder:
            source = write_parquet(rows, Path(folder) / "shards", args.files)
            decode_rate = decode_only(source, args.batch_size)
            model_rate = model_only(rows, args.model, args.device, args.batch_size)
            results = []
            memory = None
            for actors in args.actors:
                with MemorySampler() as sampler:
                    before = psutil.Process().memory_info().rss
                    summary = score_dataset_ray(
                        str(source), f"{folder}/out-{actors}", model=args.model, num_actors=actors,
                        batch_size=args.batch_size, device=args.device,
                    )  # fmt: skip
                assert summary.rows == args.rows and summary.failed == 0, summary
                results.append((actors, summary.images_per_second))
                samples = [rss for _, rss in sampler.samples]
                memory = (before, samples[len(samples) // 2], samples[-1], max(samples))
    finally:
        ray.shutdown()
    print("| actors | decode only img/s | model only img/s (1 actor) | scoring img/s | / min(decode, actors x model) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for actors, rate in results:
        bound = min(decode_rate, actors * model_rate)
        print(f"| {actors} | {decode_rate:.1f} | {model_rate:.1f} | {rate:.1f} | {rate / bound:.0%} |")
    mib = [value / 2**20 for value in memory]
    print(
        f"\n# driver resident memory over the last run: {mib[0]:.0f} MiB before, {mib[1]:.0f} MiB halfway, "
        f"{mib[2]:.0f} MiB at the end, {mib[3]:.0f} MiB at most"
    )
    print(f"# load average at the end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
