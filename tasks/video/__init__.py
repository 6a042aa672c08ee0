"""Video latents: clips of per-frame VAE latents on a (T, h, w) grid, encoded once into a
sharded cache by `dcgen prepare task=video`, with per-frame FID and FVD."""
from .codec import VideoCodec
from .data import LatentClipDataset, VideoReadError, read_clips, scan_videos
from .task import VideoTask

__all__ = ["VideoTask", "VideoCodec", "LatentClipDataset", "VideoReadError", "read_clips",
           "scan_videos"]
