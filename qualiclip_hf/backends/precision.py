"""Number formats for scoring: which ones the hardware runs natively, which one `auto` picks, and the bf16/fp16 model.

`--precision` / `precision=` takes `auto`, `fp32`, `bf16`, `fp16` or `int8`:

- `fp32`: the model as loaded.
- `bf16` / `fp16`: stages 2-4 of the image tower in that dtype, with each BatchNorm folded into its convolution in
  float32 first (so the normalisation statistics are not rounded); the stem, stage 1, the attention pool and the
  score head in float32 (see `reduce_precision`).
- `int8`: the image tower quantized to int8 by ONNX Runtime (`qualiclip_hf.backends.quantization`), run by ONNX Runtime
  (or OpenVINO with `backend="openvino"`).
- `auto`: measured for the model in hand on this machine (`qualiclip_hf.backends.auto_precision.choose_precision`):
  the fastest format that the backend runs, the device runs natively, whose scores of a probe set met `DRIFT_BAR`
  against fp32 and which ran clearly faster than fp32; fp32 otherwise. Measured once per weights, machine and library
  versions, then cached.

`--backend` / `backend=` takes `torch` (the model itself), `onnxruntime` or `openvino` (the exported ONNX graph,
`qualiclip_hf.backends.onnx`, run by that runtime on the CPU, no PyTorch in the forward pass). With OpenVINO, bf16 is
OpenVINO's own inference precision over the whole graph (`OnnxQualiCLIP`), not `reduce_precision`'s split.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..loading import BACKENDS, PRECISIONS

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What `auto` asks of a reduced format, against float32 scores of the same images (the probe set of
# `auto_precision`): Spearman rank correlation (SRCC) and the largest absolute score difference (scores in [0, 1]).
DRIFT_BAR = {"min_srcc": 0.999, "max_abs_diff": 0.01}
# The formats each backend runs (torch runs int8 through ONNX Runtime: PyTorch has no int8 path kept here).
BACKEND_PRECISIONS = {
    "torch": ("fp32", "bf16", "fp16", "int8"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}
# /proc/cpuinfo flags of the x86 instructions that run each format natively (Intel's and AMD's names, as Linux
# prints them): bf16 dot products (AVX512_BF16, AMX-BF16), fp16 arithmetic (AVX512_FP16, AMX-FP16), int8 dot products
# (AVX512_VNNI, AVX_VNNI, AMX-INT8).
CPU_FLAGS_FOR_FORMAT = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8"),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from `/proc/cpuinfo` (empty where there is none, e.g. macOS or Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_description() -> str:
    """One line naming the CPU, torch's vector ISA (`torch.backends.cpu.get_cpu_capability()`) and the flags that matter
    here, for benchmark output, e.g. `Intel(R) Xeon(R) Processor; torch ISA AVX512; avx512_bf16 amx_int8 ...`."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wanted = sorted({flag for flags in CPU_FLAGS_FOR_FORMAT.values() for flag in flags} | {"avx2", "avx512f"})
    present = " ".join(flag for flag in wanted if flag in cpu_flags()) or "none of " + " ".join(wanted)
    return f"{model}; torch ISA {torch.backends.cpu.get_cpu_capability()}; flags: {present}"


def native_formats(device: torch.device | str = "cpu") -> set[str]:
    """
    The reduced formats `device` runs natively. On CUDA: fp16, and bf16 where `torch.cuda.is_bf16_supported()`
    (int8 runs through ONNX Runtime on the CPU only). On a CPU: those whose instructions `/proc/cpuinfo` lists
    (`CPU_FLAGS_FOR_FORMAT`), bf16 and fp16 only where torch's ISA is AVX-512 or wider (oneDNN's kernels for them).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {"fp16"} | ({"bf16"} if torch.cuda.is_bf16_supported() else set())
    if device.type != "cpu":
        return set()
    flags = cpu_flags()
    found = {fmt for fmt, names in CPU_FLAGS_FOR_FORMAT.items() if flags.intersection(names)}
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        found -= {"bf16", "fp16"}
    return found


def resolve_precision(requested: str, device: torch.device | str = "cpu", backend: str = "torch") -> str:
    """
    Checks that `requested` runs with `backend` on `device`, and returns it. `"auto"` is returned as it is: what it
    runs depends on the model and is measured (`qualiclip_hf.backends.auto_precision.choose_precision`).

    Raises:
        ValueError: an unknown name or backend, a format the backend does not run (`BACKEND_PRECISIONS`), or int8 or
            an ONNX backend on a device other than the CPU.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend != "torch" and device.type != "cpu":
        raise ValueError(f"the {backend} backend runs on the CPU; use --device cpu")
    if requested == "int8" and device.type != "cpu":
        raise ValueError("int8 runs on the CPU (through ONNX Runtime or OpenVINO); use fp16 or bf16 on a GPU")
    if requested not in ("auto", *BACKEND_PRECISIONS[backend]):
        runs = ", ".join(BACKEND_PRECISIONS[backend])
        raise ValueError(f"the {backend} backend runs {runs}, not {requested}")
    return requested


