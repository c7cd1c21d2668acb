"""The Inference Endpoints handler (`model_card/handler.py`) with the demo model."""

import base64
import json
import subprocess
import sys

import pytest
from PIL import Image

from .conftest import REPO_ROOT, direct_scores, good_score, image_bytes, photo

HANDLER_FILE = REPO_ROOT / "model_card" / "handler.py"


def _direct_scores(demo, images, max_size=None):
    return direct_scores(*demo, images, max_size=max_size).tolist()


def _png_bytes(image: Image.Image) -> bytes:
    return image_bytes(image, "PNG")


def _good(answer: list[dict]) -> float:
    assert sorted(entry["label"] for entry in answer) == ["bad", "good"]
    assert answer[0]["score"] >= answer[1]["score"]  # sorted, as image-classification answers are
    assert sum(entry["score"] for entry in answer) == pytest.approx(1.0)
    return good_score(answer)


def test_every_input_form_gets_the_models_score(handler, demo):
    image = photo(96, 128, seed=1)
    (expected,) = _direct_scores(demo, [image])
    encoded = base64.b64encode(_png_bytes(image)).decode()
    for inputs in (image, _png_bytes(image), encoded, f"data:image/png;base64,{encoded}"):
        assert _good(handler({"inputs": inputs})) == pytest.approx(expected, abs=1e-6)


def test_batch_of_mixed_sizes_keeps_going_past_a_bad_input(handler, demo):
    images = [photo(96, 128, seed=2), photo(64, 80, seed=3)]
    expected = [_direct_scores(demo, [image])[0] for image in images]
    answers = handler({"inputs": [_png_bytes(images[0]), b"not an image", images[1], "@@@", photo(20, 20)]})
    assert len(answers) == 5
    assert _good(answers[0]) == pytest.approx(expected[0], abs=1e-6)
    assert _good(answers[2]) == pytest.approx(expected[1], abs=1e-6)
    assert "input 1" in answers[1][0]["error"] and "not an image" in answers[1][0]["error"]
    assert "input 3" in answers[3][0]["error"] and "base64" in answers[3][0]["error"]
    assert "input 4" in answers[4][0]["error"] and "minimum" in answers[4][0]["error"]


def test_max_size_parameter(handler, demo):
    image = photo(160, 240, seed=4)
    (expected,) = _direct_scores(demo, [image], max_size=64)
    assert _good(handler({"inputs": image, "parameters": {"max_size": 64}})) == pytest.approx(expected, abs=1e-6)
    # Downscaling below the model's minimum is reported, not attempted.
    with pytest.raises(ValueError, match="minimum"):
        handler({"inputs": image, "parameters": {"max_size": 40}})
    with pytest.raises(ValueError, match="max_size"):
        handler({"inputs": image, "parameters": {"max_size": "big"}})


def test_a_single_bad_input_raises_with_the_reason(handler):
    with pytest.raises(ValueError, match="not an image file"):
        handler({"inputs": b"\x00\x01garbage"})
    with pytest.raises(ValueError, match="got int"):
        handler({"inputs": 3})
    with pytest.raises(ValueError, match="empty list"):
        handler({"inputs": []})


_CHILD = r"""
import base64, json, sys
sys.modules["qualiclip_hf"] = None  # as on an Endpoint without the package: the repository's code files are used
import importlib.util
spec = importlib.util.spec_from_file_location("handler", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
handler = module.EndpointHandler(path=sys.argv[2])
answer = handler({"inputs": base64.b64encode(open(sys.argv[3], "rb").read()).decode()})
print(json.dumps({"answer": answer, "model_module": type(handler.model).__module__}))
"""


def test_works_without_the_package_through_remote_code(tiny_model_dir, tiny_model, tmp_path):
    from qualiclip_hf import QualiCLIPProcessor

    image = photo(64, 96, seed=5)
    image.save(tmp_path / "image.png")
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(HANDLER_FILE), str(tiny_model_dir), str(tmp_path / "image.png")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["model_module"].startswith("transformers_modules")
    processor = QualiCLIPProcessor.from_pretrained(tiny_model_dir)
    (expected,) = direct_scores(tiny_model, processor, [image]).tolist()
    assert _good(result["answer"]) == pytest.approx(expected, abs=1e-6)
