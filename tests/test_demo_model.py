"""The embedded demo model (trained here from scratch, see training/results/demo): behaviour on held-out photos."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage import data

from qualiclip_hf.loading import load_model_and_processor
from training.degradations import apply_distortion

# training/prepare_demo_data.py holds these out of the demo model's training set.
HELDOUT_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


@pytest.fixture(scope="module")
def demo():
    return load_model_and_processor("demo")


@pytest.fixture(scope="module")
def photos():
    out = []
    for name in HELDOUT_PHOTOS:
        image = torch.from_numpy(np.asarray(getattr(data, name)()).copy()).permute(2, 0, 1).float() / 255
        scale = 256 / max(image.shape[-2:])
        size = [round(s * scale) for s in image.shape[-2:]]
        out.append(torch.nn.functional.interpolate(image[None], size=size, mode="bicubic", antialias=True).clamp(0, 1))
    return out


@torch.inference_mode()
@pytest.mark.parametrize("distortion", ["gaussian_blur", "white_noise", "jpeg"])
def test_score_falls_with_the_level_of_degradation(demo, photos, distortion):
    model, processor = demo
    correlations = []
    for index, photo in enumerate(photos):
        levels = [apply_distortion(photo, distortion, lvl, torch.Generator().manual_seed(index))[0] for lvl in range(5)]
        inputs = processor(images=[(lvl * 255).round().to(torch.uint8) for lvl in levels], return_tensors="pt")
        scores = model(**inputs).quality_score.numpy()
        correlations.append(spearmanr(-np.arange(5), scores).statistic)
    assert np.mean(correlations) >= 0.8, correlations


@torch.inference_mode()
def test_pristine_photos_score_above_their_heavily_degraded_versions(demo, photos):
    model, processor = demo
    for index, photo in enumerate(photos):
        worst = apply_distortion(photo, "jpeg", 4)
        blurred = apply_distortion(photo, "gaussian_blur", 4)
        batch = [(x[0] * 255).round().to(torch.uint8) for x in (photo, worst, blurred)]
        pristine, jpeg, blur = model(**processor(images=batch, return_tensors="pt")).quality_score.tolist()
        assert pristine > jpeg and pristine > blur, (HELDOUT_PHOTOS[index], pristine, jpeg, blur)
