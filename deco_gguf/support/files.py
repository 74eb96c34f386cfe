"""Output files that are either complete or absent, and never one of the inputs.

The data is written to a temporary file that has no name (Linux `O_TMPFILE`), so a process killed
in any way, even by SIGKILL, leaves nothing visible behind; when complete it is linked into place.
Where the filesystem cannot make unnamed files, the temporary file is `.NAME.part` beside the
output, locked while in use: the next run to the same output recognises an unlocked one as left by
a killed run and replaces it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import DecoError

# Errors that mean the output cannot be written (full disk, quota, file size limit, read-only).
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def refuse_inputs(output: Path, inputs: Iterable[Path]) -> None:
    """DecoError when `output` is one of `inputs`: the same path after resolving links, or the same
    file under another name (hard link)."""
    if not output.exists():
        return
    out_stat, out_real = output.stat(), output.resolve()
    for source in inputs:
        st = source.stat()
        if source.resolve() == out_real or (st.st_dev, st.st_ino) == (out_stat.st_dev, out_stat.st_ino):
            raise DecoError(f"{output}: is the input {source}; choose another output file")


def _write_failure(error: OSError, fd: int) -> str:
    """Why writing the temporary file `fd` failed; when the error lost its errno, one more byte
    written past its end (it is discarded anyway) tells."""
    if error.errno is None:
        try:
            os.pwrite(fd, b"\0", os.fstat(fd).st_size)
        except OSError as probe:
            return probe.strerror
    return error.strerror or str(error)


def _link_unnamed(fd: int, path: Path) -> None:
    """Give the unnamed file `fd` the name `path` (linkat through /proc, which needs no privilege)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def _open_unnamed(directory: Path) -> int | None:
    """An unnamed file in `directory`, or None where the system or filesystem has none."""
    if not hasattr(os, "O_TMPFILE") or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o666)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def _open_named(part: Path, output: Path) -> int:
    """`part` created afresh and locked; one left by a killed run (unlocked) is replaced."""
    with contextlib.suppress(FileNotFoundError):
        stale = os.open(part, os.O_RDWR)
        try:
            fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DecoError(f"{output}: another process is writing it") from None
        finally:
            os.close(stale)
        part.unlink()
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a path to write the output to (from this process or a child); when the block succeeds
    it becomes `path` (replacing an existing file in one step, with the permissions of a new file),
    otherwise it disappears.

    A failure to write (full disk, quota) becomes a one-line DecoError."""
    if path.is_dir():
        raise DecoError(f"{path}: is a directory, expected an output file name")
    if not path.parent.is_dir():
        raise DecoError(f"{path.parent}: output directory does not exist")
    part = path.with_name(f".{path.name}.part")  # the recognisable name of the fallback
    fd = _open_unnamed(path.parent)
    unnamed = fd is not None
    if fd is None:
        fd = _open_named(part, path)
    try:
        yield Path(f"/proc/{os.getpid()}/fd/{fd}") if unnamed else part  # also for child processes
        if unnamed:
            try:
                _link_unnamed(fd, path)  # the output did not exist: in place at once
            except FileExistsError:
                # Linked beside it, then renamed over it; `part` is seen only between the two calls
                # (and an unnamed file can be linked only once: no trial link beforehand).
                part.unlink(missing_ok=True)
                _link_unnamed(fd, part)
                os.replace(part, path)
        else:
            os.replace(part, path)
    except OSError as e:
        # Errors from reading inputs are DecoErrors already; numpy's writes lose the errno.
        if e.errno in WRITE_ERRORS or e.errno is None:
            raise DecoError(f"{path}: cannot write it: {_write_failure(e, fd)}") from None
        raise
    finally:
        os.close(fd)
        part.unlink(missing_ok=True)  # gone after a success; after a failure, not left behind
