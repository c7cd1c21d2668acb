"""`--precision auto`: the fastest format that scores as float32 does, measured for the weights in hand on this machine.

How a model's scores move in bf16, fp16 or int8 depends on its weights (on the demo model torch bf16 moved scores by
at most 0.006; on a random RN50 with spread scores by 0.086: benchmarks/RESULTS.md), and how much faster a format runs
depends on the machine. So on first use of a model on a machine, `choose_precision`:

1. scores the probe set shipped with the package (`PROBE_DIR`: the example photos, and three of them under six
   distortions at five levels, 96 images at most 384 pixels, `training/make_probe_set.py`), one image at a time, in
   fp32 and in each reduced format the backend runs and the device runs natively (`precision.native_formats`),
   image by image in alternation, so that a change of load on the machine slows every format alike;
2. takes the fastest format whose scores meet `precision.DRIFT_BAR` against fp32 (SRCC >= 0.999 and max |score
   difference| <= 0.01) and which ran at least `SPEED_MARGIN` times as fast as fp32: never one slower than fp32;
3. caches the measurements under `cache_dir()/precision/`, keyed by the weights' hash (`onnx.model_cache_key`), the
   backend, the device and its hardware (CPU model, torch's ISA and the CPU's format flags, or the GPU's name),
   PyTorch's thread count on a CPU, the library versions (torch, ONNX Runtime, OpenVINO), the probe set and, where
   int8 is measured, its calibration photos. The next run with the same key reads the verdict in milliseconds.

`qualiclip precision --model NAME` prints the whole table.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .onnx import cache_dir, model_cache_key
from .precision import (
    BACKEND_PRECISIONS,
    DRIFT_BAR,
    cpu_description,
    native_formats,
    prepare_scorer,
    resolve_precision,
    runtime_for,
)

PROBE_DIR = Path(__file__).resolve().parents[1] / "data" / "probe"
# The probe images are scored at most this large (longest side): they are stored so, and the drift of a format
# hardly depends on the image size, while the time to measure grows with it.
PROBE_MAX_SIZE = 384
# A reduced format is taken only if it scored the probe set at least this many times as fast as fp32, timed side by
# side: timings on a shared machine vary by a few percent from run to run, and a format that is not clearly faster is
# not worth any drift.
SPEED_MARGIN = 1.10
# The first images of the probe set are scored untimed in every format: the first call of a format builds its kernels
# (oneDNN primitives, OpenVINO's compiled graph for a shape).
WARMUP_IMAGES = 2
# Written into the cache key: raise it when how a format is prepared or measured changes, so that older verdicts are
# measured again.
VERDICT_VERSION = 1
# The libraries whose versions decide a format's speed and rounding (a new version is measured again).
LIBRARIES = ("torch", "onnxruntime", "openvino")


@dataclasses.dataclass
class FormatMeasurement:
    """
    One row of a verdict: a format run by a runtime, measured on the probe set against fp32 (the backend's own fp32).

    Attributes:
        precision: `"fp32"`, `"bf16"`, `"fp16"` or `"int8"`.
        runtime: what runs it: `"torch"`, `"onnxruntime"` or `"openvino"` (`precision.runtime_for`).
        srcc: Spearman rank correlation of its scores with fp32's (1.0 for fp32 itself); `None` when not run.
        max_abs_diff: the largest |score - fp32 score| over the probe images, in score units ([0, 1]).
        images_per_second: one image at a time (batch 1), after `WARMUP_IMAGES` untimed ones.
        speedup: `images_per_second` over fp32's in the same run.
        not_run: why it was not measured (not native on this device, runtime not installed, ...), else `""`.
    """

    precision: str
    runtime: str
    srcc: float | None = None
    max_abs_diff: float | None = None
    images_per_second: float | None = None
    speedup: float | None = None
    not_run: str = ""

    @property
    def meets_drift_bar(self) -> bool:
        """Whether its scores met `DRIFT_BAR` against fp32 (a NaN SRCC, from constant scores, does not)."""
        if self.srcc is None or self.max_abs_diff is None:
            return False
        return self.srcc >= DRIFT_BAR["min_srcc"] and self.max_abs_diff <= DRIFT_BAR["max_abs_diff"]

    @property
    def fast_enough(self) -> bool:
        """Whether it ran at least `SPEED_MARGIN` times as fast as fp32."""
        return self.speedup is not None and self.speedup >= SPEED_MARGIN


@dataclasses.dataclass
class PrecisionVerdict:
    """
    What `choose_precision` decided and why.

    Attributes:
        chosen: the format that runs (`"fp32"` when no reduced format passed).
        backend: the `--backend` it was measured with.
        device: the device type (`"cpu"`, `"cuda"`, ...).
        hardware: the device in words (CPU model, ISA and flags, or the GPU's name).
        weights: the hash of the weights (`onnx.model_cache_key`, 16 hex digits).
        rows: fp32 first, then every reduced format the backend runs, measured or with why not.
        probe_images: how many probe images were scored.
        seconds: how long measuring took (when it was measured, cached or not).
        cached: whether the measurements were read from the cache rather than made now.
        cache_file: where they are cached.
    """

    chosen: str
    backend: str
    device: str
    hardware: str
    weights: str
    rows: list[FormatMeasurement]
    probe_images: int
    seconds: float
    cached: bool
    cache_file: Path

    def row(self, precision: str) -> FormatMeasurement:
        return next(row for row in self.rows if row.precision == precision)

    def line(self) -> str:
        """The one line printed when `auto` chooses, e.g. `precision: bf16 (auto, measured for weights ...: ...)`."""
        if self.cached:
            origin = f"cached verdict, measured in {self.seconds:.0f} s"
        else:
            origin = f"measured in {self.seconds:.0f} s, now cached"
        where = f"weights {self.weights} on this {self.device}, {self.probe_images} probe images, {origin}"
        if self.chosen != "fp32":
            row = self.row(self.chosen)
            return (
                f"precision: {self.chosen} (auto, {where}: {row.speedup:.2f}x fp32's speed, max score diff "
                f"{row.max_abs_diff:.4f}, SRCC {row.srcc:.5f})"
            )
        reasons = [f"{row.precision} {_verdict(row, self.chosen)}" for row in self.rows if row.precision != "fp32"]
        return f"precision: fp32 (auto, {where}: {'; '.join(reasons) or 'no reduced format'})"

    def table(self) -> str:
        """The measurements as a Markdown table: format, runtime, SRCC, max diff, images/s, speed vs fp32, verdict."""
        lines = [
            "| precision | runs in | SRCC | max abs diff | images/s | vs fp32 | verdict |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in self.rows:
            cells = [
                "-" if row.srcc is None else f"{row.srcc:.5f}",
                "-" if row.max_abs_diff is None else f"{row.max_abs_diff:.4f}",
                "-" if row.images_per_second is None else f"{row.images_per_second:.2f}",
                "-" if row.speedup is None else f"{row.speedup:.2f}x",
            ]
            lines.append(f"| {row.precision} | {row.runtime} | {' | '.join(cells)} | {_verdict(row, self.chosen)} |")
        return "\n".join(lines)


def _verdict(row: FormatMeasurement, chosen: str) -> str:
    if row.not_run:
        return f"not run: {row.not_run}"
    if row.precision == chosen:
        return "chosen" if chosen != "fp32" else "chosen (reference)"
    if row.precision == "fp32":
        return "reference"
    if not row.meets_drift_bar:
        return f"drifts (SRCC {row.srcc:.5f}, max diff {row.max_abs_diff:.4f})"
    if not row.fast_enough:
        return f"within the bar, not faster ({row.speedup:.2f}x fp32, under {SPEED_MARGIN}x)"
    return "within the bar and faster (another runtime was asked for, or a faster format passed)"


def probe_images() -> list[Path]:
    """
    The probe set's files (`PROBE_DIR`), sorted.

    Raises:
        FileNotFoundError: the package was installed without them.
    """
    paths = sorted(PROBE_DIR.glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no probe images in {PROBE_DIR}: the package is incomplete; use --precision fp32")
    return paths


def srcc(a: np.ndarray, b: np.ndarray) -> float:
    """
    Spearman's rank correlation of two score vectors: Pearson's correlation of their ranks, ties given their average
    rank (as `scipy.stats.spearmanr`, which is not a dependency of the package). NaN where either is constant.
    """
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def hardware_description(device: torch.device | str) -> str:
    """The device in words, as verdicts are keyed by it: the GPU's name and compute capability, or the CPU's model,
    torch's ISA and its format flags (`precision.cpu_description`)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
    if device.type == "cpu":
        return cpu_description()
    return device.type


def library_versions() -> dict[str, str | None]:
    """The installed versions of `LIBRARIES` (`None`: not installed), read without importing them."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def choose_precision(
    model: torch.nn.Module,
    processor: Any,
    backend: str = "torch",
    calibration_images: str | Path | None = None,
    *,
    fuse: bool = False,
    runtimes: Sequence[str] | None = None,
    remeasure: bool = False,
    weights: str | None = None,
    progress: bool | None = None,
) -> PrecisionVerdict:
    """
    What `--precision auto` runs for `model` with `backend` on its device: measured once (seconds to minutes, see the
    module's docstring), then read from the cache. `model` is left as it was (each format is measured on a copy).

    Args:
        model: a float32 `QualiCLIPModel` in eval mode, on its device.
        processor: its `QualiCLIPProcessor`.
        backend: `"torch"`, `"onnxruntime"` or `"openvino"`; its fp32 is the reference and the speed to beat.
        calibration_images: the photos int8 is calibrated on (`quantization.calibration_images`).
        fuse: measure fp32 with the torch backend as `prepare_scorer(fuse=True)` runs it (`qualiclip score` does).
        runtimes: the runtimes the choice may take (e.g. `("torch",)` where only the PyTorch model can run); all are
            measured and cached all the same.
        remeasure: measure again even if a verdict is cached.
        weights: the weights' hash, if known (default: `model_cache_key(model)`).
        progress: show a progress bar while measuring (default: on a terminal only).

    Returns:
        The `PrecisionVerdict`; `.chosen` is the format, `.line()` the line to print.

    Raises:
        ValueError: an unknown backend, or an ONNX backend on a device other than the CPU.
        FileNotFoundError: the probe set is missing.
    """
    device = next(model.parameters()).device
    resolve_precision("fp32", device, backend)  # refuses a backend that does not run on this device
    weights = weights or model_cache_key(model)
    native = native_formats(device)
    reduced = [fmt for fmt in BACKEND_PRECISIONS[backend] if fmt != "fp32"]
    calibration = None
    if "int8" in reduced and "int8" in native:
        from .quantization import calibration_key

        try:
            calibration = calibration_key(calibration_images)
        except FileNotFoundError:
            calibration = "none"  # int8 is reported as not run
    images = probe_images()
    hardware = hardware_description(device)
    key = {
        "version": VERDICT_VERSION,
        "weights": weights,
        "backend": backend,
        "device": device.type,
        "hardware": hardware,
        # How much faster a format runs depends on the threads it has (PyTorch's; the ONNX runtimes take the cores).
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "libraries": library_versions(),
        "probe": _files_key(images),
        "calibration": calibration,
        "drift_bar": DRIFT_BAR,
        "speed_margin": SPEED_MARGIN,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "precision" / f"{digest}.json"
    cached = None if remeasure else _read_verdict(path, key)
    if cached is not None:
        rows, seconds = cached
    else:
        started = time.perf_counter()
        rows = measure_formats(
            model, processor, backend, reduced, native, images, calibration_images, fuse=fuse, progress=progress
        )
        seconds = time.perf_counter() - started
        _write_verdict(path, key, rows, seconds)
    return PrecisionVerdict(
        chosen=pick_format(rows, runtimes),
        backend=backend,
        device=device.type,
        hardware=hardware,
        weights=weights,
        rows=rows,
        probe_images=len(images),
        seconds=seconds,
        cached=cached is not None,
        cache_file=path,
    )


def pick_format(rows: Sequence[FormatMeasurement], runtimes: Sequence[str] | None = None) -> str:
    """
    The fastest reduced format of `rows` that met the drift bar and ran at least `SPEED_MARGIN` times as fast as fp32
    (among `runtimes`, if given), else `"fp32"`.
    """
    passing = [
        row
        for row in rows
        if row.precision != "fp32"
        and row.meets_drift_bar
        and row.fast_enough
        and (runtimes is None or row.runtime in runtimes)
    ]
    return max(passing, key=lambda row: row.speedup).precision if passing else "fp32"


@torch.inference_mode()
def measure_formats(
    model: torch.nn.Module,
    processor: Any,
    backend: str,
    formats: Sequence[str],
    native: set[str],
    images: Sequence[Path],
    calibration_images: str | Path | None = None,
    fuse: bool = False,
    progress: bool | None = None,
) -> list[FormatMeasurement]:
    """
    Scores `images` one at a time in fp32 and in each of `formats` that is in `native` (each prepared on a copy of
    `model` by `precision.prepare_scorer`, as `qualiclip score` prepares it), the formats in turn for each image, and
    compares each format's scores and speed with fp32's. Returns fp32's row, then one per format of `formats`.
    """
    from ..scoring import read_image

    device = next(model.parameters()).device
    rows = {"fp32": FormatMeasurement("fp32", runtime_for(backend, "fp32"))}
    scorers = {"fp32": prepare_scorer(copy.deepcopy(model), processor, "fp32", backend, fuse=fuse)[0]}
    for fmt in formats:
        rows[fmt] = FormatMeasurement(fmt, runtime_for(backend, fmt))
        if fmt not in native:
            rows[fmt].not_run = f"not native on this {device.type}"
            continue
        try:
            scorers[fmt] = prepare_scorer(copy.deepcopy(model), processor, fmt, backend, calibration_images)[0]
        except (ImportError, OSError, ValueError) as error:  # a runtime not installed, no calibration photos, ...
            rows[fmt].not_run = str(error).splitlines()[0]
    inputs = []
    for path in images:
        batch = processor(images=[read_image(path)], return_tensors="pt", max_size=PROBE_MAX_SIZE)
        inputs.append({name: value.to(device) for name, value in batch.items()})
    scores = {fmt: np.empty(len(inputs)) for fmt in scorers}
    seconds = dict.fromkeys(scorers, 0.0)
    order = list(scorers)
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        print(
            f"precision auto: measuring {', '.join(order)} with {backend} on {len(inputs)} probe images, once for "
            "these weights on this machine",
            file=sys.stderr,
        )
    from tqdm.auto import tqdm

    for index, batch in enumerate(tqdm(inputs, desc="precision auto", unit="img", disable=not progress, leave=False)):
        # Each image in every format in turn, starting with another format each time: a change of load on the
        # machine, or a cache warmed by the format before, then favours none.
        for fmt in order[index % len(order) :] + order[: index % len(order)]:
            started = time.perf_counter()
            score = scorers[fmt](**batch).quality_score.float().cpu()  # .cpu() waits for the GPU
            if index >= WARMUP_IMAGES:
                seconds[fmt] += time.perf_counter() - started
            scores[fmt][index] = score.item()
    timed = len(inputs) - WARMUP_IMAGES
    for fmt, row in rows.items():
        if fmt not in scorers:
            continue
        difference = np.abs(scores[fmt] - scores["fp32"])
        row.srcc = srcc(scores[fmt], scores["fp32"]) if fmt != "fp32" else 1.0
        row.max_abs_diff = float(difference.max())
        row.images_per_second = timed / seconds[fmt] if timed > 0 and seconds[fmt] > 0 else None
        if row.images_per_second is not None and rows["fp32"].images_per_second is not None:
            row.speedup = row.images_per_second / rows["fp32"].images_per_second
    return list(rows.values())


def _files_key(paths: Sequence[Path]) -> str:
    from .quantization import _images_key  # the one hash of a set of image files (names and bytes)

    return _images_key(paths)


def _read_verdict(path: Path, key: dict) -> tuple[list[FormatMeasurement], float] | None:
    """The cached rows and measuring time for `key`, or `None` (none cached; a corrupt file is warned of)."""
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content["key"] != json.loads(json.dumps(key)):
            return None  # another key with the same hash prefix: measured again, and replaced
        rows = [FormatMeasurement(**row) for row in content["rows"]]
        return rows, float(content["seconds"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"{path}: ignoring a corrupt precision verdict ({error}); measuring again", stacklevel=3)
        return None


def _write_verdict(path: Path, key: dict, rows: list[FormatMeasurement], seconds: float) -> None:
    """Caches a verdict, atomically (a temporary file renamed); a cache that cannot be written is warned of."""
    content = {"key": key, "seconds": seconds, "rows": [dataclasses.asdict(row) for row in rows]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(content, file, indent=2)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        warnings.warn(
            f"cannot cache the precision verdict in {path.parent} ({error.strerror or error}); it is measured again "
            "next time: set QUALICLIP_CACHE to a writable folder",
            stacklevel=3,
        )
