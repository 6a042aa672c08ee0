"""Class-conditional ImageNet in SD-VAE latent space (the paper setup)."""
from .data import LatentCache, LatentDataset
from .task import ImageNetLatentTask

__all__ = ["ImageNetLatentTask", "LatentCache", "LatentDataset"]
