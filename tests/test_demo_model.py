"""The embedded demo model (trained here from scratch, see training/results/demo): behaviour on held-out photos."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from qualiclip_hf.loading import load_model_and_processor
from training.degradations import apply_distortion

from .conftest import HELDOUT_PHOTOS, heldout_photo


@pytest.fixture(scope="module")
def photos():
    return [heldout_photo(name) for name in HELDOUT_PHOTOS]


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


def test_the_demo_folder_is_a_complete_model_folder(tmp_path):
    """It holds what `save_pretrained` writes: the same files, the same `auto_map`s and `custom_pipelines`, and the
    remote-code files of this version (links to the package's own modules)."""
    import json

    from qualiclip_hf.loading import DEMO_MODEL_PATH

    model, processor = load_model_and_processor("demo")  # its own copy: saving writes into the model's config
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = {path.name for path in tmp_path.iterdir()}
    assert saved <= {path.name for path in DEMO_MODEL_PATH.iterdir()}
    for name in saved:
        if name.endswith(".py") or name == "tokenizer.json":
            assert (DEMO_MODEL_PATH / name).read_bytes() == (tmp_path / name).read_bytes(), name
    for name, keys in {
        "config.json": ("auto_map", "custom_pipelines"),
        "processor_config.json": ("auto_map",),
        "tokenizer_config.json": ("auto_map",),
    }.items():
        ours, written = (json.loads((folder / name).read_text()) for folder in (DEMO_MODEL_PATH, tmp_path))
        for key in keys:
            assert ours[key] == written[key], (name, key)
    folders = (DEMO_MODEL_PATH, tmp_path)
    ours, written = (json.loads((folder / "processor_config.json").read_text()) for folder in folders)
    assert ours["image_processor"]["auto_map"] == written["image_processor"]["auto_map"]


def test_the_demo_folder_uses_the_standard_config_names():
    import json

    from qualiclip_hf import DEMO_MODEL_PATH

    config = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    # transformers' names (CLIP's text config, ResNet's vision config), not OpenAI's `layers`/`width`/`heads`.
    assert {"depths", "embedding_size", "num_attention_heads", "projection_dim"} <= set(config["vision_config"])
    assert {"hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"} <= set(
        config["text_config"]
    )
    old_names = {"layers", "width", "heads", "output_dim", "context_length", "image_resolution"}
    assert not old_names & (set(config["vision_config"]) | set(config["text_config"]))
