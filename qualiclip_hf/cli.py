"""The `qualiclip` command: parses arguments and calls the library, one small function per subcommand.

Only the standard library is imported at start-up, so `qualiclip --help` and `--version` answer at once; a
subcommand imports torch, transformers and the model code when it runs. To add a subcommand, add its parser in a
`_add_<name>_parser` function to `_PARSERS` and have it set `handler`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
        "--threads",
        type=_positive_int,
        default=None,
        help="PyTorch threads for the model on a CPU (default: the cores not already busy, see the README)",
    )
    score.add_argument(
        "--num-workers",
        type=_non_negative_int,
        help="processes that decode images beside the model (default: one per spare core, at most 4; 0: decode in "
        "the scoring process)",
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
    files = score.add_argument_group("files (PATH)")
    files.add_argument("--recursive", action="store_true", help="descend into subfolders")
    files.add_argument(
        "--decode-on",
        help="where JPEG files are decoded: 'workers' (Pillow, in background processes) or 'device' (TorchCodec on "
        "the model's device: nvJPEG on CUDA, which frees the CPU cores; needs the [decode] extra) (default: workers)",
    )
    data = score.add_argument_group("datasets (instead of PATH: Parquet files of scores, resumable; Ray for clusters)")
    data.add_argument("--dataset", help="a Hub dataset id, or a folder of Parquet/Arrow files, images or .tar shards")
    data.add_argument("--split", help="the split to score (default: train)")
    data.add_argument("--image-column", help="the column of images (default: the only Image column, else 'image')")
    data.add_argument("--id-column", help="the column copied to `id` (default: the dataset's key, else the row index)")
    data.add_argument("--streaming", action="store_true", help="stream local data too (Hub ids always stream)")
    data.add_argument("--save-embeddings", action="store_true", help="also write the image embeddings")
    data.add_argument("--rows-per-file", type=_positive_int, help="rows per output file (default: 10000)")
    data.add_argument(
        "--engine",
        choices=("local", "ray"),
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


def _add_report_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    report = commands.add_parser(
        "report",
        parents=[common],
        help="what the scores mean: an HTML page (histogram, keep-the-top-X %% curve, pictures per decile) and the "
        "percentile table",
    )
    _add_scores_argument(report)
    report.add_argument(
        "--output", type=Path, help="the HTML page to write (default: SCORES with the extension .html, beside it)"
    )
    report.add_argument(
        "--samples", type=_non_negative_int, default=6, help="pictures shown per score decile (default: 6)"
    )
    report.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    report.set_defaults(handler=_report_command)


def _add_filter_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    filter_ = commands.add_parser(
        "filter",
        parents=[common],
        help="the keep-list of a cut: the ids (or paths) of the rows kept, one per line",
        description="Rows without a score are never kept. A percentile cut keeps the rows whose score is at or above "
        "numpy.quantile(scores, q, method='linear') over the scored rows; rows of equal score are kept together.",
    )
    _add_scores_argument(filter_)
    rule = filter_.add_mutually_exclusive_group(required=True)
    rule.add_argument("--drop-bottom", type=_percentage, metavar="P%", help="drop the lowest-scored P %% (e.g. 10%%)")
    rule.add_argument("--keep-top", type=_percentage, metavar="P%", help="keep the highest-scored P %% (e.g. 90%%)")
    rule.add_argument("--min-score", type=float, metavar="S", help="keep the rows scored S or more")
    filter_.add_argument("--output", type=Path, help="the keep-list to write (default: printed)")
    filter_.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    filter_.set_defaults(handler=_filter_command)


def _add_scores_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scores",
        type=Path,
        metavar="SCORES",
        help="the scores: a results file of `qualiclip score` (.csv, .json, .jsonl), a .parquet file, or a "
        "`score --dataset` output folder",
    )
    parser.add_argument(
        "--partial", action="store_true", help="read a --dataset folder whose run is not finished (the parts so far)"
    )


def _percentage(text: str) -> float:
    """`10%` -> 0.1. The sign is required: a bare `0.1` could mean a tenth or a tenth of a percent."""
    number = text.strip()
    if not number.endswith("%"):
        raise argparse.ArgumentTypeError(f"expected a percentage such as 10%, got {text!r}")
    try:
        value = float(number[:-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage such as 10%, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"a percentage is between 0% and 100%, got {text!r}")
    return value / 100


def _add_precision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="number format: 'auto' takes the fastest one that the hardware runs natively, that scored a probe set "
        "as fp32 does (SRCC >= 0.999, max diff <= 0.01) and ran faster, measured once per model and machine (see "
        "`qualiclip precision`), else fp32; bf16/fp16 run stages 2-4 of the image tower in that "
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
        help="photos to calibrate int8 on, once per model (--precision int8, or auto where it picks int8) "
        "(default: the bundled example photos)",
    )


def _add_export_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    export = commands.add_parser("export", parents=[common], help="export a model to another runtime's format")
    formats = export.add_subparsers(required=True, metavar="FORMAT")
    onnx = formats.add_parser(
        "onnx",
        parents=[common],
        help="image tower + score head as one ONNX graph (dynamic batch, height, width), with the processor files",
    )
    onnx.add_argument("--model", default=DEFAULT_MODEL, help=f"as for `score` (default: {DEFAULT_MODEL})")
    onnx.add_argument(
        "--output",
        required=True,
        type=Path,
        help="folder to write (model.onnx and the processor): new, empty, or a previous export to replace",
    )
    onnx.add_argument(
        "--precision", choices=("fp32", "int8"), default="fp32", help="int8: statically quantized (default: fp32)"
    )
    onnx.add_argument("--calibration-images", type=Path, metavar="DIR", help="photos to calibrate int8 on")
    onnx.set_defaults(handler=_export_onnx_command)


def _add_gmad_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    gmad = commands.add_parser(
        "gmad",
        parents=[common],
        help="gMAD competition of two metrics on a pool: the pairs each picks against the other, a study page",
        description="qualiclip gmad --pool DIR --defender qualiclip --attacker pyiqa:NAME --output report/  "
        "(then: qualiclip gmad summarize --report report/ --judgements FILE.json ...)",
    )
    # Checked by the handler, not argparse: `gmad summarize` shares the command name and needs none of these.
    gmad.add_argument("--pool", help="a folder of images, or a Parquet file/folder with a 'path' column")
    for role in ("defender", "attacker"):
        gmad.add_argument(
            f"--{role}",
            help="'qualiclip' (--model), 'pyiqa:NAME' (any pyiqa metric) or a scores file (scores:FILE, or FILE "
            ".csv/.jsonl/.json/.parquet with path or id, and score); both roles are played either way",
        )
    gmad.add_argument("--output", type=Path, help="report folder to write (must not exist, or be empty)")
    gmad.add_argument("--levels", type=_positive_int, default=6, help="levels of the defender's range (default: 6)")
    gmad.add_argument(
        "--binning",
        choices=("equal-width", "quantile"),
        default="equal-width",
        help="levels of equal score width (as in the gMAD papers) or of equal image counts (default: equal-width)",
    )
    gmad.add_argument(
        "--lower-better",
        choices=("defender", "attacker"),
        action="append",
        default=[],
        help="the scores file of this role is better when lower (pyiqa metrics know their own direction)",
    )
    gmad.add_argument("--recursive", action="store_true", help="descend into subfolders of a --pool folder")
    gmad.add_argument("--seed", type=_non_negative_int, default=0, help="the study's pair order and sides (0)")
    gmad.add_argument(
        "--study-max-size",
        type=_non_negative_int,
        default=1024,
        help="longest side of the study's images, larger ones are downscaled; 0: full size (default: 1024)",
    )
    _add_model_options(gmad)
    gmad.set_defaults(handler=_gmad_command)
    actions = gmad.add_subparsers(metavar="summarize", required=False)
    summarize = actions.add_parser(
        "summarize", parents=[common], help="aggressiveness and resistance from the study's judgement files"
    )
    summarize.add_argument("--report", type=Path, required=True, help="the report folder of `qualiclip gmad`")
    summarize.add_argument(
        "--judgements", type=Path, nargs="+", required=True, metavar="FILE", help="JSON files of study.html"
    )
    summarize.add_argument("--output", type=Path, help="also write the summary as JSON to FILE (must not exist)")
    summarize.set_defaults(handler=_gmad_summarize_command)


def _add_precision_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    precision = commands.add_parser(
        "precision",
        parents=[common],
        help="measure which number format --precision auto runs for a model on this machine, and show why",
    )
    _add_model_options(precision)
    precision.add_argument(
        "--backend",
        choices=(*BACKENDS, "all"),
        default="all",
        help="the backend to measure (default: all; onnxruntime and openvino run on the CPU only)",
    )
    precision.add_argument(
        "--calibration-images", type=Path, metavar="DIR", help="photos to calibrate int8 on (as for score)"
    )
    precision.add_argument("--remeasure", action="store_true", help="measure again even if a verdict is cached")
    precision.add_argument(
        "--threads", type=_positive_int, default=None, help="PyTorch threads on a CPU (default: as for score)"
    )
    precision.set_defaults(handler=_precision_command)


_PARSERS: list[Callable[[Any, argparse.ArgumentParser], None]] = [
    _add_score_parser,
    _add_precision_parser,
    _add_convert_parser,
    _add_push_parser,
    _add_card_parser,
    _add_export_parser,
    _add_explain_parser,
    _add_report_parser,
    _add_filter_parser,
    _add_gmad_parser,
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
    warnings (`datasets`, imported by `score --dataset` only, is quieted there). The environment variables reach both
    libraries when they are imported later, as they are here.
    """
    if verbose:
        return

    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # This package's own warnings (a JPEG scored without its end marker, an ICC profile ignored) stay visible.
    warnings.filterwarnings("default", module=r"qualiclip_hf\.")
    if "huggingface_hub" not in sys.modules:  # the command's own process: the libraries read these when imported
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


