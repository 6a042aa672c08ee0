"""3D occupancy grids from meshes (obj, ply, stl, off, glb): voxelised once, x (1, R, R, R)."""
from .data import VoxelDataset, load_mesh, normalise_mesh, occupancy_to_mesh, voxelize
from .metrics import compression_by_region, shape_metrics
from .task import VoxelTask

__all__ = ["VoxelTask", "VoxelDataset", "load_mesh", "normalise_mesh", "voxelize",
           "occupancy_to_mesh", "shape_metrics", "compression_by_region"]
