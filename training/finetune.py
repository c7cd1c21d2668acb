r"""Fine-tune QualiCLIP on your own opinion scores: images and mean opinion scores in, a model folder out.

    accelerate launch -m training.finetune --dataset ORG/NAME --image-column image --score-column mos \
        --method ridge --output runs/mine [--model official] [--num-splits 10] [--resume]
    python -m training.finetune --dataset DIR --method prompts --output runs/mine --epochs 50

Run it from the repository's root, as a module. `--dataset` is a Hub dataset id, a folder (an `imagefolder` with a
`metadata.csv`, or a `save_to_disk` folder) or a parquet file; `--streaming` reads a Hub dataset as a stream, once.

Methods (`--method`):

- `ridge`: ridge regression on the frozen image embeddings of the whole images (ARNIQA's protocol), in closed form;
  the penalty is chosen on the validation split. Stored as a linear head (`config.quality_head = "linear"`).
- `prompts`: QualiCLIP+ prompt learning (CoOp): `prompt_context_length` learned context vectors per prompt, the
  whole CLIP frozen, MSE + PLCC loss, Adam with a cosine schedule, random square crops and flips, the epoch of the
  best validation SRCC kept. The learned prompts are baked into the stored prompt embeddings.
- `full`: as `prompts`, with the image tower trained too, at `vision_learning_rate`.

Evaluation is the IQA literature's: `num_splits` random 70/10/20 splits of the images (seeded), each fitted on its
70 %, selected on its 10 % and tested on its 20 %; the median and the mean ± std over splits of SRCC, PLCC (after
the 4-parameter logistic fit of `training.evaluate.correlation_metrics`) and KRCC, for the zero-shot model (the
baseline row) and the fine-tuned one. The folder `--output` holds the model of the first split, loadable as it is
by `AutoModel`, `qualiclip score`, the pipeline and the pyiqa plugin, its card (`README.md`) and
`finetune_results.json`; the run's state (embeddings, checkpoints, finished splits) is under
`--output/finetune_state`, so `--resume` continues where a killed run stopped, with the same results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from safetensors.torch import load_file, save_file
from scipy.optimize import OptimizeWarning
from scipy.stats import spearmanr
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler

from qualiclip_hf import QualiCLIPModel, QualiCLIPProcessor
from qualiclip_hf.image_reader import open_image
from qualiclip_hf.loading import resolve_model
from training.evaluate import correlation_metrics
from training.train import latest_checkpoint, save_checkpoint

METHODS = ("ridge", "prompts", "full")
# Penalties tried by `ridge`, on L2-normalised embeddings and targets in [0, 1]: the one of the best validation SRCC
# is kept (ties: the larger, smoother one).
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
STATE_DIR = "finetune_state"
RESULTS_FILE = "finetune_results.json"


def _option(help: str, **kwargs: Any) -> Any:
    return field(metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of a fine-tuning run; each is a command-line option of `python -m training.finetune`."""

    dataset: str = _option("a Hub dataset id, a folder (imagefolder with metadata.csv, or save_to_disk) or a file")
    output: str = _option("the model folder to write (its run state goes to OUTPUT/finetune_state)")
    method: Literal["ridge", "prompts", "full"] = _option("ridge, prompts or full (see the module's help)")
    model: str = _option("the zero-shot model to start from: official, demo, a folder or a Hub id", default="official")
    split: str = _option("the split of the dataset to read", default="train")
    image_column: str = _option("the column of the images", default="image")
    score_column: str = _option("the column of the mean opinion scores", default="mos")
    streaming: bool = _option("stream a Hub dataset (read once, kept in memory), not download it", default=False)
    lower_better: bool = _option("a lower opinion score means better quality (e.g. a DMOS)", default=False)
    mos_min: float | None = _option("the lowest possible opinion score; default: the data's lowest", default=None)
    mos_max: float | None = _option("the highest possible opinion score; default: the data's highest", default=None)
    # Evaluation
    num_splits: int = _option("random 70/10/20 train/validation/test splits to fit and test on", default=10)
    seed: int = _option("seed of the splits, the initialisation, the data order and the crops", default=0)
    max_size: int | None = _option("longest side of the whole images scored for ridge and evaluation", default=None)
    batch_size: int = _option("images per step (training) or per forward (embedding)", default=8)
    # Prompt learning (prompts, full); pyiqa's QualiCLIP+ settings by default
    prompt_context_length: int = _option("learned context vectors per prompt", default=16)
    epochs: int = _option("epochs over the training split", default=50)
    learning_rate: float = _option("Adam learning rate of the prompt contexts", default=2e-3)
    vision_learning_rate: float = _option("Adam learning rate of the image tower (full only)", default=1e-5)
    lr_scheduler_type: str = _option("a schedule of transformers.get_scheduler", default="cosine")
    warmup_steps: int = _option("steps of linear warm-up", default=0)
    crop_size: int = _option("side of the random square training crops (at most an image's shorter side)", default=384)
    logit_scale: float | None = _option(
        "logit scale at which the prompts are learned, written to the model's config; default: the base model's",
        default=None,
    )
    plcc_loss_weight: float = _option("weight of the (1 - PLCC) term added to the MSE loss", default=1.0)
    mixed_precision: str = _option("Accelerate's mixed precision: no, fp16 or bf16", default="no")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.num_splits < 1 or self.epochs < 1 or self.batch_size < 1 or self.crop_size < 32:
            raise ValueError("num_splits, epochs and batch_size must be positive, crop_size at least 32")
        if self.mos_min is not None and self.mos_max is not None and not self.mos_min < self.mos_max:
            raise ValueError(f"mos_min ({self.mos_min}) must be below mos_max ({self.mos_max})")


