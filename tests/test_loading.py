"""`qualiclip_hf.loading`: model names fail fast and say why; Hub names work offline from a local cache; devices."""

import socket
import time

import pytest
import torch

from qualiclip_hf import loading
from qualiclip_hf.cli import main
from qualiclip_hf.loading import (
    DEMO_MODEL_PATH,
    ModelUnavailableError,
    load_model_and_processor,
    resolve_model,
    select_device,
)

from .conftest import add_to_hub_cache, folder_files, photo


@pytest.fixture
def no_network(monkeypatch):
    """Every TCP connection fails at once, as on a machine without network; counts the attempts."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def hub_cache(monkeypatch, tmp_path, tiny_model_dir):
    """An empty Hugging Face home, plus `add(repo_id)` to put the tiny model in its cache as the Hub client does."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))

    def add(repo_id: str) -> None:
        add_to_hub_cache(home / "hub", repo_id, folder_files(tiny_model_dir), commit="1" * 40)

    return add


@pytest.mark.parametrize("name", ["dmeo", "Official", "qualiclip", "org/name/extra/", "org//name", "a--b/c"])
def test_malformed_names_are_refused_at_once_with_the_choices(name, no_network):
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        resolve_model(name)
    assert not no_network  # refused before any connection
    message = str(error.value)
    assert name in message
    if isinstance(error.value, FileNotFoundError):
        assert "no such model folder" in message
    else:
        assert "'official'" in message and "'demo'" in message and "ORG/NAME" in message


def test_a_typo_of_a_name_gets_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'demo'"):
        resolve_model("dmeo")


def test_missing_folders_and_files_are_named(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match=r"missing/: no such model folder"):
        resolve_model("./missing/")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_model(tmp_path)  # exists, but holds no config.json
    checkpoint = tmp_path / "qualiclip.pth"
    checkpoint.write_bytes(b"not relevant")
    with pytest.raises(ValueError, match="qualiclip convert --checkpoint"):
        resolve_model(checkpoint)
    assert not no_network


def test_hub_names_load_from_the_local_cache_when_offline(hub_cache, tiny_model_dir, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_cache("someone/tiny-qualiclip")
    model, processor = load_model_and_processor("someone/tiny-qualiclip")
    reference, _ = load_model_and_processor(tiny_model_dir)
    inputs = processor(images=photo(64, 80), return_tensors="pt")
    with torch.no_grad():
        assert model(**inputs).quality_score.item() == pytest.approx(reference(**inputs).quality_score.item())
    assert "HF_HUB_OFFLINE" in resolve_model("someone/tiny-qualiclip").description
    assert not no_network  # HF_HUB_OFFLINE: not even a probe


def test_an_uncached_hub_name_offline_fails_at_once_saying_what_to_do(hub_cache, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as error:
        resolve_model("someone/not-cached")
    assert time.monotonic() - started < 5  # a generous bound; huggingface_hub's own retries take ~30 s
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and "hf download someone/not-cached" in message


def test_without_network_hub_names_use_the_cache_after_one_failed_connection(hub_cache, no_network):
    hub_cache("someone/tiny-qualiclip")
    assert "cannot be reached" in resolve_model("someone/tiny-qualiclip").description
    assert len(no_network) == 1  # one probe, no retries
    with pytest.raises(ModelUnavailableError, match="cannot be reached"):
        resolve_model("someone/not-cached")


def test_official_weights_without_network_or_cache_point_to_the_alternatives(hub_cache, no_network):
    with pytest.raises(ModelUnavailableError) as error:
        resolve_model("official")
    message = str(error.value)
    assert "QualiCLIP.pth" in message and "qualiclip convert --checkpoint" in message and "--model demo" in message
    assert len(no_network) <= 2  # our probe, and huggingface_hub's one-off fetch for its user agent; no retries


def test_the_demo_name_and_the_path_constant_are_the_same_model():
    assert resolve_model("demo").location == str(DEMO_MODEL_PATH)
    assert "not QualiCLIP" in resolve_model("demo").description


def test_cli_refuses_a_bad_model_name_in_one_line(tmp_path, capsys, no_network):
    photo(40, 40).save(tmp_path / "a.png")
    assert main(["score", str(tmp_path), "--model", "dmeo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'demo'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("cuda", "mps", "choice", "expected"),
    [
        (True, True, "auto", "cuda"),
        (False, True, "auto", "mps"),
        (False, False, "auto", "cpu"),
        (False, True, "mps", "mps"),
        (True, False, "cpu", "cpu"),
    ],
)
def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, choice, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert select_device(choice).type == expected


@pytest.mark.parametrize("choice", ["cuda", "mps"])
def test_an_unavailable_device_is_refused_by_name(monkeypatch, choice):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"--device {choice} was asked for, but {choice.upper()} is not available"):
        select_device(choice)


def test_hub_probe_is_skipped_behind_a_proxy(monkeypatch, no_network):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert loading.hub_unreachable_reason() is None
    assert not no_network


def test_the_pipeline_given_a_resolved_hub_name_works_offline_and_fails_without_retries(hub_cache, no_network):
    # `transformers.pipeline("ORG/NAME")` itself asks the Hub (huggingface_hub retries for ~24 s without network);
    # the README's way, `pipeline(model=resolve_pretrained(name))`, probes once and loads the cached copy.
    from transformers import pipeline

    hub_cache("someone/tiny-qualiclip")
    judge = pipeline(model=loading.resolve_pretrained("someone/tiny-qualiclip"), trust_remote_code=True)
    assert 0 <= judge(photo(64, 80))[0]["score"] <= 1
    assert len(no_network) == 1  # the probe; the pipeline itself read the local folder
    with pytest.raises(ModelUnavailableError, match=r"someone/not-cached: .*cannot be reached.*hf download"):
        pipeline(model=loading.resolve_pretrained("someone/not-cached"), trust_remote_code=True)
    assert len(no_network) == 2  # one more probe, no retries
