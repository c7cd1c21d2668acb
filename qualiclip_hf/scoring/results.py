"""Results files of `qualiclip score`: CSV, JSON lines or JSON, written as results come and resumable.

Only the standard library is used here, so the command checks its `--output` before it imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..outputs import check_output_location, write_text_atomic

if TYPE_CHECKING:
    from .files import ScoreResult

OUTPUT_FORMATS = (".csv", ".json", ".jsonl")
# The settings that change a score, recorded in every row and checked on resume, with the option that sets each.
SETTING_OPTIONS = {
    "precision": "--precision",
    "backend": "--backend",
    "max_size": "--max-size",
    # int8 only: a hash of the calibration photos (`qualiclip_hf.backends.quantization.calibration_key`), since other
    # photos
    # give other int8 scores.
    "calibration": "--calibration-images",
    # A hash of the model's config and weights (`qualiclip_hf.backends.onnx.model_cache_key`): the model's name stays
    # when its weights change (a folder retrained in place, a Hub id with a new commit).
    "weights": "--model",
}
# What identifies the scored file, recorded in every row so that `--resume` knows a file again whatever path names it
# (another working directory, a symbolic link) and notices one that changed since (`file_identity`).
IDENTITY_FIELDS = ("resolved_path", "size", "mtime_ns")
RESULT_FIELDS = ("path", "score", "error", "model", *SETTING_OPTIONS, *IDENTITY_FIELDS)
# Names of files are written as the file system holds them: one that is not valid UTF-8 keeps its bytes in a CSV file
# (read back exactly on resume), and JSON escapes them (`"\\udce9"`), which Python's `json` reads back exactly.
_ENCODING_ERRORS = "surrogateescape"


def file_identity(path: str | os.PathLike) -> dict:
    """
    What identifies an image file across runs: `resolved_path` (absolute, symbolic links resolved), and the file's
    `size` in bytes and `mtime_ns` (its modification time, in nanoseconds since the epoch), both `None` for a file that
    cannot be read. Size and modification time, not a hash of the content: resuming a million files must not read
    them all again, and any tool that rewrites a photo changes its modification time.
    """
    resolved = os.path.realpath(path)
    try:
        stat = os.stat(resolved)
    except OSError:
        return {"resolved_path": resolved, "size": None, "mtime_ns": None}
    return {"resolved_path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def printable(text: str) -> str:
    """
    `text` as a terminal can show it: the bytes of a file name that is not valid UTF-8 (held as surrogates by
    `os.fsdecode`) written as `\\xe9`, where printing them to a UTF-8 terminal would raise `UnicodeEncodeError`.
    """
    return text.encode("utf-8", _ENCODING_ERRORS).decode("utf-8", "backslashreplace")


def _row_key(row: dict) -> str:
    # Rows of an earlier version record no resolved path: their path is taken from the current working directory.
    return row["resolved_path"] or os.path.realpath(row["path"])


class ResultWriter:
    """
    Writes [`ScoreResult`]s to a results file as they come, so that an interrupted run keeps what it scored.

    The format follows the extension: `.csv` (a header, then `path,score,error,model,` and the settings),
    `.jsonl` (one object per line) or `.json` (a list of objects). CSV and JSON lines are appended and flushed row by
    row. A JSON list is only valid once complete, so it is rewritten whole, into a temporary file renamed over the
    output (atomic), at most every `json_interval_s` seconds and on `close`: the file on disk is always a complete JSON
    list. Every row names the model that scored it and the settings that change a score (`SETTING_OPTIONS`): the
    precision that ran (the one `auto` chose, never `auto`), the backend that ran the model (`torch`, `onnxruntime` or
    `openvino`), `max_size` (empty in CSV, `null` in JSON: full resolution) and, for int8, `calibration` (a hash of
    the calibration photos). Not recorded: `--max-pixels`, which only decides which files are refused (their rows
    have an error), the device, batch size and `--decode-on`, which move scores by float rounding (nvJPEG's decoding,
    by small pixel differences). The weights are recorded by a hash (`weights`), as the name stays when they change.

    The file is checked when the writer is made: its extension, that it can be created, and with `resume=True` that
    its rows parse and name this model. It is written from [`start`] on, once the settings are known (after the model
    is loaded and its precision chosen); until then it is left as it was.

    Every row also records the file's identity (`IDENTITY_FIELDS`, see [`file_identity`]): its resolved path, size and
    modification time. With `resume=True`, the rows already in the file are kept and [`resume_plan`] tells which of
    this run's files they cover, by resolved path (so a resumed run may start from another folder, or name the files
    through a symbolic link), which are new, and which changed since they were scored (other size or modification
    time: their rows are dropped and they are scored again); [`done`] holds the resolved paths of the rows. A last
    CSV row or JSON line cut off by a crash (no newline) is dropped, and its file is scored again. [`start`]
    (and [`check_settings`], to refuse early) refuses rows recorded with other settings, so that a file never mixes
    scores computed two ways.

    The writer does not lock its file: the command holds an `outputs.OutputLock` on it for the run, so that two runs
    never write one file.

    Args:
        path: The results file; its folder is created.
        model: The model's name, written in every row.
        resume: Keep the rows of an existing file instead of replacing it.
        json_interval_s: The shortest time between two rewrites of a JSON file.
        settings: This run's settings (keys of `SETTING_OPTIONS`): when given, [`start`] is called at once.

    Raises:
        ValueError: an unknown extension; a file to resume that does not parse, or whose rows name another model
            (or, with `settings`, were scored with other settings); a path that cannot be written
            (`outputs.check_output_location`: under a file, in a folder without write permission).
        OSError: the folder cannot be created.
    """

    def __init__(
        self,
        path: str | Path,
        model: str,
        resume: bool = False,
        json_interval_s: float = 2.0,
        settings: dict | None = None,
    ) -> None:
        self.path = Path(path)
        self.format = self.path.suffix.lower()
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"{self.path}: the results file must end with one of {', '.join(OUTPUT_FORMATS)}")
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a folder; name a file")
        self.model = model
        self.json_interval_s = json_interval_s
        if not resume and self.path.is_file() and self.path.stat().st_size > 0:
            raise ValueError(
                f"{self.path} already holds results: --resume continues it; to start over, delete it or choose "
                "another --output"
            )
        self.rows: list[dict] = self._read_rows() if resume and self.path.exists() else []
        self.done = {_row_key(row) for row in self.rows}
        self.settings: dict | None = None
        self._last_dump = 0.0
        self._dumped = -1  # rows in the file at the last whole write
        self._file = None
        # Nothing is written before `start`, but whether it can be is known now, before a model is loaded.
        check_output_location(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            self.start(settings)

    def resume_plan(self, paths: list[Path]) -> tuple[list[Path], str]:
        """
        Which of `paths` (this run's files) still need scoring, and a line that says what the resumed rows cover:
        `"resuming FILE: 5 already scored, 2 new, 1 gone (their rows kept), 1 changed (rescored)"`. A file is known by
        its resolved path; one whose size or modification time differs from its row's changed since: the row is
        dropped (before [`start`] writes the file) and the file is scored again; so is one that was missing when it
        was scored and is there now. Rows of files this run does not name are *gone*: they are kept. Rows of an
        earlier version, without size and time, count as unchanged.
        """
        current: dict[str, dict] = {}
        identities: dict[str, Path] = {}
        for path in paths:
            identity = file_identity(path)
            current.setdefault(identity["resolved_path"], identity)
            identities.setdefault(identity["resolved_path"], path)  # a file named twice is scored once
        changed = set()
        for row in self.rows:
            key = _row_key(row)
            # A row of an earlier version records no identity: it counts as unchanged. One of a file that was
            # missing then (no size) and is there now has changed too.
            recorded = row["resolved_path"] is not None
            now = current.get(key)
            if recorded and now is not None and (row["size"], row["mtime_ns"]) != (now["size"], now["mtime_ns"]):
                changed.add(key)
        self.rows = [row for row in self.rows if _row_key(row) not in changed]
        self.done -= changed
        gone = len({_row_key(row) for row in self.rows} - set(identities))
        todo = [path for key, path in identities.items() if key not in self.done]
        scored = len(identities) - len(todo)
        line = (
            f"resuming {self.path}: {scored} already scored, {len(todo) - len(changed)} new, {gone} gone (their rows "
            f"kept), {len(changed)} changed (rescored)"
        )
        return todo, line

    def check_settings(self, settings: dict) -> None:
        """
        Refuses resumed rows recorded with other values of the given settings (any of `SETTING_OPTIONS`; those not
        given are not checked): a `ValueError` of one line naming each setting, the file's value and this run's, and
        the options that continue the file.
        """
        for row in self.rows:
            # A row without a weights hash (written before it was recorded) cannot be checked for it.
            changed = [
                key
                for key in SETTING_OPTIONS
                if key in settings and row[key] != settings[key] and not (key == "weights" and row[key] is None)
            ]
            if changed:
                theirs = " and ".join(_as_option(key, row[key]) for key in changed)
                ours = " and ".join(_as_option(key, settings[key]) for key in changed)
                advice = _options_to_continue({key: row[key] for key in changed})
                raise ValueError(
                    f"{self.path} holds scores computed with {theirs}, and this run uses {ours}: continue it "
                    f"{advice}, or write to another --output"
                )

    def start(self, settings: dict) -> None:
        """
        Checks the resumed rows against this run's `settings` (every key of `SETTING_OPTIONS`; see
        [`check_settings`]), then writes the file: the header of a new CSV, or the resumed rows without a cut-off
        line. Rows written from now on record `settings`.
        """
        missing = set(SETTING_OPTIONS) - set(settings)
        if missing:
            raise ValueError(f"the settings lack {', '.join(sorted(missing))}")
        self.check_settings(settings)
        self.settings = {key: settings[key] for key in SETTING_OPTIONS}
        self._dump()
        if self.format != ".json":
            self._file = open(self.path, "a", newline="", encoding="utf-8", errors=_ENCODING_ERRORS)  # noqa: SIM115

    @property
    def failed(self) -> int:
        """Rows with an error, resumed ones included."""
        return sum(row["error"] is not None for row in self.rows)

    def write(self, result: ScoreResult) -> None:
        if self.settings is None:
            raise RuntimeError("ResultWriter.start(settings) comes before the first row")
        row = {
            "path": result.path,
            "score": result.score,
            "error": result.error,
            "model": self.model,
            **self.settings,
            **file_identity(result.path),
        }
        self.rows.append(row)
        if self._file is not None:
            self._file.write(self._serialise([row], header=False))
            self._file.flush()
        elif time.monotonic() - self._last_dump >= self.json_interval_s:
            self._dump()

    def close(self) -> None:
        """Completes the file (a JSON list is written whole)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self.format == ".json" and self.settings is not None and self._dumped != len(self.rows):
            self._dump()  # (never started: the file is left as it was; closed twice: written once)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _serialise(self, rows: list[dict], header: bool = True) -> str:
        if self.format == ".json":
            return json.dumps(rows, indent=2) + "\n"
        if self.format == ".jsonl":
            return "".join(json.dumps(row) + "\n" for row in rows)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=RESULT_FIELDS, lineterminator="\n")
        # `csv` quotes a field holding "\n" but not one holding a lone "\r" when lines end with "\n": such a row
        # (a file name with a carriage return) is written with every field quoted, so that it reads back whole.
        quoted = csv.DictWriter(text, fieldnames=RESULT_FIELDS, lineterminator="\n", quoting=csv.QUOTE_ALL)
        if header:
            writer.writeheader()
        for row in rows:
            values = {key: "" if value is None else value for key, value in row.items()}
            (quoted if any("\r" in value for value in values.values() if isinstance(value, str)) else writer).writerow(
                values
            )
        return text.getvalue()

    def _dump(self) -> None:
        """Writes every row as the whole file (a JSON list; the resumed rows of a CSV or JSON lines file)."""
        self._replace(self._serialise(self.rows))
        self._dumped = len(self.rows)

    def _replace(self, text: str) -> None:
        """Writes `text` as the whole file, atomically (`outputs.write_text_atomic`)."""
        write_text_atomic(self.path, text, errors=_ENCODING_ERRORS)
        self._last_dump = time.monotonic()

    def _read_rows(self) -> list[dict]:
        with open(self.path, encoding="utf-8", errors=_ENCODING_ERRORS, newline="") as file:
            text = file.read()
        try:
            if self.format == ".json":
                rows = json.loads(text) if text.strip() else []
            else:
                # Lines end at "\n", "\r\n" or "\r" only: `str.splitlines` would also cut at U+2028, U+0085 or a
                # form feed, which may be part of a file name.
                lines = io.StringIO(text, newline="").readlines()
                if lines and not lines[-1].endswith("\n") and not _is_json_object(lines[-1]):
                    # Rows are written with their newline: one without it was cut off mid-write (a complete JSON
                    # object, written by hand, is kept). Its file is scored again.
                    lines = lines[:-1]
                if self.format == ".jsonl":
                    rows = [json.loads(line) for line in lines if line.strip()]
                else:
                    rows = [{key: row.get(key) or None for key in RESULT_FIELDS} for row in csv.DictReader(lines)]
                    for row in rows:
                        row["score"] = None if row["score"] is None else float(row["score"])
                        for key in ("max_size", "size", "mtime_ns"):
                            row[key] = None if row[key] is None else int(row[key])
            rows = [{key: row.get(key) for key in RESULT_FIELDS} for row in rows]
        except (ValueError, TypeError, AttributeError) as error:  # JSON, float() or a row that is no object
            raise ValueError(
                f"{self.path}: cannot resume from this file; it does not parse as results: {error}"
            ) from None
        if any(not isinstance(row["path"], str) for row in rows):
            raise ValueError(f"{self.path}: cannot resume from this file: a row has no path")
        others = sorted({row["model"] for row in rows if row["model"] not in (None, self.model)})
        if others:
            raise ValueError(
                f"{self.path} holds scores of the model {others[0]!r}, and this run uses {self.model!r}: continue it "
                f"with --model {others[0]}, or write to another --output"
            )
        return rows


def _as_option(key: str, value: object) -> str:
    """A setting as the command line gives it: `--precision bf16`, or `no --max-size` (full resolution)."""
    if key == "calibration":
        return "no int8 calibration" if value is None else f"int8 calibration photos of hash {value}"
    if key == "weights":
        return f"the weights of hash {value}"
    return f"no {SETTING_OPTIONS[key]}" if value is None else f"{SETTING_OPTIONS[key]} {value}"


def _options_to_continue(settings: dict) -> str:
    """How to run with `settings`: `with --precision bf16 and without --max-size`."""
    if "weights" in settings:  # no option brings back other weights: only the model files they were scored with
        settings = dict(settings)
        weights = settings.pop("weights")
        advice = _options_to_continue(settings) if settings else ""
        model = f"with the model files of those weights ({weights})"
        return f"{advice} and {model}" if advice else model
    if "calibration" in settings:  # a hash names no folder: say which photos
        settings = dict(settings)
        calibration = settings.pop("calibration")
        advice = _options_to_continue(settings) if settings else ""
        if calibration is None:
            return advice or "as it was started (its int8 calibration photos are not recorded)"
        photos = f"--calibration-images set to the photos of hash {calibration}"
        return f"{advice} and {photos}" if advice else f"with {photos}"
    given = " ".join(_as_option(key, value) for key, value in settings.items() if value is not None)
    absent = " ".join(SETTING_OPTIONS[key] for key, value in settings.items() if value is None)
    return " and ".join(([f"with {given}"] if given else []) + ([f"without {absent}"] if absent else []))


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
