"""The `qualiclip` command: `score` image files and folders, `convert` the official checkpoint."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .scoring import DECODE_PLACES, ScoreResult

OUTPUT_FORMATS = (".csv", ".json", ".jsonl")
# `--precision`: the dtype the model is loaded in (`from_pretrained(dtype=...)`); its head stays in float32.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qualiclip", description="QualiCLIP no-reference image quality.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    score = commands.add_parser("score", help="score images (files and folders) in [0, 1], higher is better")
    score.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    score.add_argument(
        "--model",
        default="demo",
        help="'demo' (embedded small model), 'official' (download and convert the official weights), "
        "a converted folder, or a Hub repository id (default: demo)",
    )
    score.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per forward pass (default: 1 on a CPU, where batches are slower, see benchmarks/RESULTS.md; "
        "8 on CUDA)",
    )
    score.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    score.add_argument("--recursive", action="store_true", help="descend into subfolders")
    score.add_argument(
        "--max-size", type=_positive_int, default=None, help="downscale images whose longest side exceeds this"
    )
    score.add_argument(
        "--max-pixels",
        type=_non_negative_int,
        default=None,
        help="refuse files of more pixels, before decoding them (a guard against decompression bombs); 0: no limit "
        "(default: Pillow's, about 89 million)",
    )
    _add_precision_options(score)
    score.add_argument(
        "--decode-on",
        choices=DECODE_PLACES,
        default="workers",
        help="where JPEG files are decoded: 'workers' (Pillow, in background processes) or 'device' (TorchCodec on "
        "the model's device: nvJPEG on CUDA, which frees the CPU cores; needs the [decode] extra) (default: workers)",
    )
    score.add_argument("--output", type=Path, help=f"write results to FILE ({', '.join(OUTPUT_FORMATS)})")
    score.set_defaults(handler=_score_command)

    _add_export_command(commands)

    convert = commands.add_parser("convert", help="convert the official qualiclip.pth to a Hugging Face folder")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="official-layout QualiCLIP checkpoint (qualiclip.pth)")
    source.add_argument(
        "--clip", type=Path, help="an OpenAI CLIP ResNet checkpoint (RN50.pt): the starting point for training"
    )
    convert.add_argument(
        "--plus", type=Path, help="a QualiCLIP+ file of pyiqa (QualiCLIP+_<dataset>.pth) to add its learned prompts"
    )
    convert.add_argument("--output", required=True, type=Path, help="folder to write")
    convert.set_defaults(handler=_convert_command)

    push = commands.add_parser("push", help="publish a model folder as a Hub repository, in one commit")
    push.add_argument("--model-dir", required=True, help="a converted or trained folder, or 'demo'")
    push.add_argument("--repo-id", required=True, help="the Hub repository, ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    push.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, upload nothing")
    push.add_argument(
        "--weights",
        choices=("official", "trained", "demo", "random"),
        help="what the weights are, for a generated card (inferred for 'demo' and trained folders)",
    )
    push.add_argument(
        "--results", nargs="+", type=Path, default=[], metavar="FILE", help="evaluation JSONs for a generated card"
    )
    push.add_argument("--license", help="Hub licence id for a generated card")
    push.add_argument("--base-model", help="Hub id of the base model for a generated card")
    push.add_argument("--include", nargs="+", type=Path, default=[], metavar="FILE", help="extra files for the root")
    push.add_argument("--commit-message")
    push.set_defaults(handler=_push_command)

    explain = commands.add_parser(
        "explain", help="Grad-CAM map of the regions that lower an image's score (image or .npy output)"
    )
    explain.add_argument("image", type=Path, metavar="IMAGE", help="image file")
    explain.add_argument(
        "--output", required=True, type=Path, help="heat map to write: an image (.png, .jpg, ...) or .npy (raw floats)"
    )
    explain.add_argument("--overlay", action="store_true", help="paint the heat map over the image")
    explain.add_argument("--model", default="demo", help="as for `score` (default: demo)")
    explain.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    explain.add_argument(
        "--max-size", type=_positive_int, default=None, help="downscale the image if its longest side exceeds this"
    )
    explain.set_defaults(handler=_explain_command)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _score_command(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.suffix.lower() not in OUTPUT_FORMATS:
        print(f"qualiclip: --output must end with one of {', '.join(OUTPUT_FORMATS)}: {args.output}", file=sys.stderr)
        return 2
    device = _pick_device(args.device)
    if device is None:
        print("qualiclip: --device cuda was asked for, but CUDA is not available", file=sys.stderr)
        return 2

    from .scoring import DEFAULT_MAX_PIXELS, collect_image_paths, score_files

    paths = collect_image_paths(args.paths, recursive=args.recursive)
    if not paths:
        print(f"qualiclip: no image files found in {' '.join(args.paths)}", file=sys.stderr)
        return 1
    loaded = _load_for_command(args.model, device)
    if loaded is None:
        return 2
    model, processor = loaded
    model = _apply_precision(args, model, processor)
    if model is None:
        return 2

    batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
    results = []
    progress = tqdm(total=len(paths), unit="img", desc="scoring", disable=None)
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    scored = score_files(
        paths,
        model,
        processor,
        batch_size=batch_size,
        max_size=args.max_size,
        max_pixels=max_pixels,
        decode_on=args.decode_on,
    )
    try:
        for result in scored:
            results.append(result)
            progress.update()
    except ImportError as error:  # --decode-on device without TorchCodec: known before the first image
        print(f"qualiclip: {error}", file=sys.stderr)
        return 2
    finally:
        progress.close()

    if args.output is None:
        _print_table(results)
    else:
        write_results(results, args.output)
        print(f"wrote {len(results)} results to {args.output}", file=sys.stderr)
    failed = sum(result.error is not None for result in results)
    if failed:
        print(f"qualiclip: {failed} of {len(results)} files failed", file=sys.stderr)
        return 1
    return 0


def _add_precision_options(score: argparse.ArgumentParser) -> None:
    from . import precision

    score.add_argument(
        "--precision",
        choices=precision.PRECISIONS,
        default="fp32",
        help="number format: 'auto' takes a faster one only where the hardware runs it natively and its score drift "
        "met the bar of benchmarks/precision.py, else fp32; bf16/fp16 run the convolutions in that dtype (head in "
        "fp32); int8 runs an int8 graph with ONNX Runtime on the CPU (needs the [onnx] extra). See "
        "benchmarks/RESULTS.md (default: fp32)",
    )
    score.add_argument(
        "--backend",
        choices=precision.BACKENDS,
        default="torch",
        help="'onnxruntime': the model exported to ONNX once (cached) and run by ONNX Runtime on the CPU, fp32 or "
        "int8 (needs the [onnx] extra) (default: torch)",
    )
    score.add_argument(
        "--calibration-images",
        type=Path,
        metavar="DIR",
        help="photos to calibrate int8 on, once per model (default: the bundled example photos)",
    )


def _apply_precision(args: argparse.Namespace, model: torch.nn.Module, processor: object) -> object | None:
    """`prepare_scorer` for `score`, printing the chosen precision once; None after telling the user what failed."""
    from .precision import describe_choice, prepare_scorer

    try:
        scorer, chosen = prepare_scorer(model, processor, args.precision, args.backend, args.calibration_images)
    except (ImportError, OSError, ValueError) as error:
        print(f"qualiclip: --precision {args.precision} --backend {args.backend}: {error}", file=sys.stderr)
        return None
    backend = "onnxruntime" if not isinstance(scorer, torch.nn.Module) else "torch"
    print(f"{describe_choice(args.precision, chosen, model.device)}; backend: {backend}", file=sys.stderr)
    return scorer


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="export a model to another runtime's format")
    formats = export.add_subparsers(required=True, metavar="FORMAT")
    onnx = formats.add_parser(
        "onnx",
        help="image tower + score head as one ONNX graph (dynamic batch, height, width), with the processor files",
    )
    onnx.add_argument("--model", default="demo", help="as for `score` (default: demo)")
    onnx.add_argument("--output", required=True, type=Path, help="folder to write (model.onnx and the processor)")
    onnx.add_argument(
        "--precision", choices=("fp32", "int8"), default="fp32", help="int8: statically quantized (default: fp32)"
    )
    onnx.add_argument("--calibration-images", type=Path, metavar="DIR", help="photos to calibrate int8 on")
    onnx.set_defaults(handler=_export_onnx_command)


def _export_onnx_command(args: argparse.Namespace) -> int:
    import shutil

    loaded = _load_for_command(args.model, torch.device("cpu"))
    if loaded is None:
        return 2
    model, processor = loaded
    try:
        from .export import ONNX_FILENAME, export_onnx
        from .quantization import calibration_images, quantize_onnx

        path = export_onnx(model, args.output, processor)
        if args.precision == "int8":
            quantized = quantize_onnx(
                path, args.output / "model_int8.onnx", calibration_images(args.calibration_images), processor
            )
            shutil.move(quantized, path)  # one model.onnx per folder, whichever precision
    except ImportError as error:
        print(f'qualiclip: {error}; pip install "qualiclip-hf[onnx]"', file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"qualiclip: export failed: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output / ONNX_FILENAME} ({args.precision})")
    return 0


def _pick_device(choice: str) -> torch.device | None:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        return None
    return torch.device(choice)


def _load_for_command(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple | None:
    """`load_model_and_processor`, or None after telling the user why the model cannot be loaded."""
    try:
        return load_model_and_processor(name, device, dtype)
    except (OSError, ValueError) as error:
        print(f"qualiclip: cannot load model '{name}': {error}", file=sys.stderr)
        return None


def load_model_and_processor(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple:
    """
    Loads a `QualiCLIPModel` in eval mode and its processor from a name `resolve_pretrained` understands. In a
    half-precision `dtype` the image tower runs in that dtype and the score head in float32.
    """
    from .modeling_qualiclip import QualiCLIPModel
    from .pretrained import resolve_pretrained
    from .processing_qualiclip import QualiCLIPProcessor

    path = resolve_pretrained(name)
    model = QualiCLIPModel.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, QualiCLIPProcessor.from_pretrained(path)


def write_results(results: list[ScoreResult], output: Path) -> None:
    """Writes results as CSV (`path,score,error`), a JSON list, or JSON lines, by the file's extension."""
    rows = [{"path": r.path, "score": r.score, "error": r.error} for r in results]
    output.parent.mkdir(parents=True, exist_ok=True)
    suffix = output.suffix.lower()
    with open(output, "w", newline="", encoding="utf-8") as file:
        if suffix == ".csv":
            writer = csv.DictWriter(file, fieldnames=["path", "score", "error"])
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        elif suffix == ".json":
            json.dump(rows, file, indent=2)
            file.write("\n")
        else:
            file.writelines(json.dumps(row) + "\n" for row in rows)


