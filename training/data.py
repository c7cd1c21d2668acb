"""Training samples: pristine images from a `datasets` stream, two overlapping crops, degraded at L levels.

Sharding: the stream is split across processes with `datasets.distributed.split_dataset_by_node`, and nothing
is passed through `accelerator.prepare` as a data loader (Accelerate would shard the iterable a second time and
drop samples). Within a process, a pool of worker processes does the decoding and degrading; optionally the
degradations after a composition's last codec step run in the training process instead, on its accelerator.
"""

from __future__ import annotations

import io
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image

from qualiclip_hf.image_processing_qualiclip import to_viewable_rgb

from .degradations import (
    DEFAULT_STYLE,
    CompositionStep,
    apply_composition,
    apply_composition_all_levels,
    apply_composition_levels_from,
    check_style,
    sample_composition,
    split_after_last_codec,
)


def load_pristine_stream(source: str, split: str = "train", image_column: str = "image") -> datasets.IterableDataset:
    """
    A stream of pristine images. Images stay undecoded, so that a corrupt one can be skipped and counted instead of
    failing the stream.

    Args:
        source (`str`):
            A local folder (read as an `imagefolder`, with `split` as its subfolder when it has one), a local
            parquet/webdataset path, or a Hub dataset id.
        split (`str`, defaults to `"train"`): The split (or subfolder) to read.
        image_column (`str`, defaults to `"image"`): The column holding the images; renamed to `image`.

    Returns:
        `datasets.IterableDataset`: examples with a single `image` column of undecoded images (`bytes`/`path`).
    """
    path = Path(source)
    if path.is_dir():
        data_dir = path / split if (path / split).is_dir() else path
        stream = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train", streaming=True)
    else:
        stream = datasets.load_dataset(source, split=split, streaming=True)
    if image_column != "image":
        stream = stream.rename_column(image_column, "image")
    return stream.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])