# Options of `score` that only one of its two modes reads (argparse name -> option). Given in the other mode they are
# refused in one line, so that no option is silently ignored.
_FILE_OPTIONS = {"recursive": "--recursive", "decode_on": "--decode-on"}
_DATASET_OPTIONS = {
    "split": "--split",
    "image_column": "--image-column",
    "id_column": "--id-column",
    "streaming": "--streaming",
    "save_embeddings": "--save-embeddings",
    "rows_per_file": "--rows-per-file",
    "num_actors": "--num-actors",
    "engine": "--engine",
}


def _score_command(args: argparse.Namespace) -> int:
    _check_score_options(args)
    if args.dataset is not None and args.engine == "ray":
        return _score_dataset_ray_command(args)
    if args.dataset is not None:
        return _score_dataset_command(args)
    return _score_files_command(args)


def _check_score_options(args: argparse.Namespace) -> None:
    """
    Every option of `score`, checked before a model loads: each must apply to the mode (files or `--dataset`) and
    have a value that can score an image. The checks that need only the standard library come first: on a busy
    machine importing torch takes seconds.
    """
    if (args.dataset is None) == (not args.paths):
        raise CommandError("give image files or folders, or --dataset NAME_OR_FOLDER (not both)")
    if args.dataset is not None:
        given = [option for name, option in _FILE_OPTIONS.items() if getattr(args, name) not in (None, False)]
        if given:
            raise CommandError(f"{given[0]} applies to image files and folders (PATH), not to --dataset")
        if args.output is None:
            raise CommandError("--dataset needs --output FOLDER, where the Parquet files of scores go")
        if args.num_actors is not None and args.engine != "ray":
            raise CommandError("--num-actors sizes the Ray actor pool: it applies to --engine ray only")
        if args.output.suffix.lower() in OUTPUT_FORMATS:
            raise CommandError(
                f"--dataset writes a folder of Parquet files, not a results file: --output {args.output}"
            )
    else:
        given = [option for name, option in _DATASET_OPTIONS.items() if getattr(args, name) not in (None, False)]
        if given:
            raise CommandError(f"{given[0]} applies to --dataset only")
        if args.resume and args.output is None:
            raise CommandError("--resume continues an --output file; name it")
        if args.output is not None and args.output.suffix.lower() not in OUTPUT_FORMATS:
            raise CommandError(f"--output must end with one of {', '.join(OUTPUT_FORMATS)}: {args.output}")
    # `auto` may choose int8 (where the CPU runs it natively), and then calibrates.
    if args.calibration_images is not None and args.precision not in ("int8", "auto"):
        raise CommandError(f"--calibration-images calibrates int8; it does not apply to --precision {args.precision}")
    if args.output is not None:
        from .outputs import check_output_location

        try:
            check_output_location(args.output, folder=args.dataset is not None)
        except ValueError as error:
            raise CommandError(f"cannot write --output {args.output}: {error}") from None

    from .backends.precision import runtime_for
    from .image_processing_qualiclip import MIN_IMAGE_SIZE
    from .scoring.files import DECODE_PLACES

    if args.max_size is not None and args.max_size < MIN_IMAGE_SIZE:
        raise CommandError(
            f"--max-size {args.max_size} is below the model's minimum image size of {MIN_IMAGE_SIZE} pixels: every "
            "image would be refused"
        )
    if args.decode_on is not None and args.decode_on not in DECODE_PLACES:
        raise CommandError(f"--decode-on must be one of {', '.join(DECODE_PLACES)}, got {args.decode_on!r}")
    if args.dataset is not None and runtime_for(args.backend, args.precision) != "torch":
        raise CommandError("--dataset runs the PyTorch model: --precision fp32, bf16, fp16 or auto, --backend torch")


