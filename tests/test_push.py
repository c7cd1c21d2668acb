"""`qualiclip push`: the staged repository, one commit with exactly its files, and loading it where qualiclip_hf is
not installed, from a folder and from a Hub cache laid out as huggingface_hub lays it out, offline."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, scan_cache_dir
from PIL import Image
from safetensors.torch import load_file, save_file

from qualiclip_hf import loading
from qualiclip_hf.cli import main
from qualiclip_hf.hub.card import write_model_card
from qualiclip_hf.hub.push import PushError, stage_model_folder

from .conftest import add_to_hub_cache, direct_scores, folder_files, photo

REPO_ID = "someone/qualiclip-tiny"
CODE_FILES = {
    "configuration_qualiclip.py",
    "modeling_qualiclip.py",
    "image_processing_qualiclip.py",
    "processing_qualiclip.py",
    "pipeline_qualiclip.py",
    "image_reader.py",  # imported by the image processor and the pipeline
}
REPO_FILES = CODE_FILES | {
    "README.md",
    "config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def staged(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("staged") / "repo"
    files = stage_model_folder(tiny_model_dir, folder, weights="random", repo_id=REPO_ID)
    return folder, files


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("push_images")
    paths = [folder / "a.png", folder / "b.png", folder / "c.png"]
    for index, (path, (height, width)) in enumerate(zip(paths, [(64, 96), (80, 48), (64, 96)], strict=True)):
        photo(height, width, seed=10 + index).save(path)
    return paths


@pytest.fixture
def recorded_hub_calls(monkeypatch):
    """Records what would reach the Hub; `HfApi`'s two network calls are the only things replaced."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        # The staging folder is gone after the command; read the files while the commit is being made.
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls.append(("create_commit", repo_id, files, kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(loading, "hub_unreachable_reason", lambda: None)  # the Hub "answers" through the two above
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")  # logged in
    return calls


def test_staged_folder_has_weights_config_processor_code_and_card(staged, tiny_model):
    folder, files = staged
    assert {file.path_in_repo for file in files} == REPO_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_qualiclip.QualiCLIPConfig",
        "AutoModel": "modeling_qualiclip.QualiCLIPModel",
    }
    assert "image-quality-assessment" in config["custom_pipelines"]
    weights = load_file(folder / "model.safetensors")
    for key, tensor in tiny_model.state_dict().items():
        assert torch.equal(weights[key], tensor), key
    assert "random weights" in ModelCard.load(folder / "README.md").text


def test_dry_run_lists_the_files_and_uploads_nothing(tiny_model_dir, recorded_hub_calls, capsys):
    argv = ["push", "--model-dir", str(tiny_model_dir), "--repo-id", REPO_ID, "--weights", "random", "--dry-run"]
    assert main(argv) == 0
    assert recorded_hub_calls == []
    listing = capsys.readouterr().out
    assert f"would upload {len(REPO_FILES)} files" in listing
    for name in REPO_FILES:
        assert f"  {name} " in listing


def test_push_makes_one_commit_with_exactly_the_staged_files(
    tiny_model_dir, tiny_model, recorded_hub_calls, tmp_path, capsys
):
    results = tmp_path / "koniq.json"
    results.write_text(json.dumps({"dataset": "koniq10k", "num_images": 9, "srcc": 0.61, "plcc": 0.65}))
    handler = tmp_path / "handler.py"
    handler.write_text("class EndpointHandler: ...\n")
    argv = ["push", "--model-dir", str(tiny_model_dir), "--repo-id", REPO_ID, "--weights", "random", "--private"]
    assert main([*argv, "--results", str(results), "--include", str(handler)]) == 0

    assert [call[0] for call in recorded_hub_calls] == ["create_repo", "create_commit"]
    assert recorded_hub_calls[0][1] == REPO_ID and recorded_hub_calls[0][2]["private"] is True
    _, repo_id, files, _ = recorded_hub_calls[1]
    assert repo_id == REPO_ID
    assert set(files) == REPO_FILES | {"handler.py"}
    assert files["handler.py"] == handler.read_bytes()
    card = ModelCard(files["README.md"].decode())
    metrics = {(result.metric_type, result.metric_value) for result in card.data.eval_results}
    assert metrics == {("spearmanr", 0.61), ("pearsonr", 0.65)}
    (tmp_path / "uploaded.safetensors").write_bytes(files["model.safetensors"])
    uploaded = load_file(tmp_path / "uploaded.safetensors")
    assert all(torch.equal(uploaded[key], tensor) for key, tensor in tiny_model.state_dict().items())
    assert f"pushed: https://huggingface.co/{REPO_ID}/commit/0123abc" in capsys.readouterr().out


def test_a_folder_keeps_its_own_card_with_the_repository_filled_in(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    write_model_card(folder, weights="random")  # made without a repository: usage examples say ORG/NAME
    files = stage_model_folder(folder, tmp_path / "repo", repo_id=REPO_ID)  # no weight kind needed: a card exists
    assert {file.path_in_repo for file in files} == REPO_FILES
    own = (folder / "README.md").read_text()
    staged_card = (tmp_path / "repo" / "README.md").read_text()
    assert "ORG/NAME" in own and "ORG/NAME" not in staged_card
    assert staged_card == own.replace("ORG/NAME", REPO_ID)


def test_folders_that_cannot_be_published_are_refused_with_the_cause(
    tiny_model_dir, tmp_path, recorded_hub_calls, capsys
):
    missing = tmp_path / "missing"
    shutil.copytree(tiny_model_dir, missing)
    weights = load_file(missing / "model.safetensors")
    del weights["vision_model.conv1.weight"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PushError, match=r"missing: does not load as a QualiCLIP model: .*vision_model\.conv1\.weight"):
        stage_model_folder(missing, tmp_path / "repo1", weights="random")

    assert main(["push", "--model-dir", str(tmp_path), "--repo-id", REPO_ID, "--weights", "random"]) == 2
    assert "not a saved model folder (no config.json)" in capsys.readouterr().err
    assert main(["push", "--model-dir", str(tiny_model_dir), "--repo-id", REPO_ID]) == 2
    assert "say what these weights are" in capsys.readouterr().err
    assert main(["push", "--model-dir", "demo", "--repo-id", REPO_ID, "--weights", "demo", "--dry-run"]) == 0
    assert "is uploaded as it is; --weights, --results" in capsys.readouterr().err  # the demo folder has its card
    assert recorded_hub_calls == []


_CHILD = r"""
import json, sys
sys.modules["qualiclip_hf"] = None  # any import of the package now raises ImportError
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline
sources, paths = sys.argv[1:3], sys.argv[3:]
report = {}
for source in sources:
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    with torch.no_grad():
        scores = model(**processor(images=[Image.open(p) for p in paths], return_tensors="pt")).quality_score
    judge = pipeline(model=source, trust_remote_code=True)
    report[source] = {
        "scores": scores.tolist(),
        "pipeline": judge(paths, batch_size=2),
        "model_module": type(model).__module__,
        "pipeline_class": type(judge).__name__,
        "task": judge.task,
    }
report["package_loaded"] = any(name.startswith("qualiclip_hf") and sys.modules[name] for name in sys.modules)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def clean_process_report(staged, images, tmp_path_factory):
    """Loads the staged folder, then the same files by repository id from an offline Hub cache, in one process."""
    folder, _ = staged
    root = tmp_path_factory.mktemp("hub")
    commit = hashlib.sha1(b"qualiclip push test").hexdigest()
    add_to_hub_cache(root / "cache", REPO_ID, folder_files(folder), commit)
    cached = scan_cache_dir(root / "cache")
    assert [(repo.repo_id, repo.refs["main"].commit_hash) for repo in cached.repos] == [(REPO_ID, commit)]
    (repo,) = cached.repos
    assert {file.file_name for file in repo.refs["main"].files} == REPO_FILES and not cached.warnings

    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(root / "cache"), HF_HOME=str(root / "home"))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), REPO_ID, *map(str, images)],
        capture_output=True, text=True, cwd=root, env=env, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1]), commit


@pytest.fixture(scope="module")
def expected_scores(tiny, images):
    return direct_scores(*tiny, [Image.open(p) for p in images])


def check_source(result: dict, expected: torch.Tensor) -> None:
    assert torch.allclose(torch.tensor(result["scores"]), expected, atol=1e-6, rtol=0)
    assert result["pipeline_class"] == "ImageQualityAssessmentPipeline"
    assert result["task"] == "image-quality-assessment"
    for labels, score in zip(result["pipeline"], expected.tolist(), strict=True):
        assert [entry["label"] for entry in labels] == ["good", "bad"]
        assert labels[0]["score"] == pytest.approx(score, abs=1e-5)
        assert labels[1]["score"] == pytest.approx(1 - score, abs=1e-5)


def test_staged_folder_loads_with_remote_code_where_the_package_is_not_installed(
    clean_process_report, staged, expected_scores
):
    report, _ = clean_process_report
    assert not report["package_loaded"]
    result = report[str(staged[0])]
    assert result["model_module"].startswith("transformers_modules.")
    check_source(result, expected_scores)


def test_repository_loads_by_id_from_an_offline_hub_cache(clean_process_report, expected_scores):
    report, commit = clean_process_report
    result = report[REPO_ID]
    # transformers names remote-code modules after the repository and the commit it resolved from the cache
    assert result["model_module"].startswith("transformers_modules.someone.")
    assert f".{commit}.modeling_qualiclip" in result["model_module"]
    check_source(result, expected_scores)


def test_a_push_without_a_token_stops_at_once_in_one_line(tiny_model_dir, recorded_hub_calls, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # no token file either
    assert main(["push", "--model-dir", str(tiny_model_dir), "--repo-id", REPO_ID, "--weights", "random"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not logged in" in err and "hf auth login" in err
    assert recorded_hub_calls == []


def test_training_with_push_to_hub_offline_stops_before_training(tmp_path, monkeypatch):
    # The check comes first: nothing is trained, read or written (the pristine data need not exist).
    from training.train import TrainConfig, train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = TrainConfig(output_dir=str(tmp_path / "run"), data_source=str(tmp_path / "no-such-data"))
    with pytest.raises(ValueError, match=rf"cannot push to {REPO_ID}: HF_HUB_OFFLINE is set; nothing was trained"):
        train(config, push_to_hub=REPO_ID)
    assert not (tmp_path / "run").exists()
