"""pyiqa plugin: `pyiqa.create_metric("qualiclip")` runs our model, and gives the numbers of pyiqa's own arch.

Parity is checked against pyiqa's real `QualiCLIP` arch loaded with the same random weights. The only thing
bypassed is its download: its weight cache points to a temporary folder, and its CLIP loader (`load("RN50")`) is
pointed at a TorchScript archive of openai-clip's `CLIP` with those weights, read by pyiqa's own `clip_model.load`.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyiqa
import pytest
import torch
import torch.nn.functional as F
from pyiqa.archs import clip_model as pyiqa_clip_model
from pyiqa.archs import qualiclip_arch as pyiqa_qualiclip_arch
from pyiqa.default_model_configs import DEFAULT_CONFIGS
from pyiqa.utils import download_util

import pyiqa_plugin  # the added names exist once the plugin is loaded; a fresh process is tested separately
from qualiclip_hf import QUALICLIP_PROMPT_PAIRS, QualiCLIPModel
from qualiclip_hf.convert_qualiclip_checkpoint import CheckpointError, convert_checkpoint, convert_qualiclip_plus
from qualiclip_hf.loading import OFFICIAL_FILENAME, OFFICIAL_REPO_ID, PLUS_FILENAMES

from .conftest import CLIP_MEAN, CLIP_STD, add_to_hub_cache, photo, randomize_batchnorms

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP

PROMPTS = [text for pair in QUALICLIP_PROMPT_PAIRS for text in pair]
PLUS_METRICS = ["qualiclip+", "qualiclip+-clive", "qualiclip+-flive", "qualiclip+-spaq"]  # "+" is KonIQ
ALL_METRICS = ["qualiclip", *PLUS_METRICS]
# Not 100 nor openai-clip's initial 1/0.07: shows that the scale is read from the checkpoint.
CLIP_LOGIT_SCALE = 37.0


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@dataclass
class PyiqaWeights:
    """Weights as pyiqa would have downloaded them, and the same weights converted for our model."""

    cache: Path  # pyiqa's weight cache: QualiCLIP.pth and QualiCLIP+_<dataset>.pth
    archive: Path  # the CLIP backbone as a TorchScript archive, what pyiqa's clip loader reads
    converted: dict[str, Path]  # metric name -> converted folder

    def cached_file(self, metric: str) -> Path:
        """Where pyiqa looks for a metric's file: named after its URL's last part (`QualiCLIP%2B_koniq.pth`)."""
        return self.cache / Path(urlparse(pyiqa_qualiclip_arch.default_model_urls[metric]).path).name


def offline_pyiqa(monkeypatch: pytest.MonkeyPatch, weights: PyiqaWeights) -> None:
    """The download bypass: pyiqa's weight cache is `weights.cache` and its CLIP "RN50" is `weights.archive`."""

    def load_local_clip(name: str, device: str = "cpu", *args, **kwargs):
        assert name == "RN50", name
        return pyiqa_clip_model.load(str(weights.archive), device, *args, **kwargs)

    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(weights.cache))
    monkeypatch.setattr(pyiqa_qualiclip_arch, "load", load_local_clip)


def save_official_layout(model: CLIP, path: Path) -> None:
    """`QualiCLIP.pth`: every CLIP tensor as `clip_model.<key>`, and the normalised prompt features."""
    with torch.no_grad():
        prompts_features = F.normalize(model.encode_text(clip.tokenize(PROMPTS)), dim=-1)
    checkpoint = {f"clip_model.{key}": tensor for key, tensor in model.state_dict().items()}
    torch.save({**checkpoint, "prompts_features": prompts_features}, path)


def save_torchscript(model: CLIP, path: Path) -> None:
    image = torch.rand(1, 3, model.visual.input_resolution, model.visual.input_resolution)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in CLIP's forward
        torch.jit.trace(model, (image, clip.tokenize(["a photo"])), check_trace=False).save(str(path))


def save_plus_files(weights: PyiqaWeights, metrics: list[str], context_std: float) -> None:
    """`QualiCLIP+_<dataset>.pth` as pyiqa's training saves them: the `params` of its arch; a context each."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        offline_pyiqa(monkeypatch, weights)
        net = pyiqa_qualiclip_arch.QualiCLIP(model_type="qualiclip+", pretrained=False)
    for index, metric in enumerate(metrics):
        params = {key: tensor.clone() for key, tensor in net.state_dict().items()}
        context = params["prompt_learner.ctx"]
        generator = torch.Generator().manual_seed(100 + index)
        params["prompt_learner.ctx"] = torch.randn(context.shape, generator=generator) * context_std
        torch.save({"params": params}, weights.cached_file(metric))


def calibrate_batchnorms(visual: torch.nn.Module, images: torch.Tensor) -> None:
    """Sets every BatchNorm's statistics to those of `images` (CLIP-normalised): a random network whose statistics
    do not match its activations maps every image to nearly the same embedding, which would make parity vacuous."""
    for module in visual.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    visual.train()
    with torch.no_grad():
        visual(images)
    visual.eval()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Iterator[PyiqaWeights]:
    """A small CLIP ResNet (real vocabulary and context length, so pyiqa's tokenisation applies), random weights
    rounded to fp16 like the released CLIP's, and pyiqa's files for QualiCLIP and the four QualiCLIP+ variants."""
    root = tmp_path_factory.mktemp("pyiqa_tiny")
    torch.manual_seed(7)
    model = CLIP(32, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1).eval()
    randomize_batchnorms(model, torch.Generator().manual_seed(7))
    calibration = torch.cat([rgb_images(seed=seed) for seed in (20, 30, 40)])
    calibrate_batchnorms(model.visual, (calibration - CLIP_MEAN) / CLIP_STD)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(CLIP_LOGIT_SCALE))
    model = model.half().float()
    weights = PyiqaWeights(cache=root / "pyiqa", archive=root / "tiny_clip.pt", converted={})
    weights.cache.mkdir()
    save_torchscript(model, weights.archive)
    save_official_layout(model, weights.cache / OFFICIAL_FILENAME)
    save_plus_files(weights, list(PLUS_METRICS), context_std=0.02)

    weights.converted["qualiclip"] = convert_checkpoint(weights.cache / OFFICIAL_FILENAME, root / "qualiclip")
    for name in PLUS_METRICS:
        plus_file = weights.cached_file(name)
        weights.converted[name] = convert_qualiclip_plus(weights.cache / OFFICIAL_FILENAME, plus_file, root / name)
    yield weights
    shutil.rmtree(root, ignore_errors=True)  # 115 MB, needed by this module only


def rgb_images(sizes=((64, 80), (64, 80), (64, 80)), seed: int = 0) -> torch.Tensor:
    """A batch of smooth random photos, RGB in [0, 1], at different contrasts and brightnesses."""
    batch = []
    for index, (height, width) in enumerate(sizes):
        image = torch.from_numpy(np.array(photo(height, width, seed=seed + index))).permute(2, 0, 1).float() / 255
        contrast, level = ((0.3, 0.3), (1.0, 0.5), (1.6, 0.7))[index % 3]
        batch.append(((image - 0.5) * contrast + level).clamp(0, 1))
    return torch.stack(batch)


@torch.no_grad()
@pytest.mark.parametrize("formula", ["pyiqa", "official"])
@pytest.mark.parametrize("name", ALL_METRICS)
def test_scores_match_pyiqa_builtin_arch(tiny_weights, monkeypatch, name, formula):
    """Both metrics at their defaults give pyiqa's formula; the official one (scale 100) is `logit_scale="official"`
    here and, on the built-in, the `temperature` that turns CLIP's learned scale into 100."""
    offline_pyiqa(monkeypatch, tiny_weights)
    folder = tiny_weights.converted[name]
    clip_scale = QualiCLIPModel.config_class.from_pretrained(folder).clip_logit_scale
    builtin_options = {} if formula == "pyiqa" else {"temperature": clip_scale / 100.0}
    our_options = {} if formula == "pyiqa" else {"logit_scale": "official"}
    builtin = pyiqa.create_metric(f"{name}-pyiqa", device="cpu", **builtin_options)
    assert type(builtin.net) is pyiqa_qualiclip_arch.QualiCLIP
    ours = pyiqa.create_metric(name, device="cpu", pretrained_model_name_or_path=str(folder), **our_options)
    assert type(ours.net) is pyiqa_plugin.QualiCLIPHF
    for images in (rgb_images(), rgb_images(sizes=[(97, 45)])):
        expected = builtin(images)
        scores = ours(images)
        assert scores.shape == expected.shape == (images.shape[0], 1)
        assert (scores - expected).abs().max() <= 1e-5
    assert builtin(rgb_images()).std() > 1e-2, "the scores must depend on the image for the test to mean something"


@torch.no_grad()
def test_default_formula_is_pyiqas_and_official_is_an_option(tiny_weights):
    folder = str(tiny_weights.converted["qualiclip"])
    images = rgb_images()
    model = QualiCLIPModel.from_pretrained(folder).eval()
    assert model.config.clip_logit_scale == pytest.approx(CLIP_LOGIT_SCALE, rel=1e-3)
    pixel_values = (images - CLIP_MEAN) / CLIP_STD
    default = pyiqa.create_metric("qualiclip-hf", device="cpu", pretrained_model_name_or_path=folder)(images)
    official = pyiqa.create_metric(
        "qualiclip-hf", device="cpu", pretrained_model_name_or_path=folder, logit_scale="official"
    )(images)
    half_clip = model(pixel_values, logit_scale=model.config.clip_logit_scale / 2).quality_score[:, None]
    hundred = model(pixel_values, logit_scale=100.0).quality_score[:, None]
    torch.testing.assert_close(default, half_clip, atol=1e-6, rtol=0)
    torch.testing.assert_close(official, hundred, atol=1e-6, rtol=0)
    assert (default - official).abs().max() > 1e-3


def test_plus_conversion_keeps_the_context_and_recomputes_the_prompt_embeddings(tiny_weights, monkeypatch, tmp_path):
    offline_pyiqa(monkeypatch, tiny_weights)
    pyiqa_net = pyiqa.create_metric("qualiclip+-clive-pyiqa", device="cpu").net
    model = QualiCLIPModel.from_pretrained(tiny_weights.converted["qualiclip+-clive"])
    params = torch.load(tiny_weights.cached_file("qualiclip+-clive"), weights_only=True)["params"]
    assert model.config.prompt_context_length == 16
    assert torch.equal(model.prompt_context, params["prompt_learner.ctx"])
    with torch.no_grad():
        expected = F.normalize(pyiqa_net.prompt_learner(pyiqa_net.clip_model[0]), dim=-1)
    torch.testing.assert_close(model.prompt_embeds, expected, atol=1e-6, rtol=0)
    # The learned context changes the prompts: the embeddings differ from the plain prompts'.
    plain = QualiCLIPModel.from_pretrained(tiny_weights.converted["qualiclip"])
    assert (model.prompt_embeds - plain.prompt_embeds).abs().max() > 1e-2
    # Saving and loading again keeps every tensor, the context included, bit for bit.
    model.save_pretrained(tmp_path / "again")
    saved, reloaded = model.state_dict(), QualiCLIPModel.from_pretrained(tmp_path / "again").state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[key], reloaded[key]) for key in saved)


def test_plus_file_learned_for_other_prompts_is_refused(tiny_weights, tmp_path):
    params = torch.load(tiny_weights.cached_file("qualiclip+"), weights_only=True)["params"]
    params["prompt_learner.token_suffix"] = params["prompt_learner.token_suffix"].roll(1, dims=0)
    other = tmp_path / "QualiCLIP+_other.pth"
    torch.save({"params": params}, other)
    with pytest.raises(CheckpointError, match=r"QualiCLIP\+_other\.pth: its learned context belongs to other prompts"):
        convert_qualiclip_plus(tiny_weights.cache / OFFICIAL_FILENAME, other, tmp_path / "out")
    torch.save({"weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a QualiCLIP\\+ checkpoint"):
        convert_qualiclip_plus(tiny_weights.cache / OFFICIAL_FILENAME, other, tmp_path / "out")


def test_metric_conventions(tiny_weights):
    for name in [*ALL_METRICS, *(f"{name}-hf" for name in ALL_METRICS), *(f"{name}-pyiqa" for name in ALL_METRICS)]:
        assert name in pyiqa.list_models(metric_mode="NR"), name
        entry = DEFAULT_CONFIGS[name]
        assert (entry["metric_mode"], entry.get("lower_better", False), entry["score_range"]) == ("NR", False, "0, 1")
    metric = pyiqa.create_metric(
        "qualiclip", device="cpu", pretrained_model_name_or_path=str(tiny_weights.converted["qualiclip"])
    )
    assert (metric.metric_mode, metric.lower_better, metric.score_range) == ("NR", False, "0, 1")
    with torch.no_grad():
        scores = metric(rgb_images())
    assert scores.shape == (3, 1) and scores.dtype == torch.float32
    assert torch.all((scores > 0) & (scores < 1))


@torch.no_grad()
def test_inputs_are_checked_and_read_the_pyiqa_way(tiny_weights, tmp_path):
    metric = pyiqa.create_metric(
        "qualiclip", device="cpu", pretrained_model_name_or_path=str(tiny_weights.converted["qualiclip"])
    )
    image = photo(72, 90, seed=11)
    image.save(tmp_path / "photo.png")
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None] / 255
    torch.testing.assert_close(metric(str(tmp_path / "photo.png")), metric(tensor), atol=1e-6, rtol=0)
    grey = tensor.mean(dim=1, keepdim=True)
    torch.testing.assert_close(metric(grey), metric(grey.expand(-1, 3, -1, -1)), atol=0, rtol=0)
    with pytest.raises(AssertionError, match=r"normalized to \[0, 1\]"):
        metric(tensor * 2)
    with pytest.raises(AssertionError, match="4D tensor"):
        metric(tensor[0])


@torch.no_grad()
def test_max_size_passes_through_create_metric(tiny_weights):
    folder = str(tiny_weights.converted["qualiclip"])
    capped = pyiqa.create_metric("qualiclip", device="cpu", pretrained_model_name_or_path=folder, max_size=48)
    full = pyiqa.create_metric("qualiclip", device="cpu", pretrained_model_name_or_path=folder)
    images = rgb_images(sizes=[(64, 80)] * 3)
    # The processor's rule: longest side 80 -> 48, the other 64 * 0.6 = 38.4 -> 38; antialiased bicubic.
    downscaled = F.interpolate(images, size=(38, 48), mode="bicubic", antialias=True, align_corners=False)
    downscaled = downscaled.clamp(0, 1)  # bicubic overshoots; the arch keeps images in range
    torch.testing.assert_close(capped(images), full(downscaled), atol=1e-6, rtol=0)
    assert (capped(images) - full(images)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="max_size"):
        pyiqa.create_metric("qualiclip", device="cpu", pretrained_model_name_or_path=folder, max_size=8)


def test_as_loss_gives_finite_gradients_to_the_images_only(tiny_weights):
    folder = str(tiny_weights.converted["qualiclip+"])
    metric = pyiqa.create_metric("qualiclip+", as_loss=True, device="cpu", pretrained_model_name_or_path=folder)
    images = rgb_images().requires_grad_()
    loss = metric(images)
    assert loss.ndim == 0
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in metric.net.parameters())


@torch.no_grad()
def test_half_precision_images_score_as_their_float32_values(tiny_weights):
    # pyiqa's own range check compares in the input's precision, where its `1 + 1e-6` bound rounds to 1, so it refuses
    # a half-precision image that reaches 1.0; `check_input_range=False` skips that check (README, pyiqa section).
    folder = str(tiny_weights.converted["qualiclip"])
    images = rgb_images()
    images[:, :, 0, 0] = 1.0
    with pytest.raises(AssertionError, match="normalized to"):
        pyiqa.create_metric("qualiclip", device="cpu", pretrained_model_name_or_path=folder)(images.half())
    metric = pyiqa.create_metric(
        "qualiclip", device="cpu", check_input_range=False, pretrained_model_name_or_path=folder
    )
    half, bfloat = images.half(), images.bfloat16()
    torch.testing.assert_close(metric(half), metric(half.float()), atol=0, rtol=0)
    torch.testing.assert_close(metric(bfloat), metric(bfloat.float()), atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_matches_cpu(tiny_weights):
    folder = str(tiny_weights.converted["qualiclip+"])
    on_cpu = pyiqa.create_metric("qualiclip+", device="cpu", pretrained_model_name_or_path=folder)
    on_gpu = pyiqa.create_metric("qualiclip+", device="cuda", pretrained_model_name_or_path=folder)
    images = rgb_images()
    scores = on_gpu(images.cuda())
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), on_cpu(images), atol=1e-4, rtol=0)


def test_unknown_options_point_to_the_builtin(tiny_weights):
    with pytest.raises(TypeError, match=r"does not take 'backbone'.*'qualiclip-pyiqa'.*import pyiqa_plugin"):
        pyiqa.create_metric("qualiclip", device="cpu", backbone="ViT-B/32")
    with pytest.raises(ValueError, match="logit_scale must be"):
        pyiqa.create_metric(
            "qualiclip", device="cpu", pretrained_model_name_or_path=str(tiny_weights.converted["qualiclip"]),
            logit_scale="clip",
        )  # fmt: skip


@torch.no_grad()
def test_official_weights_are_the_default_for_every_variant(tiny_weights, offline_hf_home, monkeypatch):
    """With no `pretrained_model_name_or_path`, the metric downloads (here: finds in an offline Hub cache) the
    authors' QualiCLIP.pth and the variant's QualiCLIP+ file, converts them once, and scores like pyiqa."""
    files = {
        name: tiny_weights.cached_file(metric)
        for name, metric in [(OFFICIAL_FILENAME, "qualiclip"), (PLUS_FILENAMES["spaq"], "qualiclip+-spaq")]
    }
    contents = {name: path.read_bytes() for name, path in files.items()}
    add_to_hub_cache(offline_hf_home / "hub", OFFICIAL_REPO_ID, contents)
    offline_pyiqa(monkeypatch, tiny_weights)
    images = rgb_images()
    for name in ("qualiclip", "qualiclip+-spaq"):
        ours = pyiqa.create_metric(name, device="cpu")(images)
        expected = pyiqa.create_metric(f"{name}-pyiqa", device="cpu")(images)
        assert (ours - expected).abs().max() <= 1e-5
    assert len(list((offline_hf_home / "qualiclip_hf").iterdir())) == 2


@pytest.fixture(scope="module")
def rn50_weights(reference_clip, official_checkpoint, converted_dir, tmp_path_factory) -> Iterator[PyiqaWeights]:
    """The real sizes, from the session's random CLIP RN50 in the official layout: pyiqa's files for QualiCLIP and
    a QualiCLIP+ context, and both converted."""
    from pyiqa.archs.qualiclip_arch import PromptLearner

    clip_rn50, _ = reference_clip
    root = tmp_path_factory.mktemp("pyiqa_rn50")
    weights = PyiqaWeights(cache=root / "pyiqa", archive=root / "rn50.pt", converted={"qualiclip": converted_dir})
    weights.cache.mkdir()
    (weights.cache / OFFICIAL_FILENAME).symlink_to(official_checkpoint)
    save_torchscript(clip_rn50, weights.archive)
    # What pyiqa's QualiCLIP+ saves, built by its own prompt learner from this (fp32) CLIP, with a random context.
    learner = PromptLearner(clip_rn50, PROMPTS, n_ctx=16, prompt_specific_ctx=True)
    params = {f"prompt_learner.{key}": tensor for key, tensor in learner.state_dict().items()}
    torch.save({"params": params}, weights.cached_file("qualiclip+"))
    weights.converted["qualiclip+"] = convert_qualiclip_plus(
        official_checkpoint, weights.cached_file("qualiclip+"), root / "qualiclip+"
    )
    yield weights
    shutil.rmtree(root, ignore_errors=True)  # 800 MB at RN50 sizes, needed by this module only


