"""Precision selection (`auto`), the bf16/fp16 model, and the cached int8 graph."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from qualiclip_hf.backends import precision
from qualiclip_hf.backends.fusion import FusedQualiCLIP, fold_batch_norms
from qualiclip_hf.backends.precision import (
    native_formats,
    prepare_scorer,
    reduce_precision,
    resolve_precision,
)
from qualiclip_hf.cli import main

from .conftest import REPO_ROOT, photo

AVX512_BF16_VNNI = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
AVX2_ONLY = frozenset({"avx2", "fma"})


@pytest.fixture
def cpu(monkeypatch):
    """Pretends to run on a CPU with the given /proc/cpuinfo flags and torch ISA."""

    def pretend(flags: frozenset[str], isa: str = "AVX512") -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)

    return pretend


def test_native_formats_follow_the_cpu_flags(cpu):
    cpu(AVX512_BF16_VNNI)
    assert native_formats("cpu") == {"bf16", "int8"}
    cpu(AVX2_ONLY, "AVX2")
    assert native_formats("cpu") == set()
    cpu(frozenset({"avx_vnni", "avx512_bf16"}), "AVX2")  # bf16 kernels need torch's AVX-512 build
    assert native_formats("cpu") == {"int8"}


def passing(**formats: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """`FORMATS_MEETING_DRIFT_BAR` with the given backends' formats, none for the others."""
    return {backend: formats.get(backend, ()) for backend in precision.BACKEND_PRECISIONS}


def test_auto_takes_only_a_native_format_that_met_the_drift_bar_with_that_backend(cpu, monkeypatch):
    monkeypatch.setattr(precision, "FORMATS_MEETING_DRIFT_BAR", passing(torch=("bf16",), onnxruntime=("int8",)))
    cpu(AVX512_BF16_VNNI)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu", backend="openvino") == "fp32"  # bf16 passed with torch, not openvino
    cpu(AVX2_ONLY, "AVX2")
    assert resolve_precision("auto", "cpu") == "fp32"  # never an emulated format: slower than fp32
    assert resolve_precision("auto", "cpu", backend="onnxruntime") == "fp32"  # no VNNI: int8 not native
    monkeypatch.setattr(precision, "FORMATS_MEETING_DRIFT_BAR", passing())
    cpu(AVX512_BF16_VNNI)
    assert resolve_precision("auto", "cpu") == "fp32"  # native, but its scores moved too much
    assert resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is obeyed


def test_auto_skips_a_format_whose_runtime_is_not_installed(cpu, monkeypatch):
    monkeypatch.setattr(precision, "FORMATS_MEETING_DRIFT_BAR", passing(torch=("int8", "bf16")))
    monkeypatch.setattr(precision, "_runtime_available", lambda runtime: runtime != "onnxruntime")
    cpu(AVX512_BF16_VNNI)
    assert resolve_precision("auto", "cpu") == "bf16"  # int8 would run in ONNX Runtime, missing here


def test_impossible_choices_are_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int4", "cpu")
    with pytest.raises(ValueError, match="int8 runs on the CPU"):
        resolve_precision("int8", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_precision("fp32", "cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="the onnxruntime backend runs fp32, int8, not bf16"):
        resolve_precision("bf16", "cpu", backend="onnxruntime")
    with pytest.raises(ValueError, match="the openvino backend runs fp32, bf16, int8, not fp16"):
        resolve_precision("fp16", "cpu", backend="openvino")
    with pytest.raises(ValueError, match="the openvino backend runs on the CPU"):
        resolve_precision("fp32", "cuda", backend="openvino")


def test_folding_batch_norms_keeps_the_outputs(tiny_model):
    folded = fold_batch_norms(copy.deepcopy(tiny_model.vision_model))
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    pixel_values = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(folded(pixel_values), tiny_model.vision_model(pixel_values), rtol=1e-5, atol=1e-5)


def test_fuse_folds_the_fp32_model_only_and_keeps_its_scores(tiny_model):
    pixel_values = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = tiny_model(pixel_values).quality_score
    fused, chosen = prepare_scorer(tiny_model, None, "fp32", fuse=True)
    assert chosen == "fp32" and isinstance(fused, FusedQualiCLIP)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in fused.modules())
    with torch.inference_mode():
        torch.testing.assert_close(fused(pixel_values).quality_score, expected, rtol=0, atol=1e-5)
    assert prepare_scorer(tiny_model, None, "fp32")[0] is tiny_model  # fuse is asked for, never implied
    reduced, _ = prepare_scorer(tiny_model, None, "bf16", fuse=True)
    assert not isinstance(reduced, FusedQualiCLIP)  # reduce_precision folds its own way; no CPU chunking in bf16
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in tiny_model.modules())  # left as it was


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_runs_late_stages_in_it_and_keeps_the_rest_in_float32(tiny_model, dtype):
    reduced = reduce_precision(copy.deepcopy(tiny_model), dtype)
    vision = reduced.vision_model
    assert [vision.layer2.module[0].conv1.weight.dtype, vision.layer4[0].conv3.weight.dtype] == [dtype, dtype]
    assert [vision.conv1.weight.dtype, vision.layer1[0].conv2.weight.dtype] == [torch.float32, torch.float32]
    pool = reduced.vision_model.attnpool.module
    assert pool.c_proj.weight.dtype == torch.float32
    torch.testing.assert_close(pool.c_proj.weight, tiny_model.vision_model.attnpool.c_proj.weight, rtol=0, atol=0)
    pixel_values = torch.randn(4, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = tiny_model(pixel_values).quality_score, reduced(pixel_values).quality_score
    assert got.dtype == torch.float32
    assert not torch.equal(got, expected), "the reduced precision must reach the image tower"
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)


