"""Train QualiCLIP's image tower with the self-supervised QualiCLIP recipe.

    accelerate launch training/train.py --config training/configs/demo.yaml [--resume] [--push-to-hub ORG/NAME]

Accelerate is the distributed engine (CPU, one GPU, DDP/FSDP/DeepSpeed through `accelerate config`). Only the image
tower trains; the text tower is frozen and the prompt embeddings are fixed. Checkpoints (`save_state`) are written
to a temporary folder and renamed, so an interrupted save never leaves an unloadable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repository

from qualiclip_hf import QualiCLIPConfig, QualiCLIPModel
from qualiclip_hf.convert_qualiclip_checkpoint import make_processor
from training.data import DegradedBatches, load_pristine_stream, shard_for_process
from training.losses import QualiCLIPLossWeights, qualiclip_losses


@dataclass
class TrainConfig:
    """Every knob of a run; see `training/configs/*.yaml` for the values used and where they come from."""

    output_dir: str = "runs/qualiclip"
    # Model: fine-tune a pretrained QualiCLIP/CLIP folder or Hub id, or build one from `vision`/`text` sizes.
    init_from: str | None = None
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    # Data
    data_source: str = "data/pristine"
    data_split: str = "train"
    image_column: str = "image"
    shuffle_buffer: int = 1000
    crop_size: int = 224
    num_levels: int = 5
    max_groups: int = 4
    num_workers: int = 4
    # Where the degradations after a composition's last codec step run: "workers" (the CPU worker processes, with
    # everything else), "accelerator" (the training process, on accelerator.device), or "auto": the accelerator when
    # it is not the CPU. The samples are the same either way (see training/data.py).
    degrade_on: str = "auto"
    # Which implementation of the 24 distortions: "arniqa" (ARNIQA's code, quirks included: the distribution QualiCLIP
    # was trained on) or "clean" (the corrected versions); see training/README.md.
    degradation_style: str = "arniqa"
    # Optimisation
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    # Stop early (with a checkpoint and the final folder) once this much wall time has passed; None: no limit.
    time_limit_minutes: float | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    loss: dict = field(default_factory=dict)
    # Run
    seed: int = 0
    mixed_precision: str = "no"
    checkpoint_every: int = 200
    log_every: int = 10


def load_config(path: str | Path) -> TrainConfig:
    values = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(values) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    return TrainConfig(**values)


def build_model(config: TrainConfig) -> QualiCLIPModel:
    if config.init_from:
        return QualiCLIPModel.from_pretrained(config.init_from)
    model = QualiCLIPModel(QualiCLIPConfig(vision_config=config.vision, text_config=config.text))
    # A model built from scratch has a random frozen text tower: the prompt embeddings are what it encodes.
    model.set_prompts(model.config.prompt_pairs, make_processor().tokenizer)
    return model


def prompt_similarities(model: torch.nn.Module, prompt_embeds: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """
    Args:
        prompt_embeds (`torch.Tensor` of shape `(2 * num_pairs, dim)`): the fixed, normalised prompt embeddings.
        crops (`torch.Tensor` of shape `(batch, levels, 2, 3, size, size)`): degraded crops in [0, 1].

    Returns:
        `(batch, levels, 2, num_pairs, 2)` cosine similarities to the (positive, negative) prompts.
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
    interruption, are computed again (to the same values), and a row cut short by a crash is dropped.
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
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(kept))
    os.replace(staging, path)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict) -> None:
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
    if config.degrade_on not in ("auto", "workers", "accelerator"):
        raise ValueError(f"degrade_on must be 'auto', 'workers' or 'accelerator', got {config.degrade_on!r}")
    output_dir = Path(config.output_dir)
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps))
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_weights = QualiCLIPLossWeights(**config.loss)
    prompt_embeds = accelerator.unwrap_model(model).prompt_embeds

    step, cursor, skipped_images = 0, (0, 0), 0
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
            if out_of_time:
                config.max_steps = step  # ends the loop after this step's checkpoint
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                save_checkpoint(
                    accelerator, output_dir, step, {"step": step, "cursor": cursor, "skipped_images": skipped_images}
                )
            if step >= config.max_steps:
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
                    "steps": step,
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

            from qualiclip_hf.hub import push_model_folder, stage_model_folder

            with tempfile.TemporaryDirectory() as staging:
                staged = stage_model_folder(final_dir, Path(staging) / "repo", repo_id=push_to_hub, weights="trained")
                push_model_folder(staged, push_to_hub)
        accelerator.print(f"saved {final_dir} ({skipped_images} unreadable images skipped)")
    return final_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file of TrainConfig settings")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the final model to this Hub repository")
    parser.add_argument("--max-steps", type=int, help="override max_steps")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument(
        "--degrade-on", choices=("auto", "workers", "accelerator"), help="override degrade_on (compare the two)"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    if args.degrade_on is not None:
        config.degrade_on = args.degrade_on
    if not math.isfinite(config.learning_rate) or config.learning_rate <= 0:
        raise ValueError("learning_rate must be positive")
    train(config, resume=args.resume, push_to_hub=args.push_to_hub)


if __name__ == "__main__":
    main()
