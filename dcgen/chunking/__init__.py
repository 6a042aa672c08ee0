"""N-D dynamic chunking core: router, chunk/de-chunk pair, ratio loss. Rank-specific code is in grid.py."""
from .chunk import ChunkIndex, ChunkLayer, DeChunkLayer, ste, tail_drop_mask
from .ratio_loss import ratio_loss, ratio_loss_from_aux
from .router import CausalCosineRouter, CosineRouter, RoutingModule, RoutingModuleOutput, build_router

__all__ = ["ChunkIndex", "ChunkLayer", "DeChunkLayer", "ste", "tail_drop_mask", "ratio_loss",
           "ratio_loss_from_aux", "RoutingModule", "CosineRouter", "CausalCosineRouter",
           "RoutingModuleOutput", "build_router"]
