"""How the project writes what it produces: atomically, to a place checked first, and by one run at a time.

The one home of these rules, for results files, dataset scoring folders, exported graphs, converted models, model
cards and training logs (not training checkpoints: every process of a run writes into one staging folder, whose name
they must agree on, `training/train.py`):

- [`atomic_path`] / [`write_text_atomic`]: a file (or folder) is written under a hidden temporary name beside its
  target and renamed over it (`os.replace`, atomic within a file system), so that a reader, or a run resumed after a
  crash, never sees half a file. A failed write leaves the target as it was and removes the temporary.
- [`check_output_location`]: whether an output can be created where it is asked for, said in one line (a parent that
  is a file, a folder that cannot be written) before any work starts.
- [`OutputLock`]: an exclusive lock (`fcntl.flock`) on a lock file beside the output, held for a run, so that a second
  run writing the same output is refused instead of both interleaving their rows.

Standard library only: the command checks its `--output` before it imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX; elsewhere (Windows) outputs are not locked
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms tested
    fcntl = None

__all__ = [
    "OutputInUseError",
    "OutputLock",
    "atomic_path",
    "check_output_location",
    "lock_path",
    "write_json_atomic",
    "write_text_atomic",
]


class OutputInUseError(ValueError):
    """Another run holds the lock of the output this run would write."""


def staging_path(target: str | os.PathLike) -> Path:
    """
    A fresh temporary name beside `target`: `.NAME.XXXXXXXX.partial`, hidden (a leading dot), so that the readers of a
    folder of Parquet files (pyarrow, pandas, `datasets`) and image folders skip it, and in the same folder, so that
    the rename is atomic.
    """
    target = Path(target)
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """
    Yields a temporary path beside `target` for the caller to write a file or a folder to; on a normal exit it is
    renamed over `target` (a folder replaces only an absent or empty folder: `os.replace`'s rule), on an exception it
    is removed and `target` is left as it was.

    Example: `with atomic_path(path) as temporary: pyarrow.parquet.write_table(table, temporary)`.
    """
    target = Path(target)
    temporary = staging_path(target)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str, errors: str = "strict") -> None:
    """
    Writes `text` (UTF-8, newlines as given) as the whole of `target`, atomically (see [`atomic_path`]). `errors` is
    the encoder's error handler: `"surrogateescape"` writes back the original bytes of file names that are not valid
    UTF-8 (as `os.fsdecode` holds them).
    """
    with atomic_path(target) as temporary, open(temporary, "w", newline="", encoding="utf-8", errors=errors) as file:
        file.write(text)


def write_json_atomic(target: str | os.PathLike, content: object) -> None:
    """Writes `content` as indented JSON with a final newline, atomically (see [`atomic_path`])."""
    write_text_atomic(target, json.dumps(content, indent=2) + "\n")


def check_output_location(output: str | os.PathLike, folder: bool = False) -> None:
    """
    Checks, without creating anything, that `output` (a file, or with `folder=True` a folder) can be created or
    written: its nearest existing ancestor must be a folder this process can write to, and `output` itself, where it
    exists, of the kind asked for.

    Raises:
        ValueError: one line naming the path and what is wrong with it.
    """
    output = Path(output)
    kind = "folder" if folder else "file"
    if output.exists():
        if folder and not output.is_dir():
            raise ValueError(f"{output} is a file, not a folder")
        if not folder and output.is_dir():
            raise ValueError(f"{output} is a folder; name a file")
        where = output if folder else output.parent
    else:
        where = output.parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise ValueError(f"{where} is a file, so the {kind} {output} cannot be created under it")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ValueError(f"{where} cannot be written (permission denied)")


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of an output: `.NAME.lock` beside it (beside a folder too, so that the folder keeps only data)."""
    output = Path(os.path.abspath(output))
    return output.with_name(f".{output.name}.lock")


class OutputLock:
    """
    An exclusive lock on an output, held from [`acquire`] to [`release`] (or as a context manager).

    The lock is `fcntl.flock` on [`lock_path`]`(output)`, which records the holder's process id. The kernel releases
    it when the process ends, however it ends (a killed run leaves the file, unlocked), so there is no stale lock to
    clear by hand. On platforms without `fcntl` (Windows) nothing is locked.

    Raises (`acquire`):
        OutputInUseError: another run holds the lock: one line naming the output and that run's process id.
        OSError: the lock file cannot be created (see [`check_output_location`] to say why first).
    """

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self._file = None

    def acquire(self) -> OutputLock:
        if fcntl is None or self._file is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            raise OutputInUseError(
                f"{self.output} is being written by another run"
                + (f" (process {holder})" if holder else "")
                + "; wait for it to end, or choose another --output"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        # The file stays: deleting it would let a run that opened it just before lock an unlinked file while a third
        # run locks a new one.
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