@dataclass(frozen=True)
class RunOptions:
    resume: bool = _option("continue the run in OUTPUT/finetune_state where it stopped", default=False)


# ----------------------------------------------------------------------------------------------------- the data


def load_opinion_dataset(config: FinetuneConfig) -> tuple[Any, np.ndarray]:
    """
    The labelled images: a `datasets.Dataset` with an undecoded `image` column, and their opinion scores
    `(num_images,)`, in the dataset's order.

    Raises:
        ValueError: naming the dataset when a column is missing, and the row when an opinion score is not a finite
            number.
    """
    import datasets

    source = Path(config.dataset)
    if source.is_dir() and ((source / "dataset_info.json").is_file() or (source / "state.json").is_file()):
        data = datasets.load_from_disk(str(source))
        if isinstance(data, datasets.DatasetDict):
            data = data[config.split]
    else:
        if source.is_dir():
            arguments = {"path": "imagefolder", "data_dir": str(source), "split": "train"}
        elif source.is_file():
            builder = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(source.suffix)
            if builder is None:
                raise ValueError(f"{source}: expected a parquet, CSV or JSON file, or a folder")
            arguments = {"path": builder, "data_files": str(source), "split": "train"}
        else:
            arguments = {"path": config.dataset, "split": config.split}
        data = datasets.load_dataset(**arguments, streaming=config.streaming)
    if isinstance(data, datasets.IterableDataset):
        # Splits need random access: the stream is read once, its images kept undecoded, in memory.
        _check_columns(config, data.column_names or list(data.features or {}))
        data = data.select_columns([config.image_column, config.score_column])
        data = data.cast_column(config.image_column, datasets.Image(decode=False))
        data = datasets.Dataset.from_list(list(tqdm(data, desc="reading the stream")), features=data.features)
    _check_columns(config, data.column_names)
    data = data.select_columns([config.image_column, config.score_column])
    data = data.cast_column(config.image_column, datasets.Image(decode=False))
    data = data.rename_columns({config.image_column: "image", config.score_column: "mos"})
    mos = np.empty(len(data))
    for row, value in enumerate(data["mos"]):  # a CSV column with one bad cell arrives as strings
        try:
            mos[row] = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            mos[row] = math.nan
        if not math.isfinite(mos[row]):
            raise ValueError(
                f"{config.dataset}, row {row}: '{config.score_column}' is empty or not a number ({value!r})"
            )
    if len(data) < 10:
        raise ValueError(f"{config.dataset}: {len(data)} images; a 70/10/20 split needs at least 10")
    return data.remove_columns("mos"), mos


def _check_columns(config: FinetuneConfig, columns: Sequence[str]) -> None:
    missing = [name for name in (config.image_column, config.score_column) if name not in columns]
    if missing:
        raise ValueError(
            f"{config.dataset}: no column {', '.join(map(repr, missing))} (found {list(columns)}); name them with "
            "--image-column and --score-column"
        )


