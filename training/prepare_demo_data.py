"""Collects freely packaged photos for the demo model into an imagefolder: `train/` and `heldout/`.

Sources: scikit-image's bundled data photos (public domain / CC0) and the photographs of Debian's
`mate-backgrounds` and `plasma-workspace-wallpapers` packages (downloaded with `apt-get download`, unpacked with
`dpkg -x`; nothing is installed). Each photo is downscaled to at most `--max-side` pixels and stored as a
high-quality JPEG. Nothing here is committed; run it before training:

    python -m training.prepare_demo_data --output data/demo_pristine
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data

# Held out for evaluation and for the behaviour tests of the demo model (never seen in training).
HELDOUT = {"coffee", "chelsea", "astronaut", "rocket", "LadyBird", "Storm", "Altai", "Path"}
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat", "retina")
DEBIAN_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")


def debian_photos(workdir: Path) -> dict[str, Path]:
    """
    Downloads and unpacks `DEBIAN_PACKAGES` (`apt-get download`, `dpkg -x`; nothing is installed).

    Args:
        workdir (`Path`): An empty folder to unpack into.

    Returns:
        `dict[str, Path]`: by photo name, the largest image of each wallpaper (plasma ships several sizes) and the
        MATE nature photos.

    Raises:
        subprocess.CalledProcessError: when `apt-get` or `dpkg` fails (no package index, no network).
    """
    subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=workdir, check=True, capture_output=True)
    root = workdir / "root"
    for deb in workdir.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    photos = {path.stem: path for path in (root / "usr/share/backgrounds/mate/nature").glob("*.jpg")}
    for wallpaper in sorted((root / "usr/share/wallpapers").iterdir()):
        images = list(wallpaper.glob("contents/images/*.jpg")) + list(wallpaper.glob("contents/images/*.png"))
        if images:
            photos[wallpaper.name] = max(images, key=lambda p: p.stat().st_size)
    return photos


def save(image: Image.Image, path: Path, max_side: int) -> None:
    """
    Writes `image` as an RGB JPEG of quality 95, downscaled (Lanczos) so that its longest side is at most `max_side`.

    Args:
        image (`PIL.Image.Image`): The photo.
        path (`Path`): The file to write.
        max_side (`int`): The longest side, in pixels.
    """
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    image.save(path, quality=95)


def main() -> None:
    """The command line: see the module's docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("data/demo_pristine"))
    parser.add_argument("--max-side", type=int, default=768)
    args = parser.parse_args()
    for split in ("train", "heldout"):
        (args.output / split).mkdir(parents=True, exist_ok=True)

    count = {"train": 0, "heldout": 0}
    for name in SKIMAGE_PHOTOS:
        split = "heldout" if name in HELDOUT else "train"
        save(
            Image.fromarray(np.asarray(getattr(skimage_data, name)())),
            args.output / split / f"{name}.jpg",
            args.max_side,
        )
        count[split] += 1
    with tempfile.TemporaryDirectory() as workdir:
        for name, path in debian_photos(Path(workdir)).items():
            split = "heldout" if name in HELDOUT else "train"
            with Image.open(path) as image:
                save(image, args.output / split / f"{name}.jpg", args.max_side)
            count[split] += 1
    print(f"wrote {count['train']} training and {count['heldout']} held-out photos to {args.output}")


if __name__ == "__main__":
    main()
