"""Model throughput: pyiqa's built-in QualiCLIP arch vs ours, same RN50 weights, same tensors, same device.

    python benchmarks/model_throughput.py [--sizes 512x384 1024x768] [--batches 1 32] [--repeats 3]
                                          [--precision fp32|bf16|fp16]

The weights are random, in the official layout (no real weights exist offline): this measures speed, memory and
the largest score difference between the two, not quality. pyiqa's download is bypassed exactly as in
tests/test_pyiqa_plugin.py (its cache points to a temporary folder, its CLIP loader to a TorchScript archive of
openai-clip's CLIP). Both take the same [0, 1] tensors under `torch.inference_mode()` with pyiqa's score formula;
pyiqa always runs in float32, ours in `--precision` (its weights cast to that dtype, head in float32; CUDA only).

The two models are timed in alternation, `--repeats` times each, and each figure is the median, so that a change of
machine load hits both alike. Peak memory is the growth of the process's resident memory during one forward on the
CPU (Linux `VmHWM`, reset before each call), or `torch.cuda.max_memory_allocated` growth on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyiqa.archs import clip_model as pyiqa_clip_model
from pyiqa.archs import qualiclip_arch as pyiqa_qualiclip_arch
from pyiqa.utils import download_util

from pyiqa_plugin.qualiclip_arch import QualiCLIPHF
from qualiclip_hf import QUALICLIP_PROMPT_PAIRS
from qualiclip_hf.cli import PRECISIONS
from qualiclip_hf.convert_qualiclip_checkpoint import OFFICIAL_FILENAME, convert_checkpoint

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
    folder = official_rn50_folder(workdir)
    download_util.DEFAULT_CACHE_DIR = str(workdir / "pyiqa")
    archive = workdir / "RN50.pt"
    pyiqa_qualiclip_arch.load = lambda name, device="cpu", *a, **k: pyiqa_clip_model.load(str(archive), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pyiqa_qualiclip_arch.QualiCLIP(model_type="qualiclip").eval().to(device)
    ours = QualiCLIPHF(pretrained_model_name_or_path=str(folder)).eval().to(device)
    return theirs, ours


class PeakMemory:
    """Growth of memory use during a block: resident memory on the CPU, allocated CUDA memory on a GPU (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL(None).malloc_trim(0)  # memory freed earlier goes back to the system, out of the baseline
            with contextlib.suppress(OSError):  # resets VmHWM to the current RSS (Linux)
                Path("/proc/self/clear_refs").write_text("5")
            self._before = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        self.mib = (peak - self._before) / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def timed(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    if images.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["512x384", "1024x768"], help="WIDTHxHEIGHT")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model and setting (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="ours only; CUDA only")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.precision != "fp32" and device.type != "cuda":
        parser.error("--precision bf16/fp16 is for CUDA; on this CPU (no native bf16) it only slows down")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# torch {torch.__version__}, {name}, {time.strftime('%Y-%m-%d')}, random RN50 weights; "
        f"ours in {args.precision}, median of {args.repeats}\n"
    )
    with tempfile.TemporaryDirectory() as workdir:
        theirs, ours = build_both(Path(workdir), args.device)
        ours.model.to(PRECISIONS[args.precision])

        print(
            "| size (WxH) | batch | pyiqa img/s | ours img/s | ours / pyiqa | pyiqa peak MiB | ours peak MiB "
            "| max score diff |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for size in args.sizes:
            width, height = map(int, size.split("x"))
            for batch in args.batches:
                generator = torch.Generator().manual_seed(batch)
                images = torch.rand(batch, 3, height, width, generator=generator).to(device)
                with torch.inference_mode():
                    theirs(images[:1]), ours(images[:1])  # warm-up: kernel selection
                    with PeakMemory(device) as theirs_memory:
                        theirs_scores = theirs(images).float().flatten().cpu()
                    with PeakMemory(device) as ours_memory:
                        ours_scores = ours(images).float().flatten().cpu()
                    theirs_times, ours_times = [], []
                    for _ in range(args.repeats):
                        theirs_times.append(timed(theirs, images))
                        ours_times.append(timed(ours, images))
                theirs_rate = batch / statistics.median(theirs_times)
                ours_rate = batch / statistics.median(ours_times)
                diff = (theirs_scores - ours_scores).abs().max().item()
                print(
                    f"| {size} | {batch} | {theirs_rate:.3g} | {ours_rate:.3g} | {ours_rate / theirs_rate:.2f}x "
                    f"| {theirs_memory.mib:,.0f} | {ours_memory.mib:,.0f} | {diff:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
