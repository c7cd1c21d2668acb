"""Precision selection (`auto`), the bf16/fp16 model, and the cached int8 graph."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
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
SAPPHIRE_RAPIDS = AVX512_BF16_VNNI | {"avx512_fp16", "amx_bf16", "amx_int8"}


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


class FakeClock:
    """Stands in for `time` in `auto_precision`: time passes only when a fake scorer runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def fake_formats(monkeypatch, cpu):
    """
    Makes `prepare_scorer` give, for each format, the fp32 model timed by a fake clock (`seconds` per image) and with
    its scores moved by `drift(scores)`: what `auto` measures is then set by the test, not by this machine's load.
    Returns the settings dict and the list of formats prepared (one entry per call).
    """
    from types import SimpleNamespace

    from qualiclip_hf.backends import auto_precision

    clock = FakeClock()
    monkeypatch.setattr(auto_precision, "time", clock)
    cpu(SAPPHIRE_RAPIDS)
    settings = {"fp32": (1.0, None), "bf16": (0.25, None), "fp16": (0.25, None)}
    prepared = []

    class Timed:
        def __init__(self, model, seconds, drift):
            self.model, self.seconds, self.drift = model, seconds, drift

        def __call__(self, **inputs):
            clock.now += self.seconds
            scores = self.model(**inputs).quality_score
            return SimpleNamespace(quality_score=scores if self.drift is None else scores + self.drift(scores))

    def fake_prepare(model, processor, precision_name, backend="torch", calibration_images=None, **options):
        if precision_name not in settings:
            raise ImportError(f"{precision_name} is not measured in this test")
        prepared.append(precision_name)
        seconds, drift = settings[precision_name]
        return Timed(model, seconds, drift), precision_name

    monkeypatch.setattr(auto_precision, "prepare_scorer", fake_prepare)
    return settings, prepared


def test_auto_stays_fp32_when_the_faster_format_drifts(tiny, small_probe_set, fake_formats):
    from qualiclip_hf.backends.auto_precision import choose_precision

    settings, _ = fake_formats
    settings["bf16"] = (0.25, lambda scores: 0.05 * scores)  # 4x faster, ranks kept, scores moved by up to 0.05
    settings["fp16"] = (0.25, lambda scores: 0.02 * torch.randn_like(scores))  # ranks and scores moved
    verdict = choose_precision(*tiny, "torch")
    assert verdict.chosen == "fp32"
    bf16, fp16 = verdict.row("bf16"), verdict.row("fp16")
    assert bf16.speedup == pytest.approx(4.0) and bf16.max_abs_diff > 0.01 and not bf16.meets_drift_bar
    assert not fp16.meets_drift_bar
    assert verdict.row("int8").not_run  # not measured in this test
    line = verdict.line()
    assert line.startswith("precision: fp32 (auto, weights ") and "bf16 drifts" in line and "\n" not in line


def test_auto_takes_the_fastest_format_within_the_bar_and_never_a_slower_one(tiny, small_probe_set, fake_formats):
    from qualiclip_hf.backends.auto_precision import choose_precision

    settings, _ = fake_formats
    settings["bf16"] = (0.5, lambda scores: 0.001 * scores)  # 2x fp32's speed, within the bar
    settings["fp16"] = (0.25, None)  # 4x, the same scores
    verdict = choose_precision(*tiny, "torch", remeasure=True)
    assert verdict.chosen == "fp16" and verdict.row("fp16").speedup == pytest.approx(4.0)
    assert "precision: fp16 (auto, " in verdict.line() and "4.00x fp32's speed" in verdict.line()
    assert "| fp16 | torch |" in verdict.table() and "chosen" in verdict.table()
    settings["bf16"] = settings["fp16"] = (0.95, None)  # exact, but hardly faster than fp32 (1.05x < SPEED_MARGIN)
    assert choose_precision(*tiny, "torch", remeasure=True).chosen == "fp32"
    settings["bf16"] = settings["fp16"] = (1.5, None)  # slower
    assert choose_precision(*tiny, "torch", remeasure=True).chosen == "fp32"


