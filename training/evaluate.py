"""Evaluation of a QualiCLIP model, with and without opinion scores.

    python training/evaluate.py mos --model DIR --dataset koniq10k --csv scores.csv --images DIR --output r.json
    python training/evaluate.py mos --model DIR --hub-dataset ORG/NAME --split test --output r.json
    python training/evaluate.py synthetic --model DIR --images data/demo_pristine/heldout --output r.json

`mos`: SRCC, KRCC, PLCC after the usual 4-parameter logistic mapping, and raw PLCC (scipy), between the scores
and the mean opinion scores of an IQA dataset given as a `datasets` dataset (Hub id) or a local CSV and folder.
Presets name the columns of KonIQ-10k, CLIVE, FLIVE, SPAQ, KADID-10k and AGIQA-3K; for KADID-10k the opinion is a
DMOS, where higher is worse, and the sign is flipped.

`synthetic`: each held-out pristine image is degraded by each distortion at the 5 levels; per image, the Spearman
correlation between the level and the score is computed with the sign flipped, so that 1 means "the score falls
strictly as the level rises". The JSON holds, per distortion, the mean over images, and the overall mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import curve_fit
from scipy.stats import kendalltau, pearsonr, spearmanr
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qualiclip_hf.cli import load_model_and_processor
from qualiclip_hf.image_processing_qualiclip import limit_longest_side
from qualiclip_hf.scoring import collect_image_paths, read_image, score_files
from training.degradations import ALL_DISTORTIONS, apply_distortion

# (image column, opinion column, higher opinion is better) of each dataset's published score file.
MOS_PRESETS: dict[str, tuple[str, str, bool]] = {
    "koniq10k": ("image_name", "MOS", True),
    "clive": ("image", "mos", True),
    "flive": ("name", "mos", True),
    "spaq": ("Image name", "MOS", True),
    "kadid10k": ("dist_img", "dmos", False),
    "agiqa3k": ("name", "mos_quality", True),
}


def logistic_4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The monotonic logistic of VQEG's recommendation, mapping objective scores to the opinion scale."""
    return (b1 - b2) / (1 + np.exp(-(x - b3) / (np.abs(b4) + 1e-12))) + b2


def correlation_metrics(scores: np.ndarray, opinions: np.ndarray) -> dict[str, float]:
    """SRCC, KRCC, raw PLCC, and PLCC after fitting `logistic_4` from the scores to the opinions."""
    scores, opinions = np.asarray(scores, dtype=np.float64), np.asarray(opinions, dtype=np.float64)
    if len(scores) < 3:
        raise ValueError(f"need at least 3 scored images, got {len(scores)}")
    initial = [opinions.max(), opinions.min(), float(np.mean(scores)), float(np.std(scores)) or 1.0]
    try:
        params, _ = curve_fit(logistic_4, scores, opinions, p0=initial, maxfev=20000)
        fitted_plcc = float(pearsonr(logistic_4(scores, *params), opinions).statistic)
    except RuntimeError:  # the fit did not converge: report the raw correlation
        fitted_plcc = float(pearsonr(scores, opinions).statistic)
    return {
        "srcc": float(spearmanr(scores, opinions).statistic),
        "krcc": float(kendalltau(scores, opinions).statistic),
        "plcc": fitted_plcc,
        "plcc_raw": float(pearsonr(scores, opinions).statistic),
    }


def mos_evaluation(
    model_name: str,
    image_paths: list[Path],
    opinions: list[float],
    higher_is_better: bool = True,
    device: str = "cpu",
    batch_size: int = 4,
    max_size: int | None = None,
    dataset: str = "",
) -> dict:
    """Scores the images and correlates with the opinions; failed images are counted and left out."""
    model, processor = load_model_and_processor(model_name, device)
    results = list(
        tqdm(
            score_files(image_paths, model, processor, batch_size=batch_size, max_size=max_size),
            total=len(image_paths),
            desc="scoring",
        )
    )
    kept = [(r.score, o) for r, o in zip(results, opinions, strict=True) if r.score is not None]
    scores, kept_opinions = np.array([k[0] for k in kept]), np.array([k[1] for k in kept])
    if not higher_is_better:
        kept_opinions = -kept_opinions
    return {
        "dataset": dataset,
        "model": str(model_name),
        "num_images": len(image_paths),
        "num_failed": len(image_paths) - len(kept),
        "errors": [r.error for r in results if r.error][:20],
        **correlation_metrics(scores, kept_opinions),
    }


