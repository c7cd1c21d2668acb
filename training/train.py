"""Train QualiCLIP's image tower with the self-supervised QualiCLIP recipe.

    accelerate launch -m training.train --config training/configs/demo.yaml [--resume] [--push-to-hub ORG/NAME]
    python -m training.train --config training/configs/demo.yaml --max_steps 200 --vision '{"depths": [1, 1, 1, 1]}'

Run it from the repository's root, as a module. Every key of the YAML file is also a command-line option, which
overrides it (`--max_steps 200` or `--max-steps 200`; mappings as JSON). Accelerate is the distributed engine (CPU,
one GPU, DDP/FSDP/DeepSpeed through `accelerate config`). Only the image tower trains; the text tower is frozen and
the prompt embeddings are fixed. Checkpoints (`save_state`) are written to a temporary folder and renamed, so an
interrupted save never leaves an unloadable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from qualiclip_hf import QualiCLIPConfig, QualiCLIPModel
from qualiclip_hf.build_processor import make_processor
from qualiclip_hf.hub.push import push_blocker
from qualiclip_hf.outputs import write_text_atomic
from training.data import DegradedBatches, load_pristine_stream, shard_for_process
from training.losses import QualiCLIPLossWeights, qualiclip_losses

DEGRADE_PLACES = ("auto", "workers", "accelerator")


class JsonDict(dict):
    """A mapping setting of `TrainConfig`: a YAML mapping in the file, a JSON object on the command line."""

    def __init__(self, value: str | dict[str, Any] | None = None) -> None:
        super().__init__(json.loads(value) if isinstance(value, str) else (value or {}))


def _option(help: str, **kwargs: Any) -> Any:
    return field(metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """
    Every setting of a run. `training/configs/*.yaml` hold the values used and say where they come from; each key
    is also a command-line option of `python -m training.train`. The configuration is never changed during a run.
    """

    output_dir: str = _option("folder of the run: checkpoints, losses.jsonl, logs, final/", default="runs/qualiclip")
    # Model
    init_from: str | None = _option(
        "QualiCLIP/CLIP folder or Hub id to fine-tune; none: build from vision/text", default=None
    )
    vision: JsonDict = field(
        default_factory=JsonDict, metadata={"help": "QualiCLIPVisionConfig settings of a model built from scratch"}
    )
    text: JsonDict = field(
        default_factory=JsonDict, metadata={"help": "QualiCLIPTextConfig settings of a model built from scratch"}
    )
    # Data
    data_source: str = _option("a folder of pristine images, or a Hub dataset id", default="data/pristine")
    data_split: str = _option("the split of a Hub dataset", default="train")
    image_column: str = _option("the image column of a Hub dataset", default="image")
    shuffle_buffer: int = _option("size of the streaming shuffle buffer (<= 1: no shuffling)", default=1000)
    crop_size: int = _option("side of the square crops, pixels", default=224)
    num_levels: int = _option("degradation levels L per composition", default=5)
    max_groups: int = _option("distortion groups per composition, at most", default=4)
    num_workers: int = _option("CPU worker processes that decode and degrade", default=4)
    degrade_on: Literal["auto", "workers", "accelerator"] = _option(
        "where the degradations after a composition's last codec step run: the CPU workers, the training process "
        "(on accelerator.device), or auto: the accelerator when it is not the CPU. Same samples either way",
        default="auto",
    )
    degradation_style: Literal["arniqa", "clean"] = _option(
        "the distortions' implementation: arniqa (ARNIQA's code, quirks included: the distribution QualiCLIP was "
        "trained on) or clean (the corrected versions); see training/README.md",
        default="arniqa",
    )
    # Optimisation
    batch_size: int = _option("pristine images per step and process", default=16)
    gradient_accumulation_steps: int = _option("micro-batches per optimizer step", default=1)
    max_steps: int = _option("optimizer steps to train for (the planned steps)", default=1000)
    time_limit_minutes: float | None = _option(
        "stop early, with a checkpoint and the final folder, once this much wall time has passed; none: no limit",
        default=None,
    )
    learning_rate: float = _option("AdamW learning rate (peak, after the warm-up)", default=1e-4)
    weight_decay: float = _option("AdamW weight decay", default=1e-2)
    lr_scheduler_type: str = _option(
        "a schedule of transformers.get_scheduler (constant_with_warmup, linear, cosine, ...)",
        default="constant_with_warmup",
    )
    warmup_steps: int = _option("steps of linear warm-up of the learning rate", default=0)
    loss: JsonDict = field(
        default_factory=JsonDict, metadata={"help": "QualiCLIPLossWeights settings (margins, weights)"}
    )
    # Run
    seed: int = _option("seed of the model, the data order and the degradations", default=0)
    mixed_precision: str = _option("Accelerate's mixed precision: no, fp16 or bf16", default="no")
    checkpoint_every: int = _option("steps between checkpoints", default=200)
    log_every: int = _option("steps between logged losses", default=10)

    def __post_init__(self) -> None:
        if self.degrade_on not in DEGRADE_PLACES:
            raise ValueError(f"degrade_on must be 'auto', 'workers' or 'accelerator', got {self.degrade_on!r}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")


@dataclass(frozen=True)
class RunOptions:
    """What a launch does with the configuration; not part of it."""

    config: str | None = _option("YAML file of TrainConfig settings; the other options override its keys", default=None)
    resume: bool = _option("continue from the latest checkpoint in output_dir", default=False)
    push_to_hub: str | None = _option("upload the final model to this Hub repository (ORG/NAME)", default=None)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """
    The settings of a YAML configuration file.

    Raises:
        ValueError: naming the file, when it is not a mapping or has a key `TrainConfig` does not know.
    """
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig settings, got {type(values).__name__}")
    unknown = set(values) - {item.name for item in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    return values


def load_config(path: str | Path) -> TrainConfig:
    """The `TrainConfig` of a YAML file (see `read_config_file`), without command-line overrides."""
    return TrainConfig(**read_config_file(path))


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[TrainConfig, RunOptions]:
    """
    `--config FILE` sets the defaults, and every other option overrides one key (timm's `train.py` layout, parsed
    by transformers' `HfArgumentParser`).

    Raises:
        SystemExit: with argparse's message, for an unknown option or a value of the wrong type.
    """
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config")
    config_file = config_parser.parse_known_args(argv)[0].config
    parser = HfArgumentParser(
        (TrainConfig, RunOptions), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if config_file is not None:
        try:
            parser.set_defaults(**read_config_file(config_file))
        except (OSError, ValueError, yaml.YAMLError) as error:
            parser.error(str(error))
    try:
        config, options = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as error:  # TrainConfig.__post_init__
        parser.error(str(error))
    return config, options


def build_model(config: TrainConfig) -> QualiCLIPModel:
    """
    The model a run starts from.

    Args:
        config ([`TrainConfig`]): `init_from` (a folder or Hub id to fine-tune) or, without it, the `vision` and
            `text` sizes of a model built from scratch.

    Returns:
        [`QualiCLIPModel`]: loaded strictly, or built with random weights and the prompt embeddings of its random,
        frozen text tower.
    """
    if config.init_from:
        return QualiCLIPModel.from_pretrained(config.init_from)
    model = QualiCLIPModel(QualiCLIPConfig(vision_config=config.vision, text_config=config.text))
    # A model built from scratch has a random frozen text tower: the prompt embeddings are what it encodes.
    model.set_prompts(model.config.prompt_pairs, make_processor().tokenizer)
    return model


def prompt_similarities(model: torch.nn.Module, prompt_embeds: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """
    The cosine similarities of degraded crops to the prompts, through the model's forward.

    Args:
        model (`torch.nn.Module`): The (possibly DDP-wrapped) [`QualiCLIPModel`].
        prompt_embeds (`torch.Tensor` of shape `(2 * num_pairs, projection_dim)`): the fixed, normalised prompt
            embeddings.
        crops (`torch.Tensor` of shape `(batch, levels, 2, 3, size, size)`): degraded crops in [0, 1].

    Returns:
        `torch.Tensor` of shape `(batch, levels, 2, num_pairs, 2)`: cosine similarities to the (positive, negative)
        prompts, in float32.
    """
    batch, levels, two = crops.shape[:3]
    mean = crops.new_tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = crops.new_tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    pixels = ((crops.flatten(0, 2) - mean) / std).contiguous(memory_format=torch.channels_last)
    # Through the (possibly DDP-wrapped) module's forward, so that gradients are synchronised.
    embeds = model(pixel_values=pixels).image_embeds.float()
    similarities = embeds @ prompt_embeds.float().T
    return similarities.view(batch, levels, two, -1, 2)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """
    The complete checkpoint of the highest step: a `step_<N>` folder with its trainer state. The `.tmp` folder of a
    save cut short by a crash, or anything else put there, is never picked.

    Args:
        output_dir (`Path`): The run's folder.

    Returns:
        `Path` or `None`: `output_dir/checkpoints/step_<N>`, or `None` when there is no complete checkpoint.
    """
    complete = []
    for path in (output_dir / "checkpoints").glob("step_*"):
        match = re.fullmatch(r"step_(\d+)", path.name)
        if match and (path / "trainer_state.json").is_file():
            complete.append((int(match.group(1)), path))
    return max(complete)[1] if complete else None


def truncate_loss_log(path: Path, step: int) -> None:
    """
    Keeps the rows of `losses.jsonl` up to `step`, where a resumed run starts: the rows after it, logged before an
    interruption, are computed again (to the same values), and a row cut short by a crash is dropped. The file is
    replaced atomically.

    Args:
        path (`Path`): The log; nothing happens when it does not exist.
        step (`int`): The last step to keep.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict) -> None:
    """
    Saves Accelerate's state and `trainer_state.json` into `output_dir/checkpoints/step_<step>`, through a `.tmp`
    folder renamed at the end, so that an interrupted save never looks complete. Every process must call it.

    Args:
        accelerator (`Accelerator`): The run's accelerator.
        output_dir (`Path`): The run's folder.
        step (`int`): The completed optimizer steps.
        state (`dict`): The trainer state: `step`, the data `cursor` and `skipped_images`.
    """
    final = output_dir / "checkpoints" / f"step_{step}"
    staging = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        (staging / "trainer_state.json").write_text(json.dumps(state))
        os.replace(staging, final)
    accelerator.wait_for_everyone()