def test_auto_measures_only_native_formats_and_the_runtimes_allowed(tiny, small_probe_set, fake_formats, cpu):
    from qualiclip_hf.backends import auto_precision

    _, prepared = fake_formats
    cpu(AVX2_ONLY, "AVX2")  # no bf16/fp16 kernels: emulated, slower than fp32
    verdict = auto_precision.choose_precision(*tiny, "torch")
    assert verdict.chosen == "fp32" and prepared == ["fp32"]
    assert verdict.row("bf16").not_run == "not native on this cpu"
    rows = [
        auto_precision.FormatMeasurement("fp32", "torch", 1.0, 0.0, 10.0, 1.0),
        auto_precision.FormatMeasurement("bf16", "torch", 0.9999, 0.005, 20.0, 2.0),
        auto_precision.FormatMeasurement("int8", "onnxruntime", 0.9999, 0.005, 40.0, 4.0),
    ]
    assert auto_precision.pick_format(rows) == "int8"
    assert auto_precision.pick_format(rows, runtimes=("torch",)) == "bf16"  # e.g. score --dataset: PyTorch only


def test_the_verdict_is_cached_per_weights_and_a_corrupt_cache_is_measured_again(
    tiny, small_probe_set, fake_formats, recwarn
):
    from qualiclip_hf.backends.auto_precision import choose_precision

    model, processor = tiny
    _, prepared = fake_formats
    first = choose_precision(model, processor, "torch")
    assert not first.cached and first.chosen == "bf16" and len(prepared) == 3
    again = choose_precision(model, processor, "torch")
    assert again.cached and again.chosen == "bf16" and len(prepared) == 3  # nothing prepared nor scored again
    assert again.rows == first.rows
    assert "cached" in again.line()
    # The same name with other weights (retrained in place): measured again, into another entry.
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.vision_model.conv1.weight.mul_(1.01)
    other = choose_precision(retrained, processor, "torch")
    assert not other.cached and other.weights != first.weights and other.cache_file != first.cache_file
    assert len(prepared) == 6
    first.cache_file.write_text("{ not json")
    with pytest.warns(UserWarning, match="ignoring a corrupt precision verdict"):
        remeasured = choose_precision(model, processor, "torch")
    assert not remeasured.cached and len(prepared) == 9
    assert choose_precision(model, processor, "torch").cached  # written again, whole


def test_srcc_is_spearmans_rank_correlation_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    from qualiclip_hf.backends.auto_precision import srcc

    rng = np.random.default_rng(0)
    a = rng.random(50).round(1)  # many ties
    b = a + rng.normal(0, 0.1, 50)
    assert srcc(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
    assert srcc(a, a) == pytest.approx(1.0)


def test_cli_prints_the_choice_once_and_precision_shows_the_table(
    tiny_model_dir, tmp_path, capsys, small_probe_set, fake_formats
):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        photo(64, 80, seed=seed).save(folder / f"{seed}.png")
    output = tmp_path / "scores.jsonl"
    command = ["score", str(folder), "--model", str(tiny_model_dir), "--precision", "auto", "--output", str(output)]
    assert main(command) == 0
    err = capsys.readouterr().err
    assert err.count("precision:") == 1 and "precision: bf16 (auto, weights " in err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert {row["precision"] for row in rows} == {"bf16"}  # what auto chose, never "auto"

    assert main(["precision", "--model", str(tiny_model_dir), "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "| precision | runs in | SRCC | max abs diff | images/s | vs fp32 | verdict |" in out
    assert "| bf16 | torch |" in out and "| fp32 | torch |" in out and "precision: bf16 (auto, " in out
    assert "cached" in out  # measured by the score command above


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


def test_prepare_scorer_auto_runs_what_the_measurement_chose(tiny, small_probe_set, fake_formats):
    model, processor = tiny
    settings, _ = fake_formats
    settings["bf16"] = (1.0, None)  # not faster
    settings["fp16"] = (0.5, None)  # 2x, exact
    scorer, chosen = prepare_scorer(copy.deepcopy(model), processor, "auto")
    assert chosen == "fp16"
    assert scorer.vision_model.layer4[0].conv3.weight.dtype == torch.float16  # reduced, as --precision fp16 does
    # Restricted to the PyTorch model (as score --dataset is): fp16 runs in torch, so it is still taken.
    assert prepare_scorer(copy.deepcopy(model), processor, "auto", runtimes=("torch",))[1] == "fp16"
