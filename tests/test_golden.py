"""Golden losses: the first steps of fixed-seed K=4 runs must match tests/golden/losses.json.

A change of numerics (the loss's normalisation, an update's order, a head's initialisation) shows here.
If the change is meant, regenerate with ``python scripts/golden_losses.py --update`` and say why.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import golden_losses  # noqa: E402

GOLDEN = json.loads(golden_losses.GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN["runs"]))
def test_losses_match_the_golden_file(name):
    expected = torch.tensor(GOLDEN["runs"][name])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = torch.tensor(golden_losses.losses(golden_losses.RUNS[name], steps=len(expected)))
    finally:
        torch.set_num_threads(threads)
    # different CPUs round convolutions differently in the last bits; anything the code changes is far larger
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4), (got - expected).abs().max()
