"""int8 QualiCLIP for the CPU: ONNX Runtime static quantization of the exported graph, calibrated on a few photos.

Why ONNX Runtime (measured in benchmarks/RESULTS.md, section "Precision past fp32 on the CPU"): it runs the int8
graph without PyTorch (the same runtime as the fp32 ONNX backend), takes any image size without recompiling, and
its int8 convolutions use VNNI/AMX where the CPU has them. PyTorch's PT2E x86 quantizer needs `torch.compile` (its
Inductor backend and a C++ compiler) and recompiles per input shape; OpenVINO is another 60 MB runtime.

What is quantized: the convolutions (weights per output channel, int8; activations per tensor, uint8, from the
min/max seen on the calibration images), in QDQ format, which ONNX Runtime fuses into int8 convolutions. The
attention pool and the score head stay in float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_path
from .onnx import ONNX_FILENAME, cache_dir, export_onnx, model_cache_key

# The default calibration photos, shipped with the package (links to the README's `examples/images` in a clone; files
# in a wheel): a pristine photo and its blurred, noisy and JPEG versions, and two other scenes.
CALIBRATION_IMAGES_DIR = Path(__file__).resolve().parents[1] / "data" / "calibration"
# Calibration photos are scored at most this large (longest side): activation ranges hardly depend on the size, and
# larger photos only make calibration slower.
CALIBRATION_MAX_SIZE = 512


def default_calibration_images() -> list[Path]:
    """The bundled calibration photos (`qualiclip_hf/data/calibration`, package data), sorted."""
    return sorted(CALIBRATION_IMAGES_DIR.glob("*.jpg"))


def calibration_images(folder: str | Path | None = None) -> list[Path]:
    """
    The photos to calibrate on: the image files of `folder` (sorted, not recursive), or the bundled ones.

    Raises:
        FileNotFoundError: `folder` does not exist, or it (or the bundled folder, in a package installed without its
            data) holds no image.
    """
    from ..scoring import collect_image_paths

    if folder is not None and not Path(folder).exists():
        raise FileNotFoundError(f"{folder}: no such folder of calibration photos")
    paths = default_calibration_images() if folder is None else collect_image_paths([folder])
    paths = [path for path in paths if path.is_file()]
    if not paths:
        where = folder if folder is not None else f"{CALIBRATION_IMAGES_DIR} (the bundled photos)"
        raise FileNotFoundError(f"no calibration images in {where}; pass a folder of photos (--calibration-images)")
    return paths


class _CalibrationReader:
    """ONNX Runtime's `CalibrationDataReader` protocol: one `{"pixel_values": (1, 3, H, W)}` per photo."""

    def __init__(self, paths: Sequence[Path], processor: Any) -> None:
        self._items = self._inputs(paths, processor)

    @staticmethod
    def _inputs(paths: Sequence[Path], processor: Any) -> Iterator[dict[str, np.ndarray]]:
        from ..scoring import read_image

        for path in paths:
            image = read_image(path)  # raises ValueError naming the file
            try:
                inputs = processor(images=[image], return_tensors="pt", max_size=CALIBRATION_MAX_SIZE)
            except ValueError as error:  # below the model's minimum size: the processor knows no file name
                raise ValueError(f"calibration photo {path}: {error}") from None
            yield {"pixel_values": inputs["pixel_values"].float().numpy()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_onnx(fp32_path: str | Path, output: str | Path, images: Sequence[Path], processor: Any) -> Path:
    """
    Writes the int8 version of an exported fp32 graph to `output` (atomically), calibrated on `images`.

    Args:
        fp32_path: a graph written by `export_onnx`.
        output: the int8 ONNX file to write.
        images: calibration photos (a handful is enough: only activation ranges are estimated).
        processor: the model's `QualiCLIPProcessor`, which prepares the photos.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as staged, _quiet_onnxruntime_logs():
        quantize_static(
            str(fp32_path),
            str(staged),
            _CalibrationReader(images, processor),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return output


@contextlib.contextmanager
def _quiet_onnxruntime_logs() -> Iterator[None]:
    """
    Drops the quantizer's advice, which it logs on the root logger, one line per convolution ("Please consider
    pre-processing before quantization", "Expected bias ... to be an initializer"): it says nothing a user can act
    on. Other loggers' records pass.
    """

    def not_from_onnxruntime(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    logging.root.addFilter(not_from_onnxruntime)
    try:
        yield
    finally:
        logging.root.removeFilter(not_from_onnxruntime)


def calibration_key(folder: str | Path | None = None) -> str:
    """
    A hash of the calibration photos of `folder` (default: the bundled examples), 12 hex digits: the same photos
    give the same int8 graph. Results files record it (`qualiclip_hf.scoring.results.SETTING_OPTIONS`).

    Raises:
        FileNotFoundError: no calibration photos.
    """
    return _images_key(calibration_images(folder))


def _images_key(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cached_onnx(
    model: Any, processor: Any, precision: str = "fp32", calibration_folder: str | Path | None = None
) -> Path:
    """
    The ONNX graph of `model` in `precision` (`"fp32"` or `"int8"`), exported (and quantized) on first use into
    `cache_dir()/<model key>/`, where the key hashes the model's config and weights (`model_cache_key`); int8 graphs
    are also keyed by their calibration photos (`calibration_folder`, default: the bundled examples).

    Raises:
        FileNotFoundError: no calibration photos.
        ValueError: an unknown precision, or a calibration photo that cannot be read (naming it).
        OSError: the cache folder cannot be written (naming it and `QUALICLIP_CACHE`).
    """
    if precision not in ("fp32", "int8"):
        raise ValueError(f"ONNX graphs are cached in fp32 or int8, not {precision!r}")
    images = calibration_images(calibration_folder) if precision == "int8" else []  # refused before any work
    folder = cache_dir() / model_cache_key(model)
    fp32_path = folder / ONNX_FILENAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or error
        raise OSError(
            f"cannot write the graph cache {folder}: {reason}; set QUALICLIP_CACHE to a writable folder"
        ) from None
    if not fp32_path.is_file():
        export_onnx(model, folder, processor)
    if precision == "fp32":
        return fp32_path
    int8_path = folder / f"model_int8_{_images_key(images)}.onnx"
    if not int8_path.is_file():
        quantize_onnx(fp32_path, int8_path, images, processor)
    return int8_path