def shard_for_process(stream: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """
    This process's part of the stream: every sample goes to exactly one process.

    Args:
        stream (`datasets.IterableDataset`): The whole stream.
        rank (`int`): This process's index, in `[0, world_size)`.
        world_size (`int`): The number of processes.

    Returns:
        `datasets.IterableDataset`: the stream itself for one process, else its shard.
    """
    return split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream


class DegradedBatches:
    """
    Batches of `(batch, levels, 2, 3, crop, crop)` float tensors in [0, 1]: per pristine image, two overlapping crops
    degraded with one random ARNIQA composition at `num_levels` increasing levels (index 0 the mildest).

    This process reads the (cheap, undecoded) examples from its part of the stream; decoding, cropping and
    degrading run in a pool of `num_workers` processes, a bounded number of images ahead. The pool does not depend
    on how many shards the stream has (a local folder streams as a single shard, which would leave all but one
    DataLoader worker idle). Randomness is a function of `(seed, epoch, rank, position in the stream)` only, so a run
    is reproducible whatever the number of workers, and resuming from a batch's cursor replays exactly the batches
    that would have followed it.

    With `degrade_device` set, the workers stop after a composition's last codec step (JPEG / JPEG2000, which need
    the CPU) and this process applies the rest of it to the batch on `degrade_device`, carrying each level's random
    generator on from where the worker left it. The samples are the same as the workers' own (bit for bit on CPU;
    on a GPU up to floating-point differences of its kernels), and still a function of the cursor only.

    Args:
        stream (`datasets.IterableDataset`): This process's part of the pristine stream (`shard_for_process`).
        batch_size (`int`): Pristine images per batch.
        crop_size (`int`, defaults to 224): Side of the square crops, in pixels.
        num_levels (`int`, defaults to 5): Degradation levels per composition.
        max_groups (`int`, defaults to 7): Distortion groups per composition, at most.
        seed (`int`, defaults to 0): Seed of every random draw, with the epoch, rank and position.
        rank (`int`, defaults to 0): This process's index, which enters the per-sample seeds.
        num_workers (`int`, defaults to 0): Worker processes; 0 decodes and degrades in this process.
        degrade_device (`torch.device` or `str`, *optional*):
            Where the part of each composition after its last codec step runs; `None`: in the workers.
        degradation_style (`str`, defaults to `"arniqa"`):
            The distortions' implementation (`training.degradations.DEGRADATION_STYLES`): `"arniqa"`, the
            distribution QualiCLIP was trained on, or `"clean"`.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        batch_size: int,
        crop_size: int = 224,
        num_levels: int = 5,
        max_groups: int = 7,
        seed: int = 0,
        rank: int = 0,
        num_workers: int = 0,
        degrade_device: torch.device | str | None = None,
        degradation_style: str = DEFAULT_STYLE,
    ) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.sample_options = {
            "crop_size": crop_size,
            "num_levels": num_levels,
            "max_groups": max_groups,
            "defer": degrade_device is not None,
            "style": check_style(degradation_style),
        }
        self.seed = seed
        self.rank = rank
        self.num_workers = num_workers
        self.degrade_device = None if degrade_device is None else torch.device(degrade_device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, int, tuple[int, int]]]:
        return self.iterate()

    def iterate(self, cursor: tuple[int, int] = (0, 0)) -> Iterator[tuple[torch.Tensor | None, int, tuple[int, int]]]:
        """
        The batches, endlessly, epoch after epoch. Batches may span an epoch boundary, so a small dataset keeps the
        pool busy.

        Args:
            cursor (`tuple[int, int]`, defaults to `(0, 0)`):
                `(epoch, position)` of the first example to read: a cursor this method yielded, to resume.

        Yields:
            `tuple`: `(batch, skipped, cursor)`. `batch` is a `(batch_size - skipped, levels, 2, 3, crop, crop)`
            float tensor in [0, 1], on `degrade_device` when that is set, else on the CPU, or `None` when no image of
            it was readable; `skipped` counts its unreadable images; `cursor` is `(epoch, position)` of the next
            example to read.

        Raises:
            ValueError: when the stream is empty.
        """
        jobs = self._jobs(*cursor)
        if self.num_workers == 0:
            yield from _batched(map(_make_sample, jobs), self.batch_size, self.degrade_device)
            return
        context = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.num_workers, mp_context=context, initializer=_init_worker) as pool:
            samples = _bounded_map(pool, _make_sample, jobs, 4 * self.batch_size)
            yield from _batched(samples, self.batch_size, self.degrade_device)

    def _jobs(self, epoch: int, start: int) -> Iterator[tuple[dict, int, dict, tuple[int, int]]]:
        while True:
            stream = self.stream.skip(start) if start else self.stream
            stream.set_epoch(epoch)
            position = start - 1
            for position, example in enumerate(stream, start):
                seed = _mix(self.seed, epoch, self.rank, position)
                yield example["image"], seed, self.sample_options, (epoch, position + 1)
            if position < 0:
                raise ValueError("the pristine image stream is empty")
            epoch, start = epoch + 1, 0


@dataclass
class PendingDegradation:
    """
    A sample whose CPU part is done: the rest of its composition, to apply where the model is.

    Attributes:
        partial (`torch.Tensor` of shape `(levels, 2, 3, crop, crop)` or `(2, 3, crop, crop)`):
            The crops after the composition's head (up to its last codec step), or the crops themselves when the
            composition has no codec step; values in [0, 1].
        steps (`list[CompositionStep]`): The tail of the composition, still to apply.
        generator_states (`list[torch.Tensor]`): The state of each level's CPU generator where the head left it.
        style (`str`): The degradation style of the composition (`"arniqa"` or `"clean"`).
    """

    partial: torch.Tensor
    steps: list[CompositionStep]
    generator_states: list[torch.Tensor]
    style: str = DEFAULT_STYLE

    def finish(self, device: torch.device) -> torch.Tensor:
        """
        Applies the rest of the composition.

        Args:
            device (`torch.device`): Where to compute.

        Returns:
            `torch.Tensor` of shape `(levels, 2, 3, crop, crop)`: the degraded crops in [0, 1], on `device`.
        """
        partial = self.partial.to(device, non_blocking=True)
        return apply_composition_levels_from(partial, self.steps, self.generator_states, self.style)


def _batched(
    samples: Iterator[tuple[torch.Tensor | PendingDegradation | None, tuple[int, int]]],
    batch_size: int,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor | None, int, tuple[int, int]]]:
    batch = []
    for sample, cursor in samples:
        batch.append(sample.finish(device) if isinstance(sample, PendingDegradation) else sample)
        if len(batch) == batch_size:
            yield (*collate_degraded(batch), cursor)
            batch = []


def _bounded_map(pool: ProcessPoolExecutor, fn, jobs: Iterator, window: int) -> Iterator:
    """`pool.map` in order, with at most `window` jobs in flight (the stream may be endless)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _init_worker() -> None:
    torch.set_num_threads(1)  # one image per process; threads would only contend


def _make_sample(
    job: tuple[dict, int, dict, tuple[int, int]],
) -> tuple[torch.Tensor | PendingDegradation | None, tuple[int, int]]:
    image_data, seed, options, cursor = job
    generator = torch.Generator().manual_seed(seed)
    try:
        image = _decode(image_data)
    except Exception:  # Pillow's plugins raise many kinds of errors on corrupt files: each one is skipped and counted
        return None, cursor
    crops = overlapping_crops(image, options["crop_size"], generator)
    num_levels = options["num_levels"]
    composition = sample_composition(generator, max_groups=options["max_groups"], num_levels=num_levels)
    degradation_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    style = options["style"]
    if not options["defer"]:
        return apply_composition_all_levels(crops, composition, degradation_seed, num_levels, style=style), cursor
    # The same draws as apply_composition_all_levels: one generator per level, all seeded alike.
    head, tail = split_after_last_codec(composition)
    generators = [torch.Generator().manual_seed(degradation_seed) for _ in range(num_levels)]
    partial = crops  # shared by every level when the whole composition runs on the device
    if head:
        partial = torch.stack([apply_composition(crops, head, level, g, style) for level, g in enumerate(generators)])
    return PendingDegradation(partial, tail, [g.get_state() for g in generators], style), cursor


def collate_degraded(samples: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, int]:
    """
    Stacks the readable samples.

    Args:
        samples (`list`): `(levels, 2, 3, crop, crop)` tensors, `None` for an unreadable image.

    Returns:
        `tuple`: the `(batch, levels, 2, 3, crop, crop)` stack of the readable samples (`None` when there is none)
        and the number of unreadable ones.
    """
    good = [sample for sample in samples if sample is not None]
    return (torch.stack(good) if good else None), len(samples) - len(good)


def overlapping_crops(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """
    Two random `size` x `size` crops that overlap by at least half their side in each direction (the second is the
    first shifted by at most `size // 2`). Images smaller than the crop are upscaled (bicubic, antialiased).

    Args:
        image (`torch.Tensor` of shape `(3, height, width)`): A float image in [0, 1].
        size (`int`): Side of the crops, in pixels.
        generator (`torch.Generator`): The source of the random positions.

    Returns:
        `torch.Tensor` of shape `(2, 3, size, size)`: the two crops, in [0, 1].
    """
    height, width = image.shape[-2:]
    if min(height, width) < size:
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
        image = torch.nn.functional.interpolate(image[None], size=new_size, mode="bicubic", antialias=True)[0]
        image = image.clamp(0, 1)
        height, width = new_size

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    top, left = randint(0, height - size), randint(0, width - size)
    shift = size // 2
    top2 = min(max(top + randint(-shift, shift), 0), height - size)
    left2 = min(max(left + randint(-shift, shift), 0), width - size)
    return torch.stack(
        [image[:, top : top + size, left : left + size], image[:, top2 : top2 + size, left2 : left2 + size]]
    )


def _decode(image: dict) -> torch.Tensor:
    source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
    with Image.open(source) as pil:
        array = np.array(to_viewable_rgb(pil))
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def _mix(*values: int) -> int:
    return zlib.crc32(",".join(map(str, values)).encode())
