"""Shared fixtures: small real models, fixed thread count and seeds."""

import os

import pytest
import torch

# The suite runs two tests at a time (pytest-xdist, one worker per core), so each takes one thread; alone it
# takes two. Oversubscribed cores are very slow here (a 2-thread step ran 7x slower beside another process).
_DEFAULT = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("LFNNIFY_TEST_THREADS", _DEFAULT)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
