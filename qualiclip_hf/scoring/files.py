"""Scoring image files: decoding in DataLoader workers, batched inference, one result per file, errors included."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..image_reader import DEFAULT_MAX_PIXELS, find_image_files, open_image
from ..modeling_qualiclip import QualiCLIPModel
from ..processing_qualiclip import QualiCLIPProcessor
from .core import DecodedImage, score_images
from .resources import choose_thread_counts, prepare_worker

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


def _prepare_loader_worker(parent_pid: int, worker_id: int) -> None:
    prepare_worker(parent_pid)


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
        worker_init_fn=functools.partial(_prepare_loader_worker, os.getpid()),
    )
    for batch in loader:
        decoded: dict[int, DecodedImage] = {item.index: item.error or item.image for item in batch if item.jpeg is None}
        encoded = [(item.index, item.jpeg) for item in batch if item.jpeg is not None]
        decoded.update(_decode_jpegs(encoded, decode_jpeg, model.device, paths, max_pixels))
        indices = sorted(decoded)
        outcomes = score_images(
            [decoded[index] for index in indices], model, processor, [str(paths[index]) for index in indices], max_size
        )
        for index, outcome in zip(indices, outcomes, strict=True):
            yield ScoreResult(str(paths[index]), outcome.score, outcome.error)


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
