"""What a pipeline and data-parallel backprop send over the links between devices per step, and how long it takes.

A pipeline sends, across each cut, the block's output for the batch (and the labels); in ``mode="replay"`` the
gradient of that output comes back the other way, the same size again. Data-parallel backprop (DDP) over the
same K devices all-reduces every gradient each step: a ring all-reduce makes each device send ``2(K-1)/K`` times
the model's gradient bytes. Which is smaller depends on the input size: small inputs favour the pipeline; at
ImageNet resolution an early ResNet cut carries more than the whole gradient.

DDP's users cut that all-reduce with a communication hook, and the plan says what each sends too:
``fp16_compress_hook`` halves it; ``powerSGD_hook`` at rank r all-reduces, for every weight of n rows and m columns
(``weight.view(n, -1)``) worth compressing, the factors P (n x r) and Q (m x r) instead, and the rest whole
(torch's rule: compressed only where that is at least ``min_compression_rate`` = 2 times smaller); local SGD
(``post_localSGD_hook`` with a ``PeriodicModelAverager``) all-reduces the parameters every H steps and nothing in
between (one host's processes are its own subgroup). What they do to accuracy is measured, not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import is_count, is_number
from ..errors import ConfigError

__all__ = ["Traffic", "traffic", "parse_link", "POWERSGD_RANKS", "LOCAL_SGD_PERIODS", "powersgd_elements",
           "SEND_DTYPES", "SEND_DTYPES_BY_NAME"]

# what a pipeline can send activations and gradients as: floats, or int8 with a float32 scale per channel
# (lfnnify.pipeline.quantize); PipelineOptions.send_dtype takes these, and recipes and the command line their names
SEND_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
SEND_DTYPES_BY_NAME = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}

POWERSGD_RANKS = (1, 2, 4)  # what a plan reports; Vogels et al. (2019) match SGD on ResNet-18 at rank 2
LOCAL_SGD_PERIODS = (4, 16)
_MIN_COMPRESSION_RATE = 2  # torch's PowerSGDState default

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
    ddp_fp16_bytes: int = 0  # per device and step, with DDP's fp16 compression hook
    powersgd_bytes: dict[int, int] = field(default_factory=dict)  # rank -> per device and step, with PowerSGD
    local_sgd_bytes: dict[int, int] = field(default_factory=dict)  # period H -> per device and step, on average

    @property
    def ddp_variants(self) -> dict[str, int]:
        """Bytes each device sends per step, for DDP and each of its communication hooks the plan reports."""
        out = {"DDP": self.ddp_bytes}
        if self.ddp_fp16_bytes:
            out["DDP + fp16 hook"] = self.ddp_fp16_bytes
        out |= {f"DDP + PowerSGD rank {r}": b for r, b in self.powersgd_bytes.items()}
        out |= {f"local SGD every {h} steps": b for h, b in self.local_sgd_bytes.items()}
        return out

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

        def timed(nbytes):
            t = self.seconds(nbytes)
            return f" ({t * 1e3:.1f} ms)" if t else ""

        if self.ddp_fp16_bytes:
            fp16 = self.ddp_fp16_bytes
            out.append(f"  DDP with the fp16 compression hook: {_size(fp16)}{timed(fp16)}")
        if self.powersgd_bytes:
            out.append("  DDP with PowerSGD (error feedback, once compressing): " + ", ".join(
                f"rank {r} {_size(b)}{timed(b)}" for r, b in self.powersgd_bytes.items()))
        if self.local_sgd_bytes:
            out.append("  local SGD (parameters averaged every H steps), per step on average: " + ", ".join(
                f"H={h} {_size(b)}{timed(b)}" for h, b in self.local_sgd_bytes.items()))
        one_way = self.busiest_one_way
        if one_way > self.ddp_bytes:
            times = one_way / self.ddp_bytes
            out.append(f"  the pipeline's busiest cut sends MORE than each DDP device ({times:.1f}x, one way): at this "
                       f"input size and batch, data parallelism moves less")
        else:
            ratio = self.ddp_bytes / one_way if one_way else float("inf")
            out.append(f"  the pipeline's busiest cut sends {ratio:.1f}x less than each DDP device (one way)")
        if self.powersgd_bytes or self.ddp_fp16_bytes:
            name, least = min(((n, b) for n, b in self.ddp_variants.items() if not n.startswith("local")),
                              key=lambda item: item[1])
            if one_way > least:
                out.append(f"  the pipeline's busiest cut sends more than {name} ({one_way / least:.1f}x, one way): "
                           f"on a slow link, that is the baseline to beat")
            else:
                out.append(f"  the pipeline's busiest cut sends {least / one_way if one_way else float('inf'):.1f}x "
                           f"less than {name}, the least-sending every-step DDP (one way); accuracy decides the rest")
        return out + [f"  {n}" for n in self.notes]


def powersgd_elements(shapes, rank: int) -> int:
    """The elements powerSGD_hook all-reduces per step at ``rank`` for gradients of these ``shapes``."""
    total = 0
    for shape in shapes:
        numel = torch.Size(shape).numel()
        if len(shape) <= 1:
            total += numel  # biases and norms: all-reduced whole
            continue
        n = shape[0]
        m = numel // n
        r = min(n, m, rank)
        compressed = (n + m) * r
        total += compressed if compressed * _MIN_COMPRESSION_RATE < numel else numel
    return total


def traffic(plan, *, batch_size: int, send_dtype: torch.dtype | None = None, link=None,
            mode: str | None = None, param_shapes=None) -> Traffic:
    """The :class:`Traffic` of ``plan`` (a :class:`~lfnnify.Plan` with blocks) at ``batch_size``; with the model's
    ``param_shapes``, also what DDP's fp16 and PowerSGD hooks and local SGD send."""
    if not is_count(batch_size, 1):
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1 (the training batch)")
    if not plan.blocks:
        raise ConfigError("traffic needs a split: plan(model, blocks=K) or cuts=[...]")
    if send_dtype is not None and send_dtype not in SEND_DTYPES:
        raise ConfigError(f"send_dtype={send_dtype!r} must be None (float32) or one of "
                          f"{', '.join(map(str, SEND_DTYPES))}: what the pipeline sends activations as")
    dtype = send_dtype or torch.float32
    item = torch.empty((), dtype=dtype).element_size()
    cut_bytes = []
    for b in plan.blocks[:-1]:
        numel = torch.Size(b.output_shape[1:]).numel()
        # int8 sends carry a float32 scale per channel (dim 1; one for a 1-d output) with the values
        scales = 4 * (b.output_shape[1] if len(b.output_shape) >= 2 else 1) if dtype == torch.int8 else 0
        cut_bytes.append(batch_size * numel * item + scales + batch_size * 8)  # activations and int64 labels
    k = len(plan.blocks)
    gradient = plan.model_params * 4  # DDP all-reduces float32 gradients
    ring = 2 * (k - 1) / k  # what each device sends in a ring all-reduce, per byte all-reduced
    variants = {}
    if param_shapes is not None:
        variants = dict(ddp_fp16_bytes=int(ring * gradient / 2),
                        powersgd_bytes={r: int(ring * 4 * powersgd_elements(param_shapes, r)) for r in POWERSGD_RANKS},
                        local_sgd_bytes={h: int(ring * gradient / h) for h in LOCAL_SGD_PERIODS})
    return Traffic(batch_size=batch_size, dtype=str(dtype).removeprefix("torch."), devices=k, cut_bytes=cut_bytes,
                   backward=(mode or plan.mode) == "replay", ddp_bytes=int(ring * gradient), gradient_bytes=gradient,
                   link_bits_per_s=parse_link(link), **variants)


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
