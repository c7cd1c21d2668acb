"""
The Hub README (model card) of a QualiCLIP folder: YAML metadata and text from `model_card_template.md`.

Every number that describes how well the model does comes from a result file of `training/`: the JSON of
`training/evaluate.py mos` (SRCC/PLCC/KRCC against opinion scores, one dataset per file), of
`training/evaluate.py synthetic` (SRCC against the degradation level), or the `training_summary.json` that
`training/train.py` writes. The card says what the weights are (`official`, `trained`, `demo`, `random`), and
results measured on demo or random weights carry that label, in the text and in the `model-index` metric names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..outputs import write_text_atomic

TEMPLATE_PATH = Path(__file__).parent / "model_card_template.md"
# Stands for the repository in the usage examples of a card made without one; `qualiclip push` fills it in.
REPO_PLACEHOLDER = "ORG/NAME"

WEIGHT_KINDS = ("official", "trained", "demo", "random")
# The authors' weights come with their repository's licence; weights made with this project, with the project's.
DEFAULT_LICENSES = {"official": "cc-by-nc-4.0", "trained": "apache-2.0", "demo": "apache-2.0", "random": "apache-2.0"}
# OpenAI CLIP RN50 on the Hub, the model QualiCLIP fine-tunes.
CLIP_RN50_HUB_ID = "timm/resnet50_clip.openai"
TAGS = ("image-quality-assessment", "no-reference-iqa", "opinion-unaware", "clip", "qualiclip")
# The Hub has no image-quality task; the pipeline returns the image-classification schema, so the Hub's
# image-classification tooling (widgets, Inference Endpoints' default handler) reads its output.
PIPELINE_TAG = "image-classification"
TASK_TYPE, TASK_NAME = "image-quality-assessment", "No-reference image quality assessment"
# Pretty names of the datasets `training/evaluate.py mos` has presets for.
DATASET_NAMES = {
    "koniq10k": "KonIQ-10k",
    "clive": "LIVE In the Wild Challenge (CLIVE)",
    "flive": "FLIVE (PaQ-2-PiQ)",
    "spaq": "SPAQ",
    "kadid10k": "KADID-10k",
    "agiqa3k": "AGIQA-3K",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelCardError(ValueError):
    """A result file or an option the card cannot be made from; the message names the file or option."""


@dataclass
class Results:
    """The result files of a model, by kind; each entry is `(file name, record)`."""

    mos: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    synthetic: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    training: tuple[str, dict[str, Any]] | None = None


def read_results(paths: Iterable[str | Path]) -> Results:
    """
    Reads result JSON files and sorts them by their content: a `mos` evaluation (`srcc`, `plcc`; a list of such
    records is also accepted), a `synthetic` evaluation (`per_distortion`, `overall`), or a training summary
    (`steps`, `config`).

    Raises:
        ModelCardError: naming the file, if it cannot be read or is none of these.
    """
    results = Results()
    for path in map(Path, paths):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelCardError(f"{path}: cannot read a JSON result file: {error}") from None
        records = content if isinstance(content, list) else [content]
        for record in records:
            if not isinstance(record, dict):
                raise ModelCardError(f"{path}: expected a JSON object, got {type(record).__name__}")
            if {"srcc", "plcc"} <= record.keys():
                _check_correlations(path, {key: record.get(key) for key in ("srcc", "plcc", "krcc", "plcc_raw")})
                results.mos.append((path.name, record))
            elif {"per_distortion", "overall"} <= record.keys():
                _check_correlations(path, {"overall": record["overall"], **record["per_distortion"]})
                results.synthetic.append((path.name, record))
            elif {"steps", "config"} <= record.keys():
                if results.training is not None:
                    raise ModelCardError(f"{path}: a second training summary (the first is {results.training[0]})")
                results.training = (path.name, record)
            else:
                raise ModelCardError(
                    f"{path}: not a result file of training/ (expected the keys srcc and plcc of `evaluate.py mos`, "
                    f"per_distortion and overall of `evaluate.py synthetic`, or steps and config of a training "
                    f"summary); found {sorted(record)}"
                )
    return results


def _check_correlations(path: Path, values: dict[str, Any]) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value) or abs(value) > 1 + 1e-9:
            raise ModelCardError(f"{path}: {name} must be a correlation in [-1, 1], got {value!r}")


def infer_weights_kind(model_dir: str | Path) -> str | None:
    """`demo` for the embedded demo model, `trained` for a folder `training/train.py` wrote; otherwise unknown."""
    from ..loading import DEMO_MODEL_PATH

    model_dir = Path(model_dir)
    if model_dir.resolve() == DEMO_MODEL_PATH.resolve():
        return "demo"
    if (model_dir / "training_summary.json").is_file():
        return "trained"
    return None


def make_model_card(
    model_dir: str | Path,
    weights: str | None = None,
    results: Results | Sequence[str | Path] = (),
    repo_id: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
) -> ModelCard:
    """
    Builds the model card of a saved QualiCLIP folder.

    Args:
        model_dir: The folder (its `config.json` and safetensors weights are read; nothing is loaded into torch).
        weights: What the weights are: `official` (the authors' release, converted), `trained` (trained with
            `training/`), `demo` (the embedded demo model) or `random`. Inferred for the demo folder and for
            folders with a `training_summary.json`; required otherwise, because the card must say it.
        results: Result files (paths) or already read `Results`.
        repo_id: The Hub repository, used in the usage examples and as the model-index name.
        license: A Hub licence id; by default `cc-by-nc-4.0` for official weights, `apache-2.0` otherwise.
        base_model: A Hub id; by default CLIP RN50 for official weights, none otherwise.
        datasets: Hub ids of the training data; by default the training summary's `data_source` when it is one.

    Raises:
        ModelCardError: for an unknown weight kind, unreadable results or a folder without `config.json`.
    """
    model_dir = Path(model_dir)
    weights = weights or infer_weights_kind(model_dir)
    if weights not in WEIGHT_KINDS:
        raise ModelCardError(
            f"{model_dir}: say what these weights are, one of {', '.join(WEIGHT_KINDS)} (`--weights` of "
            "`qualiclip push`), because the card states it"
            if weights is None
            else f"unknown weight kind {weights!r}; expected one of {', '.join(WEIGHT_KINDS)}"
        )
    if not isinstance(results, Results):
        results = read_results(results)
    if results.training is None and (model_dir / "training_summary.json").is_file():
        results.training = ("training_summary.json", json.loads((model_dir / "training_summary.json").read_text()))
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelCardError(f"{model_dir}: cannot read config.json: {error}") from None

    is_plus = config.get("prompt_context_length") is not None
    label = {"demo": "demo weights", "random": "random weights"}.get(weights)
    name = repo_id or _title(weights, is_plus)
    training_config = results.training[1].get("config", {}) if results.training else {}
    if datasets is None:
        source = str(training_config.get("data_source") or "")
        datasets = [source] if _HUB_ID.fullmatch(source) and not Path(source).exists() else []
    fine_tuning = config.get("fine_tuning")  # written by training/finetune.py
    tags = [tag for tag in TAGS if not ((is_plus or fine_tuning) and tag == "opinion-unaware")]
    tags += {"demo": ["demo"], "random": ["random-weights"]}.get(weights, [])
    eval_results = _eval_results(results, label)
    card_data = ModelCardData(
        license=license or DEFAULT_LICENSES[weights],
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        base_model=base_model or (CLIP_RN50_HUB_ID if weights == "official" else None),
        datasets=list(datasets) or None,
        # model-index: one entry, named after the repository, with SRCC and PLCC per dataset
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=_title(weights, is_plus),
        repo_id=repo_id or REPO_PLACEHOLDER,
        weights_statement=_weights_statement(weights, config, results),
        architecture_table=_architecture_table(model_dir, config),
        evaluation_section=_evaluation_section(results, label),
        training_section=_training_section(results),
        limitations=_limitations(weights, is_plus, fine_tuning),
    )


def write_model_card(model_dir: str | Path, output: str | Path | None = None, **options: Any) -> Path:
    """Writes `make_model_card(model_dir, **options)` to `output` (default: `model_dir/README.md`), atomically."""
    output = Path(output) if output is not None else Path(model_dir) / "README.md"
    card = make_model_card(model_dir, **options)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, str(card))  # what `ModelCard.save` writes, never half of it
    return output


def _title(weights: str, is_plus: bool) -> str:
    model = "QualiCLIP+" if is_plus else "QualiCLIP"
    return {
        "official": model,
        "trained": f"{model}, trained with qualiclip-hf",
        "demo": "QualiCLIP demo model (not QualiCLIP)",
        "random": f"{model} architecture with random weights (for tests)",
    }[weights]


def _weights_statement(weights: str, config: dict[str, Any], results: Results) -> str:
    if weights == "official":
        digest = config.get("source_checkpoint_sha256")
        provenance = f" The SHA-256 of the converted file is `{digest}`." if digest else ""
        plus = (
            " The prompts are QualiCLIP+'s learned prompt contexts, converted from pyiqa's QualiCLIP+ weights."
            if config.get("prompt_context_length") is not None
            else ""
        )
        return (
            "These are the weights the QualiCLIP authors released (`qualiclip.pth`, "
            "[github.com/miccunifi/QualiCLIP](https://github.com/miccunifi/QualiCLIP)), converted to the "
            f"`transformers` format by qualiclip-hf.{provenance}{plus}"
        )
    if weights == "trained":
        return (
            "These weights were trained with qualiclip-hf's implementation of the QualiCLIP recipe (`training/` of "
            "that project). They are not the weights the QualiCLIP authors released. The results below were "
            "measured on these weights."
        )
    if weights == "demo":
        measured = "Every result on this card was measured on these demo weights"
        if results.synthetic and not results.mos:
            measured += ", on synthetic degradations, not against human opinion scores"
        return (
            "**This is not QualiCLIP.** QualiCLIP fine-tunes OpenAI's CLIP ResNet-50, and CLIP's pretraining gives "
            "it its judgement of real photos. This demo model has QualiCLIP's architecture at a much smaller size "
            "and was trained from scratch, without that pretraining, with qualiclip-hf's training recipe on a few "
            "freely licensed photos (scikit-image's data and Debian wallpaper packages). Its text tower is random "
            "and frozen, so its prompt embeddings are fixed random directions. It exists so that the tools can be "
            f"tried offline. {measured}. Do not use it to judge photo quality."
        )
    return (
        "**Random weights.** This folder was made to test qualiclip-hf. Any number on this card was measured on "
        "random weights and says nothing about image quality."
    )


def _architecture_table(model_dir: Path, config: dict[str, Any]) -> str:
    from ..configuration_qualiclip import QualiCLIPConfig

    # Through the config class, which also reads the names of folders saved before the standard names.
    parsed = QualiCLIPConfig.from_dict(config)
    vision, text = parsed.vision_config, parsed.text_config
    counts = _parameter_counts(model_dir)
    pairs = config.get("prompt_pairs") or []
    prompts = "; ".join(f'"{positive}" / "{negative}"' for positive, negative in pairs)
    learned = (
        f", each with {config['prompt_context_length']} learned context tokens (QualiCLIP+)"
        if config.get("prompt_context_length") is not None
        else ""
    )
    rows = [
        (
            "image tower",
            f"CLIP ModifiedResNet: blocks per stage {tuple(vision.depths)}, width {vision.embedding_size}, "
            f"{vision.projection_dim}-d embedding" + _count(counts.get("vision_model")),
        ),
        (
            "text tower (frozen)",
            f"CLIP text transformer: layers {text.num_hidden_layers}, width {text.hidden_size}"
            + _count(counts.get("text_model"))
            + "; only needed to recompute the prompt embeddings, which are stored with the weights",
        ),
        ("prompts", f"{len(pairs)} antonym pairs (positive / negative){learned}: {prompts}"),
        ("logit scale", f"{config.get('logit_scale')}"),
    ]
    return "| part | |\n| --- | --- |\n" + "\n".join(f"| {part} | {text} |" for part, text in rows)


def _count(number: int | None) -> str:
    return "" if not number else f", {number} parameters"


def _parameter_counts(model_dir: Path) -> dict[str, int]:
    """Parameters per top-level module, read from the safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            for key in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith(("running_mean", "running_var", "num_batches_tracked")) or key == "prompt_embeds":
                    continue  # statistics and buffers, not parameters
                counts[key.split(".")[0]] = counts.get(key.split(".")[0], 0) + math.prod(
                    file.get_slice(key).get_shape()
                )
    return counts


