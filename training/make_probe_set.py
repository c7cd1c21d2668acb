"""Writes the probe set that `--precision auto` scores to choose a format: `qualiclip_hf/data/probe/`.

    python training/make_probe_set.py

Run once; the images are package data (`pyproject.toml`), read by `qualiclip_hf.backends.auto_precision`. The set: the
README's example photos (`examples/images`: three pristine photos and three degraded versions of one), and the three
pristine ones under six distortions of `training/degradations.py` (ARNIQA's degradation model, one from each of six
of its groups) at all five levels: 6 + 3 x 6 x 5 = 96 images, longest side at most 384 pixels, JPEG quality 90 (about
3 MB). Their scores spread from pristine to heavily degraded, so a format's drift is judged across the range a
trained model's scores cover. Deterministic: the same files on every run (fixed seed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.degradations import apply_distortion  # noqa: E402

EXAMPLES = ROOT / "examples" / "images"
OUTPUT = ROOT / "qualiclip_hf" / "data" / "probe"
PRISTINE = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")
# One distortion from each of six of ARNIQA's seven groups (blur, noise, compression, brightness change, colour,
# spatial); sharpness/contrast is left out to keep the set near 100 images.
DISTORTIONS = ("gaussian_blur", "white_noise", "jpeg", "brighten", "color_saturation1", "pixelate")
LEVELS = range(5)
MAX_SIZE = 384
JPEG_QUALITY = 90


def load(path: Path) -> torch.Tensor:
    """A photo as `(1, 3, H, W)` float in [0, 1], longest side at most `MAX_SIZE` (Pillow's area-averaging resize)."""
    image = Image.open(path).convert("RGB")
    image.thumbnail((MAX_SIZE, MAX_SIZE), Image.Resampling.BOX)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def save(image: torch.Tensor, path: Path) -> None:
    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)


def main() -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for old in OUTPUT.glob("*.jpg"):
        old.unlink()
    generator = torch.Generator().manual_seed(0)
    for path in sorted(EXAMPLES.glob("*.jpg")):
        save(load(path), OUTPUT / path.name)
    for name in PRISTINE:
        pristine = load(EXAMPLES / name)
        for distortion in DISTORTIONS:
            for level in LEVELS:
                degraded = apply_distortion(pristine, distortion, level, generator)
                save(degraded, OUTPUT / f"{Path(name).stem}_{distortion}_{level}.jpg")
    files = sorted(OUTPUT.glob("*.jpg"))
    total = sum(file.stat().st_size for file in files)
    print(f"wrote {len(files)} images ({total / 2**20:.1f} MB) to {OUTPUT}")


if __name__ == "__main__":
    main()