def decode_row_image(image: dict[str, Any]) -> torch.Tensor:
    """An undecoded `datasets.Image` value as a `(3, height, width)` uint8 tensor, through `qualiclip_hf`'s reader."""
    source = image.get("bytes") or image.get("path")
    rgb = open_image(source)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def normalised_targets(mos: np.ndarray, config: FinetuneConfig) -> tuple[np.ndarray, tuple[float, float]]:
    """
    Opinion scores mapped to [0, 1], 1 the best: `(mos - low) / (high - low)`, reversed for `lower_better`.

    Returns:
        The targets and `(low, high)`, the MOS range used (`mos_min`/`mos_max`, or the data's extremes).

    Raises:
        ValueError: when a score lies outside a given range, or all scores are equal.
    """
    low = float(mos.min()) if config.mos_min is None else config.mos_min
    high = float(mos.max()) if config.mos_max is None else config.mos_max
    outside = np.flatnonzero((mos < low) | (mos > high))
    if outside.size:
        raise ValueError(
            f"{config.dataset}, row {outside[0]}: opinion score {mos[outside[0]]} outside --mos-min/--mos-max "
            f"[{low}, {high}]"
        )
    if high <= low:
        raise ValueError(f"{config.dataset}: every opinion score is {low}; nothing to learn from")
    targets = (mos - low) / (high - low)
    return (1 - targets if config.lower_better else targets), (low, high)


