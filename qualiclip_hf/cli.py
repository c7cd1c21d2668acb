"""The `qualiclip` command: parses arguments and calls the library, one small function per subcommand.

Only the standard library is imported at start-up, so `qualiclip --help` and `--version` answer at once; a
subcommand imports torch, transformers and the model code when it runs. To add a subcommand, add its parser in a
`_add_<name>_parser` function to `_PARSERS` and have it set `handler`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .loading import BACKENDS, DEVICES, PRECISIONS
from .scoring.results import OUTPUT_FORMATS

# The default --model. The command exists to score with QualiCLIP, so it is the authors' weights; where they cannot
# be had (offline, not cached), the command stops within a second and names the alternatives, instead of scoring
# with the embedded demo model, which is not QualiCLIP (README, "Which model").
DEFAULT_MODEL = "official"
# The exit status of a run stopped by Ctrl-C, as shells report a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure the user can act on: printed as one line, `qualiclip: <message>`, with exit status `status`."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    warnings.showwarning = _show_warning
    try:
        return args.handler(args)
    except CommandError as error:
        print(f"qualiclip: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:  # before any work was done (loading, say); `score` reports what it scored itself
        print("\nqualiclip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qualiclip", description="QualiCLIP no-reference image quality.")
    parser.add_argument("--version", action="version", version=f"qualiclip-hf {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show the libraries' progress bars and warnings")
    for add_parser in _PARSERS:
        add_parser(commands, common)
    return parser


def _add_score_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    score = commands.add_parser(
        "score", parents=[common], help="score images (files and folders) in [0, 1], higher is better"
    )
    score.add_argument("paths", nargs="*", metavar="PATH", help="image files and/or folders (or --dataset)")
    _add_model_options(score)
    score.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per forward pass (default: 1 on a CPU, where batches are slower, see benchmarks/RESULTS.md; "
        "8 on a GPU)",
    )
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
        default="workers",
        help="where JPEG files are decoded: 'workers' (Pillow, in background processes) or 'device' (TorchCodec on "
        "the model's device: nvJPEG on CUDA, which frees the CPU cores; needs the [decode] extra) (default: workers)",
    )
    score.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="PyTorch threads for the model on a CPU (default: the cores not already busy, see the README)",
    )
    score.add_argument(
        "--output",
        type=Path,
        help=f"write results to FILE ({', '.join(OUTPUT_FORMATS)}) as they are scored (default: a table at the end); "
        "with --dataset, a folder of Parquet files",
    )
    score.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --output and score only the other files (with --dataset: what is complete)",
    )
    data = score.add_argument_group("datasets (instead of PATH: Parquet files of scores, resumable; Ray for clusters)")
    data.add_argument("--dataset", help="a Hub dataset id, or a folder of Parquet/Arrow files, images or .tar shards")
    data.add_argument("--split", default="train", help="the split to score (default: train)")
    data.add_argument("--image-column", help="the column of images (default: the only Image column, else 'image')")
    data.add_argument("--id-column", help="the column copied to `id` (default: the dataset's key, else the row index)")
    data.add_argument("--streaming", action="store_true", help="stream local data too (Hub ids always stream)")
    data.add_argument("--save-embeddings", action="store_true", help="also write the image embeddings")
    data.add_argument("--rows-per-file", type=_positive_int, default=10_000, help="rows per output file (10000)")
    data.add_argument("--num-workers", type=_non_negative_int, help="decoding processes per scoring process")
    data.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: Ray Data, on the cluster of RAY_ADDRESS or a local Ray started for "
        "the run (needs the [ray] extra)",
    )
    data.add_argument(
        "--num-actors",
        type=_positive_int,
        help="with --engine ray: scoring actors (default: one per GPU, else per core less 1 in 8)",
    )
    score.set_defaults(handler=_score_command)


def _add_convert_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    convert = commands.add_parser(
        "convert", parents=[common], help="convert the official qualiclip.pth to a Hugging Face folder"
    )
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


def _add_push_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    push = commands.add_parser(
        "push", parents=[common], help="publish a model folder as a Hub repository, in one commit"
    )
    push.add_argument("--model-dir", required=True, help="a converted or trained folder, or 'demo'")
    push.add_argument("--repo-id", required=True, help="the Hub repository, ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    push.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, upload nothing")
    push.add_argument(
        "--weights",
        metavar="KIND",
        help="what the weights are, for a generated card: official, trained, demo or random (inferred for 'demo' "
        "and trained folders; checked by the card)",
    )
    push.add_argument(
        "--results", nargs="+", type=Path, default=[], metavar="FILE", help="evaluation JSONs for a generated card"
    )
    push.add_argument("--license", help="Hub licence id for a generated card")
    push.add_argument("--base-model", help="Hub id of the base model for a generated card")
    push.add_argument("--include", nargs="+", type=Path, default=[], metavar="FILE", help="extra files for the root")
    push.add_argument("--commit-message")
    push.set_defaults(handler=_push_command)


def _add_card_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    card = commands.add_parser("card", parents=[common], help="write the Hub README (model card) of a model folder")
    card.add_argument("--model-dir", required=True, help="a converted or trained folder, or 'demo'")
    card.add_argument(
        "--weights", metavar="KIND", help="official, trained, demo or random (inferred for demo and trained folders)"
    )
    card.add_argument("--results", nargs="+", type=Path, default=[], metavar="FILE", help="result JSON files")
    card.add_argument("--repo-id", help="the Hub repository the card is for (usage examples, model-index name)")
    card.add_argument("--license", help="Hub licence id (default: by weight kind)")
    card.add_argument("--base-model", help="Hub id of the base model")
    card.add_argument("--dataset", nargs="+", dest="datasets", metavar="ID", help="Hub ids of the training data")
    card.add_argument("--output", type=Path, help="where to write (default: MODEL_DIR/README.md)")
    card.set_defaults(handler=_card_command)


def _add_explain_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    explain = commands.add_parser(
        "explain",
        parents=[common],
        help="Grad-CAM map of the regions that lower an image's score (image or .npy output)",
    )
    explain.add_argument("image", type=Path, metavar="IMAGE", help="image file")
    explain.add_argument(
        "--output", required=True, type=Path, help="heat map to write: an image (.png, .jpg, ...) or .npy (raw floats)"
    )
    explain.add_argument("--overlay", action="store_true", help="paint the heat map over the image")
    _add_model_options(explain)
    explain.add_argument(
        "--max-size", type=_positive_int, default=None, help="downscale the image if its longest side exceeds this"
    )
    explain.set_defaults(handler=_explain_command)


def _add_precision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="number format: 'auto' takes a faster one only where the hardware runs it natively and its score drift "
        "met the bar of benchmarks/precision.py, else fp32; bf16/fp16 run stages 2-4 of the image tower in that "
        "dtype (the rest in fp32); int8 runs an int8 graph on the CPU (ONNX Runtime, or OpenVINO with --backend "
        "openvino; needs the [onnx] extra). "
        "See benchmarks/RESULTS.md (default: fp32)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="'onnxruntime' / 'openvino': the model exported to ONNX once (cached) and run by that runtime on the CPU "
        "(ONNX Runtime: fp32 or int8, the [onnx] extra; OpenVINO: fp32, bf16 or int8, the [openvino] extra) "
        "(default: torch)",
    )
    parser.add_argument(
        "--calibration-images",
        type=Path,
        metavar="DIR",
        help="photos to calibrate int8 on, once per model (default: the bundled example photos)",
    )


def _add_export_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    export = commands.add_parser("export", parents=[common], help="export a model to another runtime's format")
    formats = export.add_subparsers(required=True, metavar="FORMAT")
    onnx = formats.add_parser(
        "onnx",
        parents=[common],
        help="image tower + score head as one ONNX graph (dynamic batch, height, width), with the processor files",
    )
    onnx.add_argument("--model", default="demo", help="as for `score` (default: demo)")
    onnx.add_argument("--output", required=True, type=Path, help="folder to write (model.onnx and the processor)")
    onnx.add_argument(
        "--precision", choices=("fp32", "int8"), default="fp32", help="int8: statically quantized (default: fp32)"
    )
    onnx.add_argument("--calibration-images", type=Path, metavar="DIR", help="photos to calibrate int8 on")
    onnx.set_defaults(handler=_export_onnx_command)


_PARSERS: list[Callable[[Any, argparse.ArgumentParser], None]] = [
    _add_score_parser,
    _add_convert_parser,
    _add_push_parser,
    _add_card_parser,
    _add_export_parser,
    _add_explain_parser,
]


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'official' (the authors' QualiCLIP weights, downloaded and converted once), 'demo' (the embedded demo "
        f"model, not QualiCLIP), a model folder, or a Hub repository id ORG/NAME (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: CUDA, else Apple's MPS, else the CPU (default: auto)"
    )


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """One line per warning, as the command's own messages are, instead of Python's file, line and source."""
    print(f"qualiclip: warning: {message}", file=sys.stderr)


def _quiet_libraries(verbose: bool) -> None:
    """
    Without --verbose, transformers and huggingface_hub show no progress bars or warnings, and libraries no Python
    warnings. The environment variables reach both libraries when they are imported later, as they are here.
    """
    if verbose:
        return

    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # This package's own warnings (a JPEG scored without its end marker, an ICC profile ignored) stay visible.
    warnings.filterwarnings("default", module=r"qualiclip_hf\.")
    if "huggingface_hub" not in sys.modules:  # the command's own process: both libraries read these when imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow this switch too
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return
    # Called from Python, with the libraries already imported: switch them off directly, leaving the environment
    # (which child processes inherit) alone.
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _score_command(args: argparse.Namespace) -> int:
    # What to score is checked before anything is imported: on a busy machine importing torch takes seconds.
    if (args.dataset is None) == (not args.paths):
        raise CommandError("give image files or folders, or --dataset NAME_OR_FOLDER (not both)")
    if args.dataset is not None:
        from . import register_auto_classes

        register_auto_classes()  # a model folder's `auto_map` then needs no remote code
        if args.engine == "ray":
            from .scoring.ray_data import score_dataset_command_ray

            return score_dataset_command_ray(args)
        from .scoring.dataset import score_dataset_command

        return score_dataset_command(args)
    from .scoring.results import ResultWriter

    # The checks that need neither torch nor the model come first: on a busy machine importing torch takes seconds.
    if args.resume and args.output is None:
        raise CommandError("--resume continues an --output file; name it")
    if args.output is not None and args.output.suffix.lower() not in OUTPUT_FORMATS:
        raise CommandError(f"--output must end with one of {', '.join(OUTPUT_FORMATS)}: {args.output}")
    resolved = _resolve_model(args.model)
    print(f"model: {resolved.name} ({resolved.description})", file=sys.stderr)

    from .modeling_qualiclip import VISION_STRIDE
    from .scoring import DECODE_PLACES, choose_thread_counts, collect_image_paths

    if args.decode_on not in DECODE_PLACES:
        raise CommandError(f"--decode-on must be one of {', '.join(DECODE_PLACES)}, got {args.decode_on!r}")
    if args.max_size is not None and args.max_size < VISION_STRIDE:
        raise CommandError(
            f"--max-size {args.max_size} is below the model's minimum image size of {VISION_STRIDE} pixels: every "
            "image would be refused"
        )
    paths = _image_paths(args.paths, args.recursive, collect_image_paths)
    from .backends.precision import runtime_for

    # The exported graph runs on the CPU: `--device auto` means the CPU for it, even beside a GPU.
    runs_on_cpu = runtime_for(args.backend, args.precision) != "torch"
    device = _device("cpu" if runs_on_cpu and args.device == "auto" else args.device)
    if args.decode_on == "device" and device.type == "cpu":
        print(
            "qualiclip: warning: --decode-on device decodes on the CPU, because the device is the CPU: TorchCodec "
            "decodes JPEGs in the main process, not in the worker processes (--decode-on workers, the default, "
            "decodes them in parallel)",
            file=sys.stderr,
        )
    writer = None
    if args.output is not None:
        try:
            writer = ResultWriter(args.output, resolved.name, resume=args.resume)
            # The settings the arguments fix are checked now, before the model loads (minutes, for `official`); the
            # precision `auto` chooses, and the runtime, once it is loaded (`writer.start`).
            writer.check_settings(
                {"max_size": args.max_size, **({"precision": args.precision} if args.precision != "auto" else {})}
            )
        except (OSError, ValueError) as error:
            raise CommandError(f"cannot write --output {args.output}: {error}") from None
        if writer.unrecorded:
            rows = f"{writer.unrecorded} row{'s' if writer.unrecorded > 1 else ''}"
            print(
                f"qualiclip: warning: {rows} of {args.output} came from an earlier version, without the settings that "
                "change scores (--precision, --backend, --max-size): they cannot be checked and are taken to match "
                "this run's",
                file=sys.stderr,
            )
        paths = [path for path in paths if os.path.abspath(path) not in writer.done]
        if writer.done:
            print(f"{len(writer.done)} files already in {args.output}; {len(paths)} to score", file=sys.stderr)

    import torch

    workers, threads = choose_thread_counts()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or threads)
    model, processor = _load(resolved, device)
    model, precision, runtime = _scorer_in_precision(args, model, processor)
    if writer is not None:
        try:
            calibration = None
            if precision == "int8":
                from .backends.quantization import calibration_key

                calibration = calibration_key(args.calibration_images)
            settings = {"precision": precision, "backend": runtime, "max_size": args.max_size}
            writer.start({**settings, "calibration": calibration})
        except (OSError, ValueError) as error:
            raise CommandError(f"cannot write --output {args.output}: {error}") from None
    batch_size = args.batch_size or (1 if device.type == "cpu" else 8)
    results = _score_with_progress(args, paths, model, processor, batch_size, workers, writer)
    if writer is None:
        _print_table(results)
        failed, total = sum(r.error is not None for r in results), len(results)
    else:
        writer.close()
        failed, total = writer.failed, len(writer.rows)
        print(f"wrote {total} results to {args.output}", file=sys.stderr)
    if failed:
        print(f"qualiclip: {failed} of {total} files failed", file=sys.stderr)
        return 1
    return 0


def _score_with_progress(args, paths, model, processor, batch_size, workers, writer) -> list:
    """Runs `score_files`, handing each result to `writer` as it comes; Ctrl-C ends the run with one line."""
    from tqdm.auto import tqdm

    from .image_reader import DEFAULT_MAX_PIXELS
    from .scoring import score_files

    results = []
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    progress = tqdm(total=len(paths), unit="img", desc="scoring", disable=None)
    try:
        for result in score_files(
            paths,
            model,
            processor,
            batch_size=batch_size,
            num_workers=workers,
            max_size=args.max_size,
            max_pixels=max_pixels,
            decode_on=args.decode_on,
        ):
            results.append(result)
            if writer is not None:
                writer.write(result)
            progress.update()
    except ImportError as error:  # --decode-on device without TorchCodec: known before the first image
        raise CommandError(str(error)) from None
    except KeyboardInterrupt:
        progress.close()
        if writer is None:
            _print_table(results)
            where = "shown above, not saved (--output FILE saves them as they come, and --resume continues)"
        else:
            writer.close()
            where = f"in {args.output}; to continue, run the same command with --resume"
        message = f"interrupted after {len(results)} of {len(paths)} files; their results are {where}"
        raise CommandError(message, EXIT_INTERRUPTED) from None
    finally:
        progress.close()
    return results


def _scorer_in_precision(args: argparse.Namespace, model: Any, processor: Any) -> tuple[Any, str, str]:
    """
    What scores in `--precision` / `--backend` (`precision.prepare_scorer`), the choice printed once; with the
    precision chosen (`auto` resolved) and what runs the model (`torch`, `onnxruntime` or `openvino`).
    """
    from .backends.precision import describe_choice, prepare_scorer

    try:
        # Bulk scoring is where the speed layer pays (fuse: BatchNorms folded, CPU chunks).
        scorer, chosen = prepare_scorer(
            model, processor, args.precision, args.backend, args.calibration_images, fuse=True
        )
    except (ImportError, OSError, ValueError) as error:
        raise CommandError(f"--precision {args.precision} --backend {args.backend}: {error}") from None
    runtime = "torch" if scorer is model else scorer.runtime
    print(f"{describe_choice(args.precision, chosen, model.device, args.backend)}; runs in {runtime}", file=sys.stderr)
    return scorer, chosen, runtime


def _export_onnx_command(args: argparse.Namespace) -> int:
    import shutil

    resolved = _resolve_model(args.model)
    print(f"model: {resolved.name} ({resolved.description})", file=sys.stderr)
    model, processor = _load(resolved, "cpu")
    try:
        from .backends.onnx import ONNX_FILENAME, export_onnx
        from .backends.quantization import calibration_images, quantize_onnx

        path = export_onnx(model, args.output, processor)
        if args.precision == "int8":
            quantized = quantize_onnx(
                path, args.output / "model_int8.onnx", calibration_images(args.calibration_images), processor
            )
            shutil.move(quantized, path)  # one model.onnx per folder, whichever precision
    except ImportError as error:
        raise CommandError(f'{error}; pip install "qualiclip-hf[onnx]"') from None
    except (OSError, ValueError) as error:
        raise CommandError(f"export failed: {error}", status=1) from None
    print(f"wrote {args.output / ONNX_FILENAME} ({args.precision})")
    return 0


def _image_paths(inputs: Sequence[str], recursive: bool, collect: Callable[..., list[Path]]) -> list[Path]:
    """
    The files to score (`collect`, which warns of the files it skips); a missing folder, or folders without images,
    stop the command with a hint.
    """
    from .image_reader import find_image_files, image_file_extensions

    extensions = image_file_extensions()
    for item in map(Path, inputs):
        if not item.exists() and item.suffix.lower() not in extensions:
            raise CommandError(f"{item}: no such file or folder", status=1)
    paths = collect(inputs, recursive=recursive)
    if paths:
        return paths
    hint = f"looked for the {len(extensions)} extensions the installed readers open: .jpg, .png, .webp, .tif, ..."
    # Only folders are left (a file is always collected); looked into quietly: `collect` has warned of their files.
    if not recursive and any(find_image_files(item, recursive=True)[0] for item in map(Path, inputs)):
        hint = "there are images in subfolders: add --recursive to score them"
    raise CommandError(f"no image files found in {' '.join(inputs)} ({hint})", status=1)


def _device(choice: str) -> Any:
    from .loading import select_device

    try:
        return select_device(choice)
    except ValueError as error:
        raise CommandError(str(error)) from None


def _resolve_model(name: str) -> Any:
    """The `ResolvedModel` of `name`, or a `CommandError` that says why there is none."""
    from .loading import resolve_model

    try:
        return resolve_model(name)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load model {name!r}: {error}") from None


def _load(resolved: Any, device: Any, dtype: Any = None) -> tuple:
    from . import register_auto_classes
    from .loading import load_model_and_processor

    register_auto_classes()
    try:
        return load_model_and_processor(resolved, device, dtype)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load model {resolved.name!r}: {error}") from None


def _print_table(results: list) -> None:
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
    from . import register_auto_classes
    from .convert_qualiclip_checkpoint import (
        CheckpointError,
        convert_checkpoint,
        convert_clip_checkpoint,
        convert_qualiclip_plus,
    )

    register_auto_classes()  # saved folders carry `auto_map` and the remote-code files
    try:
        if args.clip is not None:
            output = convert_clip_checkpoint(args.clip, args.output)
        elif args.plus is None:
            output = convert_checkpoint(args.checkpoint, args.output)
        else:
            output = convert_qualiclip_plus(args.checkpoint, args.plus, args.output)
    except CheckpointError as error:
        raise CommandError(str(error), status=1) from None
    print(f"wrote {output}")
    return 0


def _push_command(args: argparse.Namespace) -> int:
    import tempfile

    from .loading import DEMO_MODEL_PATH, hub_unreachable_reason

    model_dir = DEMO_MODEL_PATH if args.model_dir == "demo" else Path(args.model_dir)
    card_options = {"weights": args.weights, "results": args.results, "repo_id": args.repo_id}
    if (model_dir / "README.md").is_file() and (args.weights or args.results or args.license or args.base_model):
        print(
            f"qualiclip: {model_dir / 'README.md'} is uploaded as it is; --weights, --results, --license and "
            "--base-model only shape a generated card (make one with `qualiclip card`)",
            file=sys.stderr,
        )
    card_options.update(license=args.license, base_model=args.base_model)
    # huggingface_hub retries a failing connection for minutes: without network, stop at once, before staging.
    unreachable = None if args.dry_run else hub_unreachable_reason()
    if unreachable is not None:
        raise CommandError(f"cannot push to {args.repo_id}: {unreachable}; nothing was uploaded", status=1)
    from . import register_auto_classes
    from .hub import PushError, push_model_folder, stage_model_folder

    register_auto_classes()  # the staged folder carries `auto_map` and the remote-code files
    with tempfile.TemporaryDirectory(prefix="qualiclip-push-") as staging:
        try:
            staged = stage_model_folder(model_dir, Path(staging) / "repo", include=args.include, **card_options)
        except PushError as error:
            raise CommandError(str(error)) from None
        total = sum(file.size for file in staged)
        action = "would upload" if args.dry_run else "uploading"
        print(f"{action} {len(staged)} files ({_human_size(total)}) to {args.repo_id} in one commit:")
        for file in staged:
            print(f"  {file.path_in_repo:<32} {_human_size(file.size):>10}")
        if args.dry_run:
            return 0
        try:
            commit = push_model_folder(staged, args.repo_id, private=args.private, commit_message=args.commit_message)
        except Exception as error:  # huggingface_hub raises HTTP, connection and OS errors of several libraries
            raise CommandError(f"upload to {args.repo_id} failed: {_first_line(error)}", status=1) from None
    print(f"pushed: {commit.commit_url}")
    return 0


def _card_command(args: argparse.Namespace) -> int:
    from .hub import ModelCardError, write_model_card
    from .loading import DEMO_MODEL_PATH

    model_dir = DEMO_MODEL_PATH if args.model_dir == "demo" else Path(args.model_dir)
    options = {key: getattr(args, key) for key in ("weights", "results", "repo_id", "license", "base_model")}
    try:
        output = write_model_card(model_dir, args.output, datasets=args.datasets, **options)
    except ModelCardError as error:
        raise CommandError(str(error)) from None
    print(f"wrote {output}")
    return 0


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _explain_command(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .explain import colorize_heatmap, explain_image, overlay_heatmap
    from .scoring import read_image

    suffix = args.output.suffix.lower()
    if suffix != ".npy" and suffix not in Image.registered_extensions():
        raise CommandError(f"--output must be an image file (.png, .jpg, ...) or .npy: {args.output}")
    if suffix == ".npy" and args.overlay:
        raise CommandError("--overlay needs an image --output, not .npy")
    device = _device(args.device)
    try:
        image = read_image(args.image)
    except ValueError as error:
        raise CommandError(str(error), status=1) from None
    resolved = _resolve_model(args.model)
    print(f"model: {resolved.name} ({resolved.description})", file=sys.stderr)
    model, processor = _load(resolved, device)
    try:
        explanation = explain_image(image, model, processor, max_size=args.max_size)
    except (RuntimeError, ValueError) as error:
        raise CommandError(f"{args.image}: cannot explain: {error}", status=1) from None

    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npy":
            np.save(args.output, explanation.heatmap)
        elif args.overlay:
            overlay_heatmap(explanation.image, explanation.heatmap).save(args.output)
        else:
            colorize_heatmap(explanation.heatmap).save(args.output)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot write {args.output}: {error}") from None
    print(f"{args.image}\t{explanation.score:.4f}")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
