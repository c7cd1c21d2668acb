"""Shared fixtures: tiny models for fast behaviour tests, and an RN50 checkpoint in the official layout made
from random weights with the openai-clip package's own CLIP (no real weights exist offline)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qualiclip_hf import QUALICLIP_PROMPT_PAIRS, QualiCLIPConfig, QualiCLIPModel
from qualiclip_hf.build_processor import build_clip_tokenizer, make_processor

TINY_VISION = {"layers": [1, 1, 1, 1], "width": 8, "heads": 2, "output_dim": 32}
TINY_TEXT = {"width": 32, "heads": 2, "layers": 1, "output_dim": 32}


def tiny_config(vision: dict | None = None, **overrides) -> QualiCLIPConfig:
    return QualiCLIPConfig(vision_config={**TINY_VISION, **(vision or {})}, text_config=dict(TINY_TEXT), **overrides)


def randomize_batchnorms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """CLIP's init zeroes every residual branch's last BatchNorm, which would make a random model nearly
    constant; random affine parameters and statistics make scores depend on the image, so parity tests bite."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


@pytest.fixture(scope="session")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer) -> QualiCLIPModel:
    torch.manual_seed(0)
    model = QualiCLIPModel(tiny_config()).eval()
    randomize_batchnorms(model, torch.Generator().manual_seed(0))
    model.set_prompts(QUALICLIP_PROMPT_PAIRS, tokenizer)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model.save_pretrained(path)
    make_processor(tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reference_clip():
    """OpenAI's own `clip.model.CLIP` at RN50 sizes with random weights, and its normalised prompt features."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
        from clip.model import CLIP

    torch.manual_seed(1234)
    model = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).float().eval()
    randomize_batchnorms(model, torch.Generator().manual_seed(1234))
    texts = [text for pair in QUALICLIP_PROMPT_PAIRS for text in pair]
    with torch.no_grad():
        prompts_features = F.normalize(model.encode_text(clip.tokenize(texts)), dim=-1)
    return model, prompts_features


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory, reference_clip) -> Path:
    """A file in the official `qualiclip.pth` layout: `clip_model.<key>` tensors plus `prompts_features`."""
    model, prompts_features = reference_clip
    checkpoint = {f"clip_model.{key}": tensor for key, tensor in model.state_dict().items()}
    checkpoint["prompts_features"] = prompts_features
    path = tmp_path_factory.mktemp("official") / "qualiclip.pth"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, official_checkpoint) -> Path:
    from qualiclip_hf.convert_qualiclip_checkpoint import convert_checkpoint

    return convert_checkpoint(official_checkpoint, tmp_path_factory.mktemp("converted") / "qualiclip")


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (structure at several scales, unlike white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, height // 16), max(2, width // 16), 3))
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def load_module_from_file(path: Path, name: str):
    """Imports a script that is not part of a package (the Space app, the endpoint handler) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
