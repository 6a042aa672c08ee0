import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers from each other (test_train, ...)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: the N workers share the cores, so each runs one thread, and so does every
    # process it starts (two 2-thread PyTorch processes on 2 cores run 5-10x slower than 1-thread ones)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Accelerate keeps process-wide singletons; in-process train/prepare/evaluate calls in one
    test must not leak their state (mixed precision, world) into the next."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy6(tmp_path_factory):
    """The uninterrupted 6-step TOY run (tests/test_train.py) that the kill, signal and requeue
    tests must reproduce bit for bit (checkpoint frequency does not change the weights):
    trained once per session."""
    from test_train import TOY, run_cli
    ref = tmp_path_factory.mktemp("toy6") / "run"
    run_cli(["train", *TOY, "train.max_steps=6", "train.ckpt_every=0", f"run_dir={ref}"])
    return ref
