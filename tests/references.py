"""References written from the definitions, shared by the tests that check lfnnify's sends against them (not
lfnnify's code): int8 rounding with a scale per channel, and AQ-SGD's receiver of int8 deltas."""

import torch


def int8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to int8 with one scale per channel (dim 1), s = max |x[:, c]| / 127, and back."""
    dims = tuple(d for d in range(x.dim()) if d != 1)
    scale = x.abs().amax(dim=dims, keepdim=True) / 127
    return torch.where(scale > 0, (x / scale).round().clamp(-127, 127) * scale, torch.zeros_like(x))


class AqSgdReceiver:
    """AQ-SGD's receiver: a dict of per-sample memories m, zero until a sample's first visit; a visit sends
    round(a - m) and both ends add it to m, which the receiver computes on."""

    def __init__(self):
        self.memory: dict[int, torch.Tensor] = {}

    def send(self, x: torch.Tensor, ids) -> torch.Tensor:
        x = x.detach()
        before = torch.stack([self.memory.get(int(i), torch.zeros_like(x[0])) for i in ids])
        after = before + int8_round_trip(x - before)
        self.memory.update({int(i): row for i, row in zip(ids, after)})
        return after