@dataclass
class _Scorer:
    """What the preparation shared by both modes of `score` gives: the scorer and how to run it."""

    model: Any  # the QualiCLIPModel, or what stands in for it in --precision / --backend
    processor: Any
    precision: str  # the one that runs (`auto` resolved)
    runtime: str  # torch, onnxruntime or openvino
    batch_size: int
    num_workers: int  # decode processes beside the model
    weights: str  # a hash of the weights as loaded (`backends.onnx.model_cache_key`), recorded with every row


def _prepare_scorer(
    args: argparse.Namespace, resolved: Any, device: Any, runtimes: Sequence[str] | None = None
) -> _Scorer:
    """
    The one preparation of `score`, for files and datasets: threads (`--threads`, else the cores not already busy),
    the model loaded on `device`, in `--precision` / `--backend` (`runtimes`: those `auto` may choose), the batch size
    and the decode workers; the precision chosen is printed.
    """
    import torch

    from .scoring.resources import choose_thread_counts, default_batch_size

    workers, threads = choose_thread_counts()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or threads)
    model, processor = _load(resolved, device)
    from .backends.onnx import model_cache_key

    weights = model_cache_key(model)  # of the weights as loaded: a folder retrained in place keeps its name
    model, precision, runtime = _scorer_in_precision(args, model, processor, runtimes, weights)
    batch_size = args.batch_size or default_batch_size(device)
    num_workers = workers if args.num_workers is None else args.num_workers
    return _Scorer(model, processor, precision, runtime, batch_size, num_workers, weights)


