"""Write files so that a crash or an error never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from keyseal.errors import OutputError, OutputExistsError

__all__ = ["before_rename", "directory_locked", "fsync_directory", "refuse_existing", "write_atomic"]

# Test hook, None in normal use: called with the temporary file's path after it is written and fsynced, just
# before the rename. Crash tests set it in a child process to kill that child at the worst moment.
before_rename: Callable[[Path], None] | None = None


def refuse_existing(path: Path, force: bool) -> None:
    """Raise unless `path` is absent or --force was given."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists: refusing to overwrite it (use --force)")


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, force: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory.

    With force=False an existing `path` is refused at rename time too (a hard link that fails if the target
    exists), so two concurrent writers cannot both win. A write that fails raises OutputError naming `path`
    (also an OSError, with the cause's errno).
    """
    try:
        _write_atomic(path, data, mode, force)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}", exc) from exc


def _write_atomic(path: Path, data: bytes, mode: int, force: bool) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename(tmp)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as exc:
                raise OutputExistsError(f"{path} exists: refusing to overwrite it (use --force)") from exc
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make a file created, renamed or linked in `directory` survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory_locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on the directory itself, for a read-then-write that other processes must not
    interleave: no lock file is left beside the user's files."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
