"""What a pipeline and data-parallel backprop send over the links between devices per step, and how long it takes.

A pipeline sends, across each cut, the block's output for the batch (and the labels); in ``mode="replay"`` the
gradient of that output comes back the other way, the same size again. Data-parallel backprop (DDP) over the
same K devices all-reduces every gradient each step: a ring all-reduce makes each device send ``2(K-1)/K`` times
the model's gradient bytes. Which is smaller depends on the input size: small inputs favour the pipeline; at
ImageNet resolution an early ResNet cut carries more than the whole gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import is_count, is_number
from ..errors import ConfigError

__all__ = ["Traffic", "traffic", "parse_link"]

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_link(link: str | float | None) -> float | None:
    """Bits per second of ``"1gbit"``, ``"100mbit"``, ``"10gbit"`` (or a number of bits per second)."""
    if link is None:
        return None
    if is_number(link) and link > 0:
        return float(link)
    import re

    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)bit(?:/s)?", str(link).strip().lower())
    if not found:
        raise ConfigError(f"link={link!r}: give the link's rate in bits per second as '100mbit', '1gbit' or '10gbit'")
    return float(found.group(1)) * _UNITS[found.group(2)]


@dataclass
class Traffic:
    """Bytes every cut sends per training step, and DDP's all-reduce for the same model on as many devices."""

    batch_size: int
    dtype: str
    devices: int
    cut_bytes: list[int]  # per cut: the activation (and labels) sent forward per step
    backward: bool  # replay: the same bytes come back as the gradient
    ddp_bytes: int  # per device and step: the ring all-reduce of the gradients
    gradient_bytes: int
    link_bits_per_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pipeline_bytes(self) -> int:
        """The busiest cut's bytes per step, both directions counted."""
        return max(self.cut_bytes, default=0) * (2 if self.backward else 1)

    @property
    def busiest_one_way(self) -> int:
        """The busiest cut's bytes per step in one direction: what sets the time on a full-duplex link (DDP's ring
        also sends and receives at once)."""
        return max(self.cut_bytes, default=0)

    def seconds(self, nbytes: int) -> float | None:
        return nbytes * 8 / self.link_bits_per_s if self.link_bits_per_s else None

    def lines(self) -> list[str]:
        both = " each way (replay sends the gradient back)" if self.backward else ""
        out = [f"traffic per step at batch {self.batch_size}, {self.dtype} activations"
               + (f", link {_rate(self.link_bits_per_s)}" if self.link_bits_per_s else "") + ":"]
        for k, nbytes in enumerate(self.cut_bytes):
            t = self.seconds(nbytes)
            timed = f", {t * 1e3:.1f} ms" if t else ""
            out.append(f"  cut {k} (block {k} -> {k + 1}): {_size(nbytes)}{both}{timed}")
        t = self.seconds(self.ddp_bytes)
        out.append(f"  DDP on {self.devices} devices: {_size(self.ddp_bytes)} sent by each device (ring all-reduce of "
                   f"{_size(self.gradient_bytes)} of gradients)" + (f", {t * 1e3:.1f} ms" if t else ""))
        one_way = self.busiest_one_way
        if one_way > self.ddp_bytes:
            times = one_way / self.ddp_bytes
            out.append(f"  the pipeline's busiest cut sends MORE than each DDP device ({times:.1f}x, one way): at this "
                       f"input size and batch, data parallelism moves less")
        else:
            ratio = self.ddp_bytes / one_way if one_way else float("inf")
            out.append(f"  the pipeline's busiest cut sends {ratio:.1f}x less than each DDP device (one way)")
        return out + [f"  {n}" for n in self.notes]


def traffic(plan, *, batch_size: int, send_dtype: torch.dtype | None = None, link=None,
            mode: str | None = None) -> Traffic:
    """The :class:`Traffic` of ``plan`` (a :class:`~lfnnify.Plan` with blocks) at ``batch_size``."""
    if not is_count(batch_size, 1):
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1 (the training batch)")
    if not plan.blocks:
        raise ConfigError("traffic needs a split: plan(model, blocks=K) or cuts=[...]")
    dtype = send_dtype or torch.float32
    item = torch.empty((), dtype=dtype).element_size()
    cut_bytes = []
    for b in plan.blocks[:-1]:
        numel = torch.Size(b.output_shape[1:]).numel()
        cut_bytes.append(batch_size * numel * item + batch_size * 8)  # activations and int64 labels
    k = len(plan.blocks)
    gradient = plan.model_params * 4  # DDP all-reduces float32 gradients
    ddp = int(2 * (k - 1) / k * gradient)
    return Traffic(batch_size=batch_size, dtype=str(dtype).removeprefix("torch."), devices=k, cut_bytes=cut_bytes,
                   backward=(mode or plan.mode) == "replay", ddp_bytes=ddp, gradient_bytes=gradient,
                   link_bits_per_s=parse_link(link))


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _rate(bits: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"
