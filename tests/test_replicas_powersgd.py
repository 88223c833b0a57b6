"""A block's replicas averaging through torch's PowerSGD (lfnnify.pipeline.replicas.PowerSGDAverage), two processes,
checked against definitions: the mean before compression starts, every replica applying the same average, a rank-1
average of each compressed matrix, and error feedback's bookkeeping (what was applied plus what the replicas still
hold back is exactly what they were given)."""

import pytest
import torch

from lfnnify.surgery.traffic import powersgd_elements
from tests import powersgd_worker as worker
from tests.launch import torchrun

pytestmark = pytest.mark.xdist_group("powersgd")  # one pytest worker runs them all: one launch, not one per worker


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("powersgd")
    proc, seconds = torchrun(2, "--out", out, script=worker.__file__, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _mean(records, key, step):
    return [(a + b) / 2 for a, b in zip(records[0][key][step], records[1][key][step])]


def test_every_replica_applies_the_same_average(records):
    for step in range(worker.STEPS):
        for a, b in zip(records[0]["applied"][step], records[1]["applied"][step]):
            assert torch.equal(a, b), step
    for a, b in zip(records[0]["other_layout"], records[1]["other_layout"]):
        assert torch.equal(a, b)
    assert records[0]["buckets"] == [0, 1]  # the second layout kept its own error memory


def test_the_first_steps_are_the_plain_mean_then_each_matrix_is_a_rank_one_average(records):
    for step in range(worker.START):
        for got, mean in zip(records[0]["applied"][step], _mean(records, "given", step)):
            assert torch.allclose(got, mean, atol=1e-6)
    for step in range(worker.START, worker.STEPS):
        conv, linear, bias = records[0]["applied"][step]
        assert torch.linalg.matrix_rank(conv.reshape(conv.shape[0], -1)) == 1
        assert torch.linalg.matrix_rank(linear) == 1
        assert not torch.allclose(linear, _mean(records, "given", step)[1], atol=1e-3)  # compression was used
        # a bias is too small to compress: all-reduced whole, so what each replica holds back averages to zero and
        # the replicas apply the plain mean of what they were given
        assert torch.allclose(bias, _mean(records, "given", step)[2], atol=1e-5)


def test_error_feedback_applies_over_the_steps_what_the_replicas_were_given(records):
    # each replica holds back e = (its gradient + its earlier e) - the applied average, so over the steps
    # sum(applied) + mean(e) = sum(mean of the given gradients), exactly up to rounding
    flat = [torch.cat([t.reshape(-1) for t in step]) for step in records[0]["applied"]]
    given = [torch.cat([t.reshape(-1) for t in _mean(records, "given", step)]) for step in range(worker.STEPS)]
    held_back = (records[0]["error"] + records[1]["error"]) / 2
    assert held_back.abs().max() > 1e-2  # compression left something out
    assert torch.allclose(torch.stack(flat).sum(0) + held_back, torch.stack(given).sum(0), atol=1e-4)


def test_what_the_replicas_all_reduce_is_what_the_plan_counts_for_powersgd(records):
    # the rule plan() and benchmarks/replicas_traffic.py count with, against what torch's hook really all-reduced:
    # at rank 1, the conv weight as P (8 x 1) and Q (36 x 1), the linear weight as 16 + 12, the bias whole (16)
    whole = sum(torch.Size(s).numel() for s in worker.SHAPES)
    assert records[0]["all_reduced"][:worker.START] == [whole] * worker.START
    compressed = powersgd_elements(worker.SHAPES, worker.RANK)
    assert compressed == (8 + 36) + (16 + 12) + 16
    assert records[0]["all_reduced"][worker.START:] == [compressed] * (worker.STEPS - worker.START)
