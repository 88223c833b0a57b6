"""Shared fixtures: small real models, fixed thread count and seeds."""

import os

import pytest
import torch

# The suite runs two tests at a time (pytest-xdist, one worker per core), so each takes one thread; alone it
# takes two. Oversubscribed cores are very slow here (a 2-thread step ran 7x slower beside another process).
# The processes a test starts (torchrun's workers, a benchmark's runs, the accelerator script's dry run) inherit the
# same count unless they set their own.
_DEFAULT = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
THREADS = os.environ.get("LFNNIFY_TEST_THREADS", _DEFAULT)
torch.set_num_threads(int(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
