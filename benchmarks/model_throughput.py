"""Model throughput: pyiqa's built-in QualiCLIP arch vs ours, same RN50 weights, same tensors, same device.

    python benchmarks/model_throughput.py [--sizes 384x512 768x1024] [--batches 1 8] [--repeats 3]

The weights are random, in the official layout (no real weights exist offline): this measures speed, and the max
score difference between the two, not quality. pyiqa's download is bypassed exactly as in tests/test_pyiqa_plugin.py
(its cache points to a temporary folder, its CLIP loader to a TorchScript archive of openai-clip's CLIP).
Both run under `torch.inference_mode()` with pyiqa's score formula, so the scores must agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyiqa.archs import clip_model as pyiqa_clip_model
from pyiqa.archs import qualiclip_arch as pyiqa_qualiclip_arch
from pyiqa.utils import download_util

from pyiqa_plugin.qualiclip_arch import QualiCLIPHF
from qualiclip_hf import QUALICLIP_PROMPT_PAIRS
from qualiclip_hf.convert_qualiclip_checkpoint import OFFICIAL_FILENAME, convert_checkpoint

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP


def build_both(workdir: Path, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    reference = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).eval()
    with torch.no_grad():  # non-trivial residual branches, so that the scores depend on the image
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
        texts = [text for pair in QUALICLIP_PROMPT_PAIRS for text in pair]
        prompts = F.normalize(reference.encode_text(clip.tokenize(texts)), dim=-1)
    cache = workdir / "pyiqa"
    cache.mkdir()
    checkpoint = {f"clip_model.{key}": tensor for key, tensor in reference.state_dict().items()}
    torch.save({**checkpoint, "prompts_features": prompts}, cache / OFFICIAL_FILENAME)
    archive = workdir / "RN50.pt"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.trace(reference, (torch.rand(1, 3, 224, 224), clip.tokenize(["a"])), check_trace=False).save(
            str(archive)
        )

    download_util.DEFAULT_CACHE_DIR = str(cache)
    pyiqa_qualiclip_arch.load = lambda name, device="cpu", *a, **k: pyiqa_clip_model.load(str(archive), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pyiqa_qualiclip_arch.QualiCLIP(model_type="qualiclip").eval().to(device)
    folder = convert_checkpoint(cache / OFFICIAL_FILENAME, workdir / "ours")
    ours = QualiCLIPHF(pretrained_model_name_or_path=str(folder)).eval().to(device)
    return theirs, ours


def images_per_second(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        scores = model(images)  # warm-up
        if images.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            model(images)
        if images.is_cuda:
            torch.cuda.synchronize()
    return repeats * images.shape[0] / (time.perf_counter() - started), scores.float().flatten().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["384x512", "768x1024"], help="HxW")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {name}, {time.strftime('%Y-%m-%d')}, random RN50 weights\n")
    with tempfile.TemporaryDirectory() as workdir:
        theirs, ours = build_both(Path(workdir), args.device)
        print("| size | batch | pyiqa img/s | ours img/s | ours / pyiqa | max score diff |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for size in args.sizes:
            height, width = map(int, size.split("x"))
            for batch in args.batches:
                images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
                images = images.to(args.device)
                # Interleaved, so that a change of machine load hits both alike.
                theirs_rate, theirs_scores = images_per_second(theirs, images, args.repeats)
                ours_rate, ours_scores = images_per_second(ours, images, args.repeats)
                diff = (theirs_scores - ours_scores).abs().max().item()
                print(
                    f"| {size} | {batch} | {theirs_rate:.2f} | {ours_rate:.2f} | {ours_rate / theirs_rate:.2f}x "
                    f"| {diff:.1e} |"
                )


if __name__ == "__main__":
    main()
