"""Training-side throughput, measured side by side in one run.

    python -m benchmarks.training_throughput [--batch 64] [--crop 224] [--steps 10]

1. Degraded crops per second for each of the 24 distortions: CPU (all cores) vs the GPU, same batch, with the
   ratio. The two codecs (JPEG, JPEG2000) run through Pillow on the CPU in both cases.
2. QualiCLIP training steps on the GPU (RN50 image tower, bf16 autocast, channels_last): images/s (one image =
   2 crops x 5 levels) and where a step's time goes (forward, backward, optimizer), from CUDA events.
Without CUDA, only the CPU column of (1) is printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from qualiclip_hf import QualiCLIPConfig, QualiCLIPModel
from training.degradations import ALL_DISTORTIONS, apply_distortion
from training.losses import QualiCLIPLossWeights, qualiclip_losses


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def crops_per_second(name: str, images: torch.Tensor, repeats: int) -> float:
    device = images.device.type
    apply_distortion(images, name, 2, torch.Generator().manual_seed(0))  # warm-up (kernels, caches)
    _sync(device)
    started = time.perf_counter()
    for repeat in range(repeats):
        apply_distortion(images, name, 2, torch.Generator().manual_seed(repeat))
    _sync(device)
    return repeats * images.shape[0] / (time.perf_counter() - started)


def degradation_table(batch: int, crop: int, repeats: int) -> None:
    images = torch.rand(batch, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    gpu = torch.cuda.is_available()
    print(f"\n## Degraded crops/s, batch {batch} x {crop}px, level 3 (CPU: {torch.get_num_threads()} threads)\n")
    print("| distortion | CPU crops/s | GPU crops/s | GPU / CPU |\n| --- | ---: | ---: | ---: |")
    for distortion in ALL_DISTORTIONS:
        cpu_rate = crops_per_second(distortion.name, images, repeats)
        if gpu:
            gpu_rate = crops_per_second(distortion.name, images.cuda(), repeats)
            print(f"| {distortion.name} | {cpu_rate:,.0f} | {gpu_rate:,.0f} | {gpu_rate / cpu_rate:.1f}x |")
        else:
            print(f"| {distortion.name} | {cpu_rate:,.0f} | - | - |")


def training_steps(batch: int, crop: int, steps: int) -> None:
    model = QualiCLIPModel(QualiCLIPConfig()).cuda().train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.vision_model.parameters(), lr=1e-5)
    crops = torch.rand(batch * 10, 3, crop, crop, device="cuda").contiguous(memory_format=torch.channels_last)
    weights = QualiCLIPLossWeights()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    timings = []
    for step in range(steps + 2):
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            embeds = model(pixel_values=crops).image_embeds.float()
        similarities = (embeds @ model.prompt_embeds.T).view(batch, 5, 2, -1, 2)
        loss = qualiclip_losses(similarities, weights)["loss"]
        events[1].record()
        loss.backward()
        events[2].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events[3].record()
        torch.cuda.synchronize()
        if step >= 2:  # the first steps pay for cuDNN autotuning and allocation
            timings.append([events[i].elapsed_time(events[i + 1]) for i in range(3)])
    forward, backward, optim = (sum(t[i] for t in timings) / len(timings) for i in range(3))
    total = forward + backward + optim
    print(f"\n## Training steps on the GPU: RN50 image tower, {batch} images x 10 crops of {crop}px, bf16\n")
    print(f"- {1000 * batch / total:,.0f} images/s ({1000 * batch * 10 / total:,.0f} crops/s), {total:.1f} ms/step")
    print(f"- forward + loss {forward:.1f} ms ({forward / total:.0%}), backward {backward:.1f} ms "
          f"({backward / total:.0%}), optimizer {optim:.1f} ms ({optim / total:.0%})")  # fmt: skip
    print(f"- peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"# torch {torch.__version__}, {device}, {time.strftime('%Y-%m-%d')}")
    degradation_table(args.batch, args.crop, args.repeats)
    if torch.cuda.is_available():
        training_steps(args.train_batch, args.crop, args.steps)


if __name__ == "__main__":
    main()
