"""Score drift of each fast path against float32: max |score difference| and SRCC, on two models and ~200 images.

    python benchmarks/precision.py [--max-size 384] [--formats bf16 fp16 int8 onnx-fp32 bf16-autocast]

Images (the same for both models): the README's example photos (`examples/images`), scikit-image's photos that the
demo model never saw in training (`training/prepare_demo_data.py`'s held-out set), and each of those held-out photos
under every distortion of `training/degradations.py` at levels 1 and 3 (of 0-4): 4 + 4 x 24 x 2 + 6 = 202 images,
scored one at a time, longest side at most `--max-size`.

Models:

- `demo`: the small model embedded in the package (trained here; not the real QualiCLIP);
- `rn50-random`: the full RN50 image tower in the official layout, loaded through the converter, with random
  weights and random BatchNorm statistics (as the parity tests make them), so that its scores spread over [0, 1];
  random weights: this measures rounding, not quality.

Fast paths, each against the float32 PyTorch scores of the same model: `bf16` / `fp16` (`qualiclip_hf.precision.
reduce_precision`: BatchNorms folded in float32, convolutions in that dtype, attention pool and head in float32),
`int8` (ONNX Runtime static quantization, calibrated on the example photos: `qualiclip_hf.quantization`),
`onnx-fp32` (the exported graph in ONNX Runtime) and `bf16-autocast` (`torch.autocast` over the whole model, for
comparison). The bar `auto` applies (`qualiclip_hf.precision.DRIFT_BAR`): SRCC >= 0.999 and max diff <= 0.01 on both
models. SRCC is `scipy.stats.spearmanr`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage import data as skimage_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qualiclip_hf import QualiCLIPModel, QualiCLIPProcessor  # noqa: E402
from qualiclip_hf.export import OnnxQualiCLIP, export_onnx  # noqa: E402
from qualiclip_hf.loading import DEMO_MODEL_PATH  # noqa: E402
from qualiclip_hf.precision import DRIFT_BAR, cpu_description, reduce_precision  # noqa: E402
from qualiclip_hf.quantization import default_calibration_images, quantize_onnx  # noqa: E402
from qualiclip_hf.scoring import read_image  # noqa: E402
from training.degradations import ALL_DISTORTIONS, apply_distortion  # noqa: E402
from training.prepare_demo_data import HELDOUT, SKIMAGE_PHOTOS  # noqa: E402

FORMATS = ("bf16", "fp16", "int8", "onnx-fp32", "bf16-autocast")
LEVELS = (1, 3)


def drift_images(max_size: int) -> list[tuple[str, torch.Tensor]]:
    """`(name, (3, H, W) uint8)` for the examples, the held-out photos and their degraded versions."""
    images = [(path.name, read_image(path)) for path in default_calibration_images()]
    generator = torch.Generator().manual_seed(0)
    for name in (name for name in SKIMAGE_PHOTOS if name in HELDOUT):
        photo = torch.from_numpy(np.asarray(getattr(skimage_data, name)())).permute(2, 0, 1)[:3]
        scale = min(1.0, max_size / max(photo.shape[1:]))
        size = [round(side * scale) for side in photo.shape[1:]]
        pristine = torch.nn.functional.interpolate(photo[None].float() / 255, size=size, mode="area", antialias=False)
        images.append((name, (pristine[0] * 255).round().to(torch.uint8)))
        for distortion in ALL_DISTORTIONS:
            for level in LEVELS:
                degraded = apply_distortion(pristine, distortion, level, generator)
                images.append((f"{name}/{distortion.name}/{level}", (degraded[0] * 255).round().to(torch.uint8)))
    return images


def rn50_random(workdir: Path) -> Path:
    from model_throughput import official_rn50_folder  # needs openai-clip, as that benchmark does

    return official_rn50_folder(workdir, random_statistics=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-size", type=int, default=384, help="longest side the images are scored at")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# CPU: {cpu_description()}")
    print(f"# load average before: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    images = drift_images(args.max_size)
    print(f"# {len(images)} images, longest side <= {args.max_size}\n")
    print(
        "| model | path | images | fp32 score range (min / median / max) | max abs diff | mean abs diff | SRCC "
        "| meets bar |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as workdir:
        folders = {"demo": DEMO_MODEL_PATH, "rn50-random": rn50_random(Path(workdir))}
        for name, folder in folders.items():
            model = QualiCLIPModel.from_pretrained(folder).eval()
            processor = QualiCLIPProcessor.from_pretrained(folder)
            inputs = [processor(images=[image], return_tensors="pt", max_size=args.max_size) for _, image in images]
            reference = score_all(model, inputs)
            spread = f"{reference.min():.3f} / {np.median(reference):.3f} / {reference.max():.3f}"
            for fmt in args.formats:
                scorer = fast_path(fmt, model, processor, Path(workdir) / name)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fmt == "bf16-autocast"):
                    scores = score_all(scorer, inputs)
                diff = np.abs(scores - reference)
                srcc = spearmanr(reference, scores).statistic
                meets = srcc >= DRIFT_BAR["min_srcc"] and diff.max() <= DRIFT_BAR["max_abs_diff"]
                print(
                    f"| {name} | {fmt} | {len(images)} | {spread} | {diff.max():.4f} | {diff.mean():.4f} "
                    f"| {srcc:.5f} | {'yes' if meets else 'no'} |",
                    flush=True,
                )
    print(f"\n# load average after: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")


def fast_path(fmt: str, model: QualiCLIPModel, processor: QualiCLIPProcessor, workdir: Path):
    if fmt in ("bf16", "fp16"):
        return reduce_precision(copy.deepcopy(model), {"bf16": torch.bfloat16, "fp16": torch.float16}[fmt])
    if fmt == "bf16-autocast":
        return model
    fp32_path = export_onnx(model, workdir, processor)
    if fmt == "onnx-fp32":
        return OnnxQualiCLIP(fp32_path)
    return OnnxQualiCLIP(quantize_onnx(fp32_path, workdir / "model_int8.onnx", default_calibration_images(), processor))


@torch.inference_mode()
def score_all(scorer, inputs: list) -> np.ndarray:
    return np.array([scorer(**batch).quality_score.float().item() for batch in inputs])


if __name__ == "__main__":
    main()
