"""Scoring many images: the core every path shares, and the runs built on it.

| module | what |
| --- | --- |
| `core` | [`score_images`]: decoded images in, one [`ImageScore`] each out; the rules of a batch, once |
| `resources` | decode workers, model threads and batch size for a run |
| `files` | image files and folders: decoding in DataLoader workers, [`score_files`] |
| `results` | a results file (CSV, JSON, JSONL) written as files are scored, resumable |
| `dataset` | `datasets` datasets in one process: [`QualityScorer`] for `Dataset.map`, [`score_dataset`] to Parquet |
| `ray_data` | Ray Data: `decode_images`, `QualiCLIPPredictor` for `map_batches`; `score_dataset_ray` (`--engine ray`) |

`dataset` needs the `[datasets]` extra and is imported on first use of its names; `ray_data` needs the `[ray]` extra
and is imported by its own path only (`from qualiclip_hf.scoring.ray_data import QualiCLIPPredictor`), so that nothing
else imports Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it. Imported on first use, so that `qualiclip --help` and the results writer
# load neither torch nor `datasets`.
_EXPORTS = {
    "DecodedImage": "core",
    "ImageScore": "core",
    "score_images": "core",
    "choose_thread_counts": "resources",
    "default_batch_size": "resources",
    "usable_cores": "resources",
    "DECODE_PLACES": "files",
    "ScoreResult": "files",
    "collect_image_paths": "files",
    "read_image": "files",
    "score_files": "files",
    "QualityScorer": "dataset",
    "open_dataset": "dataset",
    "read_scores": "dataset",
    "score_dataset": "dataset",
}
__all__ = [
    "DECODE_PLACES",
    "DecodedImage",
    "ImageScore",
    "QualityScorer",
    "ScoreResult",
    "choose_thread_counts",
    "collect_image_paths",
    "default_batch_size",
    "open_dataset",
    "read_image",
    "read_scores",
    "score_dataset",
    "score_files",
    "score_images",
    "usable_cores",
]

if TYPE_CHECKING:
    from .core import DecodedImage, ImageScore, score_images
    from .dataset import QualityScorer, open_dataset, read_scores, score_dataset
    from .files import DECODE_PLACES, ScoreResult, collect_image_paths, read_image, score_files
    from .resources import choose_thread_counts, default_batch_size, usable_cores


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
