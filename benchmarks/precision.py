"""Score drift of each fast path against float32: max |score difference| and SRCC, on two models and ~200 images;
with `--auto`, what `--precision auto` chooses for each model and how fast it then runs beside pyiqa's QualiCLIP.

    python -m benchmarks.precision [--max-size 384] [--paths torch/bf16 openvino/bf16 ...] [--models demo rn50-spread]
    python -m benchmarks.precision --auto [--backends torch openvino] [--device cpu|cuda] [--speed-size 512x384]
                                      [--repeats 5] [--models demo rn50-spread]

Images (the same for both models): the README's example photos (`examples/images`), scikit-image's photos that the
demo model never saw in training (`training/prepare_demo_data.py`'s held-out set), and each of those held-out photos
under every distortion of `training/degradations.py` at levels 1 and 3 (of 0-4): 6 + 4 x (1 + 24 x 2) = 202 images,
scored one at a time, longest side at most `--max-size`.

Models:

- `demo`: the small model embedded in the package (trained here; not the real QualiCLIP);
- `rn50-spread`: the full RN50 image tower in the official layout, loaded through the converter, with random
  weights and BatchNorm statistics, and prompts fitted so that its scores spread over [0, 1] (`rn50_spread`);
  random weights: this measures rounding, not quality;
- any model folder, e.g. the official weights converted by `qualiclip convert`.

Fast paths, `backend/precision`, each exactly as `qualiclip score --backend B --precision P` prepares it
(`qualiclip_hf.backends.precision.prepare_scorer`), against the float32 PyTorch scores of the same model. A backend
that is not installed is reported, not run. The bar is the one `auto` applies, per model, on the package's probe set
(`qualiclip_hf.backends.precision.DRIFT_BAR`): SRCC >= 0.999 and max diff <= 0.01. SRCC is `scipy.stats.spearmanr`.

`--auto`: for each model and backend, `qualiclip_hf.backends.auto_precision.choose_precision` measured afresh (the
package's probe set, as on first use; how long it took is printed) and its table; then, at batch 1 on one random
image of `--speed-size`, timed in alternation (median of `--repeats`): pyiqa's own QualiCLIP arch (RN50, random
weights in the official layout: its speed does not depend on the weights' values), our fp32 (`qualiclip score
--precision fp32`) and our `auto` with each backend, as images/s and as ratios to pyiqa's and to our fp32. On CUDA
(`--device cuda`) only the torch backend runs (fp16/bf16); the ONNX runtimes run on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage import data as skimage_data

from benchmarks.model_throughput import _cache_in
from qualiclip_hf import QualiCLIPModel, QualiCLIPProcessor
from qualiclip_hf.backends.precision import DRIFT_BAR, cpu_description, prepare_scorer
from qualiclip_hf.backends.quantization import default_calibration_images
from qualiclip_hf.loading import BACKENDS, DEMO_MODEL_PATH
from qualiclip_hf.scoring import choose_thread_counts, read_image
from training.degradations import ALL_DISTORTIONS, apply_distortion
from training.prepare_demo_data import HELDOUT, SKIMAGE_PHOTOS

# Each fast path is `backend/precision`, as `qualiclip score --backend B --precision P` runs it (`prepare_scorer`);
# `torch/bf16-autocast` (autocast over the whole model) is there for comparison only.
PATHS = (
    "torch/bf16",
    "torch/fp16",
    "onnxruntime/fp32",
    "onnxruntime/int8",
    "openvino/fp32",
    "openvino/bf16",
    "openvino/int8",
    "torch/bf16-autocast",
)
MODELS = ("demo", "rn50-spread")
LEVELS = (1, 3)
# The standard deviation of each prompt pair's logit difference over the fitting images of `rn50_spread`: a pair's
# softmax then ranges over about [0.05, 0.95] for most images, as the scores of a trained QualiCLIP do.
FITTED_LOGIT_STD = 3.0


def photo(name: str, max_size: int) -> torch.Tensor:
    """A scikit-image photo as `(1, 3, H, W)` float in [0, 1], longest side at most `max_size`."""
    image = torch.from_numpy(np.asarray(getattr(skimage_data, name)())).permute(2, 0, 1)[:3]
    scale = min(1.0, max_size / max(image.shape[1:]))
    size = [round(side * scale) for side in image.shape[1:]]
    return torch.nn.functional.interpolate(image[None].float() / 255, size=size, mode="area")


def degraded_set(names: list[str], levels: tuple[int, ...], max_size: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """`(name, (3, H, W) uint8)` for each photo of `names` and its versions under every distortion at `levels`."""
    images = []
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        pristine = photo(name, max_size)
        images.append((name, (pristine[0] * 255).round().to(torch.uint8)))
        for distortion in ALL_DISTORTIONS:
            for level in levels:
                degraded = apply_distortion(pristine, distortion, level, generator)
                images.append((f"{name}/{distortion.name}/{level}", (degraded[0] * 255).round().to(torch.uint8)))
    return images


def drift_images(max_size: int) -> list[tuple[str, torch.Tensor]]:
    """The example photos, the held-out photos and their degraded versions (levels 1 and 3)."""
    examples = [(path.name, read_image(path)) for path in default_calibration_images()]
    heldout = [name for name in SKIMAGE_PHOTOS if name in HELDOUT]
    return examples + degraded_set(heldout, LEVELS, max_size, seed=0)


def fitting_images(max_size: int) -> list[tuple[str, torch.Tensor]]:
    """Photos disjoint from `drift_images`: the demo data's training photos, degraded at levels 0, 2 and 4."""
    return degraded_set([name for name in SKIMAGE_PHOTOS if name not in HELDOUT], (0, 2, 4), max_size, seed=1)


