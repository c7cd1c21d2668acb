"""Evaluation of a QualiCLIP model, with and without opinion scores.

    python -m training.evaluate mos --model DIR --dataset koniq10k --csv scores.csv --images DIR --output r.json
    python -m training.evaluate mos --model DIR --hub-dataset ORG/NAME --split test --output r.json
    python -m training.evaluate synthetic --model DIR --images data/demo_pristine/heldout --output r.json

Run it from the repository's root, as a module.

`mos`: SRCC, KRCC, PLCC after the usual 4-parameter logistic mapping, and raw PLCC (scipy), between the scores
and the mean opinion scores of an IQA dataset given as a `datasets` dataset (Hub id) or a local CSV and folder.
Presets (`MOS_PRESETS`) know the columns of KonIQ-10k, CLIVE, FLIVE, SPAQ, KADID-10k and AGIQA-3K, both in each
dataset's own score file and in pyiqa's meta-info CSV; the first layout whose columns the file has is used. In all six
a higher opinion means better quality, KADID-10k's `dmos` included (see `MOS_PRESETS`).

`synthetic`: each held-out pristine image is degraded by each distortion at the 5 levels; per image, the Spearman
correlation between the level and the score is computed with the sign flipped, so that 1 means "the score falls
strictly as the level rises". The JSON holds, per distortion, the mean over images, and the overall mean.
`--degradation-style` (`arniqa`, the default, or `clean`) picks the distortions' implementation: judge a model on
the one it was trained with (its config's `degradation_style`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import curve_fit
from scipy.stats import kendalltau, pearsonr, spearmanr
from tqdm.auto import tqdm

from qualiclip_hf.image_processing_qualiclip import limit_longest_side
from qualiclip_hf.loading import DEVICES, load_model_and_processor, select_device
from qualiclip_hf.outputs import write_text_atomic
from qualiclip_hf.scoring import collect_image_paths, read_image, score_files
from training.degradations import ALL_DISTORTIONS, DEFAULT_STYLE, DEGRADATION_STYLES, apply_distortion, check_style


@dataclass(frozen=True)
class MosLayout:
    """The image-name column and the opinion column of one known score file, and where that file comes from."""

    image_column: str
    mos_column: str
    source: str


@dataclass(frozen=True)
class MosPreset:
    """How to read one IQA dataset's opinion scores.

    `layouts` are tried in order; the first whose two columns the file has is used. `exclude` lists image names that
    the usual protocol leaves out.
    """

    layouts: tuple[MosLayout, ...]
    higher_is_better: bool = True
    exclude: frozenset[str] = frozenset()


_PYIQA_META = "pyiqa's pyiqa/data/meta_info/meta_info_{}.csv"

# Checked against each dataset's published score file and pyiqa 0.1.16's meta-info CSVs and dataset settings
# (`default_dataset_configs.yml`); ARNIQA's dataset classes (miccunifi/ARNIQA, data/dataset_*.py) read the same columns.
MOS_PRESETS: dict[str, MosPreset] = {
    # KonIQ-10k's `koniq10k_scores_and_distributions.csv`: MOS on 1..5 (`MOS_zscore` is the same on 0..100).
    "koniq10k": MosPreset(
        (
            MosLayout("image_name", "MOS", "koniq10k_scores_and_distributions.csv (official)"),
            MosLayout("img_name", "mos", _PYIQA_META.format("KonIQ10kDataset")),
        )
    ),
    # LIVE In the Wild Challenge is released as MATLAB files (AllImages_release.mat, AllMOS_release.mat); pyiqa's CSV
    # is their tabular form. Its first 7 rows (t1.bmp .. t7.bmp, the `trainingImages`) are not part of the 1,162 test
    # images, and pyiqa's LIVEChallengeDataset drops them too.
    "clive": MosPreset(
        (MosLayout("img_name", "mos", _PYIQA_META.format("LIVEChallengeDataset")),),
        exclude=frozenset(f"t{index}.bmp" for index in range(1, 8)),
    ),
    # FLIVE (PaQ-2-PiQ): `labels_image.csv` of the database (baidut/PaQ-2-PiQ, database/labels_image.csv); names are
    # relative to the `database` folder (e.g. `voc_emotic_ava/AVA__12958.jpg`).
    "flive": MosPreset((MosLayout("name", "mos", "labels_image.csv (official)"),)),
    # SPAQ: `Annotations/MOS and Image attribute scores.xlsx` (export it as CSV); pyiqa's CSV keeps the same header.
    "spaq": MosPreset(
        (MosLayout("Image name", "MOS", "MOS and Image attribute scores.xlsx, saved as CSV (official)"),)
    ),
    # KADID-10k's `dmos` is a degradation category rating on 1..5 where 5 means an imperceptible degradation: higher
    # is better despite the name (level 1 of a distortion rates higher than level 5; pyiqa: `lower_better: false`).
    "kadid10k": MosPreset(
        (
            MosLayout("dist_img", "dmos", "dmos.csv (official)"),
            MosLayout("dist_name", "dmos", _PYIQA_META.format("KADID10kDataset")),
        )
    ),
    # AGIQA-3K's `data.csv` (lcysyzxdxc/AGIQA-3k-Database): perceptual quality `mos_quality` (`mos_align` is the
    # text alignment, not quality).
    "agiqa3k": MosPreset((MosLayout("name", "mos_quality", "data.csv (official)"),)),
}
_GENERIC = MosPreset((MosLayout("image", "mos", "generic"),))


def resolve_columns(
    preset: MosPreset, columns: list[str], image_column: str | None = None, mos_column: str | None = None, where=""
) -> tuple[str, str]:
    """
    The (image, opinion) columns to read: the first layout of `preset`, with the explicit columns put in its place,
    whose two columns are both among `columns`.

    Args:
        preset ([`MosPreset`]): The dataset's known layouts.
        columns (`list[str]`): The columns the file or dataset has.
        image_column (`str`, *optional*): The image column, instead of the layouts'.
        mos_column (`str`, *optional*): The opinion column, instead of the layouts'.
        where (`str`): The file or dataset, for the error message.

    Returns:
        `tuple[str, str]`: the image column and the opinion column.

    Raises:
        ValueError: naming `where`, the columns expected and those found, when no layout matches.
    """
    candidates = [(image_column or lay.image_column, mos_column or lay.mos_column) for lay in preset.layouts]
    for candidate in candidates:
        if candidate[0] in columns and candidate[1] in columns:
            return candidate
    pairs = zip(candidates, preset.layouts, strict=True)
    expected = " or ".join(f"'{image}' and '{mos}' ({layout.source})" for (image, mos), layout in pairs)
    raise ValueError(f"{where}: needs columns {expected}; found {columns}")


def logistic_4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """
    The monotonic 4-parameter logistic of VQEG's recommendation (VQEG, *Final report on the validation of objective
    models of video quality assessment*, 2000), mapping objective scores to the opinion scale:
    `(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2`.

    Args:
        x (`np.ndarray`): Objective scores.
        b1, b2, b3, b4 (`float`): The upper and lower asymptotes, the centre and the slope's scale.

    Returns:
        `np.ndarray` of the shape of `x`: the mapped scores, between `b2` and `b1`.
    """
    return (b1 - b2) / (1 + np.exp(-(x - b3) / (np.abs(b4) + 1e-12))) + b2


def correlation_metrics(scores: np.ndarray, opinions: np.ndarray) -> dict[str, float]:
    """
    The correlations of IQA between scores and opinions (`scipy.stats`).

    Args:
        scores (`np.ndarray` of shape `(num_images,)`): The model's scores.
        opinions (`np.ndarray` of shape `(num_images,)`): The opinion scores, higher is better.

    Returns:
        `dict[str, float]`: `srcc`, `krcc`, `plcc` (after fitting `logistic_4` from the scores to the opinions; the
        raw PLCC when the fit does not converge) and `plcc_raw`, each in [-1, 1].

    Raises:
        ValueError: for fewer than 3 images.
    """
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
    csv_path: str | Path,
    image_dir: str | Path,
    preset: MosPreset = _GENERIC,
    image_column: str | None = None,
    mos_column: str | None = None,
) -> tuple[list[Path], list[float]]:
    """
    Image paths and opinion scores from a CSV with a header row; the preset's excluded images are left out.

    Args:
        csv_path (`str` or `Path`): The score file.
        image_dir (`str` or `Path`): The folder the image names are relative to.
        preset ([`MosPreset`], *optional*): The dataset's layouts; by default the columns `image` and `mos`.
        image_column (`str`, *optional*): The image column, instead of the preset's.
        mos_column (`str`, *optional*): The opinion column, instead of the preset's.

    Returns:
        `tuple[list[Path], list[float]]`: the image paths and their opinion scores, in the file's order.

    Raises:
        ValueError: naming the file (and row) when the columns are missing or an opinion is not a number.
    """
    import csv

    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        image_key, mos_key = resolve_columns(preset, list(reader.fieldnames or []), image_column, mos_column, csv_path)
        rows = [row for row in reader if row[image_key] not in preset.exclude]
    paths, opinions = [], []
    for line, row in enumerate(rows, start=2):
        try:
            opinions.append(float(row[mos_key]))
        except (TypeError, ValueError):
            raise ValueError(f"{csv_path}, row {line}: '{mos_key}' is not a number: {row[mos_key]!r}") from None
        paths.append(Path(image_dir) / row[image_key])
    return paths, opinions


def read_mos_hub(
    dataset_id: str,
    split: str,
    cache_dir: Path,
    preset: MosPreset = _GENERIC,
    image_column: str | None = None,
    mos_column: str | None = None,
) -> tuple[list[Path], list[float]]:
    """
    A Hub (or local) `datasets` dataset with an image column and an opinion column, its images written out as files
    (or used in place when the dataset points to local files).

    Args:
        dataset_id (`str`): A Hub dataset id or a local dataset path.
        split (`str`): The split to read.
        cache_dir (`Path`): Where to write the images.
        preset ([`MosPreset`], *optional*): The dataset's layouts; by default the columns `image` and `mos`.
        image_column (`str`, *optional*): The image column, instead of the preset's.
        mos_column (`str`, *optional*): The opinion column, instead of the preset's.

    Returns:
        `tuple[list[Path], list[float]]`: the image paths and their opinion scores.

    Raises:
        ValueError: naming the dataset, when its columns do not match.
    """
    import datasets

    data = datasets.load_dataset(dataset_id, split=split)
    image_key, mos_key = resolve_columns(preset, data.column_names, image_column, mos_column, dataset_id)
    data = data.cast_column(image_key, datasets.Image(decode=False))
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths, opinions = [], []
    for index, row in enumerate(data):
        image = row[image_key]
        name = Path(image.get("path") or "image").name
        if name in preset.exclude:
            continue
        if image.get("path") and Path(image["path"]).is_file():
            path = Path(image["path"])
        else:
            path = cache_dir / f"{index:06d}_{name}"
            path.write_bytes(image["bytes"])
        paths.append(path)
        opinions.append(float(row[mos_key]))
    return paths, opinions


@torch.inference_mode()
def synthetic_level_srcc(
    model_name: str,
    image_dir: str | Path,
    distortions: list[str] | None = None,
    max_side: int = 512,
    device: str = "cpu",
    seed: int = 0,
    degradation_style: str = DEFAULT_STYLE,
) -> dict:
    """Returns `{"per_distortion": {name: mean SRCC}, "overall": mean, "num_images": n, ...}`.

    `degradation_style` (`"arniqa"` or `"clean"`) should be the one the model was trained with, so that it is judged
    on the distribution it learned; it is recorded in the result.
    """
    check_style(degradation_style)
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
                apply_distortion(
                    image[None], name, level, torch.Generator().manual_seed(seed + index), degradation_style
                )[0]
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
        "degradation_style": degradation_style,
        "metric": "mean over images of SRCC(-level, score), levels 1..5",
        "per_distortion": per_distortion,
        "overall": float(np.mean(list(per_distortion.values()))),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    mos = commands.add_parser("mos", help="SRCC/PLCC/KRCC against mean opinion scores")
    mos.add_argument("--model", required=True)
    mos.add_argument("--dataset", choices=sorted(MOS_PRESETS), help="dataset preset: known column names")
    mos.add_argument("--csv", type=Path, help="local score file (with --images)")
    mos.add_argument("--images", type=Path, help="folder the CSV's image names are relative to")
    mos.add_argument("--hub-dataset", help="a `datasets` dataset id or local dataset folder")
    mos.add_argument("--split", default="test")
    mos.add_argument("--image-column")
    mos.add_argument("--mos-column")
    mos.add_argument("--lower-is-better", action="store_true", help="a lower opinion means better quality")
    mos.add_argument("--batch-size", type=int, default=4)
    mos.add_argument("--max-size", type=int)
    mos.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA, else MPS, else the CPU")
    mos.add_argument("--output", type=Path)

    synthetic = commands.add_parser("synthetic", help="SRCC between degradation level and score")
    synthetic.add_argument("--model", required=True)
    synthetic.add_argument("--images", required=True, help="folder of held-out pristine images")
    synthetic.add_argument("--distortions", nargs="*", help="names (default: all 24)")
    synthetic.add_argument("--max-side", type=int, default=512)
    synthetic.add_argument(
        "--degradation-style",
        choices=DEGRADATION_STYLES,
        default=DEFAULT_STYLE,
        help="the distortions' implementation; use the one the model was trained with (its degradation_style)",
    )
    synthetic.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA, else MPS, else the CPU")
    synthetic.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.device = select_device(args.device)
    if args.command == "mos":
        preset = MOS_PRESETS[args.dataset] if args.dataset else _GENERIC
        higher_is_better = preset.higher_is_better and not args.lower_is_better
        if args.hub_dataset:
            cache = Path(args.output or "eval").with_suffix("") / "images"
            paths, opinions = read_mos_hub(
                args.hub_dataset, args.split, cache, preset, args.image_column, args.mos_column
            )
        elif args.csv and args.images:
            paths, opinions = read_mos_csv(args.csv, args.images, preset, args.image_column, args.mos_column)
        else:
            parser.error("mos needs --hub-dataset, or --csv with --images")
        name = args.dataset or args.hub_dataset or str(args.csv)
        results = mos_evaluation(
            args.model, paths, opinions, higher_is_better, args.device, args.batch_size, args.max_size, name
        )
    else:
        results = synthetic_level_srcc(
            args.model, args.images, args.distortions, args.max_side, args.device,
            degradation_style=args.degradation_style,
        )  # fmt: skip
    text = json.dumps(results, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.output, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
