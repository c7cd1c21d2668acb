"""Untrusted weights: truncated, altered or mismatched files fail with an error naming them; pickles never run code."""

import json
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qualiclip_hf import QualiCLIPModel
from qualiclip_hf.cli import main
from qualiclip_hf.convert_qualiclip_checkpoint import CheckpointError, load_official_checkpoint

from .conftest import photo


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def tensor_offset(path, key: str) -> int:
    """Where `key`'s bytes start in a safetensors file: an 8-byte header length, the JSON header, then the data."""
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    return 8 + header_length + json.loads(data[8 : 8 + header_length])[key]["data_offsets"][0]


def test_the_intact_copy_loads(model_copy):
    assert QualiCLIPModel.from_pretrained(model_copy).config.vision_config.embedding_size == 8


def test_truncated_weights_are_refused(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=rf"{model_copy}: the weight file is truncated or corrupt \(safetensors: .*"):
        QualiCLIPModel.from_pretrained(model_copy)


def test_altered_header_is_refused(model_copy):
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(OSError, match=rf"{model_copy}: the weight file is truncated or corrupt"):
        QualiCLIPModel.from_pretrained(model_copy)


def test_altered_tensor_bytes_that_give_nan_are_refused(model_copy):
    weights = model_copy / "model.safetensors"
    start = tensor_offset(weights, "vision_model.layer2.0.conv2.weight")
    data = bytearray(weights.read_bytes())
    data[start : start + 8] = b"\xff" * 8  # two float32 NaNs
    weights.write_bytes(bytes(data))
    with pytest.raises(
        OSError, match=r"corrupt or do not match the config: not finite: vision_model\.layer2\.0\.conv2"
    ):
        QualiCLIPModel.from_pretrained(model_copy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "reshape",
            r"of another shape \(file vs model\): vision_model\.conv1\.weight \(3, 3, 3, 3\) vs \(4, 3, 3, 3\)",
        ),
        ("drop", r"missing: vision_model\.conv1\.weight"),
        ("add", r"unexpected: vision_model\.extra"),
    ],
)
def test_tensors_that_do_not_match_the_config_are_refused(model_copy, change, message):
    """transformers would load these with a warning and randomly initialised tensors, giving meaningless scores."""
    weights = model_copy / "model.safetensors"
    state = load_file(weights)
    if change == "reshape":
        state["vision_model.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    elif change == "drop":
        del state["vision_model.conv1.weight"]
    else:
        state["vision_model.extra"] = torch.zeros(2)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(OSError, match=rf"{model_copy}: the weights are corrupt or do not match the config: {message}"):
        QualiCLIPModel.from_pretrained(model_copy)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickled_weight_file_carrying_code_is_refused(model_copy, capsys):
    """Folders with `pytorch_model.bin` instead of safetensors are read with `torch.load(weights_only=True)`."""
    state = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    assert QualiCLIPModel.from_pretrained(model_copy).config.vision_config.embedding_size == 8  # plain tensors: fine
    with open(model_copy / "pytorch_model.bin", "wb") as file:
        pickle.dump({"vision_model.conv1.weight": _Payload()}, file, protocol=2)
    with pytest.raises(OSError, match=rf"{model_copy}: refused the pickled weight file: it holds more than tensors"):
        QualiCLIPModel.from_pretrained(model_copy)
    assert "code ran" not in capsys.readouterr().out


def test_cli_reports_a_corrupt_model_and_exits_2(model_copy, tmp_path, capsys):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    photo(64, 64).save(tmp_path / "a.png")
    assert main(["score", str(tmp_path / "a.png"), "--model", str(model_copy)]) == 2
    assert f"cannot load model '{model_copy}': {model_copy}: the weight file is truncated" in capsys.readouterr().err


def test_altered_official_checkpoint_is_refused_by_its_checksums(official_checkpoint, tmp_path):
    """`torch.load` does not check the CRC-32 of the archive entries; the conversion does."""
    import zipfile

    with zipfile.ZipFile(official_checkpoint) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)  # the largest tensor
    data = bytearray(official_checkpoint.read_bytes())
    data[entry.header_offset + 200 + entry.file_size // 2] ^= 0x01  # one bit of one weight
    altered = tmp_path / "altered.pth"
    altered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"altered\.pth: corrupt: the checksum of its entry '{entry.filename}'"):
        load_official_checkpoint(altered)
    assert main(["convert", "--checkpoint", str(altered), "--output", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
