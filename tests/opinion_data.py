"""A small opinion-scored set made here, for the fine-tuning tests (`tests/test_finetune.py`).

Four photos that the demo model never saw (`conftest.HELDOUT_PHOTOS`, 128 pixels on the longer side), each degraded by
four distortions of `training/degradations.py` at their 5 levels: 80 images. The opinion score is a fixed function of
distortion and level, `5 - 4 * weight * (level + 1) / 5`, whose weights make darkening the worst and white noise the
mildest: the reverse of the demo model, which punishes noise most and hardly notices darkening (its zero-shot SRCC
on these scores is about 0.1). Fine-tuning has something to learn, and a held-out split shows whether it did.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image

from tests.conftest import HELDOUT_PHOTOS, heldout_photo
from training.degradations import apply_distortion

# Distortion: weight of its level in the opinion score (1: level 5 costs 4 points of 5).
OPINION_WEIGHTS = {"darken": 1.0, "gaussian_blur": 0.6, "jpeg": 0.5, "white_noise": 0.3}


def opinion_score(distortion: str, level: int) -> float:
    """The mean opinion score, on 1..5 with 5 the best, of `distortion` at `level` (0..4)."""
    return 5 - 4 * OPINION_WEIGHTS[distortion] * (level + 1) / 5


def write_opinion_folder(folder: Path, side: int = 128) -> Path:
    """
    Writes the set as an `imagefolder`: PNG files and a `metadata.csv` with `file_name`, `mos`, `distortion`,
    `level` and `photo` columns. Returns `folder`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo in HELDOUT_PHOTOS:
        pristine = heldout_photo(photo, side)
        for distortion in OPINION_WEIGHTS:
            for level in range(5):
                degraded = apply_distortion(pristine, distortion, level, torch.Generator().manual_seed(0), "clean")
                name = f"{photo}_{distortion}_{level + 1}.png"
                pixels = (degraded[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / name)
                rows.append(
                    {"file_name": name, "mos": opinion_score(distortion, level), "distortion": distortion,
                     "level": level + 1, "photo": photo}
                )  # fmt: skip
    with open(folder / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder
