"""Results files of `qualiclip score`: CSV, JSON lines or JSON, written as results come and resumable.

Only the standard library is used here, so the command checks its `--output` before it imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scoring import ScoreResult

OUTPUT_FORMATS = (".csv", ".json", ".jsonl")
RESULT_FIELDS = ("path", "score", "error", "model")


class ResultWriter:
    """
    Writes [`ScoreResult`]s to a results file as they come, so that an interrupted run keeps what it scored.

    The format follows the extension: `.csv` (a header, then `path,score,error,model`), `.jsonl` (one object per
    line) or `.json` (a list of objects). CSV and JSON lines are appended and flushed row by row. A JSON list is only
    valid once complete, so it is rewritten whole, into a temporary file renamed over the output (atomic), at most
    every `json_interval_s` seconds and on `close`: the file on disk is always a complete JSON list. Every row names
    the model that scored it.

    With `resume=True`, the rows already in the file are kept and [`done`] holds their paths, so a run can skip them;
    a last CSV row or JSON line cut off by a crash (no newline) is dropped, and its file is scored again.

    Args:
        path: The results file; its folder is created.
        model: The model's name, written in every row.
        resume: Keep the rows of an existing file instead of replacing it.
        json_interval_s: The shortest time between two rewrites of a JSON file.

    Raises:
        ValueError: an unknown extension; a file to resume that does not parse, or whose rows name another model.
        OSError: the folder cannot be created, or the file cannot be written.
    """

    def __init__(self, path: str | Path, model: str, resume: bool = False, json_interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.format = self.path.suffix.lower()
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"{self.path}: the results file must end with one of {', '.join(OUTPUT_FORMATS)}")
        self.model = model
        self.json_interval_s = json_interval_s
        if not resume and self.path.is_file() and self.path.stat().st_size > 0:
            raise ValueError(
                f"{self.path} already holds results: --resume continues it; to start over, delete it or choose "
                "another --output"
            )
        self.rows: list[dict] = self._read_rows() if resume and self.path.exists() else []
        self.done = {os.path.abspath(row["path"]) for row in self.rows}
        self._last_dump = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten in full first: the header of a new CSV, or what remains of a resumed file without a cut-off line.
        self._replace(self._serialise(self.rows))
        self._file = None if self.format == ".json" else open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115

    @property
    def failed(self) -> int:
        """Rows with an error, resumed ones included."""
        return sum(row["error"] is not None for row in self.rows)

    def write(self, result: ScoreResult) -> None:
        row = {"path": result.path, "score": result.score, "error": result.error, "model": self.model}
        self.rows.append(row)
        if self._file is not None:
            self._file.write(self._serialise([row], header=False))
            self._file.flush()
        elif time.monotonic() - self._last_dump >= self.json_interval_s:
            self._replace(self._serialise(self.rows))

    def close(self) -> None:
        """Completes the file (a JSON list is written whole)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self.format == ".json":
            self._replace(self._serialise(self.rows))

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
        if header:
            writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
        return text.getvalue()

    def _replace(self, text: str) -> None:
        """Writes `text` as the whole file, through a temporary file in the same folder and an atomic rename."""
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        try:
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600, for a file the user meant to share
            with os.fdopen(handle, "w", newline="", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._last_dump = time.monotonic()

    def _read_rows(self) -> list[dict]:
        text = self.path.read_text(encoding="utf-8")
        try:
            if self.format == ".json":
                rows = json.loads(text) if text.strip() else []
            else:
                lines = text.splitlines(keepends=True)
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


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
