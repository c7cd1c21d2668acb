"""The speed layer (`qualiclip_hf.backends.fusion.fuse_for_inference`) against the model as loaded, on the CPU or a GPU.

    python -m benchmarks.fusion_throughput [--sizes 224x224 512x384] [--batches 8] [--repeats 3]

Our RN50 (random weights with non-trivial BatchNorms: this measures speed, not quality) as loaded, with its
BatchNorms folded into the convolutions, and folded plus CPU chunking, timed in alternation on the same tensors so
that a change of machine load hits all three alike; each figure is the median of `--repeats`. The last column is the
largest score difference against the model as loaded. `qualiclip score` uses the fused model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch

from benchmarks.model_throughput import timed
from qualiclip_hf import QualiCLIPConfig, QualiCLIPModel
from qualiclip_hf.backends.fusion import fuse_for_inference
from qualiclip_hf.backends.precision import cpu_description


def fusion_table(args: argparse.Namespace, device: torch.device) -> None:
    """Our RN50 as loaded vs fused (BN folded) vs fused and chunked, timed in alternation on the same tensors."""
    torch.manual_seed(0)
    plain = QualiCLIPModel(QualiCLIPConfig()).eval().to(device)
    with torch.no_grad():  # non-trivial BatchNorms, as in a trained model
        for module in plain.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_var.uniform_(0.5, 1.5)
    variants = {
        "as loaded": plain,
        "BN folded": fuse_for_inference(copy.deepcopy(plain), cpu_chunk_pixels=None),
        "BN folded + CPU chunks": fuse_for_inference(copy.deepcopy(plain)),
    }
    names = list(variants)
    print("| size (WxH) | batch | " + " | ".join(f"{name} img/s" for name in names) + " | folded / as loaded "
          "| folded+chunks / as loaded | max score diff |")  # fmt: skip
    print("| --- | ---: |" + " ---: |" * (len(names) + 3))
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        for batch in args.batches:
            images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch)).to(device)
            times: dict[str, list[float]] = {name: [] for name in names}
            with torch.inference_mode():
                scores = {name: model(images).quality_score.cpu() for name, model in variants.items()}  # warm-up
                for _ in range(args.repeats):
                    for name, model in variants.items():
                        times[name].append(timed(model, images))
            rates = {name: batch / statistics.median(times[name]) for name in names}
            diff = max((scores[name] - scores["as loaded"]).abs().max().item() for name in names)
            print(
                f"| {size} | {batch} | " + " | ".join(f"{rates[name]:.3g}" for name in names)
                + f" | {rates['BN folded'] / rates['as loaded']:.2f}x"
                + f" | {rates['BN folded + CPU chunks'] / rates['as loaded']:.2f}x | {diff:.1e} |",
                flush=True,
            )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["224x224", "512x384"], help="WxH")
    parser.add_argument("--batches", nargs="+", type=int, default=[8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"# {cpu_description()}; load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}")
    fusion_table(args, torch.device(args.device))


if __name__ == "__main__":
    main()
