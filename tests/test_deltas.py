"""int8 sends of each sample's change (lfnnify.pipeline.deltas, AQ-SGD), against a reference written from the
definition (tests/references.py): per sample a memory m (zero at first), send round(a - m) per channel, both ends add
it to m."""

from types import SimpleNamespace

import pytest
import torch

import lfnnify
from lfnnify.data import SyntheticImages, WithIndex, make_loader
from lfnnify.pipeline.datapath import DataPath
from lfnnify.pipeline.deltas import SampleMemory
from lfnnify.pipeline.quantize import dequantize, quantize
from tests.references import AqSgdReceiver


def _visits(epochs=4, samples=24, batch=8, drift=0.02, seed=0):
    """Batches of (activation, sample indices) over a few epochs, in a new order each epoch: every sample's
    activation moves a little between its visits, as a block's output does while the block trains."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, 6, 3, 3, generator=g) * torch.tensor([1e-2, 1.0, 5.0, 1.0, 0.3, 2.0]).view(1, 6, 1, 1)
    out = []
    for epoch in range(epochs):
        now = base + drift * epoch * torch.randn(base.shape, generator=g)
        order = torch.randperm(samples, generator=g)
        out += [(now[order[i:i + batch]], order[i:i + batch]) for i in range(0, samples, batch)]
    return out


def test_the_receiver_computes_on_what_the_reference_receiver_holds_and_both_ends_keep_the_same_bits():
    sender, receiver, reference = SampleMemory(), SampleMemory(), AqSgdReceiver()
    for x, ids in _visits():
        values, scales = sender.encode(x, ids)
        assert values.dtype == torch.int8 and scales.shape == (6,)  # what crosses: int8 and a scale per channel
        got = receiver.decode(values, scales, ids, torch.float32)
        assert torch.allclose(got, reference.send(x, ids), rtol=1e-6, atol=1e-7)
        assert torch.equal(sender.rows, receiver.rows)  # the two ends never drift apart


def test_after_the_first_visit_the_error_is_a_fraction_of_plain_int8s():
    # the first epoch is plain int8; later visits round only the change, so the receiver's error falls below the
    # plain int8 send's, which stays at its level (it would fail if the memory were not updated, or not used)
    sender, receiver = SampleMemory(), SampleMemory()
    errors = {"deltas": [], "plain": []}
    for x, ids in _visits(epochs=4):
        got = receiver.decode(*sender.encode(x, ids), ids, torch.float32)
        errors["deltas"].append((got - x).abs().max().item())
        errors["plain"].append((dequantize(*quantize(x)) - x).abs().max().item())
    per_epoch = len(errors["plain"]) // 4
    first = slice(0, per_epoch)
    last = slice(3 * per_epoch, None)
    assert errors["deltas"][first] == pytest.approx(errors["plain"][first], rel=1e-5)
    assert max(errors["deltas"][last]) < 0.25 * min(errors["plain"][last])


def test_the_dtype_sent_comes_back_and_memory_grows_with_the_largest_index():
    sender, receiver = SampleMemory(), SampleMemory()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    ids = torch.tensor([5, 0, 100])
    got = receiver.decode(*sender.encode(x, ids), ids, torch.float64)
    assert got.dtype == torch.float64 and torch.allclose(got, x, atol=x.abs().max().item() / 200)
    assert receiver.rows.shape == (101, 2, 4) and receiver.nbytes == 101 * 8 * 4


@pytest.mark.parametrize("ids, shape, words", [
    (torch.tensor([0, 1, 1]), (3, 2), "appear twice in one batch"),
    (torch.tensor([0, -1, 2]), (3, 2), "sample index -1"),
    (torch.tensor([0, 1]), (3, 2), "3 activations came with 2 sample indices"),
])
def test_indices_the_memory_cannot_use_are_refused_with_the_fix(ids, shape, words):
    with pytest.raises(lfnnify.DataError, match=words):
        SampleMemory().encode(torch.randn(*shape), ids)


def test_a_batch_of_another_image_size_is_refused():
    memory = SampleMemory()
    memory.encode(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(lfnnify.DataError, match=r"shape \(3, 5, 5\) per sample after earlier ones of \(3, 4, 4\)"):
        memory.encode(torch.randn(2, 3, 5, 5), torch.tensor([2, 3]))


def test_deltas_need_int8_sends():
    from lfnnify.training.options import PipelineOptions

    with pytest.raises(lfnnify.ConfigError, match=r"send_deltas=True with send_dtype=torch.bfloat16.*int8"):
        PipelineOptions(send_dtype=torch.bfloat16, send_deltas=True)
    with pytest.raises(lfnnify.ConfigError, match=r"send_deltas=1 must be True or False"):
        PipelineOptions(send_dtype=torch.int8, send_deltas=1)
    assert PipelineOptions(send_dtype=torch.int8, send_deltas=True).send_deltas
    from lfnnify.app.recipes import load_recipe

    with pytest.raises(lfnnify.RecipeError, match=r"pipeline.send_deltas: True .* pipeline.send_dtype is None; set "
                                                  r"pipeline.send_dtype: int8"):
        load_recipe("fashion_mnist_resnet18_k4", overrides=["pipeline.send_deltas=true"])
    recipe = load_recipe("fashion_mnist_resnet18_k4",
                         overrides=["pipeline.send_deltas=true", "pipeline.send_dtype=int8"])
    assert recipe.pipeline.send_deltas


def test_an_indexed_loader_gives_each_samples_position_and_the_pipeline_checks_it():
    data = SyntheticImages(10, shape=(1, 4, 4))
    x, y, ids = next(iter(make_loader(data, batch_size=4, seed=3, indexed=True)))
    assert torch.equal(x, torch.stack([data[int(i)][0] for i in ids])) and len(set(ids.tolist())) == 4
    assert WithIndex(data)[7][2] == 7
    rules = dict(input_shape=(1, 1, 4, 4), dtype=torch.float32, num_classes=10)
    path = SimpleNamespace(link=SimpleNamespace(send_deltas=True), batch_rules=rules)
    assert torch.equal(DataPath._batch(path, (x, y, ids))[2], ids)
    with pytest.raises(lfnnify.DataError, match=r"has 2 items; with send_deltas=True .*WithIndex"):
        DataPath._batch(path, (x, y))
    with pytest.raises(lfnnify.DataError, match=r"sample indices .* are shape \(3,\)"):
        DataPath._batch(path, (x, y, ids[:3]))
