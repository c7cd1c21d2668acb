"""
transformers' own common test mixins (`ModelTesterMixin`, `ConfigTester`, `ImageProcessingTestMixin`,
`ProcessorTesterMixin`), taken from the `tests/` folder of the installed transformers release.

The wheel carries no tests, so the folder comes from the release's source distribution on PyPI: downloaded once with
pip (the user's index settings apply), unpacked into a cache outside the repository (`$QUALICLIP_TEST_CACHE`, by
default `~/.cache/qualiclip-tests/transformers-<version>`) and imported from there as the package
`transformers_tests` (our own `tests` package holds the name `tests`). Nothing of it is copied into this repository.

The source distribution ships the top-level `tests/test_*_common.py` files but not the folders they import from;
`_STAND_INS` writes the few names those imports need (see each one's docstring): the generation and export mixins,
which do not apply to QualiCLIP (it does not generate; its export is tested in tests/test_onnx.py), the config
kwargs of `ConfigTester.check_config_arguments_init`, and the URL-to-local-file helper of transformers' CI, here
mapping the test images to generated local ones, so that no test needs the network.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest
import transformers

PACKAGE = "transformers_tests"
CACHE_ENV = "QUALICLIP_TEST_CACHE"

_STAND_INS = {
    f"{PACKAGE}/__init__.py": "",
    f"{PACKAGE}/exporters/__init__.py": "",
    f"{PACKAGE}/exporters/test_export.py": '''
class ExportTesterMixin:
    """Stand-in: the source distribution leaves out tests/exporters/. QualiCLIP's export (ONNX through torch.export)
    is tested by qualiclip-hf's tests/test_onnx.py."""
''',
    f"{PACKAGE}/generation/__init__.py": "",
    f"{PACKAGE}/generation/test_utils.py": '''
class GenerationTesterMixin:
    """Stand-in: the source distribution leaves out tests/generation/; QualiCLIP does not generate."""
''',
    f"{PACKAGE}/utils/__init__.py": "",
    f"{PACKAGE}/utils/test_configuration_utils.py": '''
"""Stand-in for tests/utils/test_configuration_utils.py, left out of the source distribution: a value other than the
default for each argument `PreTrainedConfig.__init__` takes, which `ConfigTester.check_config_arguments_init` passes
to a config and reads back."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
    # test_image_processing_common and test_processing_common put <root>/utils on sys.path for this module.
    "utils/fetch_hub_objects_for_ci.py": '''
"""Stand-in for utils/fetch_hub_objects_for_ci.py of transformers' repository, which maps the URLs of the test
fixtures to files transformers' CI downloaded beforehand. Here an image URL maps to a generated local image of the
same format (a smooth random RGB picture, 480x640), so that the tests run offline; other URLs are returned as given."""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

_FOLDER = Path(__file__).resolve().parent / "images"


def url_to_local_path(url, return_url_if_not_found=True):
    suffix = Path(url.split("?")[0]).suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        return url
    digest = hashlib.sha256(url.encode()).hexdigest()
    path = _FOLDER / (digest[:16] + suffix)
    if not path.exists():
        _FOLDER.mkdir(exist_ok=True)
        rng = np.random.default_rng(int(digest[:8], 16))
        coarse = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(coarse).resize((640, 480), Image.BICUBIC).save(path)
    return str(path)
''',
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qualiclip-tests")


def transformers_tests_root(version: str = transformers.__version__) -> Path:
    """
    The folder holding the package `transformers_tests` (transformers `version`'s `tests/`, plus the stand-ins),
    downloaded and unpacked on first use.

    Raises:
        RuntimeError: the source distribution could not be downloaded or holds no `tests/test_modeling_common.py`.
    """
    root = cache_root() / f"transformers-{version}"
    if (root / PACKAGE / "test_modeling_common.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".download-") as work:
        # Few retries and a short timeout: without access to PyPI the tests are skipped soon, not after minutes.
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += ["--retries", "1", "--timeout", "30"]
        try:
            subprocess.run(
                [*command, f"transformers=={version}", "--dest", work],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.CalledProcessError as error:
            last_line = (error.stderr or error.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download transformers=={version} failed: {last_line[0]}") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download transformers=={version} took over 10 minutes") from None
        sdists = sorted(Path(work).glob("transformers-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download transformers=={version} gave no source distribution")
        staging = Path(work) / "staging"
        with tarfile.open(sdists[0]) as archive:
            # <name>-<version>/tests/<file>.py only: the common mixins live at the top of the folder.
            members = [
                member
                for member in archive.getmembers()
                if member.isfile()
                and len(PurePosixPath(member.name).parts) == 3
                and PurePosixPath(member.name).parts[1] == "tests"
                and member.name.endswith(".py")
            ]
            for member in members:
                member.name = f"{PACKAGE}/{PurePosixPath(member.name).name}"
            archive.extractall(staging, members=members, filter="data")
        if not (staging / PACKAGE / "test_modeling_common.py").is_file():
            raise RuntimeError(
                f"the source distribution of transformers {version} has no tests/test_modeling_common.py"
            )
        for relative_path, text in _STAND_INS.items():
            path = staging / relative_path
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_text(text.lstrip("\n"))
        try:
            staging.rename(root)
        except OSError:  # another test process unpacked it first
            if not (root / PACKAGE / "test_modeling_common.py").is_file():
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
    return root


def import_common(module: str) -> ModuleType:
    """
    `transformers_tests.<module>` (e.g. `"test_modeling_common"`); skips the calling test module, with the reason,
    when transformers' tests cannot be obtained (no access to PyPI).
    """
    try:
        root = transformers_tests_root()
    except RuntimeError as error:
        pytest.skip(f"transformers' common tests are unavailable: {error}", allow_module_level=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.{module}")