def _eval_results(results: Results, label: str | None) -> list[EvalResult]:
    suffix = f" ({label})" if label else ""
    entries = []
    for _, record in results.mos:
        dataset_type, dataset_name = _dataset_names(str(record.get("dataset") or "unnamed"))
        for metric, key, value_name in (("spearmanr", "srcc", "SRCC"), ("pearsonr", "plcc", "PLCC")):
            entries.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    metric_type=metric,
                    metric_name=value_name + suffix,
                    metric_value=round(float(record[key]), 4),
                )
            )
    return entries


def _dataset_names(dataset: str) -> tuple[str, str]:
    """`(type, pretty name)` for model-index: a preset name, a Hub dataset id, or the stem of a CSV path."""
    if dataset in DATASET_NAMES:
        return dataset, DATASET_NAMES[dataset]
    if _HUB_ID.fullmatch(dataset) and not dataset.endswith(".csv"):
        return dataset, dataset
    stem = Path(dataset).stem
    return stem, stem


def _evaluation_section(results: Results, label: str | None) -> str:
    if not results.mos and not results.synthetic:
        return "No evaluation results were supplied with these weights, so this card quotes none."
    measured_on = f"Measured on the {label}. " if label else ""
    parts = []
    if results.mos:
        rows = []
        for source, record in results.mos:
            _, dataset_name = _dataset_names(str(record.get("dataset") or "unnamed"))
            cells = [dataset_name, *(str(record.get(key, "")) for key in ("num_images", "num_failed"))]
            cells += [_correlation(record.get(key)) for key in ("srcc", "plcc", "krcc", "plcc_raw")]
            rows.append("| " + " | ".join([*cells, f"`{source}`"]) + " |")
        parts.append(
            f"{measured_on}Correlation between the score and the mean opinion scores of each dataset "
            "(`training/evaluate.py mos`): SRCC and KRCC, PLCC after the monotonic logistic mapping of VQEG's "
            "recommendation, and raw PLCC without it. Images that failed to load are left out.\n\n"
            "| dataset | images | failed | SRCC | PLCC | KRCC | PLCC (raw) | file |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows)
        )
    for source, record in results.synthetic:
        rows = [
            f"| {name.replace('_', ' ')} | {_correlation(value)} |" for name, value in record["per_distortion"].items()
        ]
        rows.append(f"| **all** | **{_correlation(record['overall'])}** |")
        images = f", on {record['num_images']} held-out pristine images" if "num_images" in record else ""
        parts.append(
            f"{measured_on}Synthetic degradations (`training/evaluate.py synthetic`, `{source}`): each image is "
            "degraded by each of ARNIQA's distortions at each of its levels, and the score should fall as the level "
            f"rises. The table gives, per distortion, the {record.get('metric', 'mean SRCC')}{images}: 1 means the "
            "score falls with every level. This needs no opinion scores and says nothing about agreement with "
            "people.\n\n"
            "| distortion | mean SRCC |\n| --- | --- |\n" + "\n".join(rows)
        )
    return "\n\n".join(parts)


