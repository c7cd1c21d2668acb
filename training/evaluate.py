"""Synthetic evaluation that needs no opinion scores: does the score fall as a degradation gets stronger?

    python training/evaluate.py synthetic --model DIR --images data/demo_pristine/heldout --output results.json

Each held-out pristine image is degraded by each distortion at the 5 levels; per image, the Spearman rank
correlation (scipy) between the level and the score is computed with the sign flipped, so that 1 means "the score
falls strictly as the level rises". The JSON holds, per distortion, the mean over images, and the overall mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qualiclip_hf.cli import load_model_and_processor
from qualiclip_hf.scoring import collect_image_paths, read_image
from training.degradations import ALL_DISTORTIONS, apply_distortion


@torch.inference_mode()
def synthetic_level_srcc(
    model_name: str,
    image_dir: str | Path,
    distortions: list[str] | None = None,
    max_side: int = 512,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Returns `{"per_distortion": {name: mean SRCC}, "overall": mean, "num_images": n, ...}`."""
    model, processor = load_model_and_processor(model_name, device)
    names = distortions or [d.name for d in ALL_DISTORTIONS]
    paths = collect_image_paths([image_dir])
    if not paths:
        raise ValueError(f"{image_dir}: no images")
    images = [_fit(read_image(path).float() / 255, max_side) for path in paths]
    per_distortion = {}
    for name in tqdm(names, desc="distortions"):
        correlations = []
        for index, image in enumerate(images):
            levels = [
                apply_distortion(image[None], name, level, torch.Generator().manual_seed(seed + index))[0]
                for level in range(5)
            ]
            batch = processor(images=[(lvl * 255).round().to(torch.uint8) for lvl in levels], return_tensors="pt")
            scores = model(**batch.to(model.device)).quality_score.float().cpu().numpy()
            rho = spearmanr(-np.arange(5), scores).statistic
            correlations.append(0.0 if np.isnan(rho) else float(rho))
        per_distortion[name] = float(np.mean(correlations))
    return {
        "model": str(model_name),
        "images": [p.name for p in paths],
        "num_images": len(paths),
        "max_side": max_side,
        "metric": "mean over images of SRCC(-level, score), levels 1..5",
        "per_distortion": per_distortion,
        "overall": float(np.mean(list(per_distortion.values()))),
    }


def _fit(image: torch.Tensor, max_side: int) -> torch.Tensor:
    scale = max_side / max(image.shape[-2:])
    if scale >= 1:
        return image
    size = [round(s * scale) for s in image.shape[-2:]]
    return torch.nn.functional.interpolate(image[None], size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="SRCC between degradation level and score")
    synthetic.add_argument("--model", required=True)
    synthetic.add_argument("--images", required=True, help="folder of held-out pristine images")
    synthetic.add_argument("--distortions", nargs="*", help="names (default: all 24)")
    synthetic.add_argument("--max-side", type=int, default=512)
    synthetic.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    synthetic.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    results = synthetic_level_srcc(args.model, args.images, args.distortions, args.max_side, args.device)
    text = json.dumps(results, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
