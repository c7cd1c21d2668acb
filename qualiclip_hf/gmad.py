"""
gMAD, the group MAximum Differentiation competition, between two no-reference quality metrics on a pool of images.

Ma, Duanmu, Wang, Wu, Liu, Yong, Li, Zhang, *Group MAximum Differentiation Competition: Model Comparison with Few
Samples*, IEEE TPAMI 42(4):851-864, 2020 (first in Ma et al., *Group MAD Competition: A New Methodology to Compare
Objective Image Quality Models*, CVPR 2016, and used on the Waterloo Exploration Database, Ma et al., IEEE TIP 26(2),
2017).
QualiCLIP's paper shows its robustness this way. One metric *defends*: its score range over the pool is cut into
`levels` levels, and images within a level are taken as equal in quality. The other *attacks*: in each level it
picks the pair it scores most differently (its best- and its worst-scored image of the level). Then the roles swap.
People judge each pair (which image is better?): where they agree with the attacker, the defender failed.

- **Levels.** Equal-width bins of the defender's score range (the default: our reading of the gMAD papers, which
  divide the defender's range into levels; their text could not be checked here), or `binning="quantile"`: bins of
  equal image counts, which do not change under a monotone rescaling of the scores and seldom leave a level empty,
  but whose widths differ. Equal widths keep a level's meaning on the defender's scale, which is what "taken as
  equal" asks of it; quantiles suit metrics whose scores bunch up (most images in one equal-width level). A level
  with fewer than two scored images, or whose images the attacker scores all alike, has no pair; the result says so.
- **Direction.** Every metric is oriented so that higher is better before anything is compared: the scores of a
  metric whose lower values are better (pyiqa's `metric.lower_better`, e.g. NIQE, BRISQUE, PIQE) are negated, and
  the pages show the metric's own values with a note.
- **Aggressiveness and resistance.** Each pair is judged by two-alternative forced choice; `p` is the share of
  judgements that prefer the image the attacker scored higher. The *aggressiveness* of the attacker against the
  defender is the mean of `p` over the levels with a judged pair, and the *resistance* of the defender is `1 - p`
  averaged the same way (so, for one ordered pair of roles, resistance = 1 - aggressiveness). Near 1 an attacker has
  exposed the defender at every level; near 0.5 people could not tell the pairs apart, as the defender claims; near 0
  the attacker itself misjudged its pairs. The TPAMI paper introduces the two measures "to summarize the
  performance of each model at attacking other models and defending attacks from other models" (its abstract);
  its formulas were not available to check against here, so this is the definition used, stated in full.

The library entry points are [`run_gmad`] (score arrays or callables, for any metric) and [`summarize_judgements`];
`qualiclip gmad` resolves metric names (`qualiclip`, `pyiqa:NAME`, a scores file) and writes the report with
[`write_report`].
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .html_report import page, thumbnail_data_uri
from .image_reader import open_image

BINNINGS = ("equal-width", "quantile")
# Two pairs per level and ordered pair of metrics: 6 levels give a study of 12 pairs, a few minutes for one person.
DEFAULT_LEVELS = 6
PAIRS_FILE = "pairs.json"
REPORT_PAGE = "index.html"
STUDY_PAGE = "study.html"
SCORES_FILE = "scores.csv"
PAIRS_FORMAT = "qualiclip-gmad-pairs"
JUDGEMENTS_FORMAT = "qualiclip-gmad-judgements"
FORMAT_VERSION = 1
SCORES_FILE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")

ScoreSource = Sequence[float] | np.ndarray | Callable[[Image.Image], float]


class GMADError(ValueError):
    """Bad input to the competition or its report, in one line that names the file or metric and the cause."""


# --------------------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """
    One metric's scores over the pool.

    Attributes:
        name: How the pages name it (`qualiclip (demo)`, `pyiqa:piqe`, ...).
        raw: `(num_images,)` float64, the metric's own values; NaN where an image has no score.
        lower_better: Whether lower raw values mean better quality.
        note: Where the scores came from, shown on the pages.
    """

    name: str
    raw: np.ndarray
    lower_better: bool = False
    note: str = ""

    @property
    def scores(self) -> np.ndarray:
        """`(num_images,)` float64, oriented so that higher is better (`-raw` for a lower-is-better metric)."""
        return -self.raw if self.lower_better else self.raw


def make_metric(
    name: str,
    source: Metric | ScoreSource,
    paths: Sequence[str | os.PathLike],
    lower_better: bool = False,
    note: str = "",
    progress: bool = False,
) -> Metric:
    """
    A [`Metric`] from scores or a function.

    Args:
        name: The metric's name on the pages.
        source: A `Metric` (returned as it is); one score per path, in order (NaN: no score); or a function of an
            RGB PIL image (as `image_reader.open_image` reads the file) returning a float. A file the reader refuses,
            or on which the function raises, gets NaN and a warning naming it; the other files go on.
        paths: The pool's image files.
        lower_better: Lower values of `source` mean better quality.
        progress: Show a progress bar while a function scores the files.

    Raises:
        GMADError: scores of another length than `paths`.
    """
    if isinstance(source, Metric):
        metric = source
    elif callable(source):
        metric = Metric(name, _score_files(source, paths, name, progress), lower_better, note)
    else:
        metric = Metric(name, np.asarray(source, dtype=np.float64).reshape(-1), lower_better, note)
    if metric.raw.shape != (len(paths),):
        raise GMADError(f"metric {metric.name!r}: {metric.raw.size} scores for a pool of {len(paths)} images")
    return metric


def _score_files(
    function: Callable[[Image.Image], float], paths: Sequence[str | os.PathLike], name: str, progress: bool
) -> np.ndarray:
    from tqdm.auto import tqdm

    raw = np.full(len(paths), np.nan)
    for index, path in enumerate(tqdm(paths, desc=f"scoring with {name}", unit="img", disable=not progress or None)):
        try:
            image = open_image(path)
        except ValueError as error:  # the reader names the file and the cause
            warnings.warn(f"{name}: {error}", stacklevel=2)
            continue
        try:
            raw[index] = float(function(image))
        except Exception as error:  # a metric of any library fails on one image: the others go on
            warnings.warn(f"{name}: {path}: scoring failed: {_first_line(error)}", stacklevel=2)
    return raw


# ------------------------------------------------------------------------------------------------------ competition


@dataclass(frozen=True)
class Level:
    """
    One level of the defender in one competition.

    Attributes:
        index: 0 for the defender's lowest scores, `levels - 1` for its highest.
        low, high: The level's bounds on the defender's oriented scores (higher is better).
        count: Scored images in the level.
        better, worse: Pool indices of the attacker's best- and worst-scored image of the level, or `None` when the
            level has no pair.
        reason: Why the level has no pair (`""` when it has one).
    """

    index: int
    low: float
    high: float
    count: int
    better: int | None = None
    worse: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Competition:
    """One metric defending against the other: its levels, each with the pair the attacker chose (or why none)."""

    defender: str
    attacker: str
    levels: list[Level]

    @property
    def pairs(self) -> list[Level]:
        return [level for level in self.levels if level.better is not None]


@dataclass
class GMADResult:
    """Both competitions between two metrics on a pool: `competitions[0]` has the first metric defend."""

    paths: list[str]
    metrics: list[Metric]
    competitions: list[Competition]
    num_levels: int
    binning: str
    excluded: list[str] = field(default_factory=list)  # pool images without a score of both metrics


def level_edges(scores: np.ndarray, levels: int, binning: str = "equal-width") -> np.ndarray:
    """
    The `(levels + 1,)` increasing bounds that cut `scores` (finite, oriented) into `levels` levels: equal-width
    over `[min, max]`, or at the `k / levels` quantiles (`numpy.quantile`, linear interpolation).

    Raises:
        GMADError: an unknown `binning`, `levels < 1`, or no scores.
    """
    if binning not in BINNINGS:
        raise GMADError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    if levels < 1:
        raise GMADError(f"levels must be at least 1, got {levels}")
    if scores.size == 0:
        raise GMADError("no scores to cut into levels")
    if binning == "quantile":
        return np.quantile(scores, np.linspace(0.0, 1.0, levels + 1))
    return np.linspace(scores.min(), scores.max(), levels + 1)


def assign_levels(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """
    The level of each score: `k` where `edges[k] <= score < edges[k + 1]`, the top edge going to the last level.
    Returns `(num_scores,)` int64 in `[0, len(edges) - 2]`.
    """
    return np.clip(np.searchsorted(edges[1:-1], scores, side="right"), 0, len(edges) - 2).astype(np.int64)


def select_pairs(
    defender: np.ndarray, attacker: np.ndarray, levels: int = DEFAULT_LEVELS, binning: str = "equal-width"
) -> list[Level]:
    """
    The gMAD pairs of one competition: in each level of `defender`, the attacker's best- and worst-scored image.

    Args:
        defender, attacker: `(num_images,)` scores oriented so that higher is better; NaN in either one leaves the
            image out.
        levels: How many levels the defender's range is cut into.
        binning: `"equal-width"` or `"quantile"` (see the module's docstring).

    Returns:
        One [`Level`] per level, lowest first. Ties are broken by the lower pool index.

    Raises:
        GMADError: scores of different lengths, fewer than two images scored by both, a bad `levels` or `binning`.
    """
    defender, attacker = np.asarray(defender, dtype=np.float64), np.asarray(attacker, dtype=np.float64)
    if defender.shape != attacker.shape or defender.ndim != 1:
        raise GMADError(f"defender and attacker scores differ in shape: {defender.shape} and {attacker.shape}")
    scored = np.flatnonzero(np.isfinite(defender) & np.isfinite(attacker))
    if scored.size < 2:
        raise GMADError(f"{scored.size} image(s) scored by both metrics: a competition needs at least 2")
    edges = level_edges(defender[scored], levels, binning)
    membership = assign_levels(defender[scored], edges)
    result = []
    for index in range(levels):
        members = scored[membership == index]  # in pool order, so argmax/argmin break ties by the lower index
        low, high, count = float(edges[index]), float(edges[index + 1]), int(members.size)
        if count < 2:
            result.append(Level(index, low, high, count, reason=f"{count} image(s) in this level"))
            continue
        better, worse = members[np.argmax(attacker[members])], members[np.argmin(attacker[members])]
        if attacker[better] == attacker[worse]:
            result.append(Level(index, low, high, count, reason="the attacker scores all its images alike"))
            continue
        result.append(Level(index, low, high, count, int(better), int(worse)))
    return result


def run_gmad(
    paths: Sequence[str | os.PathLike],
    first: Metric | ScoreSource,
    second: Metric | ScoreSource,
    levels: int = DEFAULT_LEVELS,
    binning: str = "equal-width",
    names: tuple[str, str] = ("A", "B"),
    lower_better: tuple[bool, bool] = (False, False),
    progress: bool = False,
) -> GMADResult:
    """
    The gMAD competition between two metrics on a pool, both ways: `first` defends against `second`, then
    `second` against `first`.

    Args:
        paths: The pool's image files.
        first, second: Each a [`Metric`], one score per path, or a function of an RGB PIL image returning its score
            (see [`make_metric`]); `names` and `lower_better` apply to the latter two.
        levels, binning: How each defender's range is cut (see [`select_pairs`]).

    Raises:
        GMADError: see [`select_pairs`] and [`make_metric`]; two metrics of the same name.
    """
    paths = [str(path) for path in paths]
    metrics = [
        make_metric(name, source, paths, lower, progress=progress)
        for name, source, lower in zip(names, (first, second), lower_better, strict=True)
    ]
    if metrics[0].name == metrics[1].name:
        raise GMADError(f"both metrics are named {metrics[0].name!r}: give them different names")
    unscored = ~(np.isfinite(metrics[0].scores) & np.isfinite(metrics[1].scores))
    competitions = [
        Competition(defender.name, attacker.name, select_pairs(defender.scores, attacker.scores, levels, binning))
        for defender, attacker in ((metrics[0], metrics[1]), (metrics[1], metrics[0]))
    ]
    excluded = [paths[index] for index in np.flatnonzero(unscored)]
    return GMADResult(paths, metrics, competitions, levels, binning, excluded)


# ------------------------------------------------------------------------------------------------------------ pools


@dataclass(frozen=True)
class Pool:
    """The images of a competition: their files, and the ids a scores file may name them by."""

    paths: list[Path]
    ids: list[str]


def load_pool(source: str | os.PathLike, recursive: bool = False) -> Pool:
    """
    The images of a folder (the files an installed reader opens, as `qualiclip score` collects them; ids are the
    paths relative to the folder) or of a Parquet file or folder of Parquet files with a `path` column (paths
    relative to the file's folder are resolved against it; ids from an `id` column, else the paths as written).

    Raises:
        GMADError: a missing source, a Parquet table without `path`, or no images.
    """
    source = Path(source)
    if not source.exists():
        raise GMADError(f"--pool {source}: no such file or folder")
    parquet_files = _parquet_files(source)
    if parquet_files:
        return _parquet_pool(parquet_files)
    if not source.is_dir():
        raise GMADError(f"--pool {source}: expected a folder of images, or a Parquet file or folder with a path column")
    paths = _collect_image_paths(source, recursive)
    if not paths:
        raise GMADError(f"--pool {source}: no image files found" + ("" if recursive else " (--recursive descends)"))
    return Pool(paths, [path.relative_to(source).as_posix() for path in paths])


def _parquet_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source] if source.suffix.lower() == ".parquet" else []
    return sorted(source.glob("*.parquet"))


def _read_parquet(files: list[Path]) -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise GMADError('reading Parquet needs PyArrow: pip install "qualiclip-hf[datasets]"') from None
    try:
        return pa.concat_tables([pq.read_table(path) for path in files], promote_options="default")
    except (OSError, pa.ArrowException) as error:
        raise GMADError(f"{files[0].parent}: cannot read Parquet: {_first_line(error)}") from None


def _parquet_pool(files: list[Path]) -> Pool:
    table = _read_parquet(files)
    if "path" not in table.column_names:
        raise GMADError(f"{files[0]}: a Parquet pool needs a 'path' column (columns: {', '.join(table.column_names)})")
    written = [str(value) for value in table.column("path").to_pylist()]
    paths = [path if path.is_absolute() else files[0].parent / path for path in map(Path, written)]
    ids = [str(value) for value in table.column("id").to_pylist()] if "id" in table.column_names else written
    if not paths:
        raise GMADError(f"{files[0]}: the pool lists no images")
    return Pool(paths, ids)


def _scoring_floor() -> tuple[Callable[..., list[Path]], Callable[..., Iterable[Any]]]:
    """`collect_image_paths` and `score_files`: the one place this module imports the scoring floor."""
    from .scoring import collect_image_paths, score_files

    return collect_image_paths, score_files


def _collect_image_paths(folder: Path, recursive: bool) -> list[Path]:
    collect_image_paths, _ = _scoring_floor()
    return collect_image_paths([folder], recursive=recursive)


# ------------------------------------------------------------------------------------------- metrics by name (CLI)


def resolve_metric(
    spec: str,
    pool: Pool,
    model: str = "official",
    device: str = "auto",
    lower_better: bool = False,
    progress: bool = True,
) -> Metric:
    """
    The scores of a metric named on the command line, over `pool`:

    - `qualiclip`: this package's model `model` (`official`, `demo`, a folder, a Hub id), scoring the files as
      `qualiclip score` does (`scoring.score_files`);
    - `pyiqa:NAME`: any metric of `pyiqa.create_metric`, fed the images as the project's reader decodes them; its
      `lower_better` orients it;
    - `scores:FILE`, or a FILE ending in .csv, .jsonl, .json or .parquet: scores of `qualiclip score --output` (or
      any table with `path`/`id` and `score`), see [`read_scores_file`]; `lower_better` says their direction.

    Raises:
        GMADError: an unknown form, or a metric that cannot be had (a model or pyiqa metric that cannot load, say
            offline without its weights), in one line.
    """
    kind, argument = parse_metric_spec(spec, lower_better)
    if kind == "qualiclip":
        return _qualiclip_metric(pool, model, device, progress)
    if kind == "pyiqa":
        return _pyiqa_metric(argument, pool, device, progress)
    scores = read_scores_file(argument, pool)
    return Metric(Path(argument).name, scores, lower_better, f"scores read from {argument}")


def parse_metric_spec(spec: str, lower_better: bool = False) -> tuple[str, str]:
    """
    Checks a metric's name without scoring anything (so that a command refuses a bad one before minutes of work):
    `("qualiclip", "")`, `("pyiqa", NAME)` or `("scores", FILE)`.

    Raises:
        GMADError: an unknown form, a missing scores file, or `lower_better` for a metric that is not a file.
    """
    file = spec.removeprefix("scores:")
    is_file = spec.startswith("scores:") or Path(file).suffix.lower() in SCORES_FILE_SUFFIXES
    if lower_better and not is_file:
        raise GMADError(f"{spec}: lower_better (--lower-better) is for scores files; metrics know their direction")
    if spec == "qualiclip":
        return "qualiclip", ""
    if spec.startswith("pyiqa:") and spec != "pyiqa:":
        return "pyiqa", spec.removeprefix("pyiqa:")
    if is_file:
        if not Path(file).is_file():
            raise GMADError(f"scores file {file}: no such file")
        return "scores", file
    raise GMADError(
        f"unknown metric {spec!r}: use 'qualiclip', 'pyiqa:NAME' (a pyiqa metric) or a scores file "
        f"(scores:FILE, or a file ending in {', '.join(SCORES_FILE_SUFFIXES)})"
    )


def _qualiclip_metric(pool: Pool, name: str, device_choice: str, progress: bool) -> Metric:
    from tqdm.auto import tqdm

    from .loading import load_model_and_processor, resolve_model, select_device

    _, score_files = _scoring_floor()
    try:
        resolved = resolve_model(name)
        device = select_device(device_choice)
        model, processor = load_model_and_processor(resolved, device)
    except (OSError, ValueError) as error:
        raise GMADError(f"cannot load model {name!r}: {_first_line(error)}") from None
    raw = np.full(len(pool.paths), np.nan)
    batches = tqdm(total=len(pool.paths), desc="scoring with qualiclip", unit="img", disable=not progress or None)
    with batches:
        for index, result in enumerate(
            score_files(pool.paths, model, processor, batch_size=1 if device.type == "cpu" else 8)
        ):
            if result.error is None:
                raw[index] = result.score
            else:
                warnings.warn(f"qualiclip: {result.error}", stacklevel=2)
            batches.update()
    return Metric(f"qualiclip ({resolved.name})", raw, False, resolved.description)


def _pyiqa_metric(name: str, pool: Pool, device_choice: str, progress: bool) -> Metric:
    try:
        import pyiqa
        import torch
    except ImportError as error:
        raise GMADError(f'pyiqa:{name} needs pyiqa (pip install "qualiclip-hf[pyiqa]"): {error}') from None
    from .loading import select_device

    device = select_device(device_choice)
    try:
        metric = pyiqa.create_metric(name, device=device)
    except Exception as error:  # unknown names assert; missing weights raise URL, HTTP or OS errors of urllib
        message = _first_line(error) or type(error).__name__
        hint = ""
        if "urlopen" in message or "resolve" in message or isinstance(error, OSError):
            hint = " (pyiqa downloads its weights on first use; offline they must already be in $TORCH_HOME/hub/pyiqa)"
        raise GMADError(f"pyiqa metric {name!r} is unavailable: {message}{hint}") from None

    @torch.inference_mode()
    def score(image: Image.Image) -> float:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float().div(255)
        return float(metric(pixels.to(device)).reshape(-1)[0])

    return make_metric(
        f"pyiqa:{name}", score, pool.paths, bool(metric.lower_better), "pyiqa " + pyiqa.__version__, progress
    )


def read_scores_file(path: str | os.PathLike, pool: Pool, column: str = "score") -> np.ndarray:
    """
    Scores from a file mapped onto `pool`: the CSV, JSON lines or JSON of `qualiclip score --output`, or Parquet,
    with a `path` or `id` column and the score `column`. A row matches a pool image by absolute path, or by the
    image's id (its path relative to a pool folder, or a Parquet pool's `id`). Returns `(len(pool.paths),)` float64,
    NaN for images without a row or whose row has no score (an `error` row).

    Raises:
        GMADError: an unreadable file, a missing column, or no row that matches the pool.
    """
    path = Path(path)
    rows = _read_rows(path)
    if rows and column not in rows[0]:
        raise GMADError(f"{path}: no {column!r} column (columns: {', '.join(rows[0])})")
    by_path = {os.path.abspath(pool_path): index for index, pool_path in enumerate(pool.paths)}
    by_id = {pool_id: index for index, pool_id in enumerate(pool.ids)}
    scores = np.full(len(pool.paths), np.nan)
    matched = 0
    for number, row in enumerate(rows, start=1):
        key_path, key_id = row.get("path"), row.get("id")
        index = None
        if key_path not in (None, ""):
            index = by_path.get(os.path.abspath(str(key_path)), by_id.get(str(key_path)))
        if index is None and key_id not in (None, ""):
            index = by_id.get(str(key_id))
        if index is None:
            continue
        matched += 1
        value = row.get(column)
        try:
            scores[index] = np.nan if value in (None, "") else float(value)
        except (TypeError, ValueError):
            raise GMADError(f"{path}: row {number}: {column} is not a number: {value!r}") from None
    if not matched:
        raise GMADError(f"{path}: none of its {len(rows)} rows names an image of the pool (by path or id)")
    return scores


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in SCORES_FILE_SUFFIXES:
        raise GMADError(f"{path}: a scores file ends with one of {', '.join(SCORES_FILE_SUFFIXES)}")
    if suffix == ".parquet":
        return _read_parquet([path]).to_pylist()
    try:
        # Names as `qualiclip score` writes them: bytes that are not UTF-8 kept, and "\r" not read as a line end.
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise GMADError(f"cannot read {path}: {error}") from None
    try:
        if suffix == ".csv":
            return list(csv.DictReader(io.StringIO(text, newline="")))
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as error:
        raise GMADError(f"{path}: not valid {suffix[1:].upper()}: {error}") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise GMADError(f"{path}: expected a JSON list of objects")
    return rows


# ---------------------------------------------------------------------------------------------------------- report


def study_id(result: GMADResult) -> str:
    """A short hash of the pairs shown: judgements are checked against the report they were made on."""
    content = [
        [competition.defender, competition.attacker, level.index, result.paths[level.better], result.paths[level.worse]]
        for competition in result.competitions
        for level in competition.pairs
    ]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def write_report(
    result: GMADResult,
    output: str | os.PathLike,
    seed: int = 0,
    thumbnail_size: int = 256,
    study_max_size: int | None = 1024,
    progress: bool = False,
) -> Path:
    """
    Writes the competition's report folder: `index.html` (the pairs of each level, thumbnails and both scores),
    `study.html` (the two-choice study, which records a person's judgements as a downloaded JSON file), `pairs.json`
    (what the study shows, read back by [`summarize_judgements`]) and `scores.csv` (every image's scores). The HTML
    pages are self-contained: images are embedded as data URIs, scripts are inline, nothing is fetched.

    Args:
        output: A folder that does not exist or is empty. It is written in a temporary folder beside it, then
            renamed into place, so it is complete or absent.
        seed: The study's default seed for the pair order and the left/right placement (`study.html#seed=N` gives
            another per person).
        thumbnail_size: The longest side of the report's thumbnails (JPEG, quality 90: for overview only).
        study_max_size: The longest side of the study's images (PNG, lossless), larger images are downscaled (a
            downscaled image hides fine noise and blur: `None` keeps full size, at the cost of a larger page).

    Raises:
        GMADError: a non-empty `output`, or an image that cannot be read (pairs are of scored images, so read once).
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise GMADError(f"--output {output} exists and is not an empty folder: choose another or delete it")
    output.parent.mkdir(parents=True, exist_ok=True)
    shown = sorted({index for c in result.competitions for level in c.pairs for index in (level.better, level.worse)})
    thumbnails, study_images = {}, {}
    from tqdm.auto import tqdm

    for index in tqdm(shown, desc="images for the pages", unit="img", disable=not progress or None):
        try:
            image = open_image(result.paths[index])
        except ValueError as error:
            raise GMADError(str(error)) from None
        thumbnails[index] = thumbnail_data_uri(image, thumbnail_size, quality=90)
        study_images[index] = thumbnail_data_uri(image, study_max_size, image_format="PNG")
    identifier = study_id(result)
    pairs = _pairs_document(result, identifier, seed, study_max_size)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial"))
    try:
        (staging / PAIRS_FILE).write_text(json.dumps(pairs, indent=1) + "\n", encoding="utf-8")
        (staging / REPORT_PAGE).write_text(_report_page(result, pairs, thumbnails), encoding="utf-8")
        (staging / STUDY_PAGE).write_text(_study_page(pairs, study_images), encoding="utf-8")
        _write_scores_csv(staging / SCORES_FILE, result)
        staging.chmod(0o777 & ~_umask())
        if output.is_dir():
            output.rmdir()  # empty, checked above; the rename below needs the name free
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _pairs_document(result: GMADResult, identifier: str, seed: int, study_max_size: int | None) -> dict:
    def metric_entry(metric: Metric) -> dict:
        return {"name": metric.name, "lower_better": metric.lower_better, "note": metric.note}

    pairs = []
    for competition in result.competitions:
        for level in competition.pairs:
            pairs.append(
                {
                    "id": f"p{len(pairs) + 1}",
                    "defender": competition.defender,
                    "attacker": competition.attacker,
                    "level": level.index,
                    "level_range": [level.low, level.high],
                    "level_count": level.count,
                    # Image keys are pool indices; `better` is the image the attacker scored higher.
                    "better": f"i{level.better}",
                    "worse": f"i{level.worse}",
                }
            )
    used = sorted({int(key[1:]) for pair in pairs for key in (pair["better"], pair["worse"])})
    return {
        "format": PAIRS_FORMAT,
        "version": FORMAT_VERSION,
        "study": identifier,
        "seed": seed,
        "levels": result.num_levels,
        "binning": result.binning,
        "study_max_size": study_max_size,
        "metrics": [metric_entry(metric) for metric in result.metrics],
        "images": {
            f"i{index}": {
                "path": result.paths[index],
                "raw": {metric.name: _finite_or_none(metric.raw[index]) for metric in result.metrics},
            }
            for index in used
        },
        "pairs": pairs,
        "skipped_levels": [
            {"defender": c.defender, "attacker": c.attacker, "level": level.index, "reason": level.reason}
            for c in result.competitions
            for level in c.levels
            if level.better is None
        ],
        "excluded": result.excluded,
    }


def _write_scores_csv(path: Path, result: GMADResult) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", *(metric.name for metric in result.metrics)])
        for index, image_path in enumerate(result.paths):
            writer.writerow([image_path, *(_format_csv(metric.raw[index]) for metric in result.metrics)])


def _format_csv(value: float) -> str:
    return "" if not math.isfinite(value) else repr(float(value))


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------------- judgements


@dataclass(frozen=True)
class CompetitionSummary:
    """
    The judged outcome of one competition.

    Attributes:
        aggressiveness: Mean over judged pairs of `p`, the share of judgements preferring the attacker's
            better-scored image (in [0, 1]; NaN if no pair was judged).
        resistance: `1 - aggressiveness`: the defender's.
        per_pair: `(pair id, level, judgements, judgements agreeing with the attacker)` for each pair.
    """

    defender: str
    attacker: str
    aggressiveness: float
    resistance: float
    per_pair: list[tuple[str, int, int, int]]


def summarize_judgements(report: str | os.PathLike, judgement_files: Iterable[str | os.PathLike]) -> list[dict]:
    """
    Aggressiveness and resistance (see the module's docstring) from the judgement files that `study.html`
    downloads, one per person, pooled.

    Args:
        report: The report folder (its `pairs.json`) the judgements were made on.
        judgement_files: JSON files of the study page.

    Returns:
        One dict per competition (both ways): `defender`, `attacker`, `aggressiveness`, `resistance`, `pairs` (each
        `id`, `level`, `judgements`, `agree_with_attacker`, `p`), `pairs_judged`, `pairs_total`.

    Raises:
        GMADError: an unreadable file, a file made on another report (its `study` differs), or a judgement that
            names a pair or image the report does not have.
    """
    pairs_path = Path(report) / PAIRS_FILE
    document = _read_json(pairs_path)
    if document.get("format") != PAIRS_FORMAT:
        raise GMADError(f"{pairs_path}: not a gMAD report's {PAIRS_FILE}")
    pairs = {pair["id"]: pair for pair in document["pairs"]}
    counts = {pair_id: [0, 0] for pair_id in pairs}  # judgements, agreeing with the attacker
    for path in map(Path, judgement_files):
        judged = _read_json(path)
        if judged.get("format") != JUDGEMENTS_FORMAT:
            raise GMADError(f"{path}: not a judgements file of the gMAD study page")
        if judged.get("study") != document["study"]:
            raise GMADError(f"{path}: made on study {judged.get('study')!r}, not this report's {document['study']!r}")
        seen = set()
        for number, judgement in enumerate(judged.get("judgements", []), start=1):
            pair = pairs.get(judgement.get("pair"))
            if pair is None:
                raise GMADError(f"{path}: judgement {number}: unknown pair {judgement.get('pair')!r}")
            if pair["id"] in seen:
                raise GMADError(f"{path}: judgement {number}: pair {pair['id']} is judged twice")
            seen.add(pair["id"])
            shown = {judgement.get("left"), judgement.get("right")}
            if shown != {pair["better"], pair["worse"]} or judgement.get("chosen") not in shown:
                raise GMADError(f"{path}: judgement {number}: its images are not those of pair {pair['id']}")
            counts[pair["id"]][0] += 1
            counts[pair["id"]][1] += judgement["chosen"] == pair["better"]
    summaries = []
    competitions = list(dict.fromkeys((pair["defender"], pair["attacker"]) for pair in document["pairs"]))
    for defender, attacker in competitions:
        rows = []
        for pair in document["pairs"]:
            if (pair["defender"], pair["attacker"]) != (defender, attacker):
                continue
            total, agree = counts[pair["id"]]
            p = agree / total if total else None
            rows.append(
                {"id": pair["id"], "level": pair["level"], "judgements": total, "agree_with_attacker": agree, "p": p}
            )
        judged_p = [row["p"] for row in rows if row["p"] is not None]
        aggressiveness = float(np.mean(judged_p)) if judged_p else None
        summaries.append(
            {
                "defender": defender,
                "attacker": attacker,
                "aggressiveness": aggressiveness,
                "resistance": None if aggressiveness is None else 1.0 - aggressiveness,
                "pairs_judged": len(judged_p),
                "pairs_total": len(rows),
                "pairs": rows,
            }
        )
    return summaries


def format_summary(summaries: list[dict]) -> str:
    """A plain-text table of [`summarize_judgements`]' result, one line per competition."""
    lines = [f"{'attacker':<24} {'defender':<24} {'aggressiveness':>14} {'resistance':>10}  pairs judged"]
    for summary in summaries:
        value = summary["aggressiveness"]
        aggressiveness = "-" if value is None else f"{value:.3f}"
        resistance = "-" if value is None else f"{summary['resistance']:.3f}"
        lines.append(
            f"{summary['attacker']:<24} {summary['defender']:<24} {aggressiveness:>14} {resistance:>10}  "
            f"{summary['pairs_judged']}/{summary['pairs_total']}"
        )
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise GMADError(f"cannot read {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise GMADError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise GMADError(f"{path}: expected a JSON object")
    return content


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------- pages


def _metric_label(metric: dict) -> str:
    direction = "lower is better; negated to compare" if metric["lower_better"] else "higher is better"
    note = f", {metric['note']}" if metric["note"] else ""
    return f"{metric['name']} ({direction}{note})"


def _report_page(result: GMADResult, pairs: dict, thumbnails: dict[int, str]) -> str:
    escape = html.escape
    metrics = pairs["metrics"]
    names = [metric["name"] for metric in metrics]
    parts = [
        f"<h1>gMAD: {escape(names[0])} vs {escape(names[1])}</h1>",
        "<p>Group maximum differentiation (Ma et al., IEEE TPAMI 2020). The defender's score range is cut into "
        f"{result.num_levels} {escape(result.binning)} levels, whose images it takes as equal in quality; in each, "
        "the attacker shows the pair it scores most differently. Where people see a difference the attacker's way, "
        "the defender failed. Level 1 holds the defender's worst-scored images. Judge the pairs with "
        f"<a href='{STUDY_PAGE}'>{STUDY_PAGE}</a>.</p>",
        "<ul>" + "".join(f"<li>{escape(_metric_label(metric))}</li>" for metric in metrics) + "</ul>",
        f"<p>{len(result.paths)} images in the pool"
        + (f", {len(result.excluded)} without a score of both metrics (left out)" if result.excluded else "")
        + ". Thumbnails are JPEG previews; the study shows lossless images.</p>",
    ]
    for competition in result.competitions:
        parts.append(f"<h2>{escape(competition.defender)} defends, {escape(competition.attacker)} attacks</h2>")
        parts.append(
            "<table><tr><th>level</th><th>defender range</th><th>images</th>"
            f"<th>{escape(competition.attacker)}'s better</th><th>{escape(competition.attacker)}'s worse</th></tr>"
        )
        for level in reversed(competition.levels):
            cells = (
                [_image_cell(result, index, thumbnails) for index in (level.better, level.worse)]
                if level.better is not None
                else [f"<td colspan='2' class='none'>no pair: {escape(level.reason)}</td>"]
            )
            span = _display_range(level, result, competition.defender)
            parts.append(f"<tr><td>{level.index + 1}</td><td>{span}</td><td>{level.count}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    return page(f"gMAD: {names[0]} vs {names[1]}", "\n".join(parts), _REPORT_STYLE, heading=False)


def _display_range(level: Level, result: GMADResult, defender: str) -> str:
    metric = next(metric for metric in result.metrics if metric.name == defender)
    low, high = (-level.high, -level.low) if metric.lower_better else (level.low, level.high)
    return f"{low:.4g} – {high:.4g}"


def _image_cell(result: GMADResult, index: int, thumbnails: dict[int, str]) -> str:
    scores = "<br>".join(f"{html.escape(metric.name)}: {metric.raw[index]:.4g}" for metric in result.metrics)
    name = html.escape(Path(result.paths[index]).name)
    title = html.escape(result.paths[index])
    return f"<td><img src='{thumbnails[index]}' alt='{name}' title='{title}'><div>{name}<br>{scores}</div></td>"


_REPORT_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
td, th { border: 1px solid #ccc; padding: 0.4em; vertical-align: top; text-align: center; font-size: 0.9em; }
td.none { color: #888; }
img { display: block; margin: 0 auto 0.3em; }
"""


def _study_page(pairs: dict, study_images: dict[int, str]) -> str:
    data = {
        "format": JUDGEMENTS_FORMAT,
        "version": FORMAT_VERSION,
        "study": pairs["study"],
        "seed": pairs["seed"],
        "pairs": [{"id": pair["id"], "images": [pair["better"], pair["worse"]]} for pair in pairs["pairs"]],
        "images": {f"i{index}": uri for index, uri in study_images.items()},
    }
    # `</` would end the script element early; JSON allows it escaped.
    payload = json.dumps(data).replace("</", "<\\/")
    body = _STUDY_BODY + f"<script>const STUDY = {payload};\n{_STUDY_SCRIPT}</script>"
    return page("Image quality study", body, _STUDY_STYLE, heading=False)


_STUDY_STYLE = """
body { font-family: sans-serif; margin: 1em; background: #777; color: #fff; text-align: center; }
#pair { display: flex; gap: 1em; justify-content: center; align-items: flex-start; }
#pair figure { margin: 0; }
#pair img { max-width: 48vw; max-height: 75vh; cursor: pointer; border: 3px solid transparent; }
#pair img:hover { border-color: #fff; }
button { font-size: 1em; margin: 0.4em; padding: 0.4em 1em; }
"""

_STUDY_BODY = """
<h1>Which image has the better quality?</h1>
<p>Click the better image (or press the left / right arrow key). If they look alike, pick the one you would keep.
Backspace goes back one pair.</p>
<p id="progress"></p>
<div id="pair">
  <figure><img id="left" alt="left image"><figcaption>left</figcaption></figure>
  <figure><img id="right" alt="right image"><figcaption>right</figcaption></figure>
</div>
<div id="done" hidden>
  <p>All pairs judged, thank you. Save your judgements and send the file to whoever runs the study.</p>
  <label>Your name or initials (optional): <input id="observer"></label>
  <button id="download">Download judgements (JSON)</button>
</div>
<p><button id="back">Back</button></p>
"""

# The pair order and left/right placement come from a small seeded generator (mulberry32), so that a study can be
# repeated exactly; `#seed=N` in the address gives each person another order.
_STUDY_SCRIPT = """
function mulberry32(seed) {
  let state = seed >>> 0;
  return function () {
    state = (state + 0x6D2B79F5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const hashSeed = /seed=(\\d+)/.exec(location.hash);
const seed = hashSeed ? Number(hashSeed[1]) : STUDY.seed;
const random = mulberry32(seed);
const order = STUDY.pairs.map((pair) => {
  const flip = random() < 0.5;
  return { id: pair.id, left: pair.images[flip ? 1 : 0], right: pair.images[flip ? 0 : 1] };
});
for (let i = order.length - 1; i > 0; i--) {
  const j = Math.floor(random() * (i + 1));
  [order[i], order[j]] = [order[j], order[i]];
}
const judgements = new Map();
const started = new Date().toISOString();
let position = 0;
let shownAt = performance.now();

function show() {
  const done = position >= order.length;
  document.getElementById("pair").hidden = done;
  document.getElementById("done").hidden = !done;
  document.getElementById("progress").textContent = done
    ? `${order.length} of ${order.length} judged`
    : `pair ${position + 1} of ${order.length}`;
  if (!done) {
    document.getElementById("left").src = STUDY.images[order[position].left];
    document.getElementById("right").src = STUDY.images[order[position].right];
  }
  shownAt = performance.now();
}

function choose(side) {
  if (position >= order.length) return;
  const pair = order[position];
  judgements.set(pair.id, {
    pair: pair.id, left: pair.left, right: pair.right, chosen: pair[side],
    milliseconds: Math.round(performance.now() - shownAt),
  });
  position += 1;
  show();
}

function back() {
  if (position > 0) { position -= 1; show(); }
}

function download() {
  const record = {
    format: STUDY.format, version: STUDY.version, study: STUDY.study, seed: seed,
    observer: document.getElementById("observer").value, started: started, finished: new Date().toISOString(),
    judgements: order.filter((pair) => judgements.has(pair.id)).map((pair) => judgements.get(pair.id)),
  };
  const blob = new Blob([JSON.stringify(record, null, 1)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  const who = record.observer.replace(/[^A-Za-z0-9_-]/g, "") || "anonymous";
  link.download = `gmad-judgements-${STUDY.study}-${who}.json`;
  document.body.appendChild(link);
  link.click();
  link.remove();
}

document.getElementById("left").addEventListener("click", () => choose("left"));
document.getElementById("right").addEventListener("click", () => choose("right"));
document.getElementById("back").addEventListener("click", back);
document.getElementById("download").addEventListener("click", download);
document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT") return;
  if (event.key === "ArrowLeft") choose("left");
  else if (event.key === "ArrowRight") choose("right");
  else if (event.key === "Backspace") back();
});
show();
"""
