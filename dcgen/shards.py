"""The sharded cache: one on-disk layout, written by `dcgen prepare`, read by training.

Every task that encodes its data once (imagenet_latent: VAE moments of images; video: VAE moments
of clips; voxel: packed occupancy grids) stores it here; the task keeps its encoding, this module
owns the layout, the atomic writes, the split over processes, resume and the index.

    cache_dir/
      manifest.json        written first: layout, task, task cache version, shard_size, the task's
                           settings (a resume with other settings is refused, naming the keys) and
                           the fields with their dtype and row shape
      items.tsv            the items, in a fixed (sorted) order, line i = "label<TAB>name"
      shard_00000/         items [0, S): one memory-mappable <field>.npy per field, one row per
        item.npy             row the items produced (0, 1 or several per item: a corrupt image
        label.npy            gives none, a video one per clip); `item` and `label` (int64) are
        <field>.npy          in every shard, the task's fields beside them
        meta.json          rows, item range and fingerprint, skipped items with their reasons,
                           the task's extras, and under "written" who wrote it (rank, seconds)
      shard_00001/ ...     items [S, 2S), ...
      .shard_00003.tmp-*/  a shard being written (or left by a killed writer: ignored, removed)
      index.json           written last, by rank 0, once every shard exists: rows per shard,
                           totals, every skipped item, the task's summary; readers refuse a cache
                           without it

Rules:
- Shard s holds items [s·S, (s+1)·S) and is written by rank s mod world: the shards do not
  depend on the number of processes, and no two processes write one file.
- A shard is written into a hidden temporary folder next to its place, every file fsynced, then
  renamed into place (dcgen.files.temp_dir_for / commit_dir): a shard folder is complete or
  absent. Rows are streamed to disk as they come (bounded memory whatever the shard size).
- A shard is complete when its folder exists and its meta.json names the same item range and
  the same items (a sha256 of its "label<TAB>name" lines). A rerun, with any number of processes,
  skips complete shards and encodes the rest: resume after a kill, and after files were added
  only the shards whose items changed. The stored shard_size wins over a requested one.
- The index is removed when a prepare starts and written when it ends; readers need it.

Reading (`ShardReader`): construction reads manifest.json and index.json only (rows per shard
come from the index, which rank 0 compiled from the shards' meta.json); shard arrays are
memory-mapped on first use, at most `max_open_shards` shards at a time (least recently used
dropped first), and a pickled reader (a DataLoader worker's copy) carries no open map.
`locate(i)` gives (the arrays of the shard holding row i, the row in it).

Processes (`Processes`): rank, world and a gather (the one collective: it is also the barrier);
`Processes.current()` wraps accelerate's state of the launch (torchrun, accelerate launch, or
one process). Errors raised while starting or encoding on one rank are raised on every rank
(`Processes.agree`), so no rank waits forever behind one that failed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .files import atomic_write_json, atomic_write_text, commit_dir, remove_stale_temps, temp_dir_for

log = logging.getLogger("dcgen.shards")

LAYOUT = 1  # this module's layout; each task has its own cache version besides
MANIFEST, ITEMS, INDEX, META = "manifest.json", "items.tsv", "index.json", "meta.json"
BUILTIN_FIELDS = ("item", "label")  # in every shard: the row's item index and label (int64)
NPY_HEADER = 256  # bytes reserved for a streamed .npy header (magic, version, length, dict)


def shard_name(s: int) -> str:
    return f"shard_{s:05d}"


def field_spec(fields: dict) -> dict:
    """{name: (dtype, row shape)} -> the manifest's {name: [dtype descr, [row shape]]}."""
    out = {}
    for name, (dtype, shape) in fields.items():
        if name in BUILTIN_FIELDS:
            raise ValueError(f"field name {name!r} is reserved (every shard has {BUILTIN_FIELDS})")
        out[name] = [np.lib.format.dtype_to_descr(np.dtype(dtype)), [int(d) for d in shape]]
    return out


