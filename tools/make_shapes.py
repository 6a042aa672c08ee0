#!/usr/bin/env python
"""Procedural 3D shapes for the voxel task, made offline: one folder per class of closed meshes.

    python tools/make_shapes.py --out data/shapes --per-class 100 --seed 0
    dcgen train experiment=voxels_dcdit task.root=data/shapes

Six classes (box, cylinder, cone, ellipsoid, torus, capsule), each drawn with random proportions
and a random orientation, so that a class is a family of shapes rather than one shape (the voxel
task rescales every mesh to the unit cube, so a plain size change would be no variation at all).
Meshes are watertight and written as .ply; the same seed gives the same files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

CLASSES = ("box", "capsule", "cone", "cylinder", "ellipsoid", "torus")


def make_shape(kind: str, rng: np.random.Generator):
    """One closed trimesh of `kind` with random proportions and a random rotation."""
    import trimesh
    from scipy.spatial.transform import Rotation

    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if kind == "box":
        m = trimesh.creation.box((1.0, u(0.3, 1.0), u(0.15, 1.0)))
    elif kind == "cylinder":
        m = trimesh.creation.cylinder(radius=u(0.15, 0.5), height=1.0, sections=32)
    elif kind == "cone":
        m = trimesh.creation.cone(radius=u(0.2, 0.6), height=1.0, sections=32)
    elif kind == "ellipsoid":
        m = trimesh.creation.icosphere(subdivisions=3)
        m.apply_scale((1.0, u(0.35, 1.0), u(0.35, 1.0)))
    elif kind == "torus":
        m = trimesh.creation.torus(major_radius=1.0, minor_radius=u(0.2, 0.5),
                                   major_sections=48, minor_sections=16)
    elif kind == "capsule":
        m = trimesh.creation.capsule(height=u(0.5, 2.0), radius=0.5, count=(16, 16))
    else:
        raise ValueError(f"unknown shape class {kind!r}; known: {CLASSES}")
    rot = np.eye(4)
    rot[:3, :3] = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
    m.apply_transform(rot)
    return m


def write_shapes(out: str | Path, per_class: int, seed: int = 0, classes=CLASSES) -> list[Path]:
    """Write `per_class` meshes of each class under out/<class>/<index>.ply; returns the paths."""
    out = Path(out)
    paths = []
    for ci, kind in enumerate(classes):
        rng = np.random.default_rng([seed, ci])
        d = out / kind
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            p = d / f"{i:04d}.ply"
            make_shape(kind, rng).export(p)
            paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.per_class < 1:
        ap.error("--per-class must be positive")
    paths = write_shapes(args.out, args.per_class, args.seed)
    print(f"wrote {len(paths)} meshes ({len(CLASSES)} classes x {args.per_class}) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
