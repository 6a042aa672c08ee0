"""Writing files that other processes (or a rerun after a kill) may read: the one set of atomic
writers of dcgen, its run dirs, exports, evaluations and task caches.

Every writer makes a temporary file in the destination's folder, gives it the mode a plain open()
would (the user's umask; mkstemp's 0600 would lock a shared cache to its writer), fsyncs it and
renames it into place: a reader sees the old file or the new one, never a partial one.

Folders the same way (`temp_dir_for`, then `commit_dir`): filled under a hidden
`.<name>.tmp-<random>` next to the destination, every file fsynced, then renamed onto it; what a
killed writer leaves behind carries that prefix and `remove_stale_temps` clears it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
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


def dir_mode() -> int:
    """What a plain mkdir() would give under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def temp_dir_for(path) -> Path:
    """A new, empty hidden folder next to `path` (`.<name>.tmp-<random>`), to be filled and then
    renamed onto `path` by `commit_dir`."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, dir_mode())
    return tmp


def commit_dir(tmp, path) -> Path:
    """Make the filled folder `tmp` (from `temp_dir_for`) the folder `path`: every file in it is
    fsynced, then one rename puts it in place (an existing `path` is first renamed aside and
    removed), and the parent is fsynced. A reader sees the old folder, no folder, or the new one,
    never a partial one."""
    tmp, path = Path(tmp), Path(path)
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(tmp)
    if path.exists():  # rename() does not replace a non-empty folder
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def remove_stale_temps(path) -> list[Path]:
    """Remove what killed folder writers left next to `path` (`.<name>.tmp-*`, `.<name>.old-*`);
    returns what was removed. Call it only where no other process is writing `path`."""
    path = Path(path)
    gone = []
    for kind in ("tmp", "old"):
        for p in path.parent.glob(f".{path.name}.{kind}-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone
