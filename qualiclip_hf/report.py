"""What a score means: the distribution of a set of scores, and a keep-list cut by a percentile or a threshold.

A QualiCLIP score is a probability in [0, 1] that the image matches the "good" prompt of each antonym pair more
than the "bad" one, averaged over the pairs. Its absolute value depends on the content and on the model's weights,
so a fixed threshold (`score >= 0.6`) means different things on different collections; a percentile ("drop the
bottom 10 %") means the same thing on every one. This module reads a table of scores, gives its percentiles, the
keep-list of a cut, and an HTML page that shows the distribution with sample pictures per score decile.

The one percentile rule, used by the table, the cut and the deciles alike: `numpy.quantile(scores, q,
method="linear")` over the scored rows (numpy's default; type 7 of Hyndman & Fan, "Sample quantiles in statistical
packages", The American Statistician 50(4), 1996; also R's and pandas' default). A cut keeps the rows whose score is
`>=` its threshold, so rows of equal score are kept or dropped together, whatever their order; with n distinct scores,
dropping the bottom fraction p drops `ceil((n - 1) * p)` rows (10 of 100 at 10 %), with ties at the threshold fewer.
Rows without a score (the scorer's `error`, or no value) are never kept, never enter a percentile, and are counted.

Only the standard library and numpy are imported at module level; pyarrow and the dataset reader are imported to
read Parquet.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import html_report

__all__ = [
    "PERCENTILES",
    "ScoreTable",
    "Selection",
    "as_score_table",
    "decile_of",
    "keep_ids",
    "keep_list_text",
    "keep_rows",
    "percentile_table",
    "read_score_table",
    "render_report",
    "select",
    "write_keep_list",
    "write_report",
]

# The percentiles of the table: the deciles, plus the tails where cuts are usually made.
PERCENTILES = (0, 1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 95, 99, 100)
QUANTILE_METHOD = "linear"
# Column names, in order of preference: `qualiclip score FILES` results (`path`, `score`, `error`), `score --dataset`
# parts (`id`, `quality_score`, `error`) and `QualityScorer`'s columns in a `datasets` table (`quality_error`).
SCORE_COLUMNS = ("score", "quality_score")
ERROR_COLUMNS = ("error", "quality_error")
ID_COLUMNS = ("path", "id")
RESULT_SUFFIXES = (".csv", ".json", ".jsonl")
# The error recorded for a row that holds neither a score nor an error (a hand-edited file, a NaN).
NO_SCORE = "no score"


@dataclass
class ScoreTable:
    """
    Scores with their row ids, as read from a scores file or a table.

    Attributes:
        ids: One per row, in the input's order: the image's path (`qualiclip score` results), the row's `id`
            (`score --dataset`), else the row index.
        scores: float64 array of shape `(len(ids),)`, NaN where the row has no score.
        errors: One per row: `None` for a scored row, else why it has no score (the scorer's error, or `"no score"`).
        id_column: The input's column the ids come from (`"path"`, `"id"`), or `None` for row indices.
        models: The models the scores were computed with, as recorded (empty when the input records none).
        source: What was read, for messages (a file name, or `"<table>"`).
    """

    ids: list[Any]
    scores: np.ndarray
    errors: list[str | None]
    id_column: str | None = None
    models: tuple[str, ...] = ()
    source: str = "<table>"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def scored(self) -> np.ndarray:
        """Boolean array of shape `(len(self),)`: the rows that have a score."""
        return ~np.isnan(self.scores)

    @property
    def failed(self) -> int:
        """The number of rows without a score."""
        return int(np.isnan(self.scores).sum())


@dataclass
class Selection:
    """
    The result of a cut ([`select`]).

    Attributes:
        keep: Boolean array of shape `(rows,)`: the rows kept, in the input's order.
        threshold: The lowest score kept (`score >= threshold`); NaN when no row has a score.
        rule: The cut in words, e.g. `"drop the bottom 10 % (score >= 0.4132)"`.
        kept: Rows kept.
        dropped: Scored rows below the threshold.
        failed: Rows without a score (never kept).
    """

    keep: np.ndarray
    threshold: float
    rule: str
    kept: int
    dropped: int
    failed: int


# ------------------------------------------------------------------------------------------------------- reading


def read_score_table(source: str | os.PathLike, require_complete: bool = True) -> ScoreTable:
    """
    Reads the scores of `qualiclip score`: a results file (`.csv`, `.json`, `.jsonl`: `path`, `score`, `error`,
    `model`, ...), a Parquet file, or a `score --dataset` output folder (its part files, with
    `qualiclip_hf.scoring.dataset.read_scores`).

    Args:
        source: The file or folder.
        require_complete: For a `--dataset` folder, refuse a run that is not finished (the default); `False` reads the
            parts written so far.

    Raises:
        ValueError: one line naming the file and the cause: missing, an unknown format, does not parse, no score
            column, an unfinished run.
    """
    path = Path(source)
    if path.is_dir():
        from .scoring.dataset import RUN_FILE, read_scores

        table = read_scores(path, require_complete=require_complete)
        models = ()
        run_file = path / RUN_FILE
        if run_file.is_file():
            try:
                model = json.loads(run_file.read_text(encoding="utf-8")).get("model")
            except (OSError, ValueError, AttributeError):
                model = None
            models = (str(model),) if model is not None else ()
        return _from_columns(_arrow_columns(table), str(path), models)
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
            raise ValueError(f"{path}: cannot read it as Parquet: {_first_line(error)}") from None
        return _from_columns(_arrow_columns(table), str(path))
    if suffix not in RESULT_SUFFIXES:
        raise ValueError(f"{path}: scores are read from .csv, .json, .jsonl or .parquet files, or a --dataset folder")
    try:
        # As `qualiclip score` writes them (`scoring.results`): a name that is not UTF-8 keeps its bytes, and lines
        # end at "\n" only (`str.splitlines` would also cut a name at U+2028 or a form feed).
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as file:  # "\r" kept as it is
            text = file.read()
        if suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text) if text.strip() else []
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError("not a list of rows")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: does not parse as scores: {_first_line(error)}") from None
    names = list(rows[0]) if rows else []
    columns = {name: [row.get(name) for row in rows] for name in names}
    return _from_columns(columns, str(path))


def as_score_table(data: Any, score_column: str | None = None, id_column: str | None = None) -> ScoreTable:
    """
    A [`ScoreTable`] from a table in memory: a `datasets.Dataset` after `QualityScorer` (`quality_score`,
    `quality_error`), a `pyarrow.Table` or `pandas.DataFrame` of scores, a mapping of column name to values, or a
    plain sequence of scores (`None` for a failed row) or float array (NaN); their ids are the row indices. Only the
    id, score and error columns are read (an image column is never decoded).

    Args:
        data: The table.
        score_column: The score column; default: the first of `score`, `quality_score`.
        id_column: The id column; default: the first of `path`, `id`, else the row index.

    Raises:
        ValueError: no score column, or a score that is not a number.
    """
    if isinstance(data, ScoreTable):
        return data
    if isinstance(data, np.ndarray) and data.dtype.kind == "f" and data.ndim == 1:  # NaN marks a failed row
        scores = data.astype(np.float64)
        if np.isinf(scores).any():
            raise ValueError(f"<scores>: row {int(np.flatnonzero(np.isinf(scores))[0])}: the score is infinite")
        errors = [NO_SCORE if math.isnan(score) else None for score in scores.tolist()]
        return ScoreTable(list(range(len(scores))), scores, errors, source="<scores>")
    names = _column_names(data)
    if names is None:  # a plain sequence of scores
        return _from_columns({"score": list(data)}, "<scores>")
    for name in (score_column, id_column):
        if name is not None and name not in names:
            raise ValueError(f"<table>: no column {name!r}; the columns are {', '.join(map(str, names))}")
    score_column = score_column or _first(names, SCORE_COLUMNS)
    if score_column is None:
        raise ValueError(
            f"<table>: no score column ({' or '.join(SCORE_COLUMNS)}); the columns are "
            f"{', '.join(map(str, names)) or 'none'}"
        )
    id_column = id_column or _first(names, ID_COLUMNS)
    wanted = (score_column, id_column, _first(names, ERROR_COLUMNS), "model")
    columns = {name: _column_values(data, name) for name in wanted if name is not None and name in names}
    return _from_columns(columns, "<table>", score_column=score_column, id_column=id_column)


def _from_columns(
    columns: Mapping[str, list],
    source: str,
    models: tuple[str, ...] = (),
    score_column: str | None = None,
    id_column: str | None = None,
) -> ScoreTable:
    score_column = score_column or _first(columns, SCORE_COLUMNS)
    if score_column is None:
        found = ", ".join(map(str, columns)) or "none"
        raise ValueError(f"{source}: no score column ({' or '.join(SCORE_COLUMNS)}); the columns are {found}")
    values = columns[score_column]
    id_column = id_column or _first(columns, ID_COLUMNS)
    ids = list(columns[id_column]) if id_column is not None else list(range(len(values)))
    error_column = _first(columns, ERROR_COLUMNS)
    recorded = columns[error_column] if error_column is not None else [None] * len(values)
    scores = np.full(len(values), np.nan)
    errors: list[str | None] = []
    for row, (value, error) in enumerate(zip(values, recorded, strict=True)):
        score = _as_score(value, source, row, ids[row])
        if not _missing(error) or math.isnan(score):
            errors.append(NO_SCORE if _missing(error) else str(error))
        else:
            scores[row] = score
            errors.append(None)
    if not models and "model" in columns:
        models = tuple(sorted({str(model) for model in columns["model"] if not _missing(model)}))
    return ScoreTable(ids, scores, errors, id_column, models, source)


def _missing(value: Any) -> bool:
    """An empty cell: `None`, an empty CSV field, or pandas' NaN in a column of text."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _as_score(value: Any, source: str, row: int, row_id: Any) -> float:
    if _missing(value):
        return math.nan
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: row {row} ({row_id}): the score {value!r} is not a number") from None
    if math.isinf(score):
        raise ValueError(f"{source}: row {row} ({row_id}): the score is infinite")
    return score


def _arrow_columns(table: Any) -> dict[str, list]:
    """The id, score and error columns of a `pyarrow.Table` (others, such as embeddings, are not converted)."""
    names = table.column_names
    wanted = {_first(names, SCORE_COLUMNS), _first(names, ID_COLUMNS), _first(names, ERROR_COLUMNS), "model"}
    return {name: table.column(name).to_pylist() for name in names if name in wanted}


def _column_names(data: Any) -> list | None:
    if isinstance(data, Mapping):
        return list(data)
    names = getattr(data, "column_names", None)  # pyarrow.Table, datasets.Dataset
    if names is None and hasattr(data, "columns") and hasattr(data, "iloc"):  # pandas.DataFrame
        names = list(data.columns)
    return list(names) if names is not None else None


def _column_values(data: Any, name: str) -> list:
    if hasattr(data, "iloc"):  # pandas: NaN stands for a missing score
        return data[name].tolist()
    if hasattr(data, "schema") and hasattr(data, "column"):  # pyarrow
        return data.column(name).to_pylist()
    return list(data[name])


def _first(names: Any, candidates: Sequence[str]) -> str | None:
    return next((name for name in candidates if name in names), None)


# ------------------------------------------------------------------------------------------------------ percentiles


def percentile_table(
    scores: ScoreTable | Sequence[float] | np.ndarray, percentiles: Sequence[float] = PERCENTILES
) -> list[tuple[float, float]]:
    """
    The score at each percentile of the scored rows: `[(percentile, score), ...]`, with
    `numpy.percentile(scores, percentiles, method="linear")` (the module's rule). Rows without a score are left out.

    Raises:
        ValueError: no row has a score.
    """
    values = _scored_values(scores)
    scores = np.percentile(values, percentiles, method=QUANTILE_METHOD)
    return [(float(percentile), float(score)) for percentile, score in zip(percentiles, scores, strict=True)]


def _scored_values(scores: Any) -> np.ndarray:
    table = scores if isinstance(scores, ScoreTable) else as_score_table(scores)
    values = table.scores[table.scored]
    if values.size == 0:
        raise ValueError(f"{table.source}: no row has a score ({table.failed} failed)")
    return values


# ------------------------------------------------------------------------------------------------------ the cut


def select(
    scores: Any,
    drop_bottom: float | None = None,
    keep_top: float | None = None,
    min_score: float | None = None,
) -> Selection:
    """
    Which rows a cut keeps; exactly one of the three rules is given.

    Args:
        scores: A [`ScoreTable`], or anything [`as_score_table`] takes (a `datasets.Dataset` after `QualityScorer`,
            a list of scores with `None` for failed rows, ...).
        drop_bottom: The fraction of the scored rows to drop, in [0, 1): keeps `score >= quantile(drop_bottom)`.
        keep_top: The fraction to keep, in (0, 1]: the same as `drop_bottom=1 - keep_top`.
        min_score: A threshold: keeps `score >= min_score`.

    Ties: a row whose score equals the threshold is kept, so equal scores are never split, whatever the row order,
    and a percentile cut may keep more rows than its fraction. Rows without a score are never kept.

    Raises:
        ValueError: not exactly one rule, a fraction out of range, or (for a percentile) no row with a score.
    """
    table = as_score_table(scores)
    given = [
        name
        for name, value in (("drop_bottom", drop_bottom), ("keep_top", keep_top), ("min_score", min_score))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of drop_bottom, keep_top, min_score (given: {', '.join(given) or 'none'})")
    if keep_top is not None:
        if not 0 < keep_top <= 1:
            raise ValueError(f"keep_top is a fraction in (0, 1], not {keep_top}")
        # Rounded so that keep_top=0.9 cuts where drop_bottom=0.1 does (1 - 0.9 is 0.09999999999999998).
        drop_bottom = round(1.0 - keep_top, 12)
    if drop_bottom is not None:
        if not 0 <= drop_bottom < 1:
            raise ValueError(f"drop_bottom is a fraction in [0, 1), not {drop_bottom}")
        threshold = float(np.quantile(_scored_values(table), drop_bottom, method=QUANTILE_METHOD))
        cut = (
            f"keep the top {_percent(keep_top)}" if keep_top is not None else f"drop the bottom {_percent(drop_bottom)}"
        )
        rule = f"{cut} (score >= {threshold:.4f})"
    else:
        threshold = float(min_score)
        rule = f"keep score >= {threshold:g}"
    keep = table.scored & (np.nan_to_num(table.scores, nan=-np.inf) >= threshold)
    kept = int(keep.sum())
    return Selection(keep, threshold, rule, kept, int(table.scored.sum()) - kept, table.failed)


def keep_rows(scores: Any, **rule: float) -> np.ndarray:
    """
    The indices of the rows a cut keeps (int64, increasing), e.g. for `datasets.Dataset.select`:
    `ds.select(keep_rows(ds, drop_bottom=0.1))`. `rule` is one of [`select`]'s `drop_bottom`, `keep_top`,
    `min_score`.
    """
    return np.flatnonzero(select(scores, **rule).keep)


def keep_ids(scores: Any, **rule: float) -> list:
    """The ids (paths, `id`s or row indices; see [`ScoreTable`]) of the rows a cut keeps, in the input's order."""
    table = as_score_table(scores)
    return [table.ids[row] for row in keep_rows(table, **rule)]


def write_keep_list(
    table: ScoreTable, output: str | os.PathLike | None, overwrite: bool = False, **rule: float
) -> Selection:
    """
    Writes the ids a cut keeps ([`select`]), one per line in the input's order, to `output` (atomically; see
    `html_report.write_text_file`), or returns them unwritten when `output` is `None` (the caller prints them).

    Raises:
        ValueError: a bad rule, or an id holding a line break (it would read as two ids).
        FileExistsError: `output` exists and not `overwrite`.
    """
    selection = select(table, **rule)
    if output is not None:
        html_report.write_text_file(output, keep_list_text(table, selection), overwrite=overwrite)
    return selection


def keep_list_text(table: ScoreTable, selection: Selection) -> str:
    """The kept ids, one per line (`str(id)`), in the input's order."""
    lines = []
    for row in np.flatnonzero(selection.keep):
        text = str(table.ids[row])
        if "\n" in text or "\r" in text:
            raise ValueError(f"{table.source}: row {row}: the id {text!r} holds a line break, which a keep-list cannot")
        lines.append(text + "\n")
    return "".join(lines)


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g} %"


# ------------------------------------------------------------------------------------------------------ the page


def write_report(
    table: ScoreTable, output: str | os.PathLike, samples_per_decile: int = 6, overwrite: bool = False
) -> Path:
    """
    Writes [`render_report`]'s page to `output` (atomically, its folder created).

    Raises:
        ValueError: no row has a score.
        FileExistsError: `output` exists and not `overwrite`.
    """
    return html_report.write_text_file(output, render_report(table, samples_per_decile), overwrite=overwrite)


def decile_of(table: ScoreTable) -> np.ndarray:
    """
    The score decile of each row, 1 (lowest) to 10, as int64 of shape `(len(table),)`; 0 for rows without a score.
    A score equal to a decile's lower edge belongs to that decile, so decile 1 is exactly what
    `select(drop_bottom=0.1)` drops.
    """
    edges = np.quantile(_scored_values(table), np.arange(1, 10) / 10, method=QUANTILE_METHOD)
    deciles = np.searchsorted(edges, np.nan_to_num(table.scores), side="right") + 1
    return np.where(table.scored, deciles, 0)


def render_report(table: ScoreTable, samples_per_decile: int = 6) -> str:
    """
    A self-contained HTML page (no script, nothing fetched) on a table of scores: what was read and by which model,
    a histogram, the retention curve (the lowest score kept when keeping the top X %), the percentile table with
    the rows each `drop the bottom P %` keeps, up to `samples_per_decile` thumbnails per score decile (rows whose id
    names a readable image file; evenly spaced by rank within the decile, lowest first), and the rows without a
    score.

    Raises:
        ValueError: no row has a score.
    """
    escape = html_report.escape
    values = _scored_values(table)
    scored = int(values.size)
    parts = [_summary(table, values)]

    parts.append("<h2>Distribution</h2>")
    parts.append(_histogram_svg(values))
    parts.append("<h2>Keep the top X %</h2>")
    parts.append(
        '<p class="note">The lowest score kept when the top X % of the scored rows are kept: '
        "<code>qualiclip filter SCORES --keep-top X%</code>.</p>"
    )
    parts.append(_retention_svg(values))

    parts.append("<h2>Percentiles</h2>")
    rows = []
    for percentile, score in percentile_table(table):
        kept = int((values >= score).sum())
        rows.append((f"{percentile:g}", f"{score:.4f}", f"{kept} ({kept / scored:.1%})"))
    parts.append(html_report.table(["percentile", "score", "rows scored ≥ it"], rows))
    parts.append(
        f'<p class="note">numpy.percentile, method="{QUANTILE_METHOD}", over the {scored} scored rows. '
        "<code>--drop-bottom P%</code> keeps the rows with a score at or above the P-th percentile.</p>"
    )

    parts.append("<h2>Sample pictures per decile</h2>")
    parts.append(_decile_samples(table, samples_per_decile))

    failed_rows = [row for row, error in enumerate(table.errors) if error is not None]
    parts.append(f"<h2>Rows without a score ({len(failed_rows)})</h2>")
    if failed_rows:
        shown = failed_rows[:50]
        parts.append(
            html_report.table(
                [table.id_column or "row", "error"],
                [(table.ids[row], table.errors[row]) for row in shown],
                text_columns=(0, 1),
            )
        )
        if len(failed_rows) > len(shown):
            parts.append(
                f'<p class="note">and {len(failed_rows) - len(shown)} more; see the error column of '
                f"{escape(table.source)}.</p>"
            )
    else:
        parts.append('<p class="note">None: every row has a score.</p>')
    return html_report.page(f"Scores of {Path(table.source).name}", "\n".join(parts))


def _summary(table: ScoreTable, values: np.ndarray) -> str:
    escape = html_report.escape
    models = ", ".join(table.models) or "not recorded"
    lines = [
        f"<p>{escape(table.source)}: {len(table)} rows, {values.size} scored, {table.failed} without a score. "
        f"Model: {escape(models)}.</p>",
        html_report.table(
            ["mean", "std", "min", "median", "max"],
            [
                [
                    f"{statistic:.4f}"
                    for statistic in (values.mean(), values.std(), values.min(), np.median(values), values.max())
                ]
            ],
        ),
    ]
    if "demo" in table.models:
        lines.append(
            '<p class="note"><strong>Scored with the demo model, which is not QualiCLIP:</strong> these numbers show '
            "the tool, not the quality of the pictures.</p>"
        )
    return "\n".join(lines)


def _decile_samples(table: ScoreTable, samples_per_decile: int) -> str:
    escape = html_report.escape
    deciles = decile_of(table)
    base_dirs = [Path.cwd()]
    if table.source != "<table>":
        base_dirs.append(Path(table.source).resolve().parent)
    unreadable: list[str] = []
    shown = 0
    sections = []
    for decile in range(1, 11):
        rows = np.flatnonzero(deciles == decile)
        rows = rows[np.argsort(table.scores[rows], kind="stable")]
        heading = f"<h3>Decile {decile} ({len(rows)} row{'' if len(rows) == 1 else 's'}"
        if len(rows):
            heading += f", scores {table.scores[rows[0]]:.4f} to {table.scores[rows[-1]]:.4f}"
        heading += ")</h3>"
        picks = (
            rows[np.unique(np.linspace(0, len(rows) - 1, min(samples_per_decile, len(rows))).round().astype(int))]
            if len(rows) and samples_per_decile > 0
            else []
        )
        figures = []
        for row in picks:
            path = _image_file(table.ids[row], base_dirs)
            if path is None:
                continue
            try:
                uri = html_report.thumbnail_data_uri(path)
            except ValueError as error:
                unreadable.append(_first_line(error))
                continue
            caption = f"{table.scores[row]:.4f} {Path(str(table.ids[row])).name}"
            figures.append(html_report.figure(uri, caption, title=str(table.ids[row])))
        shown += len(figures)
        body = '<div class="thumbs">' + "".join(figures) + "</div>" if figures else ""
        sections.append(f'<section class="decile" id="decile-{decile}">{heading}{body}</section>')
    notes = []
    if samples_per_decile == 0:
        notes.append('<p class="note">No pictures: none were asked for (<code>--samples 0</code>).</p>')
    elif shown == 0:
        why = (
            "its ids are not paths (a --dataset output records row ids, not files)"
            if table.id_column != "path"
            else "no row's path names a readable file from here"
        )
        notes.append(
            f'<p class="note">No pictures: {escape(why)}. Pictures are shown for rows whose '
            f"{escape(table.id_column or 'id')} names an image file, relative to the current folder or to "
            "the scores file's.</p>"
        )
    if unreadable:
        notes.append(f'<p class="note">{len(unreadable)} pictures could not be read, e.g. {escape(unreadable[0])}</p>')
    return "\n".join(notes + sections)


def _image_file(row_id: Any, base_dirs: Sequence[Path]) -> Path | None:
    if not isinstance(row_id, str) or not row_id or "\0" in row_id:
        return None
    path = Path(row_id)
    for candidate in [path] if path.is_absolute() else [base / path for base in base_dirs]:
        if candidate.is_file():
            return candidate
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ------------------------------------------------------------------------------------------- charts (inline SVG)

_WIDTH, _HEIGHT = 720, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 20, 20, 45


def _score_range(values: np.ndarray) -> tuple[float, float]:
    """[0, 1], a QualiCLIP score's range, unless the scores leave it (another model's scale)."""
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return 0.0, 1.0
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _svg(content: list[str], label: str) -> str:
    return (
        f'<svg viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" '
        f'height="{_HEIGHT}" role="img" aria-label="{html_report.escape(label)}" font-size="12">'
        + "".join(content)
        + "</svg>"
    )


def _axes(x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]], x_label: str, y_label: str) -> list[str]:
    """Axes, tick labels and light grid lines; tick positions are already in SVG coordinates."""
    bottom, right = _HEIGHT - _BOTTOM, _WIDTH - _RIGHT
    out = [
        f'<line x1="{_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" stroke="#333"/>',
    ]
    for x, text in x_ticks:
        out.append(f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{html_report.escape(text)}</text>')
    for y, text in y_ticks:
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{html_report.escape(text)}</text>')
    out.append(
        f'<text x="{(_LEFT + right) / 2}" y="{_HEIGHT - 6}" text-anchor="middle">{html_report.escape(x_label)}</text>'
    )
    out.append(
        f'<text x="14" y="{(_TOP + bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(_TOP + bottom) / 2})">{html_report.escape(y_label)}</text>'
    )
    return out


def _ticks(low: float, high: float, count: int = 5) -> np.ndarray:
    return np.linspace(low, high, count + 1)


def _count_step(top: int) -> int:
    """A step of 1, 2 or 5 times a power of ten giving at most 6 ticks from 0 to `top` rows."""
    power = 1
    while True:
        for step in (power, 2 * power, 5 * power):
            if top // step <= 5:
                return step
        power *= 10


def _histogram_svg(values: np.ndarray, bins: int = 40) -> str:
    low, high = _score_range(values)
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    top_count = max(int(counts.max()), 1)

    def x_of(score: float) -> float:
        return _LEFT + (score - low) / (high - low) * plot_w

    def y_of(count: float) -> float:  # a fifth of the height left above the tallest bar for the labels
        return _HEIGHT - _BOTTOM - count / (top_count * 1.25) * plot_h

    y_ticks = [(y_of(c), f"{c:g}") for c in range(0, top_count + 1, _count_step(top_count))]
    content = _axes([(x_of(t), f"{t:.2f}") for t in _ticks(low, high)], y_ticks, "score", "rows")
    for count, left, right in zip(counts, edges[:-1], edges[1:], strict=True):
        if count:
            width = max(x_of(right) - x_of(left) - 1, 1)
            content.append(
                f'<rect x="{x_of(left) + 0.5:.1f}" y="{y_of(count):.1f}" width="{width:.1f}"'
                f' height="{y_of(0) - y_of(count):.1f}" fill="#4a78b5"><title>{left:.3f}–{right:.3f}: {count} rows'
                "</title></rect>"
            )
    # One label per line, each on its own text row (they may be close); right of the line, or left near the edge.
    for line, (percentile, colour) in enumerate(((10, "#c0392b"), (50, "#333"), (90, "#27864a"))):
        score = float(np.percentile(values, percentile, method=QUANTILE_METHOD))
        x = x_of(score)
        label_x, anchor = (x + 4, "start") if x < _WIDTH - _RIGHT - 90 else (x - 4, "end")
        content.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_HEIGHT - _BOTTOM}" stroke="{colour}" '
            'stroke-dasharray="5 4" stroke-width="1.5"/>'
        )
        content.append(
            f'<text x="{label_x:.1f}" y="{_TOP + 12 + 15 * line}" text-anchor="{anchor}" fill="{colour}">'
            f"p{percentile} {score:.3f}</text>"
        )
    return _svg(content, f"histogram of {values.size} scores")