def _correlation(value: Any) -> str:
    return "" if value is None else f"{float(value):.3f}"


def _training_section(results: Results) -> str:
    if results.training is None:
        return ""
    source, summary = results.training
    config = summary.get("config", {})
    init = config.get("init_from")
    rows = [
        ("steps", summary.get("steps")),
        # Older summaries lack it; their `max_steps` may have been rewritten by the time limit, so it is not used.
        ("steps planned", summary.get("planned_steps")),
        ("stopped by the time limit", "yes" if summary.get("stopped_by_time_limit") else None),
        ("images per step", config.get("batch_size")),
        ("gradient accumulation steps", config.get("gradient_accumulation_steps")),
        ("crop size (pixels)", config.get("crop_size")),
        ("degradation levels", config.get("num_levels")),
        ("distortion groups per composition, at most", config.get("max_groups")),
        ("learning rate", config.get("learning_rate")),
        ("weight decay", config.get("weight_decay")),
        ("learning-rate schedule", config.get("lr_scheduler_type")),
        ("warm-up steps", config.get("warmup_steps")),
        ("mixed precision", config.get("mixed_precision")),
        ("seed", config.get("seed")),
        ("wall-clock seconds", summary.get("seconds")),
        ("unreadable images skipped", summary.get("skipped_images")),
        ("initial weights", f"`{init}`" if init else "random (trained from scratch)"),
    ]
    for name, value in (config.get("loss") or {}).items():
        rows.append((f"loss: {name.replace('_', ' ')}", value))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value is not None)
    return (
        f"From `{source}`, written by `training/train.py`: only the image tower trains; the text tower is frozen "
        "and the prompt embeddings are fixed.\n\n| setting | value |\n| --- | --- |\n" + table
    )


