"""dcgen.shards: the one sharded-cache layout of imagenet_latent, video and voxel. Tiny synthetic
items (a name, a label; item i produces i % 3 rows, none when i % 3 == 0), pure numpy encoding,
2-process runs as 2 threads sharing a gather."""
import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from dcgen import shards
from dcgen.shards import Processes, ShardReader

TASK, VERSION, RERUN = "toy_cache", 3, "dcgen prepare task=toy_cache"
FIELDS = {"x": (np.float32, (2, 3)), "code": (np.uint8, ())}


def items(n):
    return [(f"class{i % 2}/file_{i:03d}.bin", i % 2) for i in range(n)]


def rows_of(i):
    """What item i encodes to: i % 3 rows (none: skipped)."""
    k = i % 3
    x = (np.arange(k * 6, dtype=np.float32).reshape(k, 2, 3) + 100 * i) / 7
    return {"x": x, "code": np.full(k, i % 251, np.uint8)}


def encode(prep, todo, seen=None, die_in=None):
    """The task's part: one writer per shard, rows in item order. `die_in=(s, k)` stops dead
    after k items of shard s, as a killed process would (the writer is left as it is)."""
    for s in todo:
        if seen is not None:
            seen.append(s)
        w = prep.writer(s)
        a, b = prep.span(s)
        for j, i in enumerate(range(a, b)):
            if die_in is not None and die_in == (s, j):
                raise KeyboardInterrupt("killed")
            r = rows_of(i)
            if len(r["x"]) == 0:
                w.skip(i, "produces nothing")
            else:
                w.add(i, **r)
        w.finish(codes=int(sum(1 for i in range(a, b) if i % 3)))


def prepare(cache, n=10, size=3, settings=None, fields=FIELDS, processes=None, item_list=None, **kw):
    prep = shards.start(cache, task=TASK, version=VERSION, settings=settings or {"scale": 1, "mode": "a"},
                        fields=fields, shard_size=size, rerun=RERUN, processes=processes,
                        list_items=lambda: (item_list or items(n), {"classes": ["class0", "class1"]}))
    return prep, prep.run(lambda todo: encode(prep, todo, **kw),
                          summarize=lambda metas: {"codes": sum(m["codes"] for m in metas)})


def tree(cache: Path) -> dict:
    """Every file of a cache: bytes, except the JSON files without their "written" record (who
    wrote it, and how long it took)."""
    out = {}
    for p in sorted(cache.rglob("*")):
        if p.is_file():
            rel = p.relative_to(cache).as_posix()
            if p.suffix == ".json":
                d = json.loads(p.read_text())
                d.pop("written", None)
                out[rel] = d
            else:
                out[rel] = p.read_bytes()
    return out


def expected_rows(n):
    return [(i, r) for i in range(n) for r in range(i % 3)]