def read_mos_csv(
    csv_path: str | Path, image_dir: str | Path, image_column: str, mos_column: str
) -> tuple[list[Path], list[float]]:
    """Image paths (relative to `image_dir`) and opinion scores from a CSV with a header row."""
    import csv

    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        rows = list(csv.DictReader(file))
    if not rows or image_column not in rows[0] or mos_column not in rows[0]:
        found = list(rows[0]) if rows else []
        raise ValueError(f"{csv_path}: needs columns '{image_column}' and '{mos_column}', found {found}")
    return [Path(image_dir) / row[image_column] for row in rows], [float(row[mos_column]) for row in rows]


def read_mos_hub(
    dataset_id: str, split: str, image_column: str, mos_column: str, cache_dir: Path
) -> tuple[list[Path], list[float]]:
    """A Hub (or local) `datasets` dataset with an image column and an opinion column, written out as files."""
    import datasets

    data = datasets.load_dataset(dataset_id, split=split).cast_column(image_column, datasets.Image(decode=False))
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths, opinions = [], []
    for index, row in enumerate(data):
        image = row[image_column]
        if image.get("path") and Path(image["path"]).is_file():
            path = Path(image["path"])
        else:
            path = cache_dir / f"{index:06d}_{Path(image.get('path') or 'image').name}"
            path.write_bytes(image["bytes"])
        paths.append(path)
        opinions.append(float(row[mos_column]))
    return paths, opinions


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
    images = [limit_longest_side(read_image(path)[None].float() / 255, max_side)[0].clamp(0, 1) for path in paths]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    mos = commands.add_parser("mos", help="SRCC/PLCC/KRCC against mean opinion scores")
    mos.add_argument("--model", required=True)
    mos.add_argument("--dataset", choices=sorted(MOS_PRESETS), help="preset of column names")
    mos.add_argument("--csv", type=Path, help="local score file (with --images)")
    mos.add_argument("--images", type=Path, help="folder the CSV's image names are relative to")
    mos.add_argument("--hub-dataset", help="a `datasets` dataset id or local dataset folder")
    mos.add_argument("--split", default="test")
    mos.add_argument("--image-column")
    mos.add_argument("--mos-column")
    mos.add_argument("--lower-is-better", action="store_true", help="the opinion is a DMOS")
    mos.add_argument("--batch-size", type=int, default=4)
    mos.add_argument("--max-size", type=int)
    mos.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mos.add_argument("--output", type=Path)

    synthetic = commands.add_parser("synthetic", help="SRCC between degradation level and score")
    synthetic.add_argument("--model", required=True)
    synthetic.add_argument("--images", required=True, help="folder of held-out pristine images")
    synthetic.add_argument("--distortions", nargs="*", help="names (default: all 24)")
    synthetic.add_argument("--max-side", type=int, default=512)
    synthetic.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    synthetic.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.command == "mos":
        image_column, mos_column, higher_is_better = MOS_PRESETS.get(args.dataset, ("image", "mos", True))
        image_column, mos_column = args.image_column or image_column, args.mos_column or mos_column
        higher_is_better = higher_is_better and not args.lower_is_better
        if args.hub_dataset:
            cache = Path(args.output or "eval").with_suffix("") / "images"
            paths, opinions = read_mos_hub(args.hub_dataset, args.split, image_column, mos_column, cache)
        elif args.csv and args.images:
            paths, opinions = read_mos_csv(args.csv, args.images, image_column, mos_column)
        else:
            parser.error("mos needs --hub-dataset, or --csv with --images")
        name = args.dataset or args.hub_dataset or str(args.csv)
        results = mos_evaluation(
            args.model, paths, opinions, higher_is_better, args.device, args.batch_size, args.max_size, name
        )
    else:
        results = synthetic_level_srcc(args.model, args.images, args.distortions, args.max_side, args.device)
    text = json.dumps(results, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
