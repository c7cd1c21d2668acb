"""Writes the bundled example images: public-domain / CC0 photos from scikit-image's data, and degraded copies
of one of them (blur, noise, JPEG), so that a scoring run shows a ranking. Run from the repository root:
`python examples/make_examples.py`."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from skimage import data

OUT = Path(__file__).parent / "images"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    photos = {"coffee": data.coffee(), "astronaut": data.astronaut(), "chelsea": data.chelsea()}
    for name, array in photos.items():
        Image.fromarray(array).save(OUT / f"{name}.jpg", quality=92)
    coffee = Image.fromarray(photos["coffee"])
    coffee.filter(ImageFilter.GaussianBlur(3)).save(OUT / "coffee_blurred.jpg", quality=92)
    noisy = np.asarray(coffee, dtype=np.float32) + np.random.default_rng(0).normal(0, 25, photos["coffee"].shape)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(OUT / "coffee_noisy.jpg", quality=92)
    coffee.save(OUT / "coffee_jpeg_q5.jpg", quality=5)


if __name__ == "__main__":
    main()
