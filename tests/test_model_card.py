"""The model card generator: Hub metadata that huggingface_hub parses, and numbers that come only from result files."""

import json
import re
import shutil

import numpy as np
import pytest
from huggingface_hub import ModelCard, metadata_load

from qualiclip_hf.hub.card import ModelCardError, make_model_card, read_results, write_model_card
from qualiclip_hf.loading import DEMO_MODEL_PATH

from .conftest import REPO_ROOT

DEMO_RESULTS = [REPO_ROOT / "training/results/demo" / name for name in ("synthetic_eval.json", "training_summary.json")]
# A number standing alone: not part of a word, an identifier or a version ("RN50", "KonIQ-10k", "v1.2").
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def numbers_in(text: str) -> set[str]:
    return set(NUMBER.findall(text))


def values_in(content) -> list[float]:
    """Every number of a JSON document, however deeply nested."""
    if isinstance(content, bool):
        return []
    if isinstance(content, (int, float)):
        return [float(content)]
    if isinstance(content, dict):
        return [value for item in content.values() for value in values_in(item)]
    if isinstance(content, list):
        return [value for item in content for value in values_in(item)]
    return []


def comes_from(token: str, values: list[float]) -> bool:
    """Whether `token` is one of `values` as the card may print it (rounded to the token's decimals)."""
    decimals = len(token.split(".")[1]) if "." in token else 0
    return any(abs(round(value, decimals) - float(token)) < 10 ** (-decimals) / 2 for value in values)


@pytest.fixture
def result_files(tmp_path):
    """Evaluation files in the schema of training/evaluate.py, with values drawn at random (they are test data)."""
    rng = np.random.default_rng(2024)

    def mos(dataset):
        srcc, plcc, krcc, raw = rng.uniform(0.3, 0.95, 4)
        return {"dataset": dataset, "model": "x", "num_images": 517, "num_failed": 3, "errors": [],
                "srcc": srcc, "krcc": krcc, "plcc": plcc, "plcc_raw": raw}  # fmt: skip

    files = {"koniq.json": mos("koniq10k"), "hub.json": mos("someorg/iqa-photos")}
    files["synthetic.json"] = {
        "model": "x",
        "images": ["a.png"],
        "num_images": 6,
        "max_side": 384,
        "metric": "mean over images of SRCC(-level, score), levels 1..5",
        "per_distortion": {"gaussian_blur": rng.uniform(0.5, 1), "jpeg": rng.uniform(0.5, 1)},
        "overall": rng.uniform(0.5, 1),
    }
    paths = []
    for name, content in files.items():
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(content))
    return paths


def test_metadata_parses_and_model_index_carries_srcc_and_plcc_per_dataset(tiny_model_dir, result_files, tmp_path):
    output = write_model_card(tiny_model_dir, tmp_path / "README.md", weights="random", results=result_files)
    metadata = metadata_load(output)
    assert metadata["library_name"] == "transformers"
    assert metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "image-classification"
    assert {"image-quality-assessment", "no-reference-iqa", "clip"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # random weights derive from nothing

    card = ModelCard.load(output)
    found = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}
    assert len(found) == len(card.data.eval_results) == 4
    for path in result_files[:2]:
        record = json.loads(path.read_text())
        for metric, key in (("spearmanr", "srcc"), ("pearsonr", "plcc")):
            result = found[(record["dataset"], metric)]
            assert result.metric_value == round(record[key], 4)
            assert result.metric_name == f"{key.upper()} (random weights)"  # labelled as measured on random weights
            assert result.task_type == "image-quality-assessment"
    assert found[("koniq10k", "spearmanr")].dataset_name == "KonIQ-10k"
    assert metadata["model-index"][0]["name"] == card.data.model_name


def test_every_number_the_results_add_comes_from_them(tiny_model_dir, result_files):
    baseline = str(make_model_card(tiny_model_dir, weights="random"))
    card = str(make_model_card(tiny_model_dir, weights="random", results=result_files))
    values = [value for path in result_files for value in values_in(json.loads(path.read_text()))]
    added = numbers_in(card) - numbers_in(baseline)
    assert added, "the results should add numbers to the card"
    assert not [token for token in added if not comes_from(token, values)]
    assert "No evaluation results were supplied" in baseline
    assert "model-index" not in baseline


