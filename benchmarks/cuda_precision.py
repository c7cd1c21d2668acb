"""`--precision auto` and the throughput of each number format on a CUDA GPU, side by side in one run.

    python -m benchmarks.cuda_precision [--sizes 512x384 1024x768] [--batches 1 8 32] [--repeats 10]

For two models, the demo model and a full-size RN50 QualiCLIP with RANDOM weights (BatchNorm statistics randomised so
that scores spread over the probe set; no real weights exist offline): `auto_precision.choose_precision`'s table on
this GPU (the probe set, one image at a time, as `--precision auto` measures), then images/s of fp32 (the fused
scorer), bf16 and fp16 (`prepare_scorer`, as `qualiclip score --precision P` prepares them) on random pixels at each
size and batch, timed alternately after warm-up, with `torch.cuda.synchronize`. Random-weight figures are speed, and
drift of random weights; they say nothing of the real weights' drift.
"""

from __future__ import annotations

import argparse
import time

import torch

from qualiclip_hf import QUALICLIP_PROMPT_PAIRS, QualiCLIPConfig, QualiCLIPModel
from qualiclip_hf.backends.auto_precision import choose_precision
from qualiclip_hf.backends.precision import prepare_scorer
from qualiclip_hf.build_processor import make_processor
from qualiclip_hf.loading import load_model_and_processor

FORMATS = ("fp32", "bf16", "fp16")


def random_rn50(device: str) -> tuple[QualiCLIPModel, object]:
    """The official RN50 layout with random weights and random BatchNorm statistics (so that scores spread)."""
    torch.manual_seed(0)
    processor = make_processor()
    model = QualiCLIPModel(QualiCLIPConfig()).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
    model.set_prompts(QUALICLIP_PROMPT_PAIRS, processor.tokenizer)
    return model.to(device), processor


def images_per_second(scorer: object, pixels: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            scorer(pixel_values=pixels)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            scorer(pixel_values=pixels)
        torch.cuda.synchronize()
    return repeats * pixels.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["512x384", "1024x768"], help="WIDTHxHEIGHT")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    models = {"demo": load_model_and_processor("demo", "cuda"), "rn50 (random weights)": random_rn50("cuda")}
    for name, (model, processor) in models.items():
        verdict = choose_precision(model, processor, "torch", fuse=True, progress=False)
        print(f"\n{name}: auto chose {verdict.chosen}\n{verdict.table()}")
    print("\n| model | size | batch | " + " | ".join(f"{f} img/s" for f in FORMATS) + " | bf16 / fp32 | fp16 / fp32 |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in FORMATS) + " | ---: | ---: |")
    for name, (model, processor) in models.items():
        scorers = {fmt: prepare_scorer(model, processor, fmt, fuse=True)[0] for fmt in FORMATS}
        for size in args.sizes:
            width, height = (int(side) for side in size.split("x"))
            for batch in args.batches:
                pixels = torch.rand(batch, 3, height, width, device="cuda")
                rates = {fmt: images_per_second(scorers[fmt], pixels, args.repeats) for fmt in FORMATS}
                cells = " | ".join(f"{rates[fmt]:.0f}" for fmt in FORMATS)
                ratios = f"{rates['bf16'] / rates['fp32']:.2f}x | {rates['fp16'] / rates['fp32']:.2f}x"
                print(f"| {name} | {size} | {batch} | {cells} | {ratios} |")


if __name__ == "__main__":
    main()