def _limitations(weights: str, is_plus: bool, fine_tuning: dict[str, Any] | None = None) -> str:
    items = []
    if weights == "demo":
        items.append(
            "**Not a judge of photo quality.** The demo model learned to rank synthetic degradations of one image. "
            "It knows nothing about authentic distortions, content or aesthetics."
        )
    if weights == "random":
        items.append("**Random weights.** The scores mean nothing.")
    if fine_tuning:
        items.append(
            f"**Opinion-aware.** Fine-tuned (`{fine_tuning.get('method')}`) on the opinion scores of "
            f"`{fine_tuning.get('dataset')}`: only its held-out test images are a fair test, and the score predicts "
            "that dataset's opinion scale, rescaled to [0, 1]."
        )
    elif is_plus:
        items.append(
            "**Opinion-aware prompts.** QualiCLIP+'s prompt contexts were fitted to the opinion scores of an IQA "
            "dataset, so this variant is not opinion-unaware, and results on that dataset are not a fair test."
        )
    else:
        items.append(
            "**Opinion-unaware.** QualiCLIP learns from synthetic degradations, without human opinion scores. Its "
            "score is not calibrated to any dataset's opinion scale: use it to rank images, or fit a mapping."
        )
    items += [
        "**Technical quality.** It judges degradations such as blur, noise and compression artefacts, not "
        "aesthetics or composition.",
        "**Resolution.** The image is judged at its full resolution, and the same photo at another size can get "
        "another score. Large photos take time and memory: `max_size` caps the longest side. Images must be at "
        "least 32×32 pixels.",
    ]
    if weights == "official":
        items.append(
            "**Licence.** The authors released their weights under CC BY-NC 4.0: no commercial use. Check the "
            "licence of the official repository before you use them."
        )
    return "\n".join(f"- {item}" for item in items)
