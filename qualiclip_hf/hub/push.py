"""
Publishing a QualiCLIP folder on the Hub: `stage_model_folder` writes exactly what the repository gets, and
`push_model_folder` uploads it in one commit through `huggingface_hub`.

The folder is loaded and saved again with this package (`save_pretrained`), so the repository always carries the
safetensors weights, `config.json` with its `auto_map` and `custom_pipelines`, the processor and tokenizer files,
and the remote-code files (configuration, modeling, image processing, processing, pipeline) of the installed
version, which load together. The folder's own `README.md` is kept; a folder without one gets a generated card.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

__all__ = ["PushError", "StagedFile", "push_model_folder", "stage_model_folder"]


class PushError(ValueError):
    """The folder cannot be published as it is; the message names the folder or file and the cause."""


@dataclass(frozen=True)
class StagedFile:
    """A file of the staged repository: its path in the repository and on disk."""

    path_in_repo: str
    local_path: Path

    @property
    def size(self) -> int:
        return self.local_path.stat().st_size


def stage_model_folder(
    model_dir: str | Path,
    staging_dir: str | Path,
    include: Sequence[str | Path] = (),
    **card_options: Any,
) -> list[StagedFile]:
    """
    Writes the repository's files into `staging_dir` (which must be empty or absent) and lists them.

    Args:
        model_dir: A QualiCLIP folder (what `qualiclip convert` or `training/train.py` writes).
        staging_dir: Where to write.
        include: Extra files placed at the repository's root under their own names (a `handler.py`, ...).
        card_options: For a folder without `README.md`, the options of `make_model_card` (`weights`,
            `results`, `repo_id`, `license`, `base_model`, `datasets`).

    Raises:
        PushError: if the folder does not load as a QualiCLIP model with all its weights, its README's metadata
            does not parse, or the card cannot be generated.
    """
    from ..modeling_qualiclip import QualiCLIPModel
    from ..processing_qualiclip import QualiCLIPProcessor
    from .card import REPO_PLACEHOLDER, ModelCardError, make_model_card

    model_dir, staging_dir = Path(model_dir), Path(staging_dir)
    if not (model_dir / "config.json").is_file():
        raise PushError(f"{model_dir}: not a saved model folder (no config.json)")
    if staging_dir.exists() and any(staging_dir.iterdir()):
        raise PushError(f"{staging_dir}: the staging folder must be empty")
    extra = [Path(path) for path in include]
    for path in extra:
        if not path.is_file():
            raise PushError(f"{path}: --include names no file")
    names = [path.name for path in extra]
    if len(set(names)) != len(names):
        raise PushError(f"two included files share a name: {sorted(names)}")

    # The card first: it is cheap, and a folder that cannot have one fails before anything is written.
    if (model_dir / "README.md").is_file():
        card_text = (model_dir / "README.md").read_text(encoding="utf-8")
        try:
            ModelCard(card_text)
        except ValueError as error:
            raise PushError(f"{model_dir / 'README.md'}: its metadata does not parse: {error}") from None
        repo_id = card_options.get("repo_id")
        if repo_id:  # a generated card made without a repository names it with a placeholder
            card_text = card_text.replace(REPO_PLACEHOLDER, repo_id)
    else:
        try:
            card_text = str(make_model_card(model_dir, **card_options))
        except ModelCardError as error:
            raise PushError(f"{model_dir} has no README.md, and one cannot be generated: {error}") from None

    try:
        # Strict: a weight missing from the file, which would be freshly initialised and published as if trained,
        # raises (see `QualiCLIPModel.from_pretrained`).
        model = QualiCLIPModel.from_pretrained(model_dir, dtype="auto")
        processor = QualiCLIPProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:
        cause = str(error).removeprefix(f"{model_dir}: ")  # the strict loader names the folder already
        raise PushError(f"{model_dir}: does not load as a QualiCLIP model: {cause}") from None
    model.save_pretrained(staging_dir)
    processor.save_pretrained(staging_dir)
    (staging_dir / "README.md").write_text(card_text, encoding="utf-8")
    for path in extra:
        if (staging_dir / path.name).exists():
            raise PushError(f"{path}: would replace the repository's own {path.name}")
        shutil.copyfile(path, staging_dir / path.name)

    return [
        StagedFile(path.relative_to(staging_dir).as_posix(), path)
        for path in sorted(staging_dir.rglob("*"))
        if path.is_file()
    ]


def push_blocker(repo_id: str) -> str | None:
    """
    Why a push to `repo_id` cannot start now, or `None`: the Hub cannot be reached (`HF_HUB_OFFLINE`, no network:
    `loading.hub_unreachable_reason`, within about a second) or no token is found (`hf auth login`, `HF_TOKEN`).
    Asked before long work (staging, training) so that it fails at once instead of after it, and without
    huggingface_hub's minutes of connection retries.
    """
    from huggingface_hub import get_token

    from ..loading import hub_unreachable_reason

    unreachable = hub_unreachable_reason()
    if unreachable is not None:
        return f"cannot push to {repo_id}: {unreachable}"
    if get_token() is None:
        return f"cannot push to {repo_id}: not logged in to the Hub (run `hf auth login`, or set HF_TOKEN)"
    return None


def push_model_folder(
    staged: Sequence[StagedFile],
    repo_id: str,
    private: bool = False,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> Any:
    """
    Creates the model repository if needed (`private` applies only then) and uploads the staged files in one
    commit. Returns huggingface_hub's `CommitInfo`.
    """
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local_path)) for f in staged]
    return api.create_commit(
        repo_id,
        operations,
        repo_type="model",
        commit_message=commit_message or "Upload QualiCLIP model (qualiclip push)",
    )