def runtime_for(backend: str, precision: str) -> str:
    """
    What runs `precision` with `backend`: `"torch"` (the model itself), or the runtime of the exported graph
    (`"onnxruntime"`, `"openvino"`), which runs on the CPU. int8 with the torch backend runs in ONNX Runtime.
    """
    if backend == "torch":
        return "onnxruntime" if precision == "int8" else "torch"
    return backend


def _runtime_available(runtime: str) -> bool:
    if runtime == "torch":
        return True
    try:
        importlib.import_module(runtime)
    except ImportError:
        return False
    return True


class _CastInput(nn.Module):
    """Runs `module`, cast to `dtype`, on its input cast to `dtype`: where the image tower changes precision."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.module(hidden_states.to(self.dtype))


def reduce_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """
    A copy of a float32 `QualiCLIPModel` (eval mode) in `dtype` (bf16 or fp16) for inference: every BatchNorm
    folded into its convolution in float32 first, then stages 2 to 4 of the image tower (about 80% of its
    multiply-adds at any image size) cast to `dtype`. The stem and stage 1, the attention pool and the score head
    stay in float32: on the demo model, bf16 in stage 1 alone moved a photo's score by 0.034 and stages 2-4 together
    by 0.004 (benchmarks/RESULTS.md, "Precision past fp32 on the CPU"); the pool's softmax and the head's logit scale
    of 100 pass any rounding on to the score.

    Returns:
        The copy (`model` is left as it was); it takes float32 `pixel_values` and returns float32 outputs.
    """
    from .fusion import fold_batch_norms

    model = copy.deepcopy(model)
    vision = model.vision_model
    fold_batch_norms(vision)
    vision.layer2 = _CastInput(vision.layer2, dtype)
    vision.layer3.to(dtype)
    vision.layer4.to(dtype)
    vision.attnpool = _CastInput(vision.attnpool, torch.float32)
    return model


def prepare_scorer(
    model: nn.Module,
    processor: Any,
    precision: str = "auto",
    backend: str = "torch",
    calibration_images: str | Path | None = None,
    fuse: bool = False,
    runtimes: tuple[str, ...] | None = None,
) -> tuple[Any, str]:
    """
    Makes what scores a float32 `QualiCLIPModel` (eval mode, on its device) in `precision`, leaving the model as it
    was: the model itself (fp32), a `FusedQualiCLIP` (fp32 with `fuse`), a reduced copy (bf16/fp16,
    `reduce_precision`), or an `OnnxQualiCLIP` running the exported
    graph with ONNX Runtime or OpenVINO (`backend="onnxruntime"` or `"openvino"`; int8 with the torch backend runs
    in ONNX Runtime), exported and quantized once per model into the cache
    (`qualiclip_hf.backends.quantization.cached_onnx`).
    Both kinds take `model(**processor_outputs)` and work with `qualiclip_hf.scoring.score_files`.

    Args:
        precision: one of `PRECISIONS`; `"auto"` as `auto_precision.choose_precision` measures (once per weights
            and machine, then cached; its line is logged at INFO level).
        backend: `"torch"`, `"onnxruntime"` or `"openvino"` (CPU; the formats of `BACKEND_PRECISIONS`).
        calibration_images: a folder of photos to calibrate int8 on (default: the bundled examples).
        fuse: when the model itself scores in fp32, apply `qualiclip_hf.backends.fusion.fuse_for_inference` (BatchNorms
            folded, CPU batches in chunks), as `qualiclip score` does: scores move by float rounding only.
        runtimes: with `"auto"`, the runtimes it may choose (e.g. `("torch",)`: int8 would run in ONNX Runtime).

    Returns:
        `(scorer, chosen precision)`.

    Raises:
        ValueError: an unknown precision or backend, or a combination that does not run (int8 or an ONNX backend
            off the CPU, a format the backend does not run).
        ImportError: the runtime is needed and not installed (the `[onnx]` or `[openvino]` extra).
    """
    device = next(model.parameters()).device
    chosen = resolve_precision(precision, device, backend)
    if chosen == "auto":
        from .auto_precision import choose_precision

        verdict = choose_precision(model, processor, backend, calibration_images, fuse=fuse, runtimes=runtimes)
        logger.info(verdict.line())
        chosen = verdict.chosen
    runtime = runtime_for(backend, chosen)
    if runtime != "torch":
        if not _runtime_available(runtime):
            extra = "onnx" if runtime == "onnxruntime" else "openvino"
            raise ImportError(f'{runtime} is not installed: pip install "qualiclip-hf[{extra}]"')
        from .onnx import OnnxQualiCLIP
        from .quantization import cached_onnx

        graph = cached_onnx(model, processor, "int8" if chosen == "int8" else "fp32", calibration_images)
        inference_precision = "bf16" if chosen == "bf16" else "fp32"  # int8: the float operations left in fp32
        return OnnxQualiCLIP(graph, runtime=runtime, inference_precision=inference_precision), chosen
    if chosen in ("bf16", "fp16"):
        return reduce_precision(model, TORCH_DTYPES[chosen]), chosen
    if fuse:
        from .fusion import fuse_for_inference

        return fuse_for_inference(model), chosen
    return model, chosen
