"""From a model name to a `QualiCLIPModel` and its processor: the one place that knows what a name means.

The names (`qualiclip --model`, pyiqa's `pretrained_model_name_or_path`, `load_model_and_processor`):

- `"official"`: the authors' QualiCLIP weights (`QualiCLIP.pth` of the Hub repository `chaofengc/IQA-PyTorch-Weights`,
  the same file as the release asset of github.com/miccunifi/QualiCLIP), downloaded through `huggingface_hub`,
  checked against the SHA-256 the Hub publishes and converted once into `$HF_HOME/qualiclip_hf/`.
- `"demo"`: the small demo model embedded in this package (`DEMO_MODEL_PATH`), trained here from scratch on 41 photos;
  it is not QualiCLIP.
- a model folder (what `save_pretrained`, `qualiclip convert` or `training/train.py` write);
- a Hub repository id, `ORG/NAME`.

Names fail fast: anything else is refused before any network access, with the valid choices; a path to a missing
folder is named as such; and a Hub name with the Hub unreachable (no network, or `HF_HUB_OFFLINE=1`) is looked up in
the local Hugging Face cache only, so it fails within about a second, saying what to do, instead of retrying.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .outputs import atomic_path

if TYPE_CHECKING:
    import torch

    from .modeling_qualiclip import QualiCLIPModel
    from .processing_qualiclip import QualiCLIPProcessor

DEMO_MODEL_PATH = Path(__file__).parent / "demo_model"
# The names that are not folders or Hub ids.
MODEL_NAMES = ("official", "demo")
# `select_device` choices; "auto" tries the others in this order.
DEVICES = ("auto", "cuda", "mps", "cpu")
# The number formats and runtimes a model can score in (`qualiclip_hf.backends.precision.prepare_scorer`); which format
# each backend runs is `qualiclip_hf.backends.precision.BACKEND_PRECISIONS`.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
BACKENDS = ("torch", "onnxruntime", "openvino")

OFFICIAL_REPO_ID = "chaofengc/IQA-PyTorch-Weights"
OFFICIAL_FILENAME = "QualiCLIP.pth"
OFFICIAL_RELEASE_URL = "https://github.com/miccunifi/QualiCLIP/releases/download/weights/qualiclip.pth"
# QualiCLIP+ contexts by the dataset they were learned on; pyiqa's metric "qualiclip+" is the KonIQ one.
PLUS_FILENAMES = {dataset: f"QualiCLIP+_{dataset}.pth" for dataset in ("koniq", "clive", "flive", "spaq")}

# How long a TCP connection to the Hub may take before the Hub counts as unreachable. huggingface_hub itself retries
# a failing connection with back-off for about half a minute.
HUB_PROBE_TIMEOUT_S = 1.0
# A Hub repository id as huggingface_hub validates it, with the namespace required: every repository created since
# the Hub moved its unnamespaced models under organisations has one, and a bare word is far more often a typo of
# "demo" or "official" than a repository.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelUnavailableError(OSError):
    """A well-formed model name whose files cannot be had here and now (offline and not cached, say)."""


@dataclass(frozen=True)
class ResolvedModel:
    """
    A model name and what it points to.

    Attributes:
        name: The name as given (`"demo"`, `"official"`, a folder, a Hub id).
        location: What `from_pretrained` loads: a local folder, or a Hub id when the Hub is reachable.
        description: For people, a few words: what the model is and where its files are.
    """

    name: str
    location: str
    description: str


def resolve_model(name: str | os.PathLike) -> ResolvedModel:
    """
    Says what a model name means, downloading the official weights if needed (see the module docstring).

    Raises:
        ValueError: `name` is none of the accepted kinds; the message lists them.
        FileNotFoundError: `name` is a path to a missing folder, or a folder without `config.json`.
        ModelUnavailableError: the Hub cannot be reached (or `HF_HUB_OFFLINE` is set) and the files are not in the
            local Hugging Face cache; the message says what to do.
        CheckpointError: the downloaded official checkpoint fails its SHA-256 check.
    """
    text = os.fspath(name)
    if text == "demo":
        return ResolvedModel(
            text, str(DEMO_MODEL_PATH), "the embedded demo model, trained here on 41 photos; not QualiCLIP"
        )
    if text == "official":
        folder = official_model_dir()
        return ResolvedModel(text, str(folder), f"the authors' QualiCLIP weights, converted in {folder}")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{text}: not a model folder (it has no config.json)")
        return ResolvedModel(text, str(path), f"the model folder {path.resolve()}")
    if path.exists():
        raise ValueError(
            f"{text}: a file, not a model folder; convert a checkpoint first with "
            f"`qualiclip convert --checkpoint {text} --output FOLDER`"
        )
    if _looks_like_path(text):
        raise FileNotFoundError(f"{text}: no such model folder")
    if not _HUB_ID.fullmatch(text) or "--" in text or ".." in text:
        close = difflib.get_close_matches(text, MODEL_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{text!r} is not a model: use 'official' (the authors' weights, downloaded once), 'demo' (the embedded "
            f"demo model, not QualiCLIP), a model folder, or a Hub repository id ORG/NAME{hint}"
        )
    offline = hub_unreachable_reason()
    if offline is None:
        return ResolvedModel(text, text, "a Hub repository")
    snapshot = _cached_snapshot(text, offline)
    return ResolvedModel(text, str(snapshot), f"a Hub repository, from the local cache ({offline}): {snapshot}")


def resolve_pretrained(name: str | os.PathLike) -> str:
    """What `from_pretrained` loads for a model name: `resolve_model(name).location`."""
    return resolve_model(name).location


def load_model_and_processor(
    name: str | os.PathLike | ResolvedModel,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[QualiCLIPModel, QualiCLIPProcessor]:
    """
    Loads a `QualiCLIPModel` in eval mode, on `device`, and its `QualiCLIPProcessor`.

    Args:
        name: A model name (see `resolve_model`), or its `ResolvedModel`.
        device: Where the model runs.
        dtype: The dtype the model is loaded in (`from_pretrained(dtype=...)`; float32 by default). In half
            precision the image tower runs in that dtype and the score head in float32.

    Raises:
        The errors of `resolve_model`; `OSError` for a folder whose files are damaged (see
        `QualiCLIPModel.from_pretrained`).
    """
    import torch

    from . import register_auto_classes
    from .modeling_qualiclip import QualiCLIPModel
    from .processing_qualiclip import QualiCLIPProcessor

    # A saved folder declares `auto_map`: without the installed classes registered, its processor's parts would be
    # loaded as remote code (a prompt, or a refusal). The `qualiclip` command defers the registration; every command
    # that loads a model comes here.
    register_auto_classes()
    resolved = name if isinstance(name, ResolvedModel) else resolve_model(name)
    model = QualiCLIPModel.from_pretrained(resolved.location, dtype=dtype or torch.float32)
    return model.to(device).eval(), QualiCLIPProcessor.from_pretrained(resolved.location)


def select_device(choice: str = "auto") -> torch.device:
    """
    The `torch.device` for `"auto"` (CUDA, else Apple's MPS, else the CPU), `"cuda"`, `"mps"` or `"cpu"`.

    Raises:
        ValueError: the device asked for is not available here, or `choice` is no device name.
    """
    import torch

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if choice == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    if choice not in available:
        raise ValueError(f"unknown device {choice!r}; choose one of {', '.join(DEVICES)}")
    if not available[choice]:
        raise ValueError(f"--device {choice} was asked for, but {choice.upper()} is not available here")
    return torch.device(choice)


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` is set (read now, also when set after huggingface_hub was imported)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_unreachable_reason() -> str | None:
    """
    Why the Hub cannot be used now, or None: `HF_HUB_OFFLINE` is set, or a TCP connection to the Hub's endpoint
    fails within `HUB_PROBE_TIMEOUT_S`. With a proxy configured, the probe is skipped (the connection would go
    through the proxy).
    """
    from huggingface_hub import constants

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:  # in a thread, so that a slow name lookup is bounded by the timeout too
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S + 0.5)
    if outcome and outcome[0] is None:
        return None
    return f"{constants.ENDPOINT} cannot be reached (no network?)"


def _looks_like_path(text: str) -> bool:
    """A name that can only be meant as a local path: relative or absolute markers, or several folders deep."""
    return (
        text.startswith((".", "/", "~", "\\"))
        or text.endswith(("/", "\\"))
        or "\\" in text
        or text.count("/") > 1
        or re.match(r"[A-Za-z]:", text) is not None
    )


def _cached_snapshot(repo_id: str, reason: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelUnavailableError(
            f"{repo_id}: {reason}, and the repository is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}). Connect to the internet, or download it where you can (`hf download "
            f"{repo_id}`) and pass the folder, or copy that machine's cache here"
        ) from None


def download_official_checkpoint(expected_sha256: str | None = None, filename: str = OFFICIAL_FILENAME) -> Path:
    """
    Downloads the official checkpoint through `huggingface_hub` (cached, so only once) and verifies its SHA-256.
    With the Hub unreachable, only the local cache is used, without retries.

    Args:
        expected_sha256: The digest the file must have. By default it is the digest the Hub publishes for the file:
            the Hub client names cached large files by that digest, so a truncated or altered download is caught.
        filename: The file of `OFFICIAL_REPO_ID` to download: `QualiCLIP.pth`, or a QualiCLIP+ file of
            `PLUS_FILENAMES`.

    Raises:
        CheckpointError: when the digest does not match.
        ModelUnavailableError: the Hub cannot be reached and the file is not in the cache.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_unreachable_reason()
    try:
        path = Path(hf_hub_download(OFFICIAL_REPO_ID, filename, local_files_only=offline is not None))
    except LocalEntryNotFoundError:
        raise ModelUnavailableError(
            f"the official weights ({filename} of {OFFICIAL_REPO_ID}) are not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {offline}. Connect once to download them (about 400 MB), or download "
            f"{OFFICIAL_RELEASE_URL} where you can and convert it with `qualiclip convert --checkpoint qualiclip.pth "
            "--output FOLDER`, then pass --model FOLDER; --model demo runs the embedded demo model (not QualiCLIP)"
        ) from None
    # Imported once the file is here: the conversion module imports torch, which a failed look-up does not need.
    from .convert_qualiclip_checkpoint import CheckpointError, sha256_of

    published = path.resolve().name  # blobs/<sha256> for files stored with Git LFS / Xet
    expected = expected_sha256 or (published if re.fullmatch(r"[0-9a-f]{64}", published) else None)
    if expected is None:
        raise CheckpointError(f"{path}: the Hub published no SHA-256 for {filename}; pass expected_sha256")
    actual = sha256_of(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: SHA-256 {actual} does not match the published {expected}; the download is corrupt or was "
            "tampered with. Delete it and download again."
        )
    return path


def official_model_dir(expected_sha256: str | None = None) -> Path:
    """
    A Hugging Face folder of the official QualiCLIP weights, downloaded and converted once into the cache
    (`$HF_HOME/qualiclip_hf/official-<sha256 prefix>`), then reused.
    """
    from huggingface_hub import constants

    checkpoint = download_official_checkpoint(expected_sha256)
    from .convert_qualiclip_checkpoint import convert_checkpoint  # after the download, which fails without torch

    output_dir = Path(constants.HF_HOME) / "qualiclip_hf" / f"official-{checkpoint.resolve().name[:16]}"
    return _convert_once(output_dir, lambda staging: convert_checkpoint(checkpoint, staging))


def official_plus_model_dir(dataset: str = "koniq") -> Path:
    """
    A Hugging Face folder of pyiqa's QualiCLIP+ learned on `dataset` (one of `PLUS_FILENAMES`: "koniq" is pyiqa's
    "qualiclip+"), downloaded with `QualiCLIP.pth` and converted once into `$HF_HOME/qualiclip_hf/`, then reused.
    """
    from huggingface_hub import constants

    if dataset not in PLUS_FILENAMES:
        raise ValueError(f"no QualiCLIP+ weights for {dataset!r}; choose one of {', '.join(PLUS_FILENAMES)}")
    base = download_official_checkpoint()
    plus = download_official_checkpoint(filename=PLUS_FILENAMES[dataset])
    from .convert_qualiclip_checkpoint import convert_qualiclip_plus

    name = f"official-plus-{dataset}-{base.resolve().name[:8]}-{plus.resolve().name[:8]}"
    output_dir = Path(constants.HF_HOME) / "qualiclip_hf" / name
    return _convert_once(output_dir, lambda staging: convert_qualiclip_plus(base, plus, staging))


def _convert_once(output_dir: Path, convert: Callable[[Path], Path]) -> Path:
    if not (output_dir / "model.safetensors").is_file():
        # Converted beside the final place and renamed, so an interrupted conversion never looks complete.
        shutil.rmtree(output_dir, ignore_errors=True)
        with atomic_path(output_dir) as staging:
            convert(staging)
    return output_dir