def items_sha(items: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for name, label in items:
        h.update(f"{int(label)}\t{name}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

class Processes:
    """The processes of one prepare: `rank`, `world`, `gather(obj)` (every rank's obj, in rank
    order; needed when world > 1) and the device of this rank."""

    def __init__(self, rank: int = 0, world: int = 1, gather: Callable | None = None,
                 device: Any = "cpu"):
        self.rank, self.world, self.device = int(rank), int(world), device
        self._gather = gather

    @classmethod
    def current(cls) -> "Processes":
        """This launch's processes (accelerate; gloo on machines without a GPU)."""
        from .evaluate import process_state
        state = process_state()

        def gather(obj):
            from accelerate.utils import gather_object
            return gather_object([obj])
        return cls(state.process_index, state.num_processes, gather, state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        return list(self._gather(obj))

    def agree(self, fn: Callable):
        """fn() on this rank; when it raised on any rank, raise on every rank (the first rank's
        error: FileNotFoundError stays one, anything else becomes ValueError)."""
        if self.world == 1:
            return fn()
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # reported to every rank below, then raised everywhere
            error = (f"{type(e).__name__}\t{e}" if isinstance(e, (ValueError, FileNotFoundError))
                     else f"ValueError\trank {self.rank}: {type(e).__name__}: {e}")
        errors = [e for e in self.gather(error) if e]
        if errors:
            kind, msg = errors[0].split("\t", 1)
            raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(msg)
        return result


# --------------------------------------------------------------------------------------------
# Manifest, items, refusals
# --------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _looks_like_a_cache(cache_dir: Path) -> bool:
    """An older layout (no manifest.json, but an index, meta or shard files of its own)."""
    if not cache_dir.is_dir():
        return False
    return any(p.name in (INDEX, META, "summary.json") or p.name.startswith("shard")
               for p in cache_dir.iterdir())


def check_manifest(found: dict, cache_dir: Path, task: str, version: int, rerun: str,
                   settings: dict | None = None, fields: dict | None = None) -> None:
    """Refuse a manifest of another layout, task or cache version (saying to rerun prepare), and,
    when `settings` / `fields` are given, one started with other values (naming every key)."""
    if found.get("layout") != LAYOUT or found.get("task") != task or found.get("version") != version:
        raise ValueError(
            f"{cache_dir}: a {found.get('task', task)} cache of an older layout (version "
            f"{found.get('version')}, layout {found.get('layout')}; this dcgen reads {task} version "
            f"{version}, layout {LAYOUT}): rerun `{rerun}` into a new cache folder, or delete this "
            "one first")
    diff = []
    if settings is not None:
        old = found.get("settings", {})
        diff += [f"'{k}' ({old.get(k)!r} != {settings.get(k)!r})"
                 for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if fields is not None and found.get("fields") != fields:
        diff.append(f"'fields' ({found.get('fields')!r} != {fields!r})")
    if diff:
        raise ValueError(f"{cache_dir}: the cache was started with different {', '.join(diff)} "
                         "(cached != requested); resume with the same settings, or choose a new "
                         "cache folder")


def read_manifest(cache_dir, task: str, version: int, rerun: str, what: str | None = None) -> dict:
    """The manifest of a cache, or a clear error: no cache (FileNotFoundError) or an older layout."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.is_file():
        if _looks_like_a_cache(cache_dir):
            raise ValueError(f"{cache_dir}: a {task} cache of an older layout (no {MANIFEST}): rerun "
                             f"`{rerun}` into a new cache folder, or delete this one first")
        raise FileNotFoundError(f"no {what or task + ' cache'} at {cache_dir} ({MANIFEST} missing); "
                                f"run `{rerun}` first")
    found = read_json(path)
    check_manifest(found, cache_dir, task, version, rerun)
    return found


def read_index(cache_dir, task: str, version: int, rerun: str, what: str | None = None
               ) -> tuple[dict, dict]:
    """(manifest, index) of a finished cache; a cache without its index is refused."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir, task, version, rerun, what)
    path = cache_dir / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{what or task + ' cache'} {cache_dir} is incomplete ({INDEX} missing: a prepare run "
            f"did not finish); run `{rerun}` again with the same settings to finish it")
    return manifest, read_json(path)


def write_items(cache_dir: Path, items: Sequence[tuple[str, int]]) -> None:
    bad = next((n for n, _ in items if "\t" in n or "\n" in n), None)
    if bad is not None:
        raise ValueError(f"item name {bad!r} holds a tab or a newline")
    atomic_write_text(cache_dir / ITEMS, "".join(f"{int(lbl)}\t{n}\n" for n, lbl in items))


def read_items(cache_dir) -> list[tuple[str, int]]:
    out = []
    for line in (Path(cache_dir) / ITEMS).read_text().splitlines():
        label, name = line.split("\t", 1)
        out.append((name, int(label)))
    return out


# --------------------------------------------------------------------------------------------
# Writing one shard
# --------------------------------------------------------------------------------------------

def npy_header(dtype, shape) -> bytes:
    """A version 1.0 .npy header of exactly NPY_HEADER bytes (padded with spaces, as numpy pads)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(d) for d in shape)}).encode("latin1")
    room = NPY_HEADER - 10
    if len(text) + 1 > room:
        raise ValueError(f"npy header too long for shape {shape}")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + text + b" " * (room - len(text) - 1) + b"\n"


class _Column:
    """One field of a shard being written: rows appended to `<field>.npy` behind a reserved
    header, which gets the final row count when the shard is finished."""

    def __init__(self, path: Path, dtype, shape):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(shape)
        self.fh = open(path, "wb")
        self.fh.write(b"\0" * NPY_HEADER)
        self.n = 0

    def append(self, rows) -> None:
        a = np.asarray(rows)
        if a.shape[1:] != self.shape:
            raise ValueError(f"{self.path.stem}: rows of shape {a.shape[1:]}, the cache stores "
                             f"{self.shape}")
        self.fh.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        self.n += a.shape[0]

    def close(self) -> None:  # fsynced by commit_dir with the rest of the folder
        self.fh.seek(0)
        self.fh.write(npy_header(self.dtype, (self.n, *self.shape)))
        self.fh.close()


class ShardWriter:
    """Shard `s` (items [start, stop)) written into a temporary folder next to its place.

    `add(item, **rows)` appends the rows item `item` produced (each field's array has them on
    its first axis; `item` and `label` are filled in), in item order; `skip(item, reason)` notes
    an item that produced nothing; `finish(**extra)` completes the files, writes meta.json and
    renames the folder into place; `abort()` removes it."""

    def __init__(self, cache_dir: Path, s: int, start: int, stop: int,
                 items: Sequence[tuple[str, int]], fields: dict, rank: int = 0, world: int = 1,
                 sha: str | None = None):
        self.final = Path(cache_dir) / shard_name(s)
        self.s, self.start, self.stop, self.items = s, start, stop, items
        self.labels = np.array([lbl for _, lbl in items], dtype=np.int64)
        self.sha = sha or items_sha(items)
        self.rank, self.world = rank, world
        self.tmp = temp_dir_for(self.final)
        self.columns = {"item": _Column(self.tmp / "item.npy", np.int64, ()),
                        "label": _Column(self.tmp / "label.npy", np.int64, ())}
        for name, (descr, shape) in fields.items():
            self.columns[name] = _Column(self.tmp / f"{name}.npy", np.lib.format.descr_to_dtype(descr),
                                         shape)
        self.skipped: list[dict] = []
        self.last = start - 1
        self.t0 = time.time()

    @property
    def rows(self) -> int:
        return self.columns["item"].n

    def _check_items(self, items: np.ndarray) -> None:
        if not len(items):
            return
        lo, hi = int(items.min()), int(items.max())
        if lo < self.start or hi >= self.stop:
            bad = lo if lo < self.start else hi
            raise ValueError(f"{shard_name(self.s)} holds items [{self.start}, {self.stop}), got {bad}")
        if int(items[0]) < self.last or (len(items) > 1 and (np.diff(items) < 0).any()):
            raise ValueError(f"{shard_name(self.s)}: items must come in order ({items.tolist()} "
                             f"after {self.last})")

    def add(self, item, **rows) -> None:
        """Append rows: `item` is the item they all came from, or one item per row (in order)."""
        rows = {name: np.asarray(v) for name, v in rows.items()}
        if set(rows) != set(self.columns) - set(BUILTIN_FIELDS):
            raise ValueError(f"{shard_name(self.s)}: fields {sorted(rows)}, the cache stores "
                             f"{sorted(set(self.columns) - set(BUILTIN_FIELDS))}")
        for name, v in rows.items():  # every check before anything is written
            if v.shape[1:] != self.columns[name].shape:
                raise ValueError(f"{shard_name(self.s)}: {name} rows of shape {v.shape[1:]}, the "
                                 f"cache stores {self.columns[name].shape}")
        n = {v.shape[0] for v in rows.values()}
        if len(n) != 1:
            raise ValueError(f"{shard_name(self.s)}: fields with different row counts {n}")
        k = n.pop()
        items = (np.full(k, int(item), np.int64) if np.ndim(item) == 0
                 else np.asarray(item, dtype=np.int64).reshape(-1))
        if items.shape != (k,):
            raise ValueError(f"{shard_name(self.s)}: {len(items)} items for {k} rows")
        check = items if len(items) or np.ndim(item) else np.array([int(item)], np.int64)
        self._check_items(check)
        if len(check):
            self.last = int(check[-1])
        self.columns["item"].append(items)
        self.columns["label"].append(self.labels[items - self.start])
        for name, v in rows.items():
            self.columns[name].append(v)

    def skip(self, item: int, reason: str) -> None:
        item = int(item)
        self._check_items(np.array([item]))
        self.last = item
        self.skipped.append({"item": item, "name": self.items[item - self.start][0],
                             "reason": str(reason)})

    def finish(self, **extra) -> dict:
        """Complete the shard (`extra` goes into its meta.json) once its last item is in."""
        if self.last != self.stop - 1:
            raise ValueError(f"{shard_name(self.s)} finished at item {self.last}, before its last "
                             f"item {self.stop - 1} was added or skipped")
        for c in self.columns.values():
            c.close()
        meta = {"shard": self.s, "start": self.start, "stop": self.stop, "rows": self.rows,
                "items_sha256": self.sha, "skipped": self.skipped, **extra,
                "written": {"rank": self.rank, "world": self.world,
                            "seconds": round(time.time() - self.t0, 3)}}
        (self.tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        commit_dir(self.tmp, self.final)
        return meta

    def abort(self) -> None:
        for c in self.columns.values():
            if not c.fh.closed:
                c.fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# A prepare run
# --------------------------------------------------------------------------------------------

class Prepare:
    """One `dcgen prepare` into a cache, on every process of the launch (`start` builds it).

    `todo`: this rank's shards that are not complete; `span(s)`: the item range of shard s;
    `writer(s)`: a ShardWriter for it; `run(encode, summarize)`: encode(todo) on every rank,
    then rank 0 writes the index (with `summarize(metas)`'s entries) and every rank returns it."""

    def __init__(self, cache_dir: Path, manifest: dict, items: list, processes: Processes,
                 info: dict | None):
        self.dir, self.manifest, self.items, self.processes = cache_dir, manifest, items, processes
        self.info = info or {}  # rank 0: what the item listing said (classes, root, ...)
        self.shard_size = int(manifest["shard_size"])
        self.num_shards = -(-len(items) // self.shard_size)
        rank, world = processes.rank, processes.world
        self.mine = [s for s in range(self.num_shards) if s % world == rank]
        self._shas: dict[int, str] = {}
        for s in self.mine:  # what killed writers of this rank's shards left
            for p in remove_stale_temps(cache_dir / shard_name(s)):
                log.info("removed %s, left by an interrupted writer", p.name)
        self.todo = [s for s in self.mine if not self.complete(s)]

    def span(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min(len(self.items), (s + 1) * self.shard_size)

    def complete(self, s: int) -> bool:
        """Shard s exists and holds exactly the items it should hold now."""
        path = self.dir / shard_name(s) / META
        if not path.is_file():
            return False
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return (meta.get("start"), meta.get("stop")) == self.span(s) and \
            meta.get("items_sha256") == self.items_sha(s)

    def items_sha(self, s: int) -> str:
        """The fingerprint of shard s's items (its "label<TAB>name" lines)."""
        if s not in self._shas:
            a, b = self.span(s)
            self._shas[s] = items_sha(self.items[a:b])
        return self._shas[s]

    def todo_items(self) -> int:
        return sum(b - a for a, b in map(self.span, self.todo))

    def writer(self, s: int) -> ShardWriter:
        a, b = self.span(s)
        return ShardWriter(self.dir, s, a, b, self.items[a:b], self.manifest["fields"],
                           self.processes.rank, self.processes.world, self.items_sha(s))

    def run(self, encode: Callable[[list[int]], Any],
            summarize: Callable[[list[dict]], dict] | None = None) -> dict:
        """encode(self.todo) on this rank; once every rank is done (an error on any rank is
        raised on all), rank 0 writes the index (`summarize(metas)` adds the task's entries);
        every rank returns it."""
        self.processes.agree(lambda: encode(self.todo))
        self.processes.agree(lambda: self._write_index(summarize) if self.processes.is_main else None)
        return read_json(self.dir / INDEX)

    def _write_index(self, summarize) -> dict:
        metas = []
        for s in range(self.num_shards):
            if not self.complete(s):
                raise ValueError(f"{self.dir}: {shard_name(s)} is missing or stale after every "
                                 "process finished; rerun dcgen prepare")
            metas.append(read_json(self.dir / shard_name(s) / META))
        for p in self.dir.glob("shard_*"):  # shards of an older, longer item list
            if p.is_dir() and p.name[6:].isdigit() and int(p.name[6:]) >= self.num_shards:
                shutil.rmtree(p)
        for p in self.dir.glob(".shard_*"):
            name = p.name[1:].split(".", 1)[0]
            if name[6:].isdigit() and int(name[6:]) >= self.num_shards:
                remove_stale_temps(self.dir / name)
        skipped = [k for m in metas for k in m["skipped"]]
        index = {"layout": LAYOUT, "task": self.manifest["task"], "version": self.manifest["version"],
                 "num_items": len(self.items),
                 "num_shards": self.num_shards, "num_rows": int(sum(m["rows"] for m in metas)),
                 "num_skipped": len(skipped), "shards": [{"rows": m["rows"]} for m in metas],
                 "skipped": skipped, **self.info}
        if summarize is not None:
            index.update(summarize(metas))
        index["written"] = {"processes": self.processes.world}
        atomic_write_json(self.dir / INDEX, index)
        return index


def start(cache_dir, *, task: str, version: int, settings: dict, fields: dict,
          shard_size: int | Callable[[list], int], list_items: Callable[[], tuple[list, dict]],
          rerun: str, processes: Processes | None = None, logger: logging.Logger = log) -> Prepare:
    """Begin (or resume) a prepare on every process of the launch.

    Rank 0 lists the items (`list_items()` -> ([(name, label), ...] in their fixed order, extra
    index entries such as the classes)), writes the manifest of a new cache or checks the one
    there (other settings or fields: an error naming the keys; an older layout: an error saying
    to rerun `rerun` elsewhere), writes items.tsv and removes the index. `shard_size` (items per
    shard, or a function of the items) counts only for a new cache. Then every rank reads the
    manifest and items and finds its unfinished shards."""
    procs = processes or Processes.current()
    cache_dir = Path(cache_dir).expanduser()
    spec = field_spec(fields)
    settings = json.loads(json.dumps(settings))  # as the manifest will hold them (lists, not tuples)
    info = {}

    def begin():
        if not procs.is_main:
            return
        if not (cache_dir / MANIFEST).is_file() and _looks_like_a_cache(cache_dir):
            raise ValueError(f"{cache_dir}: a {task} cache of an older layout (no {MANIFEST}); "
                             f"delete it or choose another cache folder, then rerun `{rerun}`")
        items, extra = list_items()
        items = [(str(n), int(lbl)) for n, lbl in items]
        info.update(extra or {})
        if (cache_dir / MANIFEST).is_file():
            found = read_json(cache_dir / MANIFEST)
            check_manifest(found, cache_dir, task, version, rerun, settings, spec)
            want = shard_size if isinstance(shard_size, int) else None
            if want is not None and want != found["shard_size"]:
                log.info("%s keeps its shard_size=%d (requested %d)", cache_dir,
                         found["shard_size"], want)
        else:
            size = int(shard_size if isinstance(shard_size, int) else shard_size(items))
            if size < 1:
                raise ValueError(f"shard_size must be positive, got {size}")
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_dir / MANIFEST, {"layout": LAYOUT, "task": task,
                                                     "version": version, "shard_size": size,
                                                     "settings": settings, "fields": spec})
        (cache_dir / INDEX).unlink(missing_ok=True)  # incomplete until this run ends
        write_items(cache_dir, items)

    procs.agree(begin)  # a collective: every rank continues once rank 0 is through
    manifest = read_json(cache_dir / MANIFEST)
    check_manifest(manifest, cache_dir, task, version, rerun, settings, spec)  # every rank agrees
    prep = Prepare(cache_dir, manifest, read_items(cache_dir), procs, info if procs.is_main else None)
    if prep.mine:
        logger.info("%s prepare (process %d/%d): %d of %d shard(s) to encode (%d item(s)), %d "
                    "already cached in %s", task, procs.rank, procs.world, len(prep.todo),
                    len(prep.mine), prep.todo_items(), len(prep.mine) - len(prep.todo), cache_dir)
    return prep


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

class ShardReader:
    """Read access to a finished cache (see the module docstring).

    `fields`: the fields opened per shard (default: all); each open shard holds one memory map
    per field. `len(reader)` rows, `locate(i)` -> ({field: array}, row), `shard(s)`,
    `column(field)` (one field of every row, read whole), `items()` (items.tsv)."""

    def __init__(self, cache_dir, task: str, version: int, rerun: str,
                 fields: Sequence[str] | None = None, max_open_shards: int = 8,
                 what: str | None = None):
        self.dir = Path(cache_dir).expanduser()
        self.manifest, self.index = read_index(self.dir, task, version, rerun, what)
        known = (*BUILTIN_FIELDS, *self.manifest["fields"])
        self.fields = tuple(known if fields is None else fields)
        unknown = sorted(set(self.fields) - set(known))
        if unknown:
            raise ValueError(f"{self.dir}: no field(s) {unknown} in the cache (it stores {list(known)})")
        self.max_open = max(1, int(max_open_shards))
        self.counts = np.array([s["rows"] for s in self.index["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._open: OrderedDict[int, dict] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # never pickle memory maps
        return state

    @property
    def num_shards(self) -> int:
        return len(self.counts)

    def open_shards(self) -> int:
        return len(self._open)

    def open_files(self) -> int:
        """Memory maps this process holds open now."""
        return sum(len(a) for a in self._open.values())

    def shard(self, s: int) -> dict:
        """{field: memory map} of shard s, opened on first use; the least recently used shard is
        dropped when more than `max_open_shards` are open."""
        arrays = self._open.get(s)
        if arrays is not None:
            self._open.move_to_end(s)
            return arrays
        while len(self._open) >= self.max_open:
            # dropped, not closed: a map closes when its last reference goes (closing one a
            # caller still holds would crash that caller)
            self._open.popitem(last=False)
        folder = self.dir / shard_name(s)
        n = int(self.counts[s])
        arrays = {}
        for f in self.fields:
            path = folder / f"{f}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{self.dir}: {path.relative_to(self.dir)} is missing "
                                        "(rerun dcgen prepare)")
            a = np.load(path, mmap_mode="r" if n else None)
            if a.shape[0] != n:
                raise ValueError(f"{self.dir}: {shard_name(s)} holds {a.shape[0]} rows, its index "
                                 f"says {n}; the shard changed after the index was written "
                                 "(rerun dcgen prepare)")
            arrays[f] = a
        self._open[s] = arrays
        return arrays

    def locate(self, i: int) -> tuple[dict, int]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"cache row {i} out of range [0, {len(self)})")
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.shard(s), i - int(self.offsets[s])

    def column(self, field: str) -> np.ndarray:
        """One field of every row, in row order, read into memory (each file closed after)."""
        parts = [np.load(self.dir / shard_name(s) / f"{field}.npy") for s in range(self.num_shards)]
        if parts:
            return np.concatenate(parts)
        descr, shape = self.manifest["fields"].get(field, ["<i8", []])
        return np.zeros((0, *shape), np.lib.format.descr_to_dtype(descr))

    def items(self) -> list[tuple[str, int]]:
        return read_items(self.dir)
