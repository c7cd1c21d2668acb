"""ONNX export, and scoring with ONNX Runtime and OpenVINO: the graph gives PyTorch's scores at any batch size and image
size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiclip_hf import QualiCLIPProcessor
from qualiclip_hf.cli import main
from qualiclip_hf.loading import DEMO_MODEL_PATH

from .conftest import photo

pytest.importorskip("onnxruntime")
from qualiclip_hf.backends.onnx import ONNX_FILENAME, OnnxQualiCLIP, export_onnx
from qualiclip_hf.backends.precision import native_formats

# OpenVINO is the [openvino] extra (in [test]); without it its cases skip, ONNX Runtime's still run.
RUNTIMES = [
    "onnxruntime",
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed"),
    ),
]

# Sizes that are not multiples of the tower's stride, the 32x32 minimum, and a batch of several images.
SHAPES = [(1, 3, 32, 32), (3, 3, 100, 111), (2, 3, 224, 160), (1, 3, 63, 200)]


@pytest.fixture(scope="module")
def demo_onnx(demo, tmp_path_factory) -> Path:
    model, processor = demo
    return export_onnx(model, tmp_path_factory.mktemp("demo_onnx"), processor)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    """The tiny RN50-layout model with random weights and random BatchNorm statistics (conftest)."""
    return export_onnx(tiny_model, tmp_path_factory.mktemp("tiny_onnx"))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_onnx_scores_equal_pytorch_at_every_batch_and_image_size(
    which, runtime, demo, demo_onnx, tiny_model, tiny_onnx
):
    model, path = (demo[0], demo_onnx) if which == "demo" else (tiny_model, tiny_onnx)
    runner = OnnxQualiCLIP(path, runtime=runtime)
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        pixel_values = torch.randn(shape, generator=generator)
        with torch.inference_mode():
            expected = model(pixel_values)
        got = runner.run(pixel_values.numpy())
        assert got["quality_score"].shape == (shape[0],)
        np.testing.assert_allclose(got["quality_score"], expected.quality_score.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["logits_per_prompt"], expected.logits_per_prompt.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["image_embeds"], expected.image_embeds.numpy(), rtol=0, atol=1e-5)


def test_tiny_model_scores_vary_so_the_equality_bites(tiny_model, tiny_onnx):
    scores = OnnxQualiCLIP(tiny_onnx).score(
        torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).numpy()
    )
    assert np.ptp(scores) > 1e-4  # 50 times the tolerance of the equality above


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_padded_batch_of_mixed_sizes_scores_as_pytorch(runtime, demo, demo_onnx):
    model, processor = demo
    images = [photo(90, 140, seed=1), photo(200, 64, seed=2), photo(90, 140, seed=3)]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["image_sizes"] is not None
    with torch.inference_mode():
        expected = model(**inputs).quality_score
    got = OnnxQualiCLIP(demo_onnx, runtime=runtime)(**inputs).quality_score
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed")
def test_openvino_bf16_computes_in_bf16_where_the_cpu_has_it_and_stays_near_fp32(demo, demo_onnx):
    processor = demo[1]
    inputs = processor(images=[photo(160, 224, seed=seed) for seed in range(4)], return_tensors="pt")
    fp32 = OnnxQualiCLIP(demo_onnx, runtime="openvino")(**inputs)
    bf16 = OnnxQualiCLIP(demo_onnx, runtime="openvino", inference_precision="bf16")(**inputs)
    embedding_change = (bf16.image_embeds - fp32.image_embeds).abs().max().item()
    if "bf16" in native_formats("cpu"):
        assert embedding_change > 1e-4  # rounded to bf16's 8 significant bits, not computed in fp32
    else:
        assert embedding_change < 1e-5  # OpenVINO computes in fp32 where the CPU has no bf16
    # Loose: the drift bar is judged on ~200 images by benchmarks/precision.py, not here.
    torch.testing.assert_close(bf16.quality_score, fp32.quality_score, rtol=0, atol=0.05)


def test_runtime_choices_are_checked(demo_onnx):
    with pytest.raises(ValueError, match="runtime must be one of onnxruntime, openvino"):
        OnnxQualiCLIP(demo_onnx, runtime="tensorrt")
    with pytest.raises(ValueError, match="onnxruntime runs this graph in fp32, not bf16"):
        OnnxQualiCLIP(demo_onnx, inference_precision="bf16")


def test_the_export_folder_carries_the_processor_and_the_prompts(demo_onnx, demo):
    folder = demo_onnx.parent
    assert QualiCLIPProcessor.from_pretrained(folder).image_processor.to_dict() == demo[1].image_processor.to_dict()
    metadata = OnnxQualiCLIP(folder).metadata
    assert json.loads(metadata["prompt_pairs"]) == [list(pair) for pair in demo[0].config.prompt_pairs]
    assert float(metadata["logit_scale"]) == demo[0].config.logit_scale


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bad_inputs_get_clear_errors(runtime, demo_onnx, tmp_path):
    runner = OnnxQualiCLIP(demo_onnx, runtime=runtime)
    good = np.zeros((1, 3, 64, 64), dtype=np.float32)
    with pytest.raises(ValueError, match=r"must be CLIP-normalised floats .* got uint8"):
        runner.run(np.zeros((1, 3, 64, 64), dtype=np.uint8))  # raw pixels would score, wrongly
    with pytest.raises(ValueError, match="no image"):
        runner.run(np.zeros((0, 3, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        runner.run(np.full((1, 3, 64, 64), np.nan, dtype=np.float32))
    assert runner.run(good)["quality_score"].shape == (1,)  # the runner still works after refusing
    with pytest.raises(ValueError, match="31x40 pixels is smaller than the 32x32"):
        runner.run(np.zeros((1, 3, 31, 40), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(batch_size, 3, height, width\)"):
        runner.run(np.zeros((3, 64, 64), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="no ONNX graph"):
        OnnxQualiCLIP(tmp_path)


def test_cli_export_and_onnxruntime_backend_score_as_torch(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUALICLIP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        photo(70 + 10 * seed, 96, seed=seed).save(folder / f"{seed}.png")

    def scores(*options: str) -> list[float]:
        output = tmp_path / f"scores{len(list(tmp_path.glob('scores*.json')))}.json"  # results files are never replaced
        assert main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(output), *options]) == 0
        return [row["score"] for row in json.loads(output.read_text())]

    expected = scores()
    assert scores("--backend", "onnxruntime") == pytest.approx(expected, abs=1e-5)
    assert "runs in onnxruntime" in capsys.readouterr().err
    cached = list((tmp_path / "cache").glob(f"*/{ONNX_FILENAME}"))
    assert len(cached) == 1  # keyed by the model: a second run reuses it
    assert scores("--backend", "onnxruntime") == pytest.approx(expected, abs=1e-5)
    assert list((tmp_path / "cache").glob(f"*/{ONNX_FILENAME}")) == cached
    if importlib.util.find_spec("openvino") is not None:
        assert scores("--backend", "openvino") == pytest.approx(expected, abs=1e-5)
        assert "runs in openvino" in capsys.readouterr().err
        assert list((tmp_path / "cache").glob(f"*/{ONNX_FILENAME}")) == cached  # the same graph

    out = tmp_path / "exported"
    assert main(["export", "onnx", "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    assert OnnxQualiCLIP(out).score(np.zeros((1, 3, 64, 64), dtype=np.float32)).shape == (1,)
    QualiCLIPProcessor.from_pretrained(out)  # the processor travels with the graph


def test_device_auto_means_the_cpu_for_the_onnx_backends_and_int8(tiny_model_dir, tmp_path, monkeypatch):
    from qualiclip_hf import loading

    asked = []

    def select_device(choice: str) -> torch.device:  # as on a machine with a GPU, where auto would pick it
        asked.append(choice)
        return torch.device("cpu")

    monkeypatch.setattr(loading, "select_device", select_device)
    monkeypatch.setenv("QUALICLIP_CACHE", str(tmp_path / "cache"))
    photo(64, 64, seed=0).save(tmp_path / "0.png")
    image = str(tmp_path / "0.png")
    assert main(["score", image, "--model", str(tiny_model_dir), "--backend", "onnxruntime"]) == 0
    assert main(["score", image, "--model", str(tiny_model_dir)]) == 0
    assert asked == ["cpu", "auto"]


def test_the_onnx_file_can_be_pushed_at_the_repository_root(demo_onnx, tmp_path):
    from qualiclip_hf.hub import stage_model_folder

    staged = stage_model_folder(DEMO_MODEL_PATH, tmp_path / "repo", include=[demo_onnx])
    assert ONNX_FILENAME in [file.path_in_repo for file in staged]
    assert (tmp_path / "repo" / ONNX_FILENAME).read_bytes() == demo_onnx.read_bytes()