class ThreadWorld:
    """`world` ranks as threads; gather is a list filled behind a barrier (collective like
    accelerate's gather_object)."""

    def __init__(self, world):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def processes(self, rank):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        return Processes(rank, self.world, gather)

    def run(self, fn):
        results, errors = [None] * self.world, [None] * self.world

        def go(rank):
            try:
                results[rank] = fn(self.processes(rank))
            except BaseException as e:  # noqa: BLE001 - handed to the test
                errors[rank] = e
        threads = [threading.Thread(target=go, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, errors


# --------------------------------------------------------------------------------------------


def test_layout_rows_and_reader_values(tmp_path):
    cache = tmp_path / "c"
    _, index = prepare(cache)
    assert sorted(p.name for p in cache.iterdir()) == ["index.json", "items.tsv", "manifest.json",
                                                       "shard_00000", "shard_00001", "shard_00002",
                                                       "shard_00003"]
    assert sorted(p.name for p in (cache / "shard_00001").iterdir()) == \
        ["code.npy", "item.npy", "label.npy", "meta.json", "x.npy"]
    want = expected_rows(10)
    assert index["num_rows"] == len(want) and index["num_items"] == 10 and index["num_shards"] == 4
    assert [s["rows"] for s in index["shards"]] == [3, 3, 3, 0]  # items 1,2 | 4,5 | 7,8 | none (9)
    assert index["classes"] == ["class0", "class1"] and index["codes"] == 6
    assert [k["item"] for k in index["skipped"]] == [0, 3, 6, 9]
    assert index["skipped"][1] == {"item": 3, "name": "class1/file_003.bin", "reason": "produces nothing"}
    meta = json.loads((cache / "shard_00001" / "meta.json").read_text())
    assert (meta["start"], meta["stop"], meta["rows"]) == (3, 6, 3)
    # streamed .npy files are plain numpy files, header aligned
    x = np.load(cache / "shard_00001" / "x.npy")
    assert x.shape == (3, 2, 3) and x.dtype == np.float32
    assert np.array_equal(x, np.concatenate([rows_of(4)["x"], rows_of(5)["x"]]))
    assert shards.NPY_HEADER % 64 == 0
    reader = ShardReader(cache, TASK, VERSION, RERUN)
    assert len(reader) == len(want)
    for r, (i, k) in enumerate(want):
        arrays, row = reader.locate(r)
        assert int(arrays["item"][row]) == i and int(arrays["label"][row]) == i % 2
        assert np.array_equal(arrays["x"][row], rows_of(i)["x"][k])
    assert reader.column("item").tolist() == [i for i, _ in want]
    assert reader.items() == items(10)


def test_resume_after_a_kill_skips_complete_shards_and_equals_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    prepare(whole)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prepare(cut, die_in=(2, 1))  # killed halfway through shard 2
    assert not (cut / "index.json").exists()
    assert sorted(p.name for p in cut.glob("shard_*")) == ["shard_00000", "shard_00001"]
    assert len(list(cut.glob(".shard_00002.tmp-*"))) == 1  # what the killed writer left
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ShardReader(cut, TASK, VERSION, RERUN)
    stamps = {s: (cut / f"shard_{s:05d}" / "x.npy").stat().st_mtime_ns for s in (0, 1)}
    seen = []
    prepare(cut, seen=seen)
    assert seen == [2, 3]  # complete shards skipped
    assert all((cut / f"shard_{s:05d}" / "x.npy").stat().st_mtime_ns == t for s, t in stamps.items())
    assert not list(cut.glob(".shard_*"))
    assert tree(cut) == tree(whole)  # byte for byte (the arrays), equal (the metadata)
    seen = []
    prepare(cut, seen=seen)
    assert seen == [] and tree(cut) == tree(whole)


def test_two_processes_write_the_same_cache_as_one(tmp_path):
    one = tmp_path / "one"
    prepare(one, n=11, size=2)
    two = tmp_path / "two"
    world = ThreadWorld(2)
    written = {0: [], 1: []}
    results, errors = world.run(lambda procs: prepare(two, n=11, size=2, processes=procs,
                                                      seen=written[procs.rank])[1])
    assert errors == [None, None]
    assert written == {0: [0, 2, 4], 1: [1, 3, 5]}  # shard s by rank s mod 2
    assert results[0] == results[1] == json.loads((two / "index.json").read_text())
    for s in range(6):
        assert json.loads((two / f"shard_{s:05d}" / "meta.json").read_text())["written"]["rank"] == s % 2
    assert tree(two) == tree(one)
    # and a 3-process resume of a 2-process cache after losing two shards
    for s in (1, 4):
        shutil.rmtree(two / f"shard_{s:05d}")
    written = {0: [], 1: [], 2: []}
    _, errors = ThreadWorld(3).run(lambda procs: prepare(two, n=11, size=2, processes=procs,
                                                         seen=written[procs.rank]))
    assert errors == [None] * 3 and written == {0: [], 1: [1, 4], 2: []}
    assert tree(two) == tree(one)


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    def go(procs):
        return procs.agree(lambda: 1 / 0 if procs.rank == 1 else "fine")
    _, errors = ThreadWorld(2).run(go)
    assert all(isinstance(e, ValueError) and "rank 1" in str(e) and "ZeroDivisionError" in str(e)
               for e in errors), errors


def test_a_temp_folder_left_by_a_killed_writer_is_ignored_then_cleaned(tmp_path):
    cache = tmp_path / "c"
    prepare(cache)
    want = tree(cache)
    junk = cache / ".shard_00001.tmp-deadbeef"
    junk.mkdir()
    np.save(junk / "x.npy", np.zeros((99, 2, 3), np.float32))
    (junk / "meta.json").write_text('{"rows": 99}')
    reader = ShardReader(cache, TASK, VERSION, RERUN)  # a reader never looks at it
    assert len(reader) == 9 and reader.locate(3)[0]["x"].shape[0] == 3
    seen = []
    prepare(cache, seen=seen)
    assert seen == [] and not junk.exists() and tree(cache) == want
    # a folder set aside by an interrupted replace is cleared the same way
    aside = cache / ".shard_00002.old-0badf00d"
    aside.mkdir()
    prepare(cache)
    assert not aside.exists()


def test_other_settings_are_refused_naming_the_keys(tmp_path):
    cache = tmp_path / "c"
    prepare(cache)
    before = tree(cache)
    with pytest.raises(ValueError, match=r"different 'scale' \(1 != 2\)") as e:
        prepare(cache, settings={"scale": 2, "mode": "a"})
    assert "'mode'" not in str(e.value)
    with pytest.raises(ValueError, match="'mode'.*'scale'"):
        prepare(cache, settings={"scale": 2, "mode": "b"})
    with pytest.raises(ValueError, match="'fields'"):
        prepare(cache, fields={"x": (np.float16, (2, 3)), "code": (np.uint8, ())})
    assert tree(cache) == before  # nothing touched, the index still there
    # another shard size is not an error: the cache keeps its own
    seen = []
    prepare(cache, size=5, seen=seen)
    assert seen == [] and tree(cache) == before
    # an older version of the task's cache: refused, saying to rerun prepare
    with pytest.raises(ValueError, match="older layout.*dcgen prepare task=toy_cache"):
        ShardReader(cache, TASK, VERSION + 1, RERUN)
    with pytest.raises(ValueError, match="older layout"):
        shards.start(cache, task=TASK, version=VERSION + 1, settings={"scale": 1, "mode": "a"},
                     fields=FIELDS, shard_size=3, rerun=RERUN, list_items=lambda: (items(10), {}))
    old = tmp_path / "old"  # a cache of a layout before this module: files, no manifest
    old.mkdir()
    (old / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="older layout.*rerun"):
        ShardReader(old, TASK, VERSION, RERUN)


def test_changed_items_reencode_only_their_shards(tmp_path):
    cache = tmp_path / "c"
    prepare(cache, n=10)
    stamps = {s: (cache / f"shard_{s:05d}" / "meta.json").stat().st_mtime_ns for s in range(4)}
    seen = []
    _, index = prepare(cache, n=11, seen=seen)  # one item appended: only the last shard changes
    assert seen == [3] and index["num_items"] == 11
    assert all((cache / f"shard_{s:05d}" / "meta.json").stat().st_mtime_ns == stamps[s] for s in range(3))
    ref = tmp_path / "ref"
    prepare(ref, n=11)
    assert tree(cache) == tree(ref)
    renamed = items(11)
    renamed[4] = ("class0/renamed.bin", 0)  # same count, another file (and label) in shard 1
    seen = []
    prepare(cache, item_list=renamed, seen=seen)
    assert seen == [1] and json.loads((cache / "shard_00001" / "meta.json").read_text())["skipped"] == \
        [{"item": 3, "name": "class1/file_003.bin", "reason": "produces nothing"}]
    assert np.load(cache / "shard_00001" / "label.npy").tolist() == [0, 1, 1]  # items 4, 5, 5
    seen = []
    prepare(cache, n=5, seen=seen)  # fewer items: shard 1 changes, shards 2 and 3 go
    assert seen == [1] and sorted(p.name for p in cache.glob("shard_*")) == ["shard_00000", "shard_00001"]
    ref5 = tmp_path / "ref5"
    prepare(ref5, n=5)
    assert tree(cache) == tree(ref5)


def _mapped(cache: Path) -> set[str]:
    """Files under `cache` this process has open or mapped (Linux)."""
    root = str(cache.resolve())
    out = {line.split(None, 5)[-1].strip() for line in open("/proc/self/maps") if root in line}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            out.add(target)
    return out


def test_the_reader_opens_no_shard_at_construction_and_keeps_at_most_n_open(tmp_path):
    import gc
    cache = tmp_path / "c"
    prepare(cache, n=30, size=2)  # 15 shards
    reader = ShardReader(cache, TASK, VERSION, RERUN, fields=["x", "item"], max_open_shards=3)
    assert reader.open_files() == 0 and _mapped(cache) == set()
    want = expected_rows(30)
    order = np.random.default_rng(0).permutation(len(want))
    for n, r in enumerate(order):
        arrays, row = reader.locate(int(r))
        i, k = want[r]
        assert int(arrays["item"][row]) == i and np.array_equal(arrays["x"][row], rows_of(i)["x"][k])
        assert reader.open_shards() <= 3 and reader.open_files() <= 6
        del arrays
        if n % 5 == 4:  # what the process really holds: the dropped maps are gone
            gc.collect()
            assert len(_mapped(cache)) <= 6
    assert set(reader.shard(0)) == {"x", "item"}  # only the fields asked for
    with pytest.raises(ValueError, match="no field"):
        ShardReader(cache, TASK, VERSION, RERUN, fields=["y"])
    with pytest.raises(IndexError):
        reader.locate(len(want))


def test_a_pickled_reader_carries_no_open_shard(tmp_path):
    cache = tmp_path / "c"
    prepare(cache, n=300, size=100)
    reader = ShardReader(cache, TASK, VERSION, RERUN)
    for r in (0, 120, 250):
        reader.locate(r)
    assert reader.open_shards() == 3
    blob = pickle.dumps(reader)
    assert len(blob) == len(pickle.dumps(ShardReader(cache, TASK, VERSION, RERUN)))  # no map in it
    copy = pickle.loads(blob)
    assert copy.open_files() == 0 and reader.open_shards() == 3
    a, r = copy.locate(150)
    b, q = reader.locate(150)
    assert np.array_equal(a["x"][r], b["x"][q])


def test_a_cache_without_its_index_is_refused(tmp_path):
    cache = tmp_path / "c"
    with pytest.raises(FileNotFoundError, match="no toy_cache cache at .*run `dcgen prepare task=toy_cache"):
        ShardReader(cache, TASK, VERSION, RERUN)
    prepare(cache)
    (cache / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete \(index.json missing.*dcgen prepare task=toy_cache"):
        ShardReader(cache, TASK, VERSION, RERUN)
    # a shard replaced after the index was written is refused when it is opened
    prepare(cache)
    reader = ShardReader(cache, TASK, VERSION, RERUN)
    index = json.loads((cache / "index.json").read_text())
    index["shards"][1]["rows"] = 2
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="changed after the index"):
        ShardReader(cache, TASK, VERSION, RERUN).shard(1)
    assert len(reader) == 9


def test_writer_checks_fields_order_and_range(tmp_path):
    prep = shards.start(tmp_path / "c", task=TASK, version=VERSION, settings={}, fields=FIELDS,
                        shard_size=4, rerun=RERUN, list_items=lambda: (items(8), {}))
    w = prep.writer(1)
    with pytest.raises(ValueError, match=r"holds items \[4, 8\)"):
        w.add(2, **rows_of(2))
    with pytest.raises(ValueError, match="fields"):
        w.add(5, x=rows_of(5)["x"])
    with pytest.raises(ValueError, match="shape"):
        w.add(5, x=np.zeros((2, 3, 2), np.float32), code=np.zeros(2, np.uint8))
    w.add(5, **rows_of(5))
    with pytest.raises(ValueError, match="in order"):
        w.add(4, **rows_of(4))
    w.skip(6, "no reason")
    with pytest.raises(ValueError, match="before its last item 7"):
        w.finish()
    w.abort()
    assert not list((tmp_path / "c").glob(".shard_*"))


def test_task_constructors_read_no_file(tmp_path):
    """VideoTask, VoxelTask and ImageNetLatentTask built over real folders open, list and read
    nothing (an audit hook sees every open() and directory listing); the folders are read on
    first use of what needs them."""
    import sys

    from dcgen.codec import tiny_autoencoder_kl
    from dcgen.tasks.imagenet_latent.task import ImageNetLatentTask
    from dcgen.tasks.video.task import VideoTask
    from dcgen.tasks.voxel.task import VoxelTask
    for d in ("videos/a", "videos/b", "meshes/x", "meshes/y", "meshes/z", "latents"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "latents" / "manifest.json").write_text("{}")
    tiny_autoencoder_kl(width=8).save_pretrained(str(tmp_path / "vae"))
    seen, active = [], [False]

    def hook(event, args):
        if active[0] and event in ("open", "os.listdir", "os.scandir"):
            seen.append((event, str(args[0])))
    sys.addaudithook(hook)  # stays installed (it cannot be removed); idle unless `active`
    active[0] = True
    try:
        video = VideoTask(root=tmp_path / "videos", vae=str(tmp_path / "vae"), frames=2, resolution=16)
        voxel = VoxelTask(root=tmp_path / "meshes", resolution=8)
        latent = ImageNetLatentTask(cache_dir=tmp_path / "latents", num_classes=None, resolution=16)
        from dcgen.tasks.pixel.task import PixelTask
        pixels = PixelTask(source="folder", root=tmp_path / "meshes")  # any class folders
        glyphs = PixelTask(source="glyphs")
    finally:
        active[0] = False
    assert seen == []
    assert pixels.num_classes == 3 and pixels.classes == ["x", "y", "z"] and glyphs.num_classes == 10
    assert video.num_classes == 2 and video.grid == (2, 2, 2) and video.channels == 4
    assert voxel.num_classes == 3 and voxel.classes == ["x", "y", "z"]
    with pytest.raises(ValueError, match="older layout.*dcgen prepare"):
        latent.num_classes  # read on first use: a manifest of no known layout