def _print_table(results: list[ScoreResult]) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(
        Column("path", overflow="fold"),
        Column("score", justify="right", no_wrap=True),
        Column("error", overflow="fold"),
    )
    for result in results:
        score = "" if result.score is None else f"{result.score:.4f}"
        # The path has its own column; the error need not repeat it.
        error = (result.error or "").removeprefix(f"{result.path}: ")
        table.add_row(result.path, score, error)
    Console().print(table)


def _convert_command(args: argparse.Namespace) -> int:
    from .convert_qualiclip_checkpoint import (
        CheckpointError,
        convert_checkpoint,
        convert_clip_checkpoint,
        convert_qualiclip_plus,
    )

    try:
        if args.clip is not None:
            output = convert_clip_checkpoint(args.clip, args.output)
        elif args.plus is None:
            output = convert_checkpoint(args.checkpoint, args.output)
        else:
            output = convert_qualiclip_plus(args.checkpoint, args.plus, args.output)
    except CheckpointError as error:
        print(f"qualiclip: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


def _push_command(args: argparse.Namespace) -> int:
    import tempfile

    from .hub import PushError, push_model_folder, stage_model_folder
    from .pretrained import DEMO_MODEL_DIR

    model_dir = DEMO_MODEL_DIR if args.model_dir == "demo" else Path(args.model_dir)
    card_options = {"weights": args.weights, "results": args.results, "repo_id": args.repo_id}
    if (model_dir / "README.md").is_file() and (args.weights or args.results or args.license or args.base_model):
        print(
            f"qualiclip: {model_dir / 'README.md'} is uploaded as it is; --weights, --results, --license and "
            "--base-model only shape a generated card (make one with model_card/generate.py)",
            file=sys.stderr,
        )
    card_options.update(license=args.license, base_model=args.base_model)
    with tempfile.TemporaryDirectory(prefix="qualiclip-push-") as staging:
        try:
            staged = stage_model_folder(model_dir, Path(staging) / "repo", include=args.include, **card_options)
        except PushError as error:
            print(f"qualiclip: {error}", file=sys.stderr)
            return 2
        total = sum(file.size for file in staged)
        action = "would upload" if args.dry_run else "uploading"
        print(f"{action} {len(staged)} files ({_human_size(total)}) to {args.repo_id} in one commit:")
        for file in staged:
            print(f"  {file.path_in_repo:<32} {_human_size(file.size):>10}")
        if args.dry_run:
            return 0
        from huggingface_hub.errors import HfHubHTTPError

        try:
            commit = push_model_folder(staged, args.repo_id, private=args.private, commit_message=args.commit_message)
        except (HfHubHTTPError, OSError, ValueError) as error:
            print(f"qualiclip: upload to {args.repo_id} failed: {error}", file=sys.stderr)
            return 1
    print(f"pushed: {commit.commit_url}")
    return 0


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _explain_command(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    suffix = args.output.suffix.lower()
    if suffix != ".npy" and suffix not in Image.registered_extensions():
        print(f"qualiclip: --output must be an image file (.png, .jpg, ...) or .npy: {args.output}", file=sys.stderr)
        return 2
    if suffix == ".npy" and args.overlay:
        print("qualiclip: --overlay needs an image --output, not .npy", file=sys.stderr)
        return 2
    device = _pick_device(args.device)
    if device is None:
        print("qualiclip: --device cuda was asked for, but CUDA is not available", file=sys.stderr)
        return 2

    from .explain import colorize_heatmap, explain_image, overlay_heatmap
    from .scoring import read_image

    try:
        image = read_image(args.image)
    except ValueError as error:
        print(f"qualiclip: {error}", file=sys.stderr)
        return 1
    loaded = _load_for_command(args.model, device)
    if loaded is None:
        return 2
    model, processor = loaded
    try:
        explanation = explain_image(image, model, processor, max_size=args.max_size)
    except (RuntimeError, ValueError) as error:
        print(f"qualiclip: {args.image}: cannot explain: {error}", file=sys.stderr)
        return 1

    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        if suffix == ".npy":
            np.save(args.output, explanation.heatmap)
        elif args.overlay:
            overlay_heatmap(explanation.image, explanation.heatmap).save(args.output)
        else:
            colorize_heatmap(explanation.heatmap).save(args.output)
    except (OSError, ValueError) as error:
        print(f"qualiclip: cannot write {args.output}: {error}", file=sys.stderr)
        return 2
    print(f"{args.image}\t{explanation.score:.4f}")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
