"""Cut points: where exactly one input-dependent tensor is live."""

import torch
from torch import nn

import lfnnify


@torch.fx.wrap
def _optional_mask(valid, dtype):
    # like timm's create_attention_mask: None when no validity mask is given (the usual case)
    return None if valid is None else valid.to(dtype)[:, None, None, :]


@torch.fx.wrap
def _masked(y, mask):
    return y if mask is None else y * mask


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, mask=None):
        y = torch.relu(self.conv(x))
        return x + _masked(y, mask)


class _MaskedStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(_Block() for _ in range(4))
        self.fc = nn.Linear(8, 5)

    def forward(self, x, valid=None):
        mask = _optional_mask(valid, x.dtype)  # input-dependent (through x.dtype), but None
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, mask)
        return self.fc(x.mean((2, 3)))


def test_a_value_that_is_none_does_not_block_cuts():
    model = _MaskedStack().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = lfnnify.plan(model, example_input=x[:1])
    names = [c.name for c in plan.cut_points]
    assert {"blocks.0", "blocks.1", "blocks.2"} <= set(names)  # the None mask is live across all of them
    net = lfnnify.convert(model, cuts=["blocks.0", "blocks.2"], example_input=x[:1]).eval()
    assert torch.equal(net(x), model(x))
    assert all(isinstance(b, torch.fx.GraphModule) for b in net.blocks)
    assert not any(n.target is _optional_mask for b in net.blocks for n in b.graph.nodes)  # never recomputed
