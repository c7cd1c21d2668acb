"""Model throughput: pyiqa's built-in QualiCLIP arch vs ours in each precision, same RN50 weights, same tensors.

    python -m benchmarks.model_throughput [--sizes 512x384 1024x768] [--batches 1 8] [--repeats 3]
                                          [--variants torch/auto openvino/bf16 ...] [--competing-load]

The weights are random, in the official layout (no real weights exist offline): this measures speed, not quality.
pyiqa's download is bypassed exactly as in tests/test_pyiqa_plugin.py (its cache points to a temporary folder, its
CLIP loader to a TorchScript archive of openai-clip's CLIP). Every variant takes the same [0, 1] tensors under
`torch.inference_mode()` with pyiqa's score formula:

- `pyiqa fp32`: pyiqa's own arch; `ours fp32`: ours through the pyiqa plugin (`QualiCLIPHF`), float32;
- `backend/precision`: `qualiclip score --backend B --precision P` (`qualiclip_hf.backends.precision.prepare_scorer`):
  `torch/bf16` is stages 2-4 of the tower in bfloat16 (`reduce_precision`), `onnxruntime/*` and `openvino/*` the
  exported graph (int8: the ONNX Runtime-quantized graph) in that runtime, `*/auto` what `--precision auto` picks
  on this machine with that backend. A runtime that is not installed is reported as skipped.

The variants are timed in alternation, `--repeats` times each, and each figure is the median, so that a change of
machine load hits all alike. `--competing-load` runs one CPU-bound process (a busy loop) beside the whole run. The
CPU model, its ISA and the load average are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pyiqa.archs import clip_model as pyiqa_clip_model
from pyiqa.archs import qualiclip_arch as pyiqa_qualiclip_arch
from pyiqa.utils import download_util

from pyiqa_plugin.qualiclip_arch import QualiCLIPHF
from qualiclip_hf import QUALICLIP_PROMPT_PAIRS, QualiCLIPProcessor
from qualiclip_hf.backends.precision import cpu_description
from qualiclip_hf.convert_qualiclip_checkpoint import convert_checkpoint
from qualiclip_hf.loading import OFFICIAL_FILENAME

VARIANTS = (
    "torch/auto",
    "torch/bf16",
    "onnxruntime/fp32",
    "onnxruntime/int8",
    "openvino/auto",
    "openvino/fp32",
    "openvino/bf16",
    "openvino/int8",
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP


def official_rn50_folder(workdir: Path, random_statistics: bool = False) -> Path:
    """
    Random RN50 weights in the official layout, written as `workdir/pyiqa/qualiclip.pth` and converted to
    `workdir/ours`; returns that folder. pyiqa's download is pointed at the checkpoint and openai-clip's TorchScript
    archive of the same CLIP (see `build_both`).

    With `random_statistics`, the BatchNorm statistics are random too (as the parity tests make them), which spreads
    the scores over [0, 1] (benchmarks/precision.py); otherwise only the BatchNorm scales are, as in earlier runs.
    """
    torch.manual_seed(0)
    reference = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial residual branches, so that the scores depend on the image
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                if random_statistics:
                    size = module.num_features
                    module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                    module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
        texts = [text for pair in QUALICLIP_PROMPT_PAIRS for text in pair]
        prompts = F.normalize(reference.encode_text(clip.tokenize(texts)), dim=-1)
    cache = workdir / "pyiqa"
    cache.mkdir(exist_ok=True)
    checkpoint = {f"clip_model.{key}": tensor for key, tensor in reference.state_dict().items()}
    torch.save({**checkpoint, "prompts_features": prompts}, cache / OFFICIAL_FILENAME)
    archive = workdir / "RN50.pt"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.trace(reference, (torch.rand(1, 3, 224, 224), clip.tokenize(["a"])), check_trace=False).save(
            str(archive)
        )
    return convert_checkpoint(cache / OFFICIAL_FILENAME, workdir / "ours")


def build_both(workdir: Path, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """pyiqa's built-in QualiCLIP arch and ours (the pyiqa plugin's arch), on the same random RN50 weights."""
    # Random BatchNorm statistics: with the default ones (zero shift) every folded convolution has the same zero
    # bias, the ONNX exporter shares one initializer among them, and ONNX Runtime's quantizer then leaves those
    # convolutions in float (measured: int8 1.1x fp32 instead of 2x). Real weights have distinct biases.
    folder = official_rn50_folder(workdir, random_statistics=True)
    download_util.DEFAULT_CACHE_DIR = str(workdir / "pyiqa")
    archive = workdir / "RN50.pt"
    pyiqa_qualiclip_arch.load = lambda name, device="cpu", *a, **k: pyiqa_clip_model.load(str(archive), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pyiqa_qualiclip_arch.QualiCLIP(model_type="qualiclip").eval().to(device)
    ours = QualiCLIPHF(pretrained_model_name_or_path=str(folder)).eval().to(device)
    return theirs, ours


def timed(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    if images.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def fast_paths(ours: QualiCLIPHF, folder: Path, names: list[str]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """
    Our other ways to score the same [0, 1] images, each `backend/precision` exactly as `qualiclip score --backend B
    --precision P` prepares it (`prepare_scorer(..., fuse=True)`: fp32 in torch is `fuse_for_inference`'s model),
    the images prepared as the plugin does (`prepare_pixels`), at the model's own logit scale (100; the plugin's pyiqa
    formula uses 50, same speed). `auto` is labelled with what it picked on this machine; a backend that is not
    installed is reported and skipped.
    """
    from qualiclip_hf.backends.precision import prepare_scorer

    processor = QualiCLIPProcessor.from_pretrained(folder)
    paths = {}
    for name in names:
        backend, precision = name.split("/")
        try:
            scorer, chosen = prepare_scorer(copy.deepcopy(ours.model), processor, precision, backend, fuse=True)
        except ImportError as error:
            print(f"# {name}: skipped ({error})")
            continue
        label = f"{backend}/auto ({chosen})" if precision == "auto" else name
        paths[label] = _normalising(scorer, ours)
    return paths


def _normalising(scorer: Callable, ours: QualiCLIPHF) -> Callable[[torch.Tensor], torch.Tensor]:
    def score(images: torch.Tensor) -> torch.Tensor:
        pixel_values = ours.image_processor.prepare_pixels(images, ours.max_size)
        return scorer(pixel_values).quality_score[:, None]

    return score


def competing_process() -> subprocess.Popen:
    """One CPU-bound process (a Python busy loop), as another job on the same machine would be."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["512x384", "1024x768"], help="WIDTHxHEIGHT")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model and setting (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=(*VARIANTS, "torch/fp16"),
        default=list(VARIANTS),
        help="our fast paths, backend/precision, timed beside pyiqa's and our fp32 (CUDA: torch/ ones only)",
    )
    parser.add_argument(
        "--competing-load", action="store_true", help="run one CPU-bound process beside the benchmark throughout"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# torch {torch.__version__}, {name}, {time.strftime('%Y-%m-%d %H:%M')}, random RN50 weights; median of "
        f"{args.repeats}, variants alternating"
    )
    print(f"# CPU: {cpu_description()}")
    print(
        f"# load average before: {_load()}" + ("; with one competing CPU-bound process" if args.competing_load else "")
    )
    competitor = competing_process() if args.competing_load else None
    try:
        with tempfile.TemporaryDirectory() as workdir:
            theirs, ours = build_both(Path(workdir), args.device)
            with _cache_in(Path(workdir) / "cache"):
                variants = {"pyiqa fp32": theirs, "ours fp32": ours}
                variants |= fast_paths(ours, Path(workdir) / "ours", args.variants)
            run(variants, _normalising(ours.model, ours), args, device)
    finally:
        if competitor is not None:
            competitor.kill()
    print(f"\n# load average after: {_load()}")


