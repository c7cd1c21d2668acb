"""End-to-end folder scoring (`qualiclip score DIR`): where the time goes, decoding vs the model.

    python -m benchmarks.folder_scoring [--images 1000] [--model demo|rn50-random] [--batch-size 4] [--workers N]
                                        [--device cpu|cuda] [--decode-on workers|device] [--precision fp32|bf16|...]
                                        [--backend torch|onnxruntime|openvino]
    python -m benchmarks.folder_scoring --competing-load [--images 60]

Writes `--images` JPEG photos of mixed sizes (crops of scikit-image's photos, 320 to 1280 px on the long side) to a
temporary folder, then measures in one run, on the same files and batches:

- decode only: the DataLoader workers of `score_files` reading the files, no model (with `--decode-on device`, the
  workers read the bytes and TorchCodec decodes them on the device, as `score_files` then does);
- model only: the processor and the model on images decoded beforehand;
- end to end: `score_files`, decoding in the workers while the model works;
- one at a time: `score_files` with batches of one image, whose scores must equal the batched ones (the model
  groups equal sizes and never lets padding change a score).

With `--competing-load` it measures instead the thread choice of `qualiclip score` on a CPU: `score_files` with
PyTorch's default (one thread per core, the old choice) and with `choose_thread_counts` (the new one), on an idle
machine and with one CPU-bound process started beside it (a "competing CPU load"), alternately in one run.

The end-to-end rate can at best reach the slower of the first two (when decoding hides entirely behind the model, or
the reverse); the last column says how close it gets. `rn50-random` is the full-size architecture with random weights:
it measures speed only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from benchmarks.threads import compare_thread_counts
from qualiclip_hf import QualiCLIPConfig, QualiCLIPModel, QualiCLIPProcessor
from qualiclip_hf.backends.precision import prepare_scorer
from qualiclip_hf.loading import BACKENDS, PRECISIONS, resolve_pretrained
from qualiclip_hf.scoring import read_image, score_files
from qualiclip_hf.scoring.files import _decode_jpegs, _device_jpeg_decoder, _ImageFiles
from qualiclip_hf.scoring.resources import runnable_elsewhere

SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
LONG_SIDES = (320, 480, 640, 800, 1024, 1280)
ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)


def write_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Random crops of the source photos, resized to mixed sizes and saved as JPEG (quality 90)."""
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in SOURCES]
    paths = []
    for index in tqdm(range(count), desc="writing photos", unit="img"):
        source = sources[index % len(sources)]
        long_side, aspect = int(rng.choice(LONG_SIDES)), float(rng.choice(ASPECTS))
        if aspect >= 1:
            width, height = long_side, round(long_side / aspect)
        else:
            width, height = round(long_side * aspect), long_side
        crop_width = int(rng.integers(source.width // 2, source.width + 1))
        crop_height = int(rng.integers(source.height // 2, source.height + 1))
        left = int(rng.integers(0, source.width - crop_width + 1))
        top = int(rng.integers(0, source.height - crop_height + 1))
        photo = source.crop((left, top, left + crop_width, top + crop_height)).resize((width, height), Image.BICUBIC)
        path = folder / f"photo_{index:05d}.jpg"
        photo.save(path, quality=90)
        paths.append(path)
    return paths


def load_model(name: str) -> tuple[QualiCLIPModel, QualiCLIPProcessor]:
    if name == "rn50-random":
        torch.manual_seed(0)
        return QualiCLIPModel(QualiCLIPConfig()).eval(), QualiCLIPProcessor.from_pretrained(resolve_pretrained("demo"))
    path = resolve_pretrained(name)
    return QualiCLIPModel.from_pretrained(path).eval(), QualiCLIPProcessor.from_pretrained(path)


def decode_only(paths: list[Path], batch_size: int, workers: int, device: torch.device, decode_on: str) -> float:
    on_device = decode_on == "device"
    loader = DataLoader(
        _ImageFiles(paths, jpeg_as_bytes=on_device), batch_size=batch_size, num_workers=workers, collate_fn=list
    )
    decode_jpeg = _device_jpeg_decoder() if on_device else None
    started = time.perf_counter()
    for batch in tqdm(loader, desc="decode only", unit="batch", leave=False, disable=None):
        if on_device:
            encoded = [(item.index, item.jpeg) for item in batch if item.jpeg is not None]
            list(_decode_jpegs(encoded, decode_jpeg, device, paths, None))
    _synchronize(device)
    return len(paths) / (time.perf_counter() - started)


@torch.inference_mode()
def model_only(paths: list[Path], model: QualiCLIPModel, processor: QualiCLIPProcessor, batch_size: int) -> float:
    progress = tqdm(paths, desc="decoding beforehand", unit="img", leave=False, disable=None)
    images = [read_image(path) for path in progress]
    started = time.perf_counter()
    for start in tqdm(range(0, len(images), batch_size), desc="model only", unit="batch", leave=False, disable=None):
        inputs = processor(images=images[start : start + batch_size], return_tensors="pt").to(model.device)
        model(**inputs).quality_score.cpu()
    return len(images) / (time.perf_counter() - started)


def end_to_end(
    paths: list[Path], model: QualiCLIPModel, processor: QualiCLIPProcessor, batch_size: int, workers: int, **options
) -> tuple[float, list[float]]:
    started = time.perf_counter()
    results = list(
        tqdm(score_files(paths, model, processor, batch_size=batch_size, num_workers=workers, **options),
             total=len(paths), desc=f"end to end, batches of {batch_size}", unit="img", leave=False, disable=None)
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    failed = [result for result in results if result.error is not None]
    if failed:
        raise SystemExit(f"{len(failed)} files failed, first: {failed[0].error}")
    return len(paths) / elapsed, [result.score for result in results]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def thread_choice(paths: list[Path], model: QualiCLIPModel, processor: QualiCLIPProcessor, repeats: int) -> None:
    """End-to-end rates with the old (one thread per core) and the new thread count (`benchmarks.threads`)."""
    compare_thread_counts(
        lambda repeat, workers, competing: end_to_end(paths, model, processor, 1, workers)[0], repeats
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="demo", help="'demo', 'rn50-random', or a model folder")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: score_files' own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decode-on", choices=("workers", "device"), default="workers")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="as `qualiclip score --precision`")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="as `qualiclip score --backend`")
    parser.add_argument(
        "--competing-load",
        action="store_true",
        help="compare the old and new thread counts, idle and beside a busy process",
    )
    parser.add_argument("--repeats", type=int, default=3, help="with --competing-load: runs of each, alternately")
    args = parser.parse_args()
    device = torch.device(args.device)
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))

    model, processor = load_model(args.model)
    model, _ = prepare_scorer(model.to(device), processor, args.precision, args.backend)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# torch {torch.__version__}, {where}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"{workers} workers, JPEGs decoded on {args.decode_on}, {args.precision} on {args.backend}, "
        f"{time.strftime('%Y-%m-%d')}; "
        f"model {args.model}, batch {args.batch_size}, {args.images} JPEG photos of mixed sizes\n"
    )
    print(
        f"# load average before the run: {os.getloadavg()}; runnable besides this process: {runnable_elsewhere():.1f}"
    )
    if args.competing_load:
        with tempfile.TemporaryDirectory() as folder:
            thread_choice(write_photos(Path(folder), args.images), model, processor, args.repeats)
        return
    options = {"decode_on": args.decode_on}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_photos(Path(folder), args.images)
        megapixels = sum(np.prod(Image.open(path).size) for path in paths) / 1e6 / len(paths)
        decode_rate = decode_only(paths, args.batch_size, workers, device, args.decode_on)
        model_rate = model_only(paths, model, processor, args.batch_size)
        total_rate, scores = end_to_end(paths, model, processor, args.batch_size, workers, **options)
        single_rate, single_scores = end_to_end(paths, model, processor, 1, workers, **options)
    bound = min(decode_rate, model_rate)
    print(f"mean size: {megapixels:.2f} megapixels\n")
    diff = max(abs(a - b) for a, b in zip(scores, single_scores, strict=True))
    print(
        "| decode only img/s | model only img/s | end to end img/s | end to end / slower of the two "
        "| one at a time img/s | batched / one at a time | max score diff |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {decode_rate:.1f} | {model_rate:.1f} | {total_rate:.1f} | {total_rate / bound:.0%} | {single_rate:.1f} "
        f"| {total_rate / single_rate:.2f}x | {diff:.1e} |"
    )


if __name__ == "__main__":
    main()
