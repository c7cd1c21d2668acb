"""`training/finetune.py`: each method beats the zero-shot demo model on held-out images of a small opinion-scored set
made here (`tests/opinion_data.py`); the folder it writes scores the same through every entry point; opinion scales
are handled; a run killed with SIGKILL and resumed ends with the same results and weights."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy.stats import spearmanr

from qualiclip_hf import DEMO_MODEL_PATH, QualiCLIPModel, QualiCLIPProcessor
from tests.opinion_data import write_opinion_folder
from training.finetune import main as finetune_main

REPO_ROOT = Path(__file__).resolve().parent.parent
# Small, fast prompt learning on 128-pixel images; logit scale 10: the demo model's tiny text tower cannot move its
# prompts far enough to fit opinions at QualiCLIP's 100 (its scores saturate).
PROMPT_OPTIONS = ["--epochs", "20", "--crop-size", "64", "--logit-scale", "10"]
FULL_OPTIONS = ["--epochs", "8", "--crop-size", "64", "--logit-scale", "10", "--vision-learning-rate", "3e-4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared, loaded machine two threads per process spend most of their time waiting for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def opinion_folder(tmp_path_factory) -> Path:
    return write_opinion_folder(tmp_path_factory.mktemp("opinions") / "set")


def run_finetune(dataset: Path, output: Path, method: str, *options: str) -> dict:
    # One torch thread, as the killed subprocess runs (OMP_NUM_THREADS=1): results compared bit for bit must come from
    # the same reduction order, whatever thread count an earlier in-process test left set.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune_main(
            ["--dataset", str(dataset), "--method", method, "--model", "demo", "--output", str(output), *options]
        )
    finally:
        torch.set_num_threads(threads)
    return json.loads((output / "finetune_results.json").read_text())


@pytest.fixture(scope="module")
def ridge_run(opinion_folder, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("ridge") / "model"
    return output, run_finetune(opinion_folder, output, "ridge")


@pytest.fixture(scope="module")
def prompts_run(opinion_folder, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("prompts") / "model"
    return output, run_finetune(opinion_folder, output, "prompts", "--num-splits", "3", *PROMPT_OPTIONS)


def metadata(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metadata.csv", newline="") as file:
        return list(csv.DictReader(file))


@torch.no_grad()
def demo_scores(paths: list[Path]) -> np.ndarray:
    model = QualiCLIPModel.from_pretrained(DEMO_MODEL_PATH).eval()
    processor = QualiCLIPProcessor.from_pretrained(DEMO_MODEL_PATH)
    return model(**processor(images=[Image.open(path) for path in paths], return_tensors="pt")).quality_score.numpy()


def test_ridge_beats_the_zero_shot_model_on_held_out_images(ridge_run, opinion_folder):
    _, results = ridge_run
    assert results["num_splits"] == len(results["splits"]) == 10
    assert [(s["num_train"], s["num_val"], s["num_test"]) for s in results["splits"]] == [(56, 8, 16)] * 10
    zero_shot, fine_tuned = results["zero_shot"]["srcc"], results["fine_tuned"]["srcc"]
    assert fine_tuned["median"] > zero_shot["median"] + 0.3
    assert fine_tuned["mean"] > zero_shot["mean"] + 0.3
    assert sum(s["fine_tuned"]["srcc"] > s["zero_shot"]["srcc"] for s in results["splits"]) >= 8
    # The baseline row is the demo model as it scores files: check one split's against a direct computation.
    rows = metadata(opinion_folder)
    mos = np.array([float(row["mos"]) for row in rows])
    everything = demo_scores([opinion_folder / row["file_name"] for row in rows])
    srcc_all = spearmanr(everything, mos).statistic
    assert srcc_all < 0.3, "the demo model must rank this set poorly for the test to mean something"
    recorded = sorted(s["zero_shot"]["srcc"] for s in results["splits"])
    assert recorded[0] < srcc_all < recorded[-1]


def test_prompt_learning_beats_the_zero_shot_model(prompts_run):
    _, results = prompts_run
    zero_shot, fine_tuned = results["zero_shot"]["srcc"], results["fine_tuned"]["srcc"]
    assert fine_tuned["median"] > zero_shot["median"] + 0.15
    assert fine_tuned["mean"] > zero_shot["mean"] + 0.1
    assert all(1 <= s["best_epoch"] <= 20 and len(s["val_srcc_per_epoch"]) == 20 for s in results["splits"])


def test_full_fine_tuning_beats_the_zero_shot_model(opinion_folder, tmp_path):
    results = run_finetune(opinion_folder, tmp_path / "full", "full", "--num-splits", "2", *FULL_OPTIONS)
    for split in results["splits"]:
        assert split["fine_tuned"]["srcc"] > split["zero_shot"]["srcc"] + 0.2


@pytest.mark.parametrize("method", ["ridge", "prompts"])
@torch.no_grad()
def test_the_folder_scores_the_same_through_every_entry_point(method, ridge_run, prompts_run, opinion_folder, tmp_path):
    import pyiqa
    from transformers import AutoModel, AutoProcessor, pipeline

    import pyiqa_plugin  # noqa: F401  (registers the metric)
    from qualiclip_hf.backends.onnx import OnnxQualiCLIP, export_onnx
    from qualiclip_hf.cli import main as cli_main

    folder, results = ridge_run if method == "ridge" else prompts_run
    config = json.loads((folder / "config.json").read_text())
    assert config["fine_tuning"]["method"] == method
    assert config["quality_head"] == ("linear" if method == "ridge" else "prompts")
    rows = metadata(opinion_folder)
    paths = [opinion_folder / row["file_name"] for row in rows[::9]]
    images = [Image.open(path).convert("RGB") for path in paths]

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    expected = model(**processor(images=images, return_tensors="pt")).quality_score.numpy()
    assert np.ptp(expected) > 1e-2, "the scores must differ for the comparisons to mean something"

    # Entry points batch images differently, which moves float32 embeddings by about 1e-7; a linear head scales it up.
    tolerance = 1e-5
    native = QualiCLIPModel.from_pretrained(folder).eval()
    np.testing.assert_allclose(
        native(**processor(images=images, return_tensors="pt")).quality_score.numpy(), expected, atol=tolerance
    )
    output = tmp_path / "scores.csv"
    assert cli_main(["score", *map(str, paths), "--model", str(folder), "--output", str(output)]) == 0
    by_path = {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(output.open())}
    np.testing.assert_allclose([by_path[path.name] for path in paths], expected, atol=tolerance)
    judge = pipeline(model=str(folder), trust_remote_code=True)
    np.testing.assert_allclose([judge(str(path))[0]["score"] for path in paths], expected, atol=tolerance)
    metric = pyiqa.create_metric("qualiclip-hf", device="cpu", pretrained_model_name_or_path=str(folder))
    tensors = [torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255 for image in images]
    np.testing.assert_allclose([float(metric(tensor)) for tensor in tensors], expected, atol=tolerance)
    onnx = OnnxQualiCLIP(export_onnx(native, tmp_path / "onnx", processor))
    onnx_scores = onnx(**processor(images=images, return_tensors="pt")).quality_score.numpy()
    np.testing.assert_allclose(onnx_scores, expected, atol=tolerance)

    # The folder is split 1's model: its SRCC on that split's test images (the last 20 % of a permutation seeded with
    # (seed, split), in the dataset's order) is the one recorded.
    import datasets

    data = datasets.load_dataset("imagefolder", data_dir=str(opinion_folder), split="train")
    test = np.random.default_rng((0, 0)).permutation(len(data))[64:].tolist()
    test_scores = model(**processor(images=[data[i]["image"] for i in test], return_tensors="pt")).quality_score
    targets = np.array([data[i]["mos"] for i in test])
    srcc = spearmanr(test_scores.numpy(), targets).statistic
    assert srcc == pytest.approx(results["splits"][0]["fine_tuned"]["srcc"], abs=1e-6)
    card = (folder / "README.md").read_text()
    assert "Fine-tuning on opinion scores" in card and "opinion-unaware" not in card.split("---")[1]


def test_lower_better_scores_on_another_range_give_the_same_fit(ridge_run, opinion_folder, tmp_path):
    # A DMOS on 0..100, lower is better: a decreasing affine map of the MOS. Normalised, it is the same target.
    flipped = tmp_path / "dmos"
    shutil.copytree(opinion_folder, flipped)
    rows = metadata(opinion_folder)
    with open(flipped / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["file_name", "dmos"])
        writer.writeheader()
        writer.writerows({"file_name": r["file_name"], "dmos": 100 - 20 * float(r["mos"])} for r in rows)
    options = ["--score-column", "dmos", "--lower-better", "--num-splits", "3"]
    ranged = run_finetune(flipped, tmp_path / "ranged", "ridge", *options, "--mos-min", "0", "--mos-max", "100")
    extremes = run_finetune(flipped, tmp_path / "extremes", "ridge", *options)
    assert extremes["mos_range"] == pytest.approx([100 - 20 * 4.76, 80.0])
    for split, reference in zip(ranged["splits"], ridge_run[1]["splits"][:3], strict=True):
        assert split["fine_tuned"]["srcc"] == pytest.approx(reference["fine_tuned"]["srcc"], abs=1e-9)
        assert split["zero_shot"]["srcc"] == pytest.approx(reference["zero_shot"]["srcc"], abs=1e-9)
    for split, reference in zip(extremes["splits"], ridge_run[1]["splits"][:3], strict=True):
        assert split["fine_tuned"]["srcc"] == pytest.approx(reference["fine_tuned"]["srcc"], abs=1e-9)


def test_a_streamed_parquet_file_gives_the_folders_results(ridge_run, opinion_folder, tmp_path):
    import datasets

    parquet = tmp_path / "opinions.parquet"
    datasets.load_dataset("imagefolder", data_dir=str(opinion_folder), split="train").to_parquet(str(parquet))
    streamed = run_finetune(parquet, tmp_path / "streamed", "ridge", "--streaming", "--num-splits", "2")
    assert streamed["num_images"] == 80
    assert streamed["splits"] == ridge_run[1]["splits"][:2]


def test_resume_after_sigkill_is_exact(opinion_folder, tmp_path):
    options = ["--num-splits", "2", "--epochs", "2", "--crop-size", "64", "--logit-scale", "10"]
    reference = run_finetune(opinion_folder, tmp_path / "reference", "full", *options)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "training.finetune", "--dataset", str(opinion_folder), "--model", "demo"]
    command += ["--output", str(killed), "--method", "full", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "finetune_state"
    deadline = time.monotonic() + 120
    while not any(state.glob("split_0*/checkpoints/step_*/trainer_state.json")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (state / "split_01" / "result.json").exists(), "killed too late: nothing was left to resume"

    resumed = run_finetune(opinion_folder, killed, "full", *options, "--resume")
    for key in ("zero_shot", "fine_tuned", "splits"):
        assert resumed[key] == reference[key]
    reference_weights = load_file(tmp_path / "reference" / "model.safetensors")
    resumed_weights = load_file(killed / "model.safetensors")
    assert reference_weights.keys() == resumed_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


def test_bad_data_and_used_folders_are_one_line_errors(opinion_folder, ridge_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(opinion_folder, broken)
    rows = metadata(opinion_folder)
    rows[5]["mos"] = "n/a"
    with open(broken / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(SystemExit, match=r"row 5: 'mos' is empty or not a number"):
        run_finetune(broken, tmp_path / "a", "ridge")
    with pytest.raises(SystemExit, match=r"no column 'quality'.*--score-column"):
        run_finetune(opinion_folder, tmp_path / "b", "ridge", "--score-column", "quality")
    with pytest.raises(SystemExit, match="already holds a fine-tuning run: pass --resume"):
        run_finetune(opinion_folder, ridge_run[0], "ridge")
    with pytest.raises(SystemExit, match="--resume with other settings"):
        run_finetune(opinion_folder, ridge_run[0], "ridge", "--seed", "1", "--resume")
