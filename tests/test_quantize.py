"""int8 sends (lfnnify.pipeline.quantize), checked against a plain-Python reference written from the definition."""

import math

import pytest
import torch

from lfnnify.pipeline.quantize import dequantize, quantize


def _reference(x: torch.Tensor) -> list[list[float]]:
    """Per channel c of x (N, C, ...): s = max |x[:, c]| / 127, each value round(v / s) * s (half to even, as
    Python's round), in plain Python floats."""
    out = []
    for c in range(x.shape[1]):
        values = x[:, c].reshape(-1).tolist()
        s = max(abs(v) for v in values) / 127
        out.append([max(-127, min(127, round(v / s))) * s if s else 0.0 for v in values])
    return out


def test_each_channel_comes_back_as_the_reference_rounds_it_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    # channels with ranges six orders of magnitude apart: one scale for the tensor would zero the small ones
    x = torch.randn(4, 5, 3, 3, generator=g) * torch.tensor([1e-3, 1e-1, 1.0, 10.0, 1e3]).view(1, 5, 1, 1)
    x[:, 2] = x[:, 2].relu()  # a channel after ReLU: non-negative
    values, scales = quantize(x)
    assert values.dtype == torch.int8 and values.shape == x.shape and scales.shape == (5,)
    assert values.abs().max() == 127  # the largest magnitude of each channel uses the whole range
    back = dequantize(values, scales)
    expected = _reference(x)
    for c in range(5):
        got = back[:, c].reshape(-1).tolist()
        step = x[:, c].abs().max().item() / 127
        assert got == pytest.approx(expected[c], rel=1e-6, abs=1e-12 * step)
        assert max(abs(a - b) for a, b in zip(got, x[:, c].reshape(-1).tolist())) <= step / 2 * (1 + 1e-5)


def test_zeros_empty_and_low_dimensional_tensors():
    x = torch.zeros(2, 3, 4)
    x[:, 1] = torch.tensor([0.5, -0.25, 0.0, 1.0])
    back = dequantize(*quantize(x))
    assert torch.equal(back[:, 0], torch.zeros(2, 4)) and torch.equal(back[:, 2], torch.zeros(2, 4))
    assert torch.allclose(back[:, 1], x[:, 1], atol=1.0 / 254)
    v = torch.tensor([3.0, -1.5, 0.75])  # 1-d: one scale
    q, s = quantize(v)
    assert s.shape == (1,) and torch.allclose(dequantize(q, s), v, atol=3.0 / 254)
    q, s = quantize(torch.tensor(-2.0))  # 0-d
    assert q.shape == () and dequantize(q, s).item() == pytest.approx(-2.0)
    q, s = quantize(torch.empty(0, 3, 2))
    assert q.shape == (0, 3, 2) and dequantize(q, s).shape == (0, 3, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_receiver_gets_the_dtype_that_was_sent(dtype):
    x = torch.randn(2, 3, 2, 2).to(dtype)
    back = dequantize(*quantize(x), dtype)
    assert back.dtype == dtype and torch.allclose(back.double(), x.double(), atol=x.abs().max().item() / 100)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_channel_holding_inf_or_nan_comes_back_as_nan_never_as_a_finite_number(bad):
    x = torch.randn(2, 3, 2, 2)
    x[1, 1, 0, 1] = bad
    back = dequantize(*quantize(x))
    assert back[:, 1].isnan().all()  # the whole channel: its scale is unknown
    assert torch.allclose(back[:, [0, 2]], x[:, [0, 2]], atol=x[:, [0, 2]].abs().max().item() / 254 + 1e-7)
    assert math.isnan(dequantize(*quantize(torch.tensor([1.0, bad]))).sum().item())
