"""Pixel-space images: sklearn digits (built in), an ImageFolder directory, or an .npz."""
from .data import ImageFolderDataset, TensorImageDataset
from .task import PixelTask

__all__ = ["PixelTask", "ImageFolderDataset", "TensorImageDataset"]