def run(
    variants: dict[str, Callable], reference_scorer: Callable, args: argparse.Namespace, device: torch.device
) -> None:
    """Times the variants alternately at each size and batch; score differences are against our fp32 model."""
    names = list(variants)
    print(
        "\n| size (WxH) | batch | "
        + " | ".join(f"{name} img/s" for name in names)
        + " | "
        + " | ".join(f"{name} / pyiqa" for name in names[1:])
        + " | max score diff vs ours fp32 (model scale) |"
    )
    print("| --- | ---: |" + " ---: |" * (2 * len(names) - 1) + " --- |")
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        for batch in args.batches:
            generator = torch.Generator().manual_seed(batch)
            images = torch.rand(batch, 3, height, width, generator=generator).to(device)
            with torch.inference_mode():
                scores = {name: model(images).float().flatten().cpu() for name, model in variants.items()}  # warm-up
                reference = reference_scorer(images).float().flatten().cpu()
                times: dict[str, list[float]] = {name: [] for name in names}
                for _ in range(args.repeats):
                    for name in names:
                        times[name].append(timed(variants[name], images))
            rates = {name: batch / statistics.median(times[name]) for name in names}
            diffs = ", ".join(f"{name} {(scores[name] - reference).abs().max().item():.1e}" for name in names[2:])
            print(
                f"| {size} | {batch} | "
                + " | ".join(f"{rates[name]:.3g}" for name in names)
                + " | "
                + " | ".join(f"{rates[name] / rates['pyiqa fp32']:.2f}x" for name in names[1:])
                + f" | {diffs} |",
                flush=True,
            )


@contextlib.contextmanager
def _cache_in(folder: Path):
    """Exported and quantized graphs go to a temporary cache, not the user's."""
    previous = os.environ.get("QUALICLIP_CACHE")
    os.environ["QUALICLIP_CACHE"] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["QUALICLIP_CACHE"]
        else:
            os.environ["QUALICLIP_CACHE"] = previous


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
