"""Writing files that other processes (or a rerun after a kill) may read: the one set of atomic
writers of dcgen, its run dirs, exports, evaluations and task caches.

Every writer makes a temporary file in the destination's folder, gives it the mode a plain open()
would (the user's umask; mkstemp's 0600 would lock a shared cache to its writer), fsyncs it and
renames it into place: a reader sees the old file or the new one, never a partial one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def file_mode() -> int:
    """What a plain open() would give under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable, binary: bool = False) -> Path:
    """`write(file object)` into a temporary file next to `path`, then renamed onto it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text))


def atomic_write_json(path, obj, indent: int = 1, **kw) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kw) + "\n")


def atomic_savez(path, compressed: bool = True, **arrays) -> Path:
    import numpy as np
    save = np.savez_compressed if compressed else np.savez
    return atomic_write(path, lambda fh: save(fh, **arrays), binary=True)