@torch.no_grad()
@pytest.mark.parametrize("name", ["qualiclip", "qualiclip+"])
def test_rn50_parity_with_pyiqa_builtin(rn50_weights, monkeypatch, name):
    offline_pyiqa(monkeypatch, rn50_weights)
    # This random RN50 is nearly blind to anything subtler than these contrasts and brightnesses, which lie outside
    # [0, 1]: pyiqa's range check is switched off (its own option) for both metrics.
    generator = torch.Generator().manual_seed(5)
    contrast = torch.tensor([0.5, 2.0, 4.0]).view(3, 1, 1, 1)
    brightness = torch.tensor([-0.5, 0.5, 1.5]).view(3, 1, 1, 1)
    images = torch.rand(3, 3, 96, 128, generator=generator) * contrast + brightness
    expected = pyiqa.create_metric(f"{name}-pyiqa", device="cpu", check_input_range=False)(images)
    folder = str(rn50_weights.converted[name])
    scores = pyiqa.create_metric(name, device="cpu", check_input_range=False, pretrained_model_name_or_path=folder)(
        images
    )
    assert (scores - expected).abs().max() <= 1e-5
    assert expected.std() > 1e-4, "the scores must depend on the image for the test to mean something"


_FRESH_PROCESS = r"""
import json, logging, sys
import pyiqa, torch
from pyiqa.utils import get_root_logger
get_root_logger().setLevel(logging.INFO)
result = {"plugin_loaded_by_import_pyiqa": "pyiqa_plugin" in sys.modules}
try:  # added names are unknown to pyiqa until the plugin is loaded
    pyiqa.create_metric("qualiclip-hf", device="cpu", pretrained_model_name_or_path=sys.argv[1])
    result["alias_before_plugin"] = "created"
except AssertionError as error:
    result["alias_before_plugin"] = str(error)
metric = pyiqa.create_metric("qualiclip", device="cpu", pretrained_model_name_or_path=sys.argv[1])
result["net"] = type(metric.net).__module__ + "." + type(metric.net).__name__
result["score_shape"] = list(metric(torch.rand(2, 3, 64, 64)).shape)
result["names"] = pyiqa.list_models(filter="qualiclip*")
print(json.dumps(result))
"""


def test_fresh_process_needs_no_import_for_qualiclip(tiny_weights, tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tiny_weights.converted["qualiclip"])],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert not result["plugin_loaded_by_import_pyiqa"]
    assert "qualiclip-hf not implemented" in result["alias_before_plugin"]
    assert result["net"] == "pyiqa_plugin.qualiclip_arch.QualiCLIPHF"
    assert result["score_shape"] == [2, 1]
    assert {"qualiclip-hf", "qualiclip-pyiqa", "qualiclip+-clive-hf", "qualiclip+-spaq-pyiqa"} <= set(result["names"])
    assert child.stderr.count("now run qualiclip_hf's QualiCLIP") == 1


def test_cli_converts_qualiclip_plus(tiny_weights, tmp_path):
    from qualiclip_hf.cli import main

    plus_file = tiny_weights.cached_file("qualiclip+-spaq")
    base = tiny_weights.cache / OFFICIAL_FILENAME
    assert main(["convert", "--checkpoint", str(base), "--plus", str(plus_file), "--output", str(tmp_path / "p")]) == 0
    converted = QualiCLIPModel.from_pretrained(tmp_path / "p")
    expected = QualiCLIPModel.from_pretrained(tiny_weights.converted["qualiclip+-spaq"])
    assert converted.prompt_context is not None
    assert torch.equal(converted.prompt_embeds, expected.prompt_embeds)
