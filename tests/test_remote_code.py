"""A saved folder loads through the Auto classes with `trust_remote_code=True` where qualiclip_hf is NOT importable."""

import json
import subprocess
import sys

import torch

from qualiclip_hf import QualiCLIPModel, QualiCLIPProcessor

from .conftest import direct_scores, photo

_CHILD = r"""
import json, sys
sys.modules["qualiclip_hf"] = None  # any import of the package now raises ImportError
import numpy as np, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
images = [Image.open(path) for path in sys.argv[2:]]
with torch.no_grad():
    scores = model(**processor(images=images, return_tensors="pt")).quality_score.tolist()
print(json.dumps({
    "scores": scores,
    "model_module": type(model).__module__,
    "processor": type(processor).__name__,
    "package_loaded": any(name.startswith("qualiclip_hf") and sys.modules[name] for name in sys.modules),
}))
"""


def test_folder_loads_with_remote_code_without_the_package(tiny_model_dir, tiny, tmp_path):
    paths = []
    for index, (height, width) in enumerate([(64, 96), (80, 48)]):
        paths.append(tmp_path / f"image{index}.png")
        photo(height, width, seed=index).save(paths[-1])
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny_model_dir), *map(str, paths)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert not result["package_loaded"]
    assert result["model_module"].startswith("transformers_modules")
    assert result["processor"] == "QualiCLIPProcessor"

    from PIL import Image

    here = direct_scores(*tiny, [Image.open(p) for p in paths])
    assert torch.allclose(torch.tensor(result["scores"]), here, atol=1e-6, rtol=0)


def test_auto_classes_resolve_to_ours_with_the_package_imported(tiny_model_dir):
    from transformers import AutoConfig, AutoModel, AutoProcessor

    assert type(AutoConfig.from_pretrained(tiny_model_dir)).__name__ == "QualiCLIPConfig"
    assert isinstance(AutoModel.from_pretrained(tiny_model_dir), QualiCLIPModel)
    assert isinstance(AutoProcessor.from_pretrained(tiny_model_dir), QualiCLIPProcessor)
