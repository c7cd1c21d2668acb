"""Scoring image files: decoding in DataLoader workers, batched inference, one result per file, errors included."""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .image_reader import DEFAULT_MAX_PIXELS, find_image_files, open_image
from .modeling_qualiclip import QualiCLIPModel
from .processing_qualiclip import QualiCLIPProcessor

logger = logging.getLogger(__name__)
DECODE_PLACES = ("workers", "device")


@dataclass
class ScoreResult:
    """The outcome for one file: a score in [0, 1], or the reason there is none."""

    path: str
    score: float | None = None
    error: str | None = None


def collect_image_paths(inputs: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """
    Expands the command-line inputs: a file is taken as given (an unreadable one gets an error later, not
    silently dropped); a directory contributes its files whose extension an installed reader opens
    (`image_reader.image_file_extensions`: Pillow's registered extensions, any case), sorted, descending into
    subdirectories only when `recursive`; the number of its other files, skipped, is logged as a warning. A path
    that does not exist is kept, so it is reported as an error.
    """
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images, skipped = find_image_files(item, recursive)
            if skipped:
                examples = ", ".join(path.name for path in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
                logger.warning("%s: skipped %d file(s) that are not images (%s)", item, len(skipped), examples)
            paths.extend(images)
        else:
            paths.append(item)
    return paths


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, convert_icc: bool = True) -> torch.Tensor:
    """
    Decodes an image file to a `(3, height, width)` uint8 RGB tensor as `image_reader.open_image` reads it (bit
    depth from the header, EXIF orientation, ICC profile to sRGB unless `convert_icc=False`, first shown frame,
    transparency composited onto white, truncation refused); files of more than `max_pixels` pixels refused before
    decoding.

    Raises:
        ValueError: naming the file and the cause (missing, a directory, empty, not an image, truncated, too large).
    """
    array = np.asarray(open_image(path, max_pixels=max_pixels, convert_icc=convert_icc))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class _FileItem(NamedTuple):
    """What a DataLoader worker hands over for one file: decoded pixels, JPEG bytes left to decode, or an error."""

    index: int
    image: torch.Tensor | None = None  # (3, height, width) uint8
    jpeg: torch.Tensor | None = None  # the file's bytes, (num_bytes,) uint8
    error: str | None = None


class _ImageFiles(Dataset):
    """
    Reads files in DataLoader workers; a failure travels as a message instead of killing the worker. With
    `jpeg_as_bytes`, plain JPEG files (RGB or grey, within the pixel limit) are only read, for decoding on the
    model's device; every other file is decoded here by Pillow.
    """

    def __init__(
        self,
        paths: list[Path],
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        jpeg_as_bytes: bool = False,
        convert_icc: bool = True,
    ) -> None:
        self.paths = paths
        self.max_pixels = max_pixels
        self.jpeg_as_bytes = jpeg_as_bytes
        self.convert_icc = convert_icc

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _FileItem:
        path = self.paths[index]
        try:
            if self.jpeg_as_bytes and _is_plain_jpeg(path, self.max_pixels, self.convert_icc):
                data = path.read_bytes()
                if data.endswith(b"\xff\xd9"):  # a file without its end marker goes to the reader's rule
                    return _FileItem(index, jpeg=torch.frombuffer(bytearray(data), dtype=torch.uint8))
            return _FileItem(index, image=read_image(path, self.max_pixels, self.convert_icc))
        except (ValueError, OSError) as error:
            return _FileItem(index, error=str(error) if isinstance(error, ValueError) else f"{path}: {error}")


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process answers it (one line, the results kept) and shuts the
    # workers down; a worker of its own would print a traceback mid-transfer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _is_plain_jpeg(path: Path, max_pixels: int | None, convert_icc: bool = True) -> bool:
    """
    Whether TorchCodec's decoder reads the file as the image reader does. Anything else (CMYK, an ICC profile to
    convert, other formats, too many pixels, unreadable) goes to `read_image`, whose errors name the cause. Reads
    the header only.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
            with Image.open(path) as image:
                width, height = image.size
                image_format, mode, profile = image.format, image.mode, image.info.get("icc_profile")
        return (
            image_format == "JPEG"
            and mode in ("RGB", "L")
            and (max_pixels is None or width * height <= max_pixels)
            and not (convert_icc and profile)
        )
    except Exception:  # Pillow raises many kinds; `read_image` names the cause
        return False


def score_files(
    paths: list[Path],
    model: QualiCLIPModel,
    processor: QualiCLIPProcessor,
    batch_size: int = 4,
    num_workers: int | None = None,
    max_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode_on: str = "workers",
    convert_icc: bool = True,
) -> Iterator[ScoreResult]:
    """
    Scores image files, yielding one [`ScoreResult`] per path in order. Decoding runs in `num_workers` background
    processes (default: up to 4, one per spare core) while the model works. A file that cannot be read or scored
    gets its `error` and the others go on. `max_size` downscales large images before scoring; `max_pixels` refuses
    files of more pixels before decoding them, and `convert_icc=False` ignores colour profiles (see `read_image`).

    Args:
        decode_on: `"workers"` (Pillow, in the worker processes) or `"device"`: the workers only read JPEG files
            and TorchCodec decodes them in batches on the model's device (nvJPEG on CUDA); other files are still
            decoded by Pillow in the workers. On a CPU, `"device"` decodes in the main process. Needs `torchcodec`
            (`pip install "qualiclip-hf[decode]"`).
    """
    if decode_on not in DECODE_PLACES:
        raise ValueError(f"decode_on must be one of {', '.join(DECODE_PLACES)}, got {decode_on!r}")
    decode_jpeg = _device_jpeg_decoder() if decode_on == "device" else None
    if num_workers is None:
        num_workers = choose_thread_counts(load=0)[0]
    loader = DataLoader(
        _ImageFiles(paths, max_pixels, jpeg_as_bytes=decode_on == "device", convert_icc=convert_icc),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=_ignore_interrupts,
    )
    for batch in loader:
        results = {item.index: ScoreResult(str(paths[item.index]), error=item.error) for item in batch}
        decoded = [(item.index, item.image) for item in batch if item.image is not None]
        encoded = [(item.index, item.jpeg) for item in batch if item.jpeg is not None]
        for index, outcome in _decode_jpegs(encoded, decode_jpeg, model.device, paths, max_pixels):
            if isinstance(outcome, torch.Tensor):
                decoded.append((index, outcome))
            else:
                results[index].error = outcome
        for index, error in _too_small(decoded, processor, max_size, paths):
            results[index].error = error
        decoded = [(index, image) for index, image in decoded if results[index].error is None]
        for index, outcome in _score_decoded(decoded, model, processor, max_size, paths):
            if isinstance(outcome, float):
                results[index].score = outcome
            else:
                results[index].error = outcome
        yield from (results[index] for index in sorted(results))


def _device_jpeg_decoder() -> Callable[..., list[torch.Tensor]]:
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError) as error:  # also a build for another torch, whose library fails to load
        raise ImportError(
            'decoding on the device needs TorchCodec, for this torch (pip install "qualiclip-hf[decode]"); importing '
            f"it failed: {error}"
        ) from error
    return decode_jpeg


def _decode_jpegs(
    encoded: list[tuple[int, torch.Tensor]],
    decode_jpeg: Callable[..., list[torch.Tensor]] | None,
    device: torch.device,
    paths: list[Path],
    max_pixels: int | None,
) -> Iterator[tuple[int, torch.Tensor | str]]:
    """
    Decodes JPEG bytes on `device` in one batch (TorchCodec applies the EXIF orientation, as `read_image` does). A
    file the batch fails on is decoded alone, and one that TorchCodec cannot decode goes to Pillow (`read_image`),
    which decodes it or names the cause.
    """
    if not encoded:
        return
    try:
        images = decode_jpeg([data for _, data in encoded], mode="RGB", device=device)
    except RuntimeError:
        if len(encoded) > 1:
            for item in encoded:
                yield from _decode_jpegs([item], decode_jpeg, device, paths, max_pixels)
            return
        index = encoded[0][0]
        try:
            yield index, read_image(paths[index], max_pixels).to(device)  # on the device, as its batch companions
        except ValueError as error:
            yield index, str(error)
        return
    yield from ((index, image) for (index, _), image in zip(encoded, images, strict=True))


def _too_small(
    decoded: list[tuple[int, torch.Tensor]], processor: QualiCLIPProcessor, max_size: int | None, paths: list[Path]
) -> Iterator[tuple[int, str]]:
    # The image processor owns the rule; checked per file here so that one small image does not fail its batch.
    for index, image in decoded:
        try:
            processor.image_processor.check_size(*image.shape[-2:], max_size=max_size)
        except ValueError as error:
            yield index, f"{paths[index]}: {error}"


@torch.inference_mode()
def _score_decoded(
    decoded: list[tuple[int, torch.Tensor]],
    model: QualiCLIPModel,
    processor: QualiCLIPProcessor,
    max_size: int | None,
    paths: list[Path],
) -> Iterator[tuple[int, float | str]]:
    if not decoded:
        return
    try:
        scores = _run_model([image for _, image in decoded], model, processor, max_size)
    except (RuntimeError, ValueError) as error:
        if len(decoded) == 1:
            index, image = decoded[0]
            yield index, _failure_message(paths[index], image, error)
            return
        # The batch failed as a whole (out of memory, say): score the images one by one so that each gets its
        # own outcome.
        for item in decoded:
            yield from _score_decoded([item], model, processor, max_size, paths)
        return
    yield from ((index, score) for (index, _), score in zip(decoded, scores, strict=True))


def _failure_message(path: Path, image: torch.Tensor, error: Exception) -> str:
    text = str(error)
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        height, width = image.shape[-2:]
        return (
            f"{path}: not enough memory to score {width}x{height} pixels at full resolution; downscale large images "
            "with --max-size (for example --max-size 2048; `max_size=2048` in Python)"
        )
    if isinstance(error, ValueError):  # the processor's checks say what is wrong with the image
        return f"{path}: {text}"
    return f"{path}: scoring failed: {text}"


def _run_model(
    images: list[torch.Tensor], model: QualiCLIPModel, processor: QualiCLIPProcessor, max_size: int | None
) -> list[float]:
    inputs = processor(images=images, return_tensors="pt", max_size=max_size).to(model.device)
    return model(**inputs).quality_score.float().cpu().tolist()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def runnable_elsewhere(samples: int = 5, interval_s: float = 0.02) -> float:
    """
    How many processes besides this one are running or waiting for a core now: on Linux the mean of a few readings of
    the kernel's count of runnable tasks (`/proc/loadavg`, fourth field), which, unlike the load average, sees a
    process started a second ago; elsewhere the 1-minute load average.
    """
    try:
        readings = []
        for index in range(samples):
            if index:
                time.sleep(interval_s)
            with open("/proc/loadavg") as file:
                readings.append(int(file.read().split()[3].split("/")[0]) - 1)  # minus this process's thread
        return max(0.0, sum(readings) / len(readings))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def choose_thread_counts(cores: int | None = None, load: float | None = None) -> tuple[int, int]:
    """
    How many DataLoader workers decode files, and how many threads PyTorch uses for the model on a CPU.

    - **Workers:** one per core beside the model's, at most 4. A worker decodes with one thread (PyTorch sets one
      thread in its workers, and Pillow decodes in one), and one worker decodes about ten times as many photos per
      second as the model scores on the same core (`benchmarks/RESULTS.md`), so more would only compete for cores.
    - **Model threads:** the cores not already busy, at least 1: `cores - round(load)`. PyTorch's default, one thread
      per core, is right on an idle machine. With the cores busy, its threads wait at every operator for a thread
      that the kernel has descheduled, and scoring collapses (15 to 1.6 images/s on 2 cores with one competing
      process, in the issue that asked for this; `benchmarks/folder_scoring.py --competing-load` measures it).

    Args:
        cores: Usable cores (default: `usable_cores()`).
        load: Processes besides this one that want a core (default: `runnable_elsewhere()`).

    Returns:
        `(num_workers, num_threads)`.
    """
    cores = usable_cores() if cores is None else cores
    load = runnable_elsewhere() if load is None else load
    workers = min(4, max(0, cores - 1))
    threads = max(1, min(cores, cores - round(load)))
    return workers, threads