def _max_pixels(args: argparse.Namespace) -> int | None:
    from .image_reader import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)


def _score_files_command(args: argparse.Namespace) -> int:
    from .outputs import OutputInUseError, OutputLock
    from .scoring.results import ResultWriter

    resolved = _resolve_model(args.model)
    print(f"model: {resolved.name} ({resolved.description})", file=sys.stderr)

    from .backends.precision import runtime_for
    from .scoring import collect_image_paths

    paths = _image_paths(args.paths, args.recursive, collect_image_paths)
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
    with contextlib.ExitStack() as cleanup:
        writer = None
        if args.output is not None:
            try:
                cleanup.enter_context(OutputLock(args.output))
                writer = cleanup.enter_context(ResultWriter(args.output, resolved.name, resume=args.resume))
                # The settings the arguments fix are checked now, before the model loads (minutes, for `official`);
                # the precision `auto` chooses, and the runtime, once it is loaded (`writer.start`).
                writer.check_settings(
                    {"max_size": args.max_size, **({"precision": args.precision} if args.precision != "auto" else {})}
                )
            except OutputInUseError as error:
                raise CommandError(str(error)) from None
            except (OSError, ValueError) as error:
                raise CommandError(f"cannot write --output {args.output}: {error}") from None
            if writer.rows:
                paths, line = writer.resume_plan(paths)
                print(line, file=sys.stderr)

        scorer = _prepare_scorer(args, resolved, device)
        if writer is not None:
            try:
                calibration = None
                if scorer.precision == "int8":
                    from .backends.quantization import calibration_key

                    calibration = calibration_key(args.calibration_images)
                settings = {"precision": scorer.precision, "backend": scorer.runtime, "max_size": args.max_size}
                writer.start({**settings, "calibration": calibration, "weights": scorer.weights})
            except (OSError, ValueError) as error:
                raise CommandError(f"cannot write --output {args.output}: {error}") from None
        results = _score_with_progress(args, paths, scorer, writer)
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