def test_the_embedded_demo_card_is_generated_and_quotes_only_its_result_files():
    committed = (DEMO_MODEL_PATH / "README.md").read_text()
    baseline = str(make_model_card(DEMO_MODEL_PATH, weights="demo"))
    values = [value for path in DEMO_RESULTS for value in values_in(json.loads(path.read_text()))]
    added = numbers_in(committed) - numbers_in(baseline)
    assert not [token for token in added if not comes_from(token, values)]
    synthetic = json.loads(DEMO_RESULTS[0].read_text())
    assert f"| gaussian blur | {synthetic['per_distortion']['gaussian_blur']:.3f} |" in committed
    assert "**This is not QualiCLIP.**" in committed
    assert "Measured on the demo weights" in committed
    assert "demo" in metadata_load(DEMO_MODEL_PATH / "README.md")["tags"]


def test_weight_kinds_set_licence_base_model_and_statement(tiny_model_dir, tmp_path):
    official = make_model_card(tiny_model_dir, weights="official")
    assert official.data.license == "cc-by-nc-4.0"
    assert official.data.base_model == "timm/resnet50_clip.openai"
    assert "the QualiCLIP authors released" in official.text
    trained_dir = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained_dir)
    summary = {"steps": 12, "skipped_images": 0, "seconds": 3.5, "config": {"batch_size": 4, "data_source": "o/d"}}
    (trained_dir / "training_summary.json").write_text(json.dumps(summary))
    trained = make_model_card(trained_dir)  # inferred from the training summary
    assert "trained with qualiclip-hf's implementation" in trained.text
    assert "| steps | 12 |" in trained.text
    assert trained.data.datasets == ["o/d"]
    with pytest.raises(ModelCardError, match="say what these weights are"):
        make_model_card(tiny_model_dir)
    with pytest.raises(ModelCardError, match="unknown weight kind 'fake'"):
        make_model_card(tiny_model_dir, weights="fake")


def test_bad_result_files_are_refused_naming_the_file(tmp_path):
    cases = {
        "other.json": ({"accuracy": 0.9}, "not a result file of training/"),
        "range.json": ({"srcc": 1.7, "plcc": 0.5}, "srcc must be a correlation in"),
        "broken.json": (None, "cannot read a JSON result file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text("{" if content is None else json.dumps(content))
        with pytest.raises(ModelCardError, match=message) as raised:
            read_results([path])
        assert str(path) in str(raised.value)


def test_card_command_writes_the_card(tiny_model_dir, result_files, tmp_path, capsys):
    from qualiclip_hf.cli import main

    output = tmp_path / "card.md"
    argv = ["card", "--model-dir", str(tiny_model_dir), "--weights", "random", "--repo-id", "me/tiny"]
    assert main([*argv, "--output", str(output), "--results", *map(str, result_files)]) == 0
    card = ModelCard.load(output)
    assert card.data.model_name == "me/tiny"
    assert 'AutoModel.from_pretrained("me/tiny", trust_remote_code=True)' in card.text
    assert main(["card", "--model-dir", str(tiny_model_dir), "--output", str(output)]) == 2
    assert "say what these weights are" in capsys.readouterr().err


def test_the_card_quotes_the_planned_and_the_completed_steps(tiny_model_dir, tmp_path):
    trained_dir = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained_dir)
    summary = {
        "steps": 1865,
        "planned_steps": 3000,
        "stopped_by_time_limit": True,
        "config": {"max_steps": 3000, "lr_scheduler_type": "constant_with_warmup"},
    }
    (trained_dir / "training_summary.json").write_text(json.dumps(summary))
    card = make_model_card(trained_dir).text
    assert "| steps | 1865 |" in card and "| steps planned | 3000 |" in card
    assert "| stopped by the time limit | yes |" in card
    assert "| learning-rate schedule | constant_with_warmup |" in card
    demo_card = (DEMO_MODEL_PATH / "README.md").read_text()
    demo_summary = json.loads(DEMO_RESULTS[1].read_text())
    assert f"| steps | {demo_summary['steps']} |" in demo_card
    assert f"| steps planned | {demo_summary['planned_steps']} |" in demo_card
