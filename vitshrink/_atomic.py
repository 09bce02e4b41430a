"""Atomic file writes: never leave a half-written file behind."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from vitshrink.errors import UserError

# Errors that mean "this location cannot take the file": a full disk, a quota, a size limit, read-only.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{path}: cannot write here (a parent path is a file, not a folder)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask  # mkstemp makes 0600; the finished file gets ordinary permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # Again after the block: a writer that recreates the file (safetensors' save_file) makes it 0600.
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in NO_ROOM:
            raise UserError(f"{path}: cannot write ({exc.strerror or exc}); nothing was written") from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