def _retention_svg(values: np.ndarray) -> str:
    low, high = _score_range(values)
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    kept_percent = np.linspace(0, 100, 201)[1:]  # keeping 0 % has no lowest score
    thresholds = np.quantile(values, 1 - kept_percent / 100, method=QUANTILE_METHOD)

    def x_of(percent: float) -> float:
        return _LEFT + percent / 100 * plot_w

    def y_of(score: float) -> float:
        return _HEIGHT - _BOTTOM - (score - low) / (high - low) * plot_h

    content = _axes(
        [(x_of(p), f"{p:g} %") for p in range(0, 101, 10)],
        [(y_of(t), f"{t:.2f}") for t in _ticks(low, high)],
        "rows kept (the top X %)",
        "lowest score kept",
    )
    points = " ".join(f"{x_of(p):.1f},{y_of(t):.1f}" for p, t in zip(kept_percent, thresholds, strict=True))
    content.append(f'<polyline points="{points}" fill="none" stroke="#4a78b5" stroke-width="2"/>')
    for percent in (50, 90):
        score = float(np.quantile(values, 1 - percent / 100, method=QUANTILE_METHOD))
        content.append(f'<circle cx="{x_of(percent):.1f}" cy="{y_of(score):.1f}" r="4" fill="#c0392b"/>')
        content.append(
            # Below and left of the point: under a falling curve, where it is empty.
            f'<text x="{x_of(percent) - 8:.1f}" y="{min(y_of(score) + 18, _HEIGHT - _BOTTOM - 6):.1f}" '
            'text-anchor="end" '
            f'fill="#c0392b">top {percent} %: ≥ {score:.3f}</text>'
        )
    return _svg(content, "score threshold against the share of rows kept")