def _score_with_progress(args: argparse.Namespace, paths: list, scorer: _Scorer, writer: Any) -> list:
    """Runs `score_files`, handing each result to `writer` as it comes; Ctrl-C ends the run with one line."""
    from tqdm.auto import tqdm

    from .scoring import score_files

    results = []
    progress = tqdm(total=len(paths), unit="img", desc="scoring", disable=None)
    try:
        for result in score_files(
            paths,
            scorer.model,
            scorer.processor,
            batch_size=scorer.batch_size,
            num_workers=scorer.num_workers,
            max_size=args.max_size,
            max_pixels=_max_pixels(args),
            decode_on=args.decode_on or "workers",
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


def _score_dataset_command(args: argparse.Namespace) -> int:
    """
    `qualiclip score --dataset ...` in this process (`--engine local`): the command's arguments to `score_dataset`.
    Returns 0 when the run is complete: rows that failed are counted in the summary and have their `error`.
    """
    from . import register_auto_classes
    from .outputs import OutputInUseError, OutputLock
    from .scoring.dataset import local_dataset_folder, open_dataset, score_dataset

    register_auto_classes()  # a model folder's `auto_map` then needs no remote code
    if not args.verbose:  # imported only now, after `_quiet_libraries`
        import datasets

        # Its bars ("Generating train split", "Creating parquet from Arrow format") and its warnings.
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    device = _device(args.device)
    split = args.split or "train"
    with contextlib.ExitStack() as cleanup:
        try:
            cleanup.enter_context(OutputLock(args.output))
        except OutputInUseError as error:
            raise CommandError(str(error)) from None
        except OSError as error:
            raise CommandError(f"cannot write --output {args.output}: {error}") from None
        try:
            dataset = open_dataset(args.dataset, split, streaming=True if args.streaming else None)
        except ValueError as error:
            raise CommandError(str(error)) from None
        resolved = _resolve_model(args.model)
        print(f"model: {resolved.name} ({resolved.description})", file=sys.stderr)
        # `--dataset` runs the PyTorch model: `auto` chooses among its formats.
        scorer = _prepare_scorer(args, resolved, device, runtimes=("torch",))
        # The precision that runs, never "auto": a resumed run must compute its rows the same way. The weights' hash:
        # the name stays when the weights change (retrained in place, a new Hub commit).
        settings = {
            "dataset": args.dataset,
            "split": split,
            "model": args.model,
            "precision": scorer.precision,
            "weights": scorer.weights,
        }
        try:
            summary = score_dataset(
                dataset,
                args.output,
                scorer.model,
                scorer.processor,
                image_column=args.image_column,
                id_column=args.id_column,
                batch_size=scorer.batch_size,
                num_workers=args.num_workers,  # None: the decode pool sizes itself to the usable cores
                max_size=args.max_size,
                max_pixels=_max_pixels(args),
                save_embeddings=args.save_embeddings,
                resume=args.resume,
                settings=settings,
                image_root=local_dataset_folder(args.dataset),
                **({"rows_per_file": args.rows_per_file} if args.rows_per_file else {}),
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
        except OSError as error:
            raise CommandError(f"cannot write --output {args.output}: {error}") from None
        except KeyboardInterrupt:
            # Part files are written whole (temporary name, then renamed): what is there is kept, and --resume scores
            # the rest. The decode workers ignore Ctrl-C (`scoring.resources.prepare_worker`): they print nothing.
            raise CommandError(
                f"interrupted; {args.output} holds {_rows_written(args.output)} scored rows; to continue, run the same "
                "command with --resume",
                EXIT_INTERRUPTED,
            ) from None
    print(
        f"scored {summary.rows_this_run} rows in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s); "
        f"{args.output} holds {summary.rows} rows, {summary.failed} failed (see the error column)",
        file=sys.stderr,
    )
    return 0


def _score_dataset_ray_command(args: argparse.Namespace) -> int:
    """
    `qualiclip score --dataset ... --engine ray`: the command's arguments to `scoring.ray_data.score_dataset_ray`.
    Returns 0 when the run is complete (failed rows have their `error`).
    """
    from . import register_auto_classes
    from .outputs import OutputInUseError, OutputLock

    if args.backend != "torch" or args.precision == "int8":
        raise CommandError("--engine ray runs the PyTorch model: --precision fp32, bf16, fp16 or auto, --backend torch")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise CommandError('--engine ray needs Ray Data: pip install "qualiclip-hf[ray]"') from None
    from .scoring.ray_data import score_dataset_ray

    register_auto_classes()  # a model folder's `auto_map` then needs no remote code
    with contextlib.ExitStack() as cleanup:
        if "://" not in str(args.output):  # a local folder: one run writes it (a bucket has no such lock)
            try:
                cleanup.enter_context(OutputLock(args.output))
            except OutputInUseError as error:
                raise CommandError(str(error)) from None
        try:
            summary = score_dataset_ray(
                args.dataset,
                str(args.output),
                model=args.model,
                split=args.split or "train",
                image_column=args.image_column,
                id_column=args.id_column,
                streaming=True if args.streaming else None,
                rows_per_file=args.rows_per_file or 10_000,
                batch_size=args.batch_size,
                num_actors=args.num_actors,
                device=args.device if args.device in ("cpu", "cuda") else "auto",
                precision=args.precision,
                max_size=args.max_size,
                max_pixels=_max_pixels(args),
                save_embeddings=args.save_embeddings,
                resume=args.resume,
                settings={"dataset": args.dataset, "split": args.split or "train", "model": args.model},
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
    print(
        f"scored {summary.rows_this_run} rows in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s, "
        f"{summary.actors} actor{'' if summary.actors == 1 else 's'}); {args.output} holds {summary.rows} rows, "
        f"{summary.failed} failed (see the error column)",
        file=sys.stderr,
    )
    return 0


def _rows_written(output: Path) -> int:
    from .scoring.dataset import read_scores

    try:
        return read_scores(output, require_complete=False).num_rows
    except (OSError, ValueError):
        return 0


def _scorer_in_precision(
    args: argparse.Namespace,
    model: Any,
    processor: Any,
    runtimes: Sequence[str] | None = None,
    weights: str | None = None,
) -> tuple[Any, str, str]:
    """
    What scores in `--precision` / `--backend` (`precision.prepare_scorer`; `auto` measured by
    `auto_precision.choose_precision` among `runtimes`), the choice printed once; with the precision chosen (`auto`
    resolved) and what runs the model (`torch`, `onnxruntime` or `openvino`).
    """
    from .backends.auto_precision import choose_precision
    from .backends.precision import prepare_scorer

    try:
        precision, line = args.precision, None
        if precision == "auto":  # measured once per weights and machine, then cached
            verdict = choose_precision(
                model, processor, args.backend, args.calibration_images, fuse=True, runtimes=runtimes, weights=weights
            )
            precision, line = verdict.chosen, verdict.line()
        # Bulk scoring is where the speed layer pays (fuse: BatchNorms folded, CPU chunks).
        scorer, chosen = prepare_scorer(model, processor, precision, args.backend, args.calibration_images, fuse=True)
    except (ImportError, OSError, ValueError) as error:
        raise CommandError(f"--precision {args.precision} --backend {args.backend}: {error}") from None
    runtime = getattr(scorer, "runtime", "torch")  # the ONNX scorers name their runtime
    print(f"{line or f'precision: {chosen}'}; runs in {runtime}", file=sys.stderr)
    return scorer, chosen, runtime


def _export_onnx_command(args: argparse.Namespace) -> int:
    import shutil

    from .backends.onnx import ONNX_FILENAME
    from .outputs import check_output_location

    if args.calibration_images is not None and args.precision != "int8":
        raise CommandError(f"--calibration-images calibrates int8; it does not apply to --precision {args.precision}")
    # Checked before the model loads. An export writes model, tokenizer and code files, replacing those of the same
    # names: into a new or empty folder, or over a previous export (it holds model.onnx), never among other files.
    try:
        check_output_location(args.output, folder=True)
    except ValueError as error:
        raise CommandError(f"cannot write --output {args.output}: {error}") from None
    if args.output.is_dir() and any(args.output.iterdir()) and not (args.output / ONNX_FILENAME).is_file():
        raise CommandError(
            f"--output {args.output} is a folder with other files and no previous export ({ONNX_FILENAME}): the export "
            "would write its files among them; name a new or empty folder"
        )
    resolved = _resolve_model(args.model)
    print(f"model: {resolved.name} ({resolved.description})", file=sys.stderr)
    model, processor = _load(resolved, "cpu")
    try:
        from .backends.onnx import export_onnx
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

    from .scoring.results import printable

    table = Table(
        Column("path", overflow="fold"),
        Column("score", justify="right", no_wrap=True),
        Column("error", overflow="fold"),
    )
    for result in results:
        score = "" if result.score is None else f"{result.score:.4f}"
        # The path has its own column; the error need not repeat it.
        error = (result.error or "").removeprefix(f"{result.path}: ")
        table.add_row(printable(result.path), score, printable(error))
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

    from .loading import DEMO_MODEL_PATH

    model_dir = DEMO_MODEL_PATH if args.model_dir == "demo" else Path(args.model_dir)
    card_options = {"weights": args.weights, "results": args.results, "repo_id": args.repo_id}
    if (model_dir / "README.md").is_file() and (args.weights or args.results or args.license or args.base_model):
        print(
            f"qualiclip: {model_dir / 'README.md'} is uploaded as it is; --weights, --results, --license and "
            "--base-model only shape a generated card (make one with `qualiclip card`)",
            file=sys.stderr,
        )
    card_options.update(license=args.license, base_model=args.base_model)
    from . import register_auto_classes
    from .hub import PushError, push_model_folder, stage_model_folder
    from .hub.push import push_blocker

    # huggingface_hub retries a failing connection for minutes: without network, stop at once, before staging.
    blocker = None if args.dry_run else push_blocker(args.repo_id)
    if blocker is not None:
        raise CommandError(f"{blocker}; nothing was uploaded", status=1)

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


def _report_command(args: argparse.Namespace) -> int:
    from .report import percentile_table, write_report

    table = _read_score_table(args)
    # Beside the scores: `scores.csv` -> `scores.html`, the folder `scores/` -> `scores.html` (not inside it, where
    # readers of the folder's Parquet files would meet it).
    output = (
        args.output or args.scores.parent / f"{args.scores.stem if args.scores.is_file() else args.scores.name}.html"
    )
    try:
        rows = percentile_table(table)
        written = write_report(table, output, samples_per_decile=args.samples, overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        raise CommandError(_first_line(error)) from None
    print("percentile\tscore")
    for percentile, score in rows:
        print(f"{percentile:g}\t{score:.4f}")
    print(f"{len(table)} rows, {len(table) - table.failed} scored, {table.failed} without a score", file=sys.stderr)
    print(f"wrote {written}", file=sys.stderr)
    return 0


def _filter_command(args: argparse.Namespace) -> int:
    from .report import keep_list_text, write_keep_list

    table = _read_score_table(args)
    rule = {"drop_bottom": args.drop_bottom, "keep_top": args.keep_top, "min_score": args.min_score}
    try:
        selection = write_keep_list(
            table,
            args.output,
            overwrite=args.overwrite,
            **{key: value for key, value in rule.items() if value is not None},
        )
        if args.output is None:
            sys.stdout.write(keep_list_text(table, selection))
    except (ValueError, OSError) as error:
        raise CommandError(_first_line(error)) from None
    where = f" to {args.output}" if args.output is not None else ""
    print(
        f"{selection.rule}: kept {selection.kept}{where}, dropped {selection.dropped}, "
        f"{selection.failed} without a score (not kept)",
        file=sys.stderr,
    )
    return 0


def _read_score_table(args: argparse.Namespace) -> Any:
    from .report import read_score_table

    try:
        return read_score_table(args.scores, require_complete=not args.partial)
    except ValueError as error:
        raise CommandError(_first_line(error)) from None
def _gmad_command(args: argparse.Namespace) -> int:
    missing = [f"--{name}" for name in ("pool", "defender", "attacker", "output") if getattr(args, name) is None]
    if missing:
        raise CommandError(f"gmad needs {', '.join(missing)} (or: qualiclip gmad summarize --report DIR ...)")
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise CommandError(f"--output {args.output} exists and is not an empty folder: choose another or delete it")
    if args.defender == args.attacker:
        raise CommandError(f"--defender and --attacker are the same metric ({args.defender})")
    from .gmad import GMADError, load_pool, parse_metric_spec, resolve_metric, run_gmad, write_report

    try:  # the metrics' names are checked before the minutes of scoring
        for role, spec in (("defender", args.defender), ("attacker", args.attacker)):
            parse_metric_spec(spec, lower_better=role in args.lower_better)
    except GMADError as error:
        raise CommandError(f"--{role}: {error}") from None
    try:
        pool = load_pool(args.pool, recursive=args.recursive)
        print(f"pool: {len(pool.paths)} images", file=sys.stderr)
        metrics = [
            resolve_metric(spec, pool, args.model, args.device, lower_better=role in args.lower_better)
            for role, spec in (("defender", args.defender), ("attacker", args.attacker))
        ]
        if metrics[0].name == metrics[1].name:
            raise CommandError(f"--defender and --attacker are the same metric ({metrics[0].name})")
        result = run_gmad(pool.paths, *metrics, levels=args.levels, binning=args.binning)
    except GMADError as error:
        raise CommandError(str(error), status=1) from None
    try:
        output = write_report(
            result, args.output, seed=args.seed, study_max_size=args.study_max_size or None, progress=True
        )
    except GMADError as error:
        raise CommandError(str(error), status=1) from None
    except OSError as error:
        raise CommandError(f"cannot write --output {args.output}: {error}", status=1) from None
    for competition in result.competitions:
        print(
            f"{competition.defender} defends, {competition.attacker} attacks: {len(competition.pairs)} pairs in "
            f"{len(competition.levels)} levels",
            file=sys.stderr,
        )
    if result.excluded:
        print(
            f"qualiclip: {len(result.excluded)} images without a score of both metrics were left out", file=sys.stderr
        )
    print(f"wrote {output} (index.html: the pairs; study.html: the two-choice study)")
    return 0


def _gmad_summarize_command(args: argparse.Namespace) -> int:
    import json

    from .gmad import GMADError, format_summary, summarize_judgements

    if args.output is not None and args.output.exists():
        raise CommandError(f"--output {args.output} exists: choose another or delete it")
    try:
        summaries = summarize_judgements(args.report, args.judgements)
    except GMADError as error:
        raise CommandError(str(error), status=1) from None
    print(format_summary(summaries))
    if args.output is not None:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            with open(args.output, "x", encoding="utf-8") as file:
                json.dump(summaries, file, indent=1)
        except OSError as error:
            raise CommandError(f"cannot write --output {args.output}: {error}", status=1) from None
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run() -> None:
    """The `qualiclip` program (console script, `python -m qualiclip_hf.cli`): [`main`], then exit with its status."""
    status = main()
    # The command has answered (its summary, or its one-line interruption): a Ctrl-C that lands while the interpreter
    # shuts down (torch's finalizers take a moment) would only add a traceback to that answer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


def _precision_command(args: argparse.Namespace) -> int:
    """`qualiclip precision`: the measurements behind `--precision auto` (`auto_precision.choose_precision`)."""
    import torch

    from .backends.auto_precision import choose_precision
    from .backends.onnx import model_cache_key
    from .scoring import choose_thread_counts

    resolved = _resolve_model(args.model)
    print(f"model: {resolved.name} ({resolved.description})", file=sys.stderr)
    device = _device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or choose_thread_counts()[1])  # as `score` runs
    model, processor = _load(resolved, device)
    weights = model_cache_key(model)
    for backend in BACKENDS if args.backend == "all" else (args.backend,):
        print(f"\n--backend {backend}:")
        if backend != "torch" and device.type != "cpu":
            print(f"not measured: {backend} runs on the CPU (--device cpu)")
            continue
        try:
            verdict = choose_precision(
                model, processor, backend, args.calibration_images, fuse=True, remeasure=args.remeasure, weights=weights
            )
        except ImportError as error:
            print(f"not measured: {_first_line(error)}")
            continue
        except (OSError, ValueError) as error:
            raise CommandError(f"--backend {backend}: {error}") from None
        print(f"{verdict.hardware}; {verdict.probe_images} probe images, one at a time; cache: {verdict.cache_file}")
        print(verdict.table())
        print(verdict.line())
    return 0


if __name__ == "__main__":
    run()
