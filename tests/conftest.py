"""Shared fixtures: small real models, fixed thread count and seeds."""

import os

import pytest
import torch

# Two threads on the 2-core CI machine; set LFNNIFY_TEST_THREADS=1 when another process holds a
# core (oversubscription made a 2-thread step 7x slower here).
torch.set_num_threads(int(os.environ.get("LFNNIFY_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
