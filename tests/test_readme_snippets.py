"""Every Python block of the README runs as written, from the repository's root, with the embedded demo model.

One documented substitution (`SUBSTITUTIONS`, also stated in the README under the block): the pyiqa block asks for
the official weights, which cannot be downloaded where the tests run, so the demo model stands in for them.
"""

import re

import pytest

from .conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
SUBSTITUTIONS = {
    'pyiqa.create_metric("qualiclip", ': 'pyiqa.create_metric("qualiclip", pretrained_model_name_or_path="demo", ',
}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert any("pyiqa.create_metric" in block for block in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, monkeypatch):
    code = python_blocks()[index]
    if "import pyiqa\n" in code:
        pytest.importorskip("pyiqa")
    for written, substitute in SUBSTITUTIONS.items():
        code = code.replace(written, substitute)
    monkeypatch.chdir(REPO_ROOT)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if "scores" in namespace:  # the transformers block: what its comment promises
        scores = namespace["scores"]
        assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 1)).all())