def test_cli_prints_the_choice_once(tiny_model_dir, tmp_path, capsys, cpu, monkeypatch):
    monkeypatch.setattr(precision, "FORMATS_MEETING_DRIFT_BAR", passing(torch=("bf16",)))
    cpu(AVX512_BF16_VNNI)
    for seed in range(3):
        photo(64, 80, seed=seed).save(tmp_path / f"{seed}.png")
    assert main(["score", str(tmp_path), "--model", str(tiny_model_dir), "--precision", "auto"]) == 0
    err = capsys.readouterr().err
    assert err.count("precision:") == 1
    assert "precision: bf16 (auto:" in err


onnxruntime = pytest.importorskip("onnxruntime")


def test_int8_is_calibrated_once_per_model_and_calibration_set(tiny_model, tmp_path, monkeypatch):
    import onnx

    from qualiclip_hf.backends import quantization
    from qualiclip_hf.build_processor import build_clip_tokenizer, make_processor

    monkeypatch.setenv("QUALICLIP_CACHE", str(tmp_path / "cache"))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for seed in range(3):
        photo(64, 96, seed=seed).save(calibration / f"{seed}.png")
    processor = make_processor(build_clip_tokenizer())
    scorer, chosen = prepare_scorer(copy.deepcopy(tiny_model), processor, "int8", calibration_images=calibration)
    assert chosen == "int8"
    graph = onnx.load(str(scorer.path)).graph
    int8_weights = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.INT8}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(any(name in int8_weights for name in _inputs_upstream(graph, node)) for node in convs)
    pixel_values = processor(images=[photo(64, 96, seed=9)], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = tiny_model(pixel_values).quality_score
    assert scorer(pixel_values).quality_score.item() == pytest.approx(expected.item(), abs=0.1)

    # A second model object with the same weights reuses the cached graph; other calibration photos make another.
    def no_second_time(*args, **kwargs):
        raise AssertionError("exported or calibrated again")

    with monkeypatch.context() as patched:
        patched.setattr(quantization, "quantize_onnx", no_second_time)
        patched.setattr(quantization, "export_onnx", no_second_time)
        again, _ = prepare_scorer(copy.deepcopy(tiny_model), processor, "int8", calibration_images=calibration)
    assert again.path == scorer.path
    other_photos = tmp_path / "other"
    other_photos.mkdir()
    photo(80, 80, seed=5).save(other_photos / "a.png")
    other, _ = prepare_scorer(copy.deepcopy(tiny_model), processor, "int8", calibration_images=other_photos)
    assert other.path != scorer.path and other.path.parent == scorer.path.parent


def _inputs_upstream(graph, node) -> set[str]:
    """The names feeding `node`'s weight input through DequantizeLinear (QDQ format)."""
    producers = {output: producer for producer in graph.node for output in producer.output}
    weight = producers.get(node.input[1])
    return set(weight.input) if weight is not None and weight.op_type == "DequantizeLinear" else set()


def test_an_unwritable_cache_is_named_with_the_fix(tiny_model_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QUALICLIP_CACHE", str(blocker / "cache"))
    photo(64, 64, seed=0).save(tmp_path / "0.png")
    assert main(["score", str(tmp_path / "0.png"), "--model", str(tiny_model_dir), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2  # the model line, then one line that says why and what to do
    assert f"cannot write the graph cache {blocker / 'cache'}" in err[1] and "set QUALICLIP_CACHE" in err[1]


def test_calibration_folder_without_images_is_named(tiny_model, tmp_path, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setenv("QUALICLIP_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    photo(64, 64).save(tmp_path / "x.png")
    code = main(
        [
            "score",
            str(tmp_path / "x.png"),
            "--model",
            str(tiny_model_dir),
            "--precision",
            "int8",
            "--calibration-images",
            str(empty),
        ]
    )
    assert code == 2
    assert f"no calibration images in {empty}" in capsys.readouterr().err


def test_cli_int8_scores_follow_float32(tiny_model_dir, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("QUALICLIP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        photo(96, 96 + 16 * seed, seed=seed).save(folder / f"{seed}.png")

    def scores(*options: str) -> list[float]:
        output = tmp_path / f"scores{len(list(tmp_path.glob('scores*.json')))}.json"  # results files are never replaced
        assert main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(output), *options]) == 0
        return [row["score"] for row in json.loads(output.read_text())]

    full, int8 = scores(), scores("--precision", "int8", "--calibration-images", str(folder))
    assert int8 != full
    assert int8 == pytest.approx(full, abs=0.1)
    # The quantizer's per-convolution advice on the root logger ("Expected bias ... to be an initializer") is dropped.
    assert [record.getMessage() for record in caplog.records if "onnxruntime" in record.pathname] == []
    # A results file records the calibration photos: resuming it with other photos is refused, in one line.
    output = tmp_path / "int8.csv"
    assert (
        main(
            [
                "score",
                str(folder / "0.png"),
                "--model",
                str(tiny_model_dir),
                "--output",
                str(output),
                "--precision",
                "int8",
                "--calibration-images",
                str(folder),
            ]
        )
        == 0
    )
    other = tmp_path / "other-photos"
    other.mkdir()
    photo(100, 90, seed=9).save(other / "9.png")
    resume = [
        "score",
        str(folder),
        "--model",
        str(tiny_model_dir),
        "--output",
        str(output),
        "--resume",
        "--precision",
        "int8",
    ]
    kept = output.read_text()
    assert main([*resume, "--calibration-images", str(other)]) == 2
    assert "computed with int8 calibration photos of hash" in capsys.readouterr().err
    assert output.read_text() == kept
    assert main([*resume, "--calibration-images", str(folder)]) == 0
    assert len(output.read_text().splitlines()) == 1 + 3
    if importlib.util.find_spec("openvino") is not None:  # the same int8 graph, run by OpenVINO's int8 kernels
        openvino_int8 = scores("--precision", "int8", "--backend", "openvino", "--calibration-images", str(folder))
        assert openvino_int8 != full
        assert openvino_int8 == pytest.approx(int8, abs=0.05)


def test_the_default_calibration_photos_are_package_data():
    # An installed wheel has no examples/ folder: the default photos ship inside the package.
    import tomllib

    import qualiclip_hf
    from qualiclip_hf.backends.quantization import default_calibration_images

    package = Path(qualiclip_hf.__file__).parent
    photos = default_calibration_images()
    assert len(photos) >= 4 and all(path.is_file() for path in photos)
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in photos:
        assert any(path.relative_to(package).match(pattern) for pattern in patterns["qualiclip_hf"]), path


def test_calibration_photos_missing_or_too_small_are_named(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("QUALICLIP_CACHE", str(tmp_path / "cache"))
    photo(64, 64).save(tmp_path / "x.png")
    command = ["score", str(tmp_path / "x.png"), "--model", str(tiny_model_dir), "--precision", "int8"]
    assert main([*command, "--calibration-images", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such folder of calibration photos" in capsys.readouterr().err
    folder = tmp_path / "calibration"
    folder.mkdir()
    photo(64, 64).save(folder / "a.png")
    photo(20, 20).save(folder / "small.png")
    assert main([*command, "--calibration-images", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"calibration photo {folder / 'small.png'}: 20x20 pixels is below the model's 32x32 minimum" in err
    assert "Traceback" not in err
