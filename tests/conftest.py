"""Shared fixtures and helpers: tiny models for fast behaviour tests, the embedded demo model, an RN50 checkpoint in
the official layout made from random weights with the openai-clip package's own CLIP (no real weights exist offline),
and the images and direct scores the tests compare entry points with."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from qualiclip_hf import QUALICLIP_PROMPT_PAIRS, QualiCLIPConfig, QualiCLIPModel, QualiCLIPProcessor
from qualiclip_hf.build_processor import build_clip_tokenizer, make_processor

REPO_ROOT = Path(__file__).resolve().parents[1]
# The standard (transformers) names; tests/test_configuration.py checks that OpenAI's old names still load.
TINY_VISION = {"depths": [1, 1, 1, 1], "embedding_size": 8, "num_attention_heads": 2, "projection_dim": 32}
TINY_TEXT = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1, "projection_dim": 32}


# OpenAI CLIP's pixel normalisation (`Normalize` in `clip/clip.py`'s `_transform`), written here independently of the
# processor's defaults so that tests compare the processor with the official preprocessing. Shape (3, 1, 1).
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


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
def tiny(tiny_model_dir) -> tuple[QualiCLIPModel, QualiCLIPProcessor]:
    """The tiny model and its processor loaded back from `tiny_model_dir`, as every entry point loads a folder."""
    return QualiCLIPModel.from_pretrained(tiny_model_dir).eval(), QualiCLIPProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def demo() -> tuple[QualiCLIPModel, QualiCLIPProcessor]:
    """The embedded demo model (fp32, eval mode) and its processor, loaded once. Shared by every test: tests only run
    it, never change it (a test that needs a changed model loads its own)."""
    from qualiclip_hf.loading import load_model_and_processor

    return load_model_and_processor("demo")


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


@pytest.fixture
def small_probe_set(tmp_path, monkeypatch) -> Path:
    """`--precision auto` measures on 4 small photos instead of the package's 96, and caches under `tmp_path`."""
    from qualiclip_hf.backends import auto_precision

    folder = tmp_path / "probe"
    folder.mkdir()
    for seed in range(4):
        photo(64 + 16 * seed, 80, seed=seed).save(folder / f"{seed}.jpg")
    monkeypatch.setattr(auto_precision, "PROBE_DIR", folder)
    monkeypatch.setenv("QUALICLIP_CACHE", str(tmp_path / "cache"))
    return folder


def image_bytes(image: Image.Image, image_format: str, **options) -> bytes:
    """The bytes of `image` saved in `image_format` ("PNG", "JPEG", ...) with Pillow's save `options`."""
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


# training/prepare_demo_data.py holds these scikit-image photos out of the demo model's training set.
HELDOUT_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


def heldout_photo(name: str, size: int = 256) -> torch.Tensor:
    """scikit-image's photo `name` as a `(1, 3, height, width)` float tensor in [0, 1], its longer side `size`."""
    image = torch.from_numpy(np.asarray(getattr(data, name)()).copy()).permute(2, 0, 1).float() / 255
    scale = size / max(image.shape[-2:])
    target = [round(s * scale) for s in image.shape[-2:]]
    return torch.nn.functional.interpolate(image[None], size=target, mode="bicubic", antialias=True).clamp(0, 1)


@torch.no_grad()
def direct_scores(model: QualiCLIPModel, processor, images, **options) -> torch.Tensor:
    """The quality scores of `images` computed directly, processor then model, with no entry point in between: what
    every entry point's answer is compared with. `options` go to the processor (e.g. `max_size`)."""
    return model(**processor(images=images, return_tensors="pt", **options)).quality_score


@pytest.fixture
def offline_hf_home(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face home folder with the Hub client offline: its cache (`<home>/hub`, filled with
    `add_to_hub_cache`) is the only place downloads come from."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


LFS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def add_to_hub_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "0" * 40, etags: dict[str, str] | None = None
) -> None:
    """
    Puts `files` (path in the repository -> content) in the Hugging Face cache folder `cache` as revision `commit` of
    model repository `repo_id`, the way huggingface_hub's downloads do: `blobs/<etag>` (SHA-256 for LFS files, the git
    blob SHA-1 otherwise; `etags` overrides a file's, e.g. to fake a tampered download), `snapshots/<commit>/<path>`
    as relative symbolic links to them, and `refs/main`.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in sorted(files.items()):
        if etags and name in etags:
            etag = etags[name]
        elif name.endswith(LFS_SUFFIXES):
            etag = hashlib.sha256(content).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        (repo / "blobs" / etag).write_bytes(content)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its path relative to `folder` (POSIX separators)."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="session")
def handler():
    """The Inference Endpoints handler (`model_card/handler.py`, imported from its file) serving the demo model."""
    from qualiclip_hf.loading import DEMO_MODEL_PATH

    module = load_module_from_file(REPO_ROOT / "model_card" / "handler.py", "qualiclip_endpoint_handler")
    return module.EndpointHandler(path=str(DEMO_MODEL_PATH))


def good_score(answer: list[dict]) -> float:
    """The probability of the label "good" in an image-classification style answer (`[{"label", "score"}, ...]`)."""
    return next(entry["score"] for entry in answer if entry["label"] == "good")


def load_module_from_file(path: Path, name: str):
    """Imports a script that is not part of a package (the Space app, the endpoint handler) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
