"""How far reduced precision moves QualiCLIP's scores: autocast bf16/fp16 and half-precision weights vs float32.

    python benchmarks/precision.py [--device cpu|cuda] [--max-size 1024]

Scores the README's example photos (`examples/images`, a pristine photo and its blurred, noisy and JPEG-compressed
versions among them) with two models, in float32 and in each reduced precision, and prints the largest and the mean
absolute score difference:

- `demo`: the small model embedded in the package (trained here; not the real QualiCLIP);
- `rn50-random`: the full RN50 architecture with random weights in the official layout (as model_throughput.py
  builds them), loaded through the converter.

On a CPU without native bf16/fp16 (this project's machine) autocast emulates the rounding, so the differences
printed there are an estimate of a GPU's; speed is for model_throughput.py on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qualiclip_hf import QualiCLIPModel, QualiCLIPProcessor
from qualiclip_hf.loading import DEMO_MODEL_PATH

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.jpg"))
REDUCED = {
    "bf16 autocast": ("autocast", torch.bfloat16),
    "fp16 autocast": ("autocast", torch.float16),
    "bf16 weights": ("weights", torch.bfloat16),
    "fp16 weights": ("weights", torch.float16),
}


@torch.inference_mode()
def score(
    model: QualiCLIPModel, inputs: dict, how: str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    if how == "weights":
        # A copy: casting back to float32 would not undo the rounding of the weights.
        model = copy.deepcopy(model).to(dtype)
    with torch.autocast(model.device.type, dtype=dtype, enabled=how == "autocast"):
        return model(**inputs).quality_score.float().cpu()


def random_rn50(workdir: Path, device: str) -> QualiCLIPModel:
    from model_throughput import build_both  # needs pyiqa and openai-clip, as that benchmark does

    _, ours = build_both(workdir, device)
    return ours.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-size", type=int, default=1024, help="longest side the photos are scored at")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {where}, {time.strftime('%Y-%m-%d')}; {len(EXAMPLES)} photos\n")
    processor = QualiCLIPProcessor.from_pretrained(DEMO_MODEL_PATH)
    inputs = processor(images=[str(path) for path in EXAMPLES], return_tensors="pt", max_size=args.max_size)
    inputs = inputs.to(args.device)
    print("| model | fp32 scores | precision | max score diff | mean score diff |")
    print("| --- | --- | --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as workdir:
        models = {
            "demo": lambda: QualiCLIPModel.from_pretrained(DEMO_MODEL_PATH),
            "rn50-random": lambda: random_rn50(Path(workdir), args.device),
        }
        for name, build in models.items():
            model = build().to(args.device).eval()
            reference = score(model, inputs)
            shown = " ".join(f"{value:.4f}" for value in reference.tolist())
            for label, (how, dtype) in REDUCED.items():
                diff = (score(model, inputs, how, dtype) - reference).abs()
                largest, mean = diff.max().item(), diff.mean().item()
                print(f"| {name} | {shown} | {label} | {largest:.1e} | {mean:.1e} |", flush=True)


if __name__ == "__main__":
    main()