def rn50_spread(workdir: Path, max_size: int, measured: list[tuple[str, torch.Tensor]]) -> Path:
    """
    The RN50 image tower in the official layout (random weights, converted from the official checkpoint layout), its
    BatchNorm statistics measured on `fitting_images` (disjoint from the drift images) and its prompt embeddings
    fitted to its own image embeddings, so that the scores of the `measured` images spread over [0, 1] as a trained
    model's would; saved to `workdir/rn50-spread`.

    With random statistics and prompts every image scores nearly the same (0.653-0.655 in an earlier run): the image
    embeddings hardly differ, and not along the prompts. Here every prompt pair is the same (p, n), built so that
    the logit difference is proportional to an image's coordinate along the direction from the pristine fitting
    photos' mean embedding to that of their most degraded versions (the score axis, learned from other photos), with
    its offset and scale set on the `measured` images (median at score 0.5, logit standard deviation
    `FITTED_LOGIT_STD` at the model's logit scale): scores centred on the steep middle of the softmax, where rounding
    moves them most. It measures how rounding moves scores that vary as much as a real model's do; it says nothing
    about quality.
    """
    from benchmarks.model_throughput import official_rn50_folder  # needs openai-clip, as that benchmark does

    folder = official_rn50_folder(workdir, random_statistics=True)
    model = QualiCLIPModel.from_pretrained(folder).eval()
    processor = QualiCLIPProcessor.from_pretrained(folder)
    fitting = fitting_images(max_size)
    names = [name for name, _ in fitting]
    # BatchNorm statistics of the fitting images themselves, as training sets them: with random statistics every
    # image gets nearly the same embedding (cosine 0.99998 between any two), with these 0.47-1.0, as CLIP's are.
    batch_norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    for module in batch_norms:
        module.reset_running_stats()
        module.momentum = None  # a plain average over the images
        module.train()
    with torch.no_grad():
        for _, image in fitting:
            model(**processor(images=[image], return_tensors="pt", max_size=max_size))
    model.eval()

    def embed(images: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat(
                [
                    model(**processor(images=[image], return_tensors="pt", max_size=max_size)).image_embeds
                    for _, image in images
                ]
            ).double()

    embeds, measured_embeds = embed(fitting), embed(measured)
    mean = embeds.mean(dim=0)
    mean = mean / mean.norm()
    # The direction from the pristine photos' mean embedding to that of their most degraded versions (level 4), made
    # orthogonal to the mean: like a trained model's quality axis, it separates clean from distorted pictures.
    degraded = torch.tensor([name.endswith("/4") for name in names])
    direction = embeds[~degraded].mean(dim=0) - embeds[degraded].mean(dim=0)
    direction = direction - (direction @ mean) * mean
    direction = direction / direction.norm()
    # The pair (p, n) = normalize(c ± k w / 2) with w = direction - g * mean and c = normalize(mean + g * direction)
    # (so c is orthogonal to w) gives the logit difference scale * K * (x . w), K = k / sqrt(1 + k^2 |w|^2 / 4):
    # g centres it on 0 over the measured images (median score 0.5), K sets its standard deviation over them to
    # FITTED_LOGIT_STD.
    g = (measured_embeds @ direction).median() / (measured_embeds @ mean).median()
    w = direction - g * mean
    c = (mean + g * direction) / (mean + g * direction).norm()
    gain = FITTED_LOGIT_STD / (model.config.logit_scale * (measured_embeds @ w).std())
    k = gain / (1 - gain**2 * (w @ w) / 4) ** 0.5
    positive, negative = c + k * w / 2, c - k * w / 2
    prompts = [positive, negative] * model.config.num_prompt_pairs
    distance = (positive / positive.norm() - negative / negative.norm()).norm().item()
    print(f"# rn50-spread: fitted prompt pair |p - n| = {distance:.3f} (the demo model's pairs: 0.14-1.28)")
    with torch.no_grad():
        model.prompt_embeds.copy_(torch.nn.functional.normalize(torch.stack(prompts), dim=-1).float())
    model.save_pretrained(workdir / "rn50-spread")
    processor.save_pretrained(workdir / "rn50-spread")
    return workdir / "rn50-spread"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-size", type=int, default=384, help="longest side the images are scored at")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="fast paths to compare")
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        help="'demo', 'rn50-spread', or a model folder (e.g. the official weights after `qualiclip convert`)",
    )
    parser.add_argument("--auto", action="store_true", help="what --precision auto chooses, and its speed vs pyiqa")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["torch", "openvino"], help="with --auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="with --auto")
    parser.add_argument("--speed-size", default="512x384", help="with --auto: WIDTHxHEIGHT of the timed image")
    parser.add_argument("--repeats", type=int, default=5, help="with --auto: timed forwards per variant (median)")
    parser.add_argument(
        "--threads", type=int, help="PyTorch threads (default: as `qualiclip score` chooses, the cores not busy)"
    )
    args = parser.parse_args()
    # As `qualiclip score` runs: on a busy machine torch's default of one thread per core collapses (measured here at
    # load 12 on 2 cores, the demo model: 8.6 images/s with 1 thread, 0.97 with 2).
    torch.set_num_threads(args.threads or choose_thread_counts()[1])
    for name in args.models:
        if name not in MODELS and not Path(name, "config.json").is_file():
            parser.error(f"--models: {name!r} is neither {' nor '.join(MODELS)} nor a model folder")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# CPU: {cpu_description()}")
    print(f"# load average before: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    if args.auto:
        auto_main(args)
        print(f"\n# load average after: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
        return
    images = drift_images(args.max_size)
    print(f"# {len(images)} images, longest side <= {args.max_size}\n")
    print(
        "| model | path | images | fp32 score range (min / median / max) | max abs diff | mean abs diff | SRCC "
        "| meets bar |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as workdir, _cache_in(Path(workdir) / "cache"):
        for name in args.models:
            folder = model_folder(name, Path(workdir), args.max_size)
            processor = QualiCLIPProcessor.from_pretrained(folder)
            inputs = [processor(images=[image], return_tensors="pt", max_size=args.max_size) for _, image in images]
            reference = score_all(QualiCLIPModel.from_pretrained(folder).eval(), inputs)
            spread = f"{reference.min():.3f} / {np.median(reference):.3f} / {reference.max():.3f}"
            for path in args.paths:
                scorer = fast_path(path, QualiCLIPModel.from_pretrained(folder).eval(), processor)
                if scorer is None:
                    print(f"| {name} | {path} | - | {spread} | - | - | - | not run: {path.split('/')[0]} missing |")
                    continue
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "torch/bf16-autocast"):
                    scores = score_all(scorer, inputs)
                diff = np.abs(scores - reference)
                srcc = spearmanr(reference, scores).statistic
                meets = srcc >= DRIFT_BAR["min_srcc"] and diff.max() <= DRIFT_BAR["max_abs_diff"]
                print(
                    f"| {name} | {path} | {len(images)} | {spread} | {diff.max():.4f} | {diff.mean():.4f} "
                    f"| {srcc:.5f} | {'yes' if meets else 'no'} |",
                    flush=True,
                )
    print(f"\n# load average after: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")


def model_folder(name: str, workdir: Path, max_size: int) -> Path:
    """The folder of `name`: the demo model, `rn50-spread` (built in `workdir`), or a model folder."""
    if name == "demo":
        return DEMO_MODEL_PATH
    if name == "rn50-spread":
        return rn50_spread(workdir, max_size, drift_images(max_size))
    return Path(name)


def auto_main(args: argparse.Namespace) -> None:
    """`--auto`: each model's verdict per backend, then auto's speed beside pyiqa's and our fp32 at batch 1."""
    from model_throughput import _normalising as normalising
    from model_throughput import build_both, timed

    from pyiqa_plugin.qualiclip_arch import QualiCLIPHF
    from qualiclip_hf.backends.auto_precision import choose_precision

    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name(device)}")
    width, height = map(int, args.speed_size.split("x"))
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    summary = []
    with tempfile.TemporaryDirectory() as workdir, _cache_in(Path(workdir) / "cache"):
        # pyiqa's arch on random RN50 weights in the official layout: the reference speed for every model.
        theirs, _ = build_both(Path(workdir), args.device)
        for name in args.models:
            folder = model_folder(name, Path(workdir), args.max_size)
            model = QualiCLIPModel.from_pretrained(folder).eval().to(device)
            processor = QualiCLIPProcessor.from_pretrained(folder)
            wrapper = QualiCLIPHF(pretrained_model_name_or_path=str(folder)).eval().to(device)
            fp32, _ = prepare_scorer(copy.deepcopy(model), processor, "fp32", "torch", fuse=True)
            variants = {"pyiqa fp32 (RN50)": theirs, "ours fp32": normalising(fp32, wrapper)}
            for backend in args.backends:
                if backend != "torch" and device.type != "cpu":
                    continue
                started = time.perf_counter()
                try:
                    verdict = choose_precision(model, processor, backend, fuse=True, remeasure=True, progress=True)
                except ImportError as error:
                    print(f"\n# {name}, --backend {backend}: not run ({error})")
                    continue
                print(f"\n### {name}, --backend {backend}: the first `auto` took {time.perf_counter() - started:.0f} s")
                print(f"\n{verdict.table()}\n\n{verdict.line()}", flush=True)
                scorer, chosen = prepare_scorer(copy.deepcopy(model), processor, verdict.chosen, backend, fuse=True)
                variants[f"{backend}/auto ({chosen})"] = normalising(scorer, wrapper)
            with torch.inference_mode():
                for variant in variants.values():
                    variant(image)  # warm-up
                times: dict[str, list[float]] = {variant: [] for variant in variants}
                for _ in range(args.repeats):
                    for variant, run in variants.items():
                        times[variant].append(timed(run, image))
            rates = {variant: 1 / float(np.median(values)) for variant, values in times.items()}
            for variant, rate in rates.items():
                summary.append(
                    f"| {name} | {variant} | {rate:.3g} | {rate / rates['pyiqa fp32 (RN50)']:.2f}x "
                    f"| {rate / rates['ours fp32']:.2f}x |"
                )
    print(f"\n### Speed at batch 1, {args.speed_size}, {device.type}, median of {args.repeats}, in alternation\n")
    print("| model | variant | images/s | vs pyiqa | vs ours fp32 |\n| --- | --- | ---: | ---: | ---: |")
    print("\n".join(summary))


def fast_path(path: str, model: QualiCLIPModel, processor: QualiCLIPProcessor):
    """The scorer `qualiclip score --backend B --precision P` would use for `path` = "B/P" (None: B not installed)."""
    backend, precision = path.split("/")
    if precision == "bf16-autocast":
        return model
    try:
        return prepare_scorer(model, processor, precision, backend)[0]
    except ImportError:
        return None


@torch.inference_mode()
def score_all(scorer, inputs: list) -> np.ndarray:
    return np.array([scorer(**batch).quality_score.float().item() for batch in inputs])


if __name__ == "__main__":
    main()
