"""Where a model name given by a user (`--model`, `pretrained_model_name_or_path`) points to."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"


def resolve_pretrained(name: str) -> str:
    """
    Resolves the names the CLI and the pyiqa plugin accept to something `from_pretrained` loads.

    - `"official"`: the official QualiCLIP weights, downloaded through `huggingface_hub` and converted once.
    - `"demo"`: the small demo model embedded in this package (trained here from scratch; not the real QualiCLIP).
    - anything else: a local folder or a Hub repository id, returned unchanged.
    """
    if name == "official":
        from .convert_qualiclip_checkpoint import official_model_dir

        return str(official_model_dir())
    if name == "demo":
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                "the embedded demo model is not part of this release yet (it is trained by the training pipeline, "
                "still in progress); use --model official on a machine with internet, or a converted folder"
            )
        return str(DEMO_MODEL_DIR)
    return name
