"""ONNX export of QualiCLIP, and scoring with ONNX Runtime or OpenVINO (no PyTorch in the forward pass).

The exported graph is the image tower plus the fixed-prompt head, one graph:

- input `pixel_values`: `(batch_size, 3, height, width)` float32, CLIP-normalised RGB (as [`QualiCLIPImageProcessor`]
  makes it), every axis but the channels dynamic; height and width at least 32 (the tower's total stride). All
  images of one call share one size: the graph has no `image_sizes`. A padded batch of mixed sizes is scored by
  cropping each image back to its true size and running each size apart, which [`OnnxQualiCLIP.__call__`] does, as
  `QualiCLIPModel` does with `image_sizes`. The attention pool runs without positional embedding, so any size works.
- outputs, the fields of `QualiCLIPOutput`: `quality_score` `(batch_size,)` in [0, 1], `logits_per_prompt`
  `(batch_size, num_prompt_pairs, 2)` and `image_embeds` `(batch_size, output_dim)`, all float32.

The export folder holds `model.onnx` and the processor's files (`QualiCLIPProcessor.from_pretrained` reads them),
so that the normalisation travels with the graph.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..image_processing_qualiclip import MIN_IMAGE_SIZE
from ..outputs import atomic_path

if TYPE_CHECKING:
    import torch

    from ..modeling_qualiclip import QualiCLIPModel, QualiCLIPOutput

ONNX_FILENAME = "model.onnx"
ONNX_OPSET = 18
OUTPUT_NAMES = ("quality_score", "logits_per_prompt", "image_embeds")
# The runtimes that run the exported graph on the CPU, and the formats each computes it in (int8 is a graph of its
# own: `qualiclip_hf.backends.quantization`).
RUNTIMES = ("onnxruntime", "openvino")
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16")}


def cache_dir() -> Path:
    """
    Where exported and quantized graphs are cached, one folder per model (keyed by a hash of its config and weights):
    `$QUALICLIP_CACHE`, else `$XDG_CACHE_HOME/qualiclip`, else `~/.cache/qualiclip`.
    """
    if os.environ.get("QUALICLIP_CACHE"):
        return Path(os.environ["QUALICLIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qualiclip"


def model_cache_key(model: QualiCLIPModel) -> str:
    """
    A hash of a model's config and of every tensor of its state dict (contents, in float32), so that a cached graph
    is used only for the very weights it came from, wherever they were loaded from. 16 hex digits.
    """
    import torch

    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _scoring_graph(model: QualiCLIPModel) -> torch.nn.Module:
    """The module that is exported: the image tower (BatchNorms folded), then the score head in float32."""
    import copy

    import torch
    import torch.nn.functional as F

    from .fusion import fold_batch_norms

    class ScoringGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_model = fold_batch_norms(copy.deepcopy(model.vision_model).float().eval())
            self.register_buffer("prompt_embeds", model.prompt_embeds.detach().float().clone())
            self.logit_scale = float(model.config.logit_scale)
            self.linear_head = (
                copy.deepcopy(model.linear_head).float() if getattr(model, "linear_head", None) is not None else None
            )

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # The head of `QualiCLIPModel.forward`, written again because that forward also checks its inputs with
            # data-dependent Python (not traceable); tests/test_onnx.py holds the two equal.
            image_embeds = F.normalize(self.vision_model(pixel_values).float(), dim=-1)
            logits = self.logit_scale * image_embeds @ self.prompt_embeds.T
            logits_per_prompt = logits.view(logits.shape[0], -1, 2)
            if self.linear_head is None:
                quality_score = logits_per_prompt.softmax(dim=-1)[..., 0].mean(dim=-1)
            else:  # config.quality_head == "linear"
                quality_score = self.linear_head(image_embeds)[:, 0]
            return quality_score, logits_per_prompt, image_embeds

    return ScoringGraph().eval()


def export_onnx(model: QualiCLIPModel, output: str | Path, processor: Any = None) -> Path:
    """
    Exports `model` (image tower + score head) to `output/model.onnx`, with dynamic batch, height and width, and
    saves `processor` beside it. Written atomically (a temporary file renamed), so a cache never holds half a file.

    Args:
        model: a `QualiCLIPModel` in any dtype (exported in float32).
        output: the folder to write (created).
        processor: its `QualiCLIPProcessor`, saved beside the graph (optional).

    Returns:
        The path of `model.onnx`.
    """
    import warnings

    import torch

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    graph = _scoring_graph(model)
    example = torch.rand(1, 3, 2 * MIN_IMAGE_SIZE, 3 * MIN_IMAGE_SIZE)
    axes = {0: "batch_size", 2: "height", 3: "width"}
    target = output / ONNX_FILENAME
    with atomic_path(target) as staged:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # torch's TorchScript-based exporter (`dynamo=False`): 2 s for the demo model where the dynamo-based one
            # took 28 s to 3 minutes on the project's busy 2-core machine, with the same graph (both checked equal
            # to PyTorch within 1e-5 at sizes from 32x32 up). Deprecated in torch 2.9+, present up to the pinned
            # torch < 2.15; `dynamo=True` with `dynamic_shapes` is the replacement.
            torch.onnx.export(
                graph,
                (example,),
                str(staged),
                input_names=["pixel_values"],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={"pixel_values": axes, **{name: {0: "batch_size"} for name in OUTPUT_NAMES}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        import onnx

        proto = onnx.load(str(staged))
        metadata = {
            "model_type": "qualiclip",
            "logit_scale": str(float(model.config.logit_scale)),
            "prompt_pairs": json.dumps(model.config.prompt_pairs),
            "min_image_size": str(MIN_IMAGE_SIZE),
        }
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(staged))
    if processor is not None:
        processor.save_pretrained(output)
    return target


class OnnxQualiCLIP:
    """
    QualiCLIP scores from an exported graph on the CPU, run by ONNX Runtime or OpenVINO.

    `score(pixel_values)` works on NumPy arrays and needs neither PyTorch nor transformers. Calling the object as a
    model (`model(pixel_values=..., image_sizes=...)`, torch tensors in, a `QualiCLIPOutput` out) lets it stand in
    for `QualiCLIPModel` in `qualiclip_hf.scoring.score_files` and the CLI.

    Args:
        path: an ONNX file written by [`export_onnx`] (or its int8 version), or the folder holding `model.onnx`.
        num_threads: the runtime's threads (default: its own choice, one per physical core).
        runtime: `"onnxruntime"` or `"openvino"` (OpenVINO reads the ONNX file itself; its int8 kernels run the int8
            graph's quantized convolutions).
        inference_precision: `"fp32"`, or with OpenVINO `"bf16"`: OpenVINO's `INFERENCE_PRECISION_HINT`, the
            format it computes the float operations in (bf16 only where the CPU has bf16 instructions; OpenVINO
            keeps some operations, e.g. the softmax, in fp32 on its own).

    Raises:
        FileNotFoundError: no graph at `path`.
        ValueError: an unknown runtime, or bf16 asked of ONNX Runtime.
        ImportError: the runtime is not installed.
    """

    min_image_size = MIN_IMAGE_SIZE

    def __init__(
        self,
        path: str | Path,
        num_threads: int | None = None,
        runtime: str = "onnxruntime",
        inference_precision: str = "fp32",
    ) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / ONNX_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ONNX graph there (qualiclip export onnx writes one)")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if inference_precision not in RUNTIME_PRECISIONS[runtime]:
            raise ValueError(
                f"{runtime} runs this graph in {' or '.join(RUNTIME_PRECISIONS[runtime])}, not {inference_precision}"
            )
        self.path = path
        self.runtime = runtime
        if runtime == "onnxruntime":
            self._run = _onnxruntime_session(path, num_threads)
        else:
            self._run = _openvino_session(path, num_threads, inference_precision)

    @functools.cached_property
    def metadata(self) -> dict[str, str]:
        """
        The metadata `export_onnx` writes into the graph (model type, logit scale, prompts, minimum size). Read on
        first use: it means parsing the whole file, weights included, which scoring does not need.
        """
        return _graph_metadata(self.path)

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """
        Args:
            pixel_values (`np.ndarray` of shape `(batch_size, 3, height, width)`): CLIP-normalised, one size.

        Returns:
            `{"quality_score": (batch_size,), "logits_per_prompt": (batch_size, num_prompt_pairs, 2),
            "image_embeds": (batch_size, output_dim)}`, float32.

        Raises:
            ValueError: not floats (e.g. raw uint8 pixels), a wrong shape, an empty batch, NaN or infinite values, or
                an image smaller than 32x32.
        """
        dtype = np.asarray(pixel_values).dtype
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"pixel_values must be CLIP-normalised floats (the processor's output), got {dtype}")
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be a (batch_size, 3, height, width) array, got shape {pixel_values.shape}"
            )
        if pixel_values.shape[0] == 0:
            # An empty batch would reach the runtime, and OpenVINO's request stays broken after it.
            raise ValueError("pixel_values holds no image (batch_size 0)")
        if not np.isfinite(pixel_values).all():
            raise ValueError("pixel_values holds NaN or infinite values")
        if min(pixel_values.shape[2:]) < self.min_image_size:
            height, width = pixel_values.shape[2:]
            raise ValueError(
                f"an image of {height}x{width} pixels is smaller than the {self.min_image_size}x{self.min_image_size}"
                " minimum of the image tower (its total stride); upscale it first"
            )
        return self._run(pixel_values)

    def score(self, pixel_values: np.ndarray) -> np.ndarray:
        """Quality scores in [0, 1], `(batch_size,)`, of same-size CLIP-normalised images `(batch_size, 3, H, W)`."""
        return self.run(pixel_values)["quality_score"]

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device("cpu")

    def __call__(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **kwargs: Any
    ) -> QualiCLIPOutput:
        """As `QualiCLIPModel.forward`: a padded batch with `image_sizes` is cropped per image, each size run apart."""
        import torch

        from ..modeling_qualiclip import QualiCLIPOutput

        pixels = pixel_values.detach().float().cpu().numpy()
        sizes = [tuple(pixels.shape[2:])] * len(pixels) if image_sizes is None else _sizes(image_sizes)
        if len(sizes) != len(pixels):
            raise ValueError(f"got {len(sizes)} image_sizes for a batch of {len(pixels)} images")
        results: dict[str, np.ndarray] = {}
        for (height, width), indices in _group_by_size(sizes).items():
            outputs = self.run(pixels[indices, :, :height, :width])
            for name, value in outputs.items():
                if name not in results:
                    results[name] = np.empty((len(pixels), *value.shape[1:]), dtype=value.dtype)
                results[name][indices] = value
        return QualiCLIPOutput(**{name: torch.from_numpy(value) for name, value in results.items()})


def _onnxruntime_session(path: Path, num_threads: int | None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        outputs = session.run(list(OUTPUT_NAMES), {"pixel_values": pixel_values})
        return dict(zip(OUTPUT_NAMES, outputs, strict=True))

    return run


def _openvino_session(
    path: Path, num_threads: int | None, inference_precision: str
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import openvino

    config = {
        # One request at a time, all cores on it: scoring runs one batch after another.
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[inference_precision],
    }
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = num_threads
    compiled = openvino.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    ports = {name: compiled.output(name) for name in OUTPUT_NAMES}

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        results = request.infer({"pixel_values": pixel_values})
        # `infer` returns views of the request's buffers, which the next call overwrites.
        return {name: np.array(results[port], copy=True) for name, port in ports.items()}

    return run


def _graph_metadata(path: Path) -> dict[str, str]:
    """The metadata `export_onnx` writes into the graph (model type, logit scale, prompts, minimum size)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def _sizes(image_sizes: Any) -> list[tuple[int, int]]:
    return [(int(height), int(width)) for height, width in np.asarray(image_sizes).tolist()]


def _group_by_size(sizes: Iterable[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    return groups