def make_splits(
    num_images: int, num_splits: int, seed: int, fractions: tuple[float, float] = (0.7, 0.1)
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """
    `num_splits` random train/validation/test splits (70/10/20 by default) of `range(num_images)`, split `k` drawn
    from `numpy.random.default_rng((seed, k))`, so that a split does not depend on how many are asked for.
    """
    splits = []
    for index in range(num_splits):
        order = np.random.default_rng((seed, index)).permutation(num_images)
        num_train, num_val = round(fractions[0] * num_images), max(1, round(fractions[1] * num_images))
        splits.append((order[:num_train], order[num_train : num_train + num_val], order[num_train + num_val :]))
    return splits


# ------------------------------------------------------------------------------------------ whole-image embeddings


@torch.no_grad()
def embed_whole_images(
    model: QualiCLIPModel,
    processor: QualiCLIPProcessor,
    images: Sequence[torch.Tensor],
    batch_size: int,
    max_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The normalised embeddings `(num_images, projection_dim)` and the scores `(num_images,)` of whole images, as
    every entry point scores them (the processor, then the model's forward), in float32 on the CPU.
    """
    embeds, scores = [], []
    for start in range(0, len(images), batch_size):
        inputs = processor(images=list(images[start : start + batch_size]), max_size=max_size, return_tensors="pt")
        output = model(**inputs.to(model.device))
        embeds.append(output.image_embeds.float().cpu())
        scores.append(output.quality_score.float().cpu())
    return torch.cat(embeds), torch.cat(scores)


def cached_whole_image_embeddings(
    model: QualiCLIPModel,
    processor: QualiCLIPProcessor,
    data,
    config: FinetuneConfig,
    state_dir: Path,
    part_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    """
    `embed_whole_images` of every row with the starting model, computed in parts of `part_size` rows, each saved
    atomically under `state_dir/embeddings`, so that a resumed run computes only the missing parts.

    Returns:
        The embeddings, the zero-shot scores (NaN rows for unreadable images) and `{row: error}` of those images.
    """
    folder = state_dir / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    embeds, scores, failed = [], [], {}
    for start in tqdm(range(0, len(data), part_size), desc="embedding whole images"):
        path = folder / f"part_{start:08d}.safetensors"
        if path.is_file():
            part = load_file(path)
            errors = json.loads((folder / f"part_{start:08d}.json").read_text())
        else:
            rows = range(start, min(start + part_size, len(data)))
            images, kept, errors = [], [], {}
            for row in rows:
                try:
                    images.append(decode_row_image(data[row]["image"]))
                    kept.append(row)
                except ValueError as error:
                    errors[str(row)] = str(error)
            dim = model.config.vision_config.projection_dim
            part = {
                "embeds": torch.full((len(rows), dim), float("nan")),
                "scores": torch.full((len(rows),), float("nan")),
            }
            if images:
                positions = torch.tensor([row - start for row in kept])
                part["embeds"][positions], part["scores"][positions] = embed_whole_images(
                    model, processor, images, config.batch_size, config.max_size
                )
            (folder / f"part_{start:08d}.json").write_text(json.dumps(errors))
            save_file(part, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        embeds.append(part["embeds"])
        scores.append(part["scores"])
        failed.update({int(row): error for row, error in errors.items()})
    return torch.cat(embeds), torch.cat(scores), failed


# ------------------------------------------------------------------------------------------------------- ridge


def fit_ridge(features: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """
    Ridge regression in closed form, the intercept unpenalised: `w = (Xc^T Xc + alpha I)^-1 Xc^T yc` on centred
    features and targets, `b = mean(y) - mean(X) w`.

    Args:
        features (`np.ndarray` of shape `(num_images, dim)`), targets (`np.ndarray` of shape `(num_images,)`).
        alpha (`float`): The penalty, positive.

    Returns:
        `(w, b)`: the weights `(dim,)` and the intercept.
    """
    features, targets = features.astype(np.float64), targets.astype(np.float64)
    mean_x, mean_y = features.mean(axis=0), targets.mean()
    centred = features - mean_x
    gram = centred.T @ centred + alpha * np.eye(features.shape[1])
    weights = np.linalg.solve(gram, centred.T @ (targets - mean_y))
    return weights, float(mean_y - mean_x @ weights)


def _srcc(scores: np.ndarray, targets: np.ndarray) -> float:
    value = spearmanr(scores, targets).statistic
    return -1.0 if np.isnan(value) else float(value)  # constant scores rank nothing


def ridge_split(
    embeds: np.ndarray, targets: np.ndarray, train: np.ndarray, val: np.ndarray
) -> tuple[np.ndarray, float, float, float]:
    """Fits every penalty of `RIDGE_ALPHAS` on `train`; returns `(w, b, alpha, validation SRCC)` of the best."""
    best = None
    for alpha in RIDGE_ALPHAS:
        weights, bias = fit_ridge(embeds[train], targets[train], alpha)
        srcc = _srcc(embeds[val] @ weights + bias, targets[val])
        if best is None or srcc >= best[3]:
            best = (weights, bias, alpha, srcc)
    return best


def with_linear_head(model: QualiCLIPModel, weights: np.ndarray, bias: float) -> QualiCLIPModel:
    """A copy of `model` whose score is `weights . image_embeds + bias` (`config.quality_head = "linear"`)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.quality_head = "linear"
    head_model = QualiCLIPModel(config)
    missing, unexpected = head_model.load_state_dict(model.state_dict(), strict=False)
    assert set(missing) == {"linear_head.weight", "linear_head.bias"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        head_model.linear_head.weight.copy_(torch.from_numpy(weights).float()[None])
        head_model.linear_head.bias.fill_(bias)
    return head_model.eval()


# ------------------------------------------------------------------------------------------- prompt learning


def with_prompt_context(
    model: QualiCLIPModel, length: int, generator: torch.Generator, logit_scale: float | None = None
) -> QualiCLIPModel:
    """
    A copy of `model` with learned prompt contexts (QualiCLIP+'s layout): the model's own when it has them, else
    `length` vectors per prompt drawn from N(0, 0.02²), CoOp's initialisation; with `logit_scale`, the copy's
    `config.logit_scale`.
    """
    if model.prompt_context is not None:
        import copy

        model = copy.deepcopy(model)
        if logit_scale is not None:
            model.config.logit_scale = float(logit_scale)
        return model
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.prompt_context_length = length
    if logit_scale is not None:
        config.logit_scale = float(logit_scale)
    plus = QualiCLIPModel(config)
    missing, unexpected = plus.load_state_dict(model.state_dict(), strict=False)
    assert set(missing) == {"prompt_context"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        plus.prompt_context.copy_(torch.randn(plus.prompt_context.shape, generator=generator) * 0.02)
    return plus


class PromptLearner(torch.nn.Module):
    """
    The training forward of `prompts` and `full`, as one module so that Accelerate's DDP wrapper sees every
    trainable parameter: crops through the image tower, the prompts (with their learned contexts) through the
    frozen text tower, and the model's own score head (`QualiCLIPModel.score_embeddings`) on both.
    """

    def __init__(self, model: QualiCLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)

    def prompt_embeds(self) -> torch.Tensor:
        """`(2 * num_prompt_pairs, projection_dim)`, normalised, differentiable in the contexts."""
        return F.normalize(self.model.encode_prompts(self.input_ids, self.attention_mask).float(), dim=-1)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Quality scores `(batch_size,)` of CLIP-normalised crops, with the prompts being learned."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.model.vision_model.conv1.weight.requires_grad):
            features = self.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
        image_embeds = F.normalize(features.float(), dim=-1)
        return self.model.score_embeddings(image_embeds, self.prompt_embeds())[0]


def plcc_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`1 - PLCC` of a batch (0 when the scores are a positive linear map of the targets); our form of the PLCC term."""
    scores, targets = scores - scores.mean(), targets - targets.mean()
    return 1 - (scores * targets).sum() / (scores.norm() * targets.norm() + 1e-8)


def training_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random square crop of side `min(size, height, width)` of a `(3, H, W)` image, mirrored half the time."""
    height, width = image.shape[-2:]
    side = min(size, height, width)
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
    crop = image[:, top : top + side, left : left + side]
    return crop.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else crop


def _seed_of(*keys: int) -> int:
    """A 63-bit seed that is a function of `keys` only (numpy's `SeedSequence`), the same in every process."""
    return int(np.random.SeedSequence(keys).generate_state(2, np.uint64)[0] >> np.uint64(1))


class BestSoFar:
    """The trainable tensors of the epoch of the best validation SRCC; checkpointed with Accelerate's state."""

    def __init__(self) -> None:
        self.srcc, self.epoch, self.tensors = -math.inf, -1, {}

    def state_dict(self) -> dict[str, Any]:
        return {"srcc": self.srcc, "epoch": self.epoch, "tensors": self.tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.srcc, self.epoch, self.tensors = float(state["srcc"]), int(state["epoch"]), dict(state["tensors"])


def _trainable_tensors(model: QualiCLIPModel, method: str) -> dict[str, torch.Tensor]:
    names = ("prompt_context", "vision_model.") if method == "full" else ("prompt_context",)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(names)}


def learn_prompts_split(
    base: QualiCLIPModel,
    processor: QualiCLIPProcessor,
    data,
    targets: np.ndarray,
    whole_embeds: torch.Tensor,
    split: tuple[np.ndarray, np.ndarray, np.ndarray],
    split_index: int,
    config: FinetuneConfig,
    split_dir: Path,
) -> tuple[QualiCLIPModel, dict[str, Any]]:
    """
    `prompts` or `full` on one split, checkpointed at the end of every epoch (`training.train.save_checkpoint`:
    Accelerate's state, atomically), so that a resumed split replays exactly what the killed one would have done.
    Randomness is a function of `(seed, split, epoch, image)` only.

    Returns:
        The model of the best validation epoch with its prompts baked into `prompt_embeds`, and a record of the
        split (best epoch, validation SRCC per epoch).
    """
    train, val, _ = split
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    model = with_prompt_context(
        base,
        config.prompt_context_length,
        torch.Generator().manual_seed(_seed_of(config.seed, split_index)),
        config.logit_scale,
    )
    model.requires_grad_(False)
    model.prompt_context.requires_grad_(True)
    groups = [{"params": [model.prompt_context], "lr": config.learning_rate}]
    if config.method == "full":
        model.vision_model.requires_grad_(True)
        groups.append({"params": list(model.vision_model.parameters()), "lr": config.vision_learning_rate})
    # BatchNorm statistics stay frozen (eval mode): batches of 8 crops are too small to estimate them.
    model.eval()
    texts = [text for pair in model.config.prompt_pairs for text in pair]
    tokens = processor.tokenizer(
        texts, padding="max_length", max_length=model.config.text_config.max_position_embeddings, return_tensors="pt"
    )
    learner = PromptLearner(model, tokens["input_ids"], tokens["attention_mask"])
    steps_per_epoch = math.ceil(len(train) / (config.batch_size * accelerator.num_processes))
    optimizer = torch.optim.Adam(groups)
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer, config.warmup_steps, num_training_steps=config.epochs * steps_per_epoch
    )
    learner, optimizer, scheduler = accelerator.prepare(learner, optimizer, scheduler)
    best = BestSoFar()
    accelerator.register_for_checkpointing(best)
    step, start_epoch, history = 0, 0, []
    if (checkpoint := latest_checkpoint(split_dir)) is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        step, start_epoch, history = state["step"], state["cursor"][0], state["history"]
        accelerator.print(f"split {split_index}: resumed from {checkpoint} at epoch {start_epoch}")
    inner = accelerator.unwrap_model(learner)
    val_targets = targets[val]
    images: dict[int, torch.Tensor] = {}
    progress = tqdm(
        total=config.epochs, initial=start_epoch, desc=f"split {split_index}", disable=not accelerator.is_main_process
    )
    for epoch in range(start_epoch, config.epochs):
        order = train[np.random.default_rng((config.seed, split_index, epoch)).permutation(len(train))]
        per_step = config.batch_size * accelerator.num_processes
        for start in range(0, len(order), per_step):
            step_rows = order[start : start + per_step]
            if len(step_rows) < 2 * accelerator.num_processes:  # a PLCC needs two images per process: skip the rest
                continue
            rows = step_rows[accelerator.process_index :: accelerator.num_processes]
            crops = []
            for row in rows.tolist():
                if row not in images:
                    images[row] = decode_row_image(data[row]["image"])
                generator = torch.Generator().manual_seed(_seed_of(config.seed, split_index, epoch, row))
                crops.append(training_crop(images[row], config.crop_size, generator))
            inputs = processor(images=crops, return_tensors="pt").to(accelerator.device)
            batch_targets = torch.as_tensor(targets[rows], dtype=torch.float32, device=accelerator.device)
            with accelerator.autocast():
                scores = learner(**inputs).float()
            loss = F.mse_loss(scores, batch_targets) + config.plcc_loss_weight * plcc_loss(scores, batch_targets)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        with torch.no_grad():
            val_scores = _whole_image_scores(inner, processor, data, val, whole_embeds, config, images)
        srcc = _srcc(val_scores, val_targets)
        history.append(round(srcc, 6))
        if srcc > best.srcc:
            best.srcc, best.epoch, best.tensors = srcc, epoch, _trainable_tensors(inner.model, config.method)
        save_checkpoint(accelerator, split_dir, step, {"step": step, "cursor": [epoch + 1, 0], "history": history})
        if accelerator.is_main_process:  # only the newest checkpoint is needed to resume
            for old in (split_dir / "checkpoints").glob("step_*"):
                if old.name != f"step_{step}":
                    shutil.rmtree(old, ignore_errors=True)
        progress.update()
        progress.set_postfix(val_srcc=f"{srcc:.3f}", loss=f"{loss.item():.4f}")
    progress.close()
    final = inner.model
    final.load_state_dict(best.tensors, strict=False)
    final.requires_grad_(False)
    with torch.no_grad():
        final.set_prompts(final.config.prompt_pairs, processor.tokenizer)
    accelerator.free_memory()
    return final.eval(), {"best_epoch": best.epoch + 1, "val_srcc": best.srcc, "val_srcc_per_epoch": history}


def _whole_image_scores(
    learner: PromptLearner,
    processor: QualiCLIPProcessor,
    data,
    rows: np.ndarray,
    whole_embeds: torch.Tensor,
    config: FinetuneConfig,
    images: dict[int, torch.Tensor],
) -> np.ndarray:
    """Scores of whole images with the prompts being learned: cached embeddings when the image tower is frozen."""
    model = learner.model
    prompt_embeds = learner.prompt_embeds()
    if config.method == "full":
        for row in rows.tolist():
            if row not in images:
                images[row] = decode_row_image(data[row]["image"])
        whole = [images[row] for row in rows.tolist()]
        embeds, _ = embed_whole_images(model, processor, whole, config.batch_size, config.max_size)
    else:
        embeds = whole_embeds[torch.as_tensor(rows)]
    return model.score_embeddings(embeds.to(prompt_embeds.device), prompt_embeds)[0].cpu().numpy()


# ------------------------------------------------------------------------------------------------- the run


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, mean and standard deviation (`ddof=1`; 0 for one split) over splits of SRCC, PLCC and KRCC."""
    summary = {}
    for metric in ("srcc", "plcc", "krcc"):
        values = np.array([row[metric] for row in rows])
        summary[metric] = {
            "median": float(np.median(values)),
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        }
    return summary


def _metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    # A logistic fit to a handful of test images often overflows or cannot estimate its covariance; the PLCC after it
    # is still what the literature reports (and the raw one when the fit fails, see `correlation_metrics`).
    with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        metrics = correlation_metrics(scores, targets)
    return {key: metrics[key] for key in ("srcc", "plcc", "krcc")}


def _check_run_folder(config: FinetuneConfig, output: Path, resume: bool) -> Path:
    """Refuses a used `output` (without `resume`) and a resume with other settings; returns the state folder."""
    state_dir = output / STATE_DIR
    recorded = state_dir / "config.json"
    if recorded.is_file():
        if not resume:
            raise ValueError(f"{output} already holds a fine-tuning run: pass --resume, or choose another --output")
        if json.loads(recorded.read_text()) != asdict(config):
            raise ValueError(
                f"{output}: --resume with other settings than the run there ({recorded}); a resumed run must be the "
                "same run"
            )
    elif output.exists() and any(output.iterdir()):
        raise ValueError(f"{output} exists and is not empty; choose another --output")
    return state_dir


def finetune(config: FinetuneConfig, resume: bool = False) -> Path:
    """
    Runs (or, with `resume`, continues) a fine-tuning run; see the module's docstring.

    Returns:
        The output model folder.

    Raises:
        ValueError: for a used `output` without `resume`, other settings on resume, or unusable data (one line,
            naming the dataset and row).
    """
    output = Path(config.output)
    # Under `accelerate launch`, every process computes the same things; only the main one writes them.
    processes = PartialState()
    state_dir = _check_run_folder(config, output, resume)
    processes.wait_for_everyone()
    if processes.is_main_process:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    started = time.perf_counter()
    resolved = resolve_model(config.model)
    # The whole images are embedded on this process's accelerator when there is one.
    base = QualiCLIPModel.from_pretrained(resolved.location).to(processes.device).eval()
    processor = QualiCLIPProcessor.from_pretrained(resolved.location)
    data, mos = load_opinion_dataset(config)
    targets, mos_range = normalised_targets(mos, config)
    if processes.is_main_process:  # the others then read the parts it saved
        cached_whole_image_embeddings(base, processor, data, config, state_dir)
    processes.wait_for_everyone()
    whole_embeds, zero_shot, failed = cached_whole_image_embeddings(base, processor, data, config, state_dir)
    for row, error in sorted(failed.items())[:20]:
        print(f"row {row}: left out: {error}", file=sys.stderr)
    usable = np.array([row for row in range(len(data)) if row not in failed])
    splits = make_splits(len(usable), config.num_splits, config.seed)
    splits = [tuple(usable[part] for part in split) for split in splits]  # positions among the readable rows

    records = []
    for index, split in enumerate(splits):
        split_dir = state_dir / f"split_{index:02d}"
        done = split_dir / "result.json"
        if done.is_file() and (index > 0 or (split_dir / "model").is_dir()):
            records.append(json.loads(done.read_text()))
            continue
        train, val, test = split
        if config.method == "ridge":
            weights, bias, alpha, val_srcc = ridge_split(whole_embeds.numpy(), targets, train, val)
            model = with_linear_head(base, weights, bias)
            extra = {"alpha": alpha, "val_srcc": val_srcc}
            test_scores = model.score_embeddings(whole_embeds[torch.as_tensor(test)].to(model.device))[0]
            test_scores = test_scores.detach().cpu().numpy()
        else:
            model, extra = learn_prompts_split(
                base, processor, data, targets, whole_embeds, split, index, config, split_dir
            )
            if config.method == "full":
                test_images = [decode_row_image(data[row]["image"]) for row in test.tolist()]
                test_scores = embed_whole_images(model, processor, test_images, config.batch_size, config.max_size)[1]
                test_scores = test_scores.numpy()
            else:
                test_scores = model.score_embeddings(whole_embeds[torch.as_tensor(test)].to(model.device))[0]
                test_scores = test_scores.detach().cpu().numpy()
        record = {
            "split": index,
            "num_train": len(train),
            "num_val": len(val),
            "num_test": len(test),
            "zero_shot": _metrics(zero_shot.numpy()[test], targets[test]),
            "fine_tuned": _metrics(test_scores, targets[test]),
            **extra,
        }
        records.append(record)
        if not processes.is_main_process:
            processes.wait_for_everyone()
            continue
        if index == 0:  # the saved model: the first split's, whose test images it never saw
            model.config.fine_tuning = {
                "method": config.method,
                "dataset": config.dataset,
                "split": config.split,
                "image_column": config.image_column,
                "score_column": config.score_column,
                "lower_better": config.lower_better,
                "mos_range": list(mos_range),
                "base_model": config.model,
                "seed": config.seed,
            }
            staging = split_dir / "model.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            shutil.rmtree(split_dir / "model", ignore_errors=True)
            os.replace(staging, split_dir / "model")
        split_dir.mkdir(parents=True, exist_ok=True)
        (split_dir / "result.json").write_text(json.dumps(record, indent=2))
        shutil.rmtree(split_dir / "checkpoints", ignore_errors=True)
        processes.wait_for_everyone()
        print(
            f"split {index}: test SRCC {record['fine_tuned']['srcc']:.4f} (zero-shot {record['zero_shot']['srcc']:.4f})"
        )

    results = {
        "dataset": config.dataset,
        "method": config.method,
        "base_model": config.model,
        "num_images": len(data),
        "num_failed": len(failed),
        "failed": {str(row): error for row, error in sorted(failed.items())[:20]},
        "mos_range": list(mos_range),
        "lower_better": config.lower_better,
        "num_splits": config.num_splits,
        "split_fractions": [0.7, 0.1, 0.2],
        "metric_note": "PLCC after the 4-parameter logistic fit; std with ddof=1",
        "zero_shot": summarise([r["zero_shot"] for r in records]),
        "fine_tuned": summarise([r["fine_tuned"] for r in records]),
        "splits": records,
        "seconds": round(time.perf_counter() - started, 1),
        "config": asdict(config),
    }
    if processes.is_main_process:
        _write_model_folder(state_dir / "split_00" / "model", output, results, resolved.name)
        print(format_results(results))
    processes.wait_for_everyone()
    return output


def _write_model_folder(model_dir: Path, output: Path, results: dict[str, Any], base_name: str) -> None:
    """Copies the first split's model into `output` and writes `finetune_results.json` and the card."""
    from qualiclip_hf.hub.card import Results, infer_weights_kind, make_model_card

    for path in model_dir.iterdir():
        shutil.copy2(path, output / path.name)
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    split_zero = results["splits"][0]
    record = {
        "dataset": f"{results['dataset']} (test images of split 1)",
        "num_images": split_zero["num_test"],
        "num_failed": 0,
        **split_zero["fine_tuned"],
    }
    weights = "demo" if infer_weights_kind(resolve_model(base_name).location) == "demo" else "trained"
    card = make_model_card(
        output, weights=weights, results=Results(mos=[(RESULTS_FILE, record)]),
        license="cc-by-nc-4.0" if base_name == "official" else None,
    )  # fmt: skip
    head = {
        "ridge": "The score is a linear head on the image embedding (`quality_head: linear`), not the prompts' softmax",
        "prompts": "The learned prompt contexts are baked into the stored prompt embeddings",
        "full": "The image tower and the learned prompt contexts were trained; the prompts are baked into the stored "
        "prompt embeddings",
    }[results["method"]]
    section = (
        f"## Fine-tuning on opinion scores\n\n{format_results(results)}\n\n{head}. The score predicts the opinion "
        "score rescaled to [0, 1] (1 the best; `fine_tuning.mos_range` in `config.json` maps it back).\n\n"
    )
    card.text = card.text.replace("## Usage", section + "## Usage", 1)
    card.save(output / "README.md")


def format_results(results: dict[str, Any]) -> str:
    """The summary as a Markdown table: a zero-shot row and a fine-tuned row, median and mean ± std over splits."""
    lines = [
        f"`training/finetune.py --method {results['method']}` from `{results['base_model']}` on `{results['dataset']}` "
        f"({results['num_images'] - results['num_failed']} images, {results['num_failed']} unreadable; MOS range "
        f"{results['mos_range']}, {'lower' if results['lower_better'] else 'higher'} is better). "
        f"{results['num_splits']} random 70/10/20 splits (seed {results['config']['seed']}); test-split "
        "correlations, PLCC after the 4-parameter logistic fit. The saved model is split 1's.",
        "",
        "| model | SRCC median | SRCC mean ± std | PLCC median | PLCC mean ± std | KRCC median | KRCC mean ± std |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in ("zero_shot", "fine_tuned"):
        cells = [row.replace("_", "-")]
        for metric in ("srcc", "plcc", "krcc"):
            value = results[row][metric]
            cells += [f"{value['median']:.4f}", f"{value['mean']:.4f} ± {value['std']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[FinetuneConfig, RunOptions]:
    """`HfArgumentParser` over `FinetuneConfig` and `RunOptions`; bad values exit with argparse's message."""
    parser = HfArgumentParser(
        (FinetuneConfig, RunOptions), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    try:
        return parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as error:  # FinetuneConfig.__post_init__
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: see the module's docstring."""
    config, options = parse_arguments(argv)
    try:
        finetune(config, resume=options.resume)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
