"""Synthetic shapes on a grid of rank 1-3: the task for smoke runs and tests."""
from .data import ToyDataset, make_sample
from .task import ToyTask

__all__ = ["ToyTask", "ToyDataset", "make_sample"]