def train(config: TrainConfig, resume: bool = False, push_to_hub: str | None = None) -> Path:
    """
    Runs (or, with `resume`, continues) a training run and saves the final model with its processor and
    `training_summary.json` (planned and completed steps, skipped images, seconds, the configuration).

    Args:
        config: The run's settings; never modified.
        resume: Continue from the latest complete checkpoint in `config.output_dir`.
        push_to_hub: A Hub repository (ORG/NAME) to upload the final model to, as `qualiclip push` does.

    Returns:
        The folder of the final model, `output_dir/final`.

    Raises:
        ValueError: when `output_dir` already holds checkpoints and `resume` is off, or when `push_to_hub` is given
            and the Hub cannot be reached or no token is found (before any training).
    """
    output_dir = Path(config.output_dir)
    if push_to_hub and (blocker := push_blocker(push_to_hub)) is not None:
        # Checked before hours of training, not after them.
        raise ValueError(f"{blocker}; nothing was trained")
    if not resume and (existing := latest_checkpoint(output_dir)) is not None:
        # A fresh run would log after the old one's losses and collide with its checkpoints.
        raise ValueError(
            f"{output_dir} already holds checkpoints ({existing.name}): pass --resume, or choose another output_dir"
        )
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(output_dir),
    )
    set_seed(config.seed)
    accelerator.init_trackers("qualiclip", config={k: str(v) for k, v in asdict(config).items()})

    model = build_model(config)
    model.train()
    model.text_model.eval()
    optimizer = torch.optim.AdamW(
        model.vision_model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_weights = QualiCLIPLossWeights(**config.loss)
    prompt_embeds = accelerator.unwrap_model(model).prompt_embeds

    step, cursor, skipped_images, out_of_time = 0, (0, 0), 0, False
    if resume and (checkpoint := latest_checkpoint(output_dir)) is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        step, cursor, skipped_images = state["step"], tuple(state["cursor"]), state["skipped_images"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    if resume and accelerator.is_main_process:
        truncate_loss_log(output_dir / "losses.jsonl", step)

    stream = load_pristine_stream(config.data_source, config.data_split, config.image_column)
    stream = shard_for_process(stream, accelerator.process_index, accelerator.num_processes)
    if config.shuffle_buffer > 1:
        stream = stream.shuffle(seed=config.seed, buffer_size=config.shuffle_buffer)

    on_accelerator = config.degrade_on == "accelerator" or (
        config.degrade_on == "auto" and accelerator.device.type != "cpu"
    )
    first_step = step
    progress = tqdm(total=config.max_steps, initial=step, disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    batches = DegradedBatches(
        stream, config.batch_size, config.crop_size, config.num_levels, config.max_groups, config.seed,
        accelerator.process_index, config.num_workers, accelerator.device if on_accelerator else None,
        config.degradation_style,
    )  # fmt: skip
    if step < config.max_steps:
        resume_at = cursor
        for crops, skipped, cursor in batches.iterate(resume_at):
            skipped_images += skipped
            if crops is None:
                continue
            crops = crops.to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    similarities = prompt_similarities(model, prompt_embeds, crops)
                losses = qualiclip_losses(similarities, loss_weights)
                accelerator.backward(losses["loss"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update()
            if step % config.log_every == 0 or step == config.max_steps:
                logged = {name: accelerator.gather(value.detach()).mean().item() for name, value in losses.items()}
                logged["skipped_images"] = skipped_images
                logged["samples_per_second"] = (
                    (step - first_step)
                    * config.batch_size
                    * config.gradient_accumulation_steps
                    * accelerator.num_processes
                    / (time.perf_counter() - started)
                )
                accelerator.log(logged, step=step)
                if accelerator.is_main_process:
                    with open(output_dir / "losses.jsonl", "a") as log_file:
                        log_file.write(json.dumps({"step": step, **logged}) + "\n")
                progress.set_postfix(loss=f"{logged['loss']:.4f}")
            out_of_time = (
                config.time_limit_minutes is not None and time.perf_counter() - started > 60 * config.time_limit_minutes
            )
            last_step = step >= config.max_steps or out_of_time
            if step % config.checkpoint_every == 0 or last_step:
                save_checkpoint(
                    accelerator, output_dir, step, {"step": step, "cursor": cursor, "skipped_images": skipped_images}
                )
            if last_step:
                break

    progress.close()
    accelerator.end_training()
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model).eval()
        final_model.save_pretrained(final_dir)
        make_processor().save_pretrained(final_dir)
        (final_dir / "training_summary.json").write_text(
            json.dumps(
                {
                    "steps": step,  # completed
                    "planned_steps": config.max_steps,
                    "stopped_by_time_limit": out_of_time,
                    "skipped_images": skipped_images,
                    "seconds": round(time.perf_counter() - started, 1),
                    "config": asdict(config),
                },
                indent=2,
            )
        )
        if push_to_hub:
            # What `qualiclip push` does: one commit with the weights, processor, remote code and a generated card
            # (weights labelled as trained here, with this run's training summary).
            import tempfile

            from qualiclip_hf.hub.push import push_model_folder, stage_model_folder

            with tempfile.TemporaryDirectory() as staging:
                staged = stage_model_folder(final_dir, Path(staging) / "repo", repo_id=push_to_hub, weights="trained")
                push_model_folder(staged, push_to_hub)
        accelerator.print(f"saved {final_dir} ({skipped_images} unreadable images skipped)")
    return final_dir


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: see the module's docstring."""
    config, options = parse_arguments(argv)
    try:
        train(config, resume=options.resume, push_to_hub=options.push_to_hub)
    except ValueError as error:  # what the user can fix, in one line (exit status 1)
        raise SystemExit(f"training.train: {error}") from None


if __name__ == "__main__":
    main()
