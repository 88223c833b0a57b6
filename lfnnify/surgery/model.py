"""The converted model: K blocks plus prediction heads; forward() is the original forward()."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .leadership import check_labels, worker_losses

__all__ = ["LFNNModel", "LocalLosses", "main_output"]


def main_output(output) -> Tensor:
    """The logits in a model's output: the tensor itself, or the first field of a tuple
    (torchvision's ``InceptionOutputs``/``GoogLeNetOutputs`` in train mode, distillation pairs)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    raise ConfigError(
        f"the model returned {type(output).__name__}; lfnnify trains on a logits tensor, the first "
        f"element of a tuple, or a dict's 'logits' entry. Wrap the model so forward() returns logits."
    )


@dataclass
class LocalLosses:
    """Everything one training step of a converted model produces."""

    loss: Tensor  # sum of block losses; in local mode, loss.backward() is the whole update
    block_losses: list[Tensor]  # one per block; the last is the model output's cross-entropy
    logits: Tensor  # the model's output (main output for tuple-returning models)
    leaders: list[Tensor]  # per block, the indices of its leader workers (best first)
    worker_ce: list[Tensor] = field(default_factory=list)  # per block, every worker's CE (detached)
    _lfnn_chain: list | None = field(default=None, repr=False)
    _mode: str = field(default="local", repr=False)

    def backward(self, *, gradient_scale: float | Tensor = 1.0) -> None:
        """Back-propagate the step's losses the way the model's mode prescribes.

        In ``mode="local"`` this is ``loss.backward()``. In ``mode="lfnn"`` (Eq. 1) each local
        loss reaches only its own block, while the global loss flows through every block with
        follower channels masked, so it needs its own pass per block. ``gradient_scale`` multiplies
        every loss (the fp16 loss scale; the optimizer steps unscale it).
        """
        if self._mode == "replay":
            raise ConfigError(
                "mode='replay' learns from delayed gradients, which need state across steps: train it with "
                "lfnnify.Trainer or lfnnify.PipelineTrainer (local_losses() only reports the losses)"
            )
        losses = [loss * gradient_scale for loss in self.block_losses]
        if self._lfnn_chain is None:
            (self.loss * gradient_scale).backward()
            return
        chain = self._lfnn_chain
        last = len(chain) - 1
        for k, step in enumerate(chain[:-1]):
            losses[k].backward(inputs=step["params"], retain_graph=True)
        grad = None
        for k in range(last, -1, -1):
            step = chain[k]
            wrt = step["params"] + ([step["input"]] if k > 0 else [])
            if k == last:
                losses[k].backward(inputs=wrt)
            else:
                step["output"].backward(grad * step["global_mask"], inputs=wrt)
            grad = step["input"].grad if k > 0 else None


class LFNNModel(nn.Module):
    """A model cut into blocks with prediction heads, trained with local error signals.

    ``forward(x)`` returns exactly what the original model returns. ``local_losses(x, y)``
    runs one training step's computation: each block's input detached (``mode="local"``),
    each hidden block trained by its own workers' losses, the last block by the output loss.

    Attributes:
        blocks: ``nn.ModuleList`` of K ``torch.fx.GraphModule`` blocks; parameter names are the
            original model's (``blocks.2.layer3.4.conv1.weight`` is ``layer3.4.conv1.weight``).
        heads: ``nn.ModuleList`` of K - 1 heads, one after each hidden block.
        plan: the :class:`~lfnnify.Plan` the model was cut by.
    """

    def __init__(self, blocks: list[nn.Module], heads: list[nn.Module], *, plan, config: dict, source: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.plan = plan
        self.config = dict(config)
        object.__setattr__(self, "_source", source)  # the original architecture, not a submodule
        self.fixed_leaders: list[Tensor | None] = [None] * len(heads)
        # the blocks (with their heads) whose weights this process holds: all of them, or one on a pipeline rank,
        # which frees the others (lfnnify.pipeline.shards.keep_only_stage)
        self.held_blocks: list[int] = list(range(len(blocks)))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def mode(self) -> str:
        return self.config["mode"]

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def head_loss(self, k: int, features: Tensor, target: Tensor):
        """Local loss of hidden block ``k`` from its output ``features``: its workers' leader
        cross-entropy plus follower alignment (see :func:`lfnnify.surgery.leadership.worker_losses`)."""
        logits = self.heads[k](features)
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        return worker_losses(
            logits,
            target,
            leaders=self.config["leaders"],
            follower_weight=self.config["follower_weight"],
            fixed_leaders=self.fixed_leaders[k],
        )

    def output_loss(self, output, target: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the model's own output (the last block's loss) and the logits."""
        logits = main_output(output)
        if logits.dim() != 2:
            raise ConfigError(
                f"the model's output has shape {tuple(logits.shape)}, not (batch, classes) logits, so the last "
                f"block has no prediction loss to train on. Give the model a classifier (timm: num_classes=N; "
                f"or wrap it with a pooling + Linear head) before converting."
            )
        return F.cross_entropy(logits, target), logits

    def blocks_with_gradient(self) -> set[int]:
        """The blocks whose parameters, or whose head's, now hold a non-zero gradient: after backpropagating
        one block's loss in local mode this is that block alone (the check of gradient isolation)."""
        reached = set()
        for k, part in [*enumerate(self.blocks), *enumerate(self.heads)]:
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()):
                reached.add(k)
        return reached

    def local_losses(self, x: Tensor, target: Tensor) -> LocalLosses:
        """Run all blocks on ``x`` and compute every block's local loss for labels ``target``.

        In ``mode="replay"`` it reports the same per-block losses as local mode; the delayed-gradient
        update itself needs a trainer (:class:`~lfnnify.Trainer` or :class:`~lfnnify.PipelineTrainer`).

        Example:
            >>> out = net.local_losses(images, labels)
            >>> out.backward()          # same as out.loss.backward() in local mode
            >>> [float(l) for l in out.block_losses]

        Raises:
            lfnnify.LabelError: labels that are not class indices in ``[0, num_classes)``.
            lfnnify.ConfigError: an input whose channels differ from the model's.
        """
        check_labels(target, self.config["num_classes"], where="local_losses")
        self.check_input(x)
        local = self.mode != "lfnn"
        block_losses, leaders, worker_ce, chain = [], [], [], []
        h = x
        for k, block in enumerate(self.blocks):
            inp = h.detach() if k > 0 else h
            if not local and k > 0:
                inp.requires_grad_(True)
            out = block(inp)
            step = {"input": inp, "output": out, "params": [p for p in block.parameters() if p.requires_grad]}
            if k < len(self.heads):
                losses = self.head_loss(k, out, target)
                block_losses.append(losses.loss)
                leaders.append(losses.leaders)
                worker_ce.append(losses.worker_ce)
                step["params"] += [p for p in self.heads[k].parameters() if p.requires_grad]
                if not local:
                    step["global_mask"] = self._leader_channel_mask(k, out, losses.leaders)
                h = out
            else:
                loss, logits = self.output_loss(out, target)
                block_losses.append(loss)
                leaders.append(torch.zeros(1, dtype=torch.long, device=loss.device))
                worker_ce.append(loss.detach().reshape(1))
            chain.append(step)
        total = torch.stack(block_losses).sum()
        return LocalLosses(total, block_losses, logits, leaders, worker_ce, None if local else chain, self.mode)

    def check_input(self, x) -> None:
        """Refuse, with the expected shape, an input whose channels differ from the example the model was cut for."""
        expected = tuple(self.plan.input_shape)
        if not isinstance(x, Tensor):
            raise ConfigError(f"the input is a {type(x).__name__}; pass a tensor shaped like {expected}")
        if len(expected) >= 2 and x.dim() == len(expected) and x.shape[1] != expected[1]:
            raise ConfigError(
                f"the input has {x.shape[1]} channels (shape {tuple(x.shape)}), but the model was converted for "
                f"{expected[1]} (example input {expected}); give images with {expected[1]} channels"
            )

    def _leader_channel_mask(self, k: int, features: Tensor, leaders: Tensor) -> Tensor:
        """1 on the channels of leader workers, 0 on followers', shaped to broadcast on ``features``."""
        workers = self.config["workers"]
        layout = self.plan.blocks[k].layout
        channel_dim = 1 if layout in ("nchw", "nc") else features.dim() - 1
        channels = features.shape[channel_dim]
        lead = torch.zeros(workers, device=features.device, dtype=features.dtype)
        lead[leaders] = 1
        mask = lead.repeat_interleave(channels // workers)
        shape = [1] * features.dim()
        shape[channel_dim] = channels
        return mask.view(shape)

    def extra_repr(self) -> str:
        c = self.config
        return (f"blocks={self.num_blocks}, cuts={c['cuts']}, workers={c['workers']}, leaders={c['leaders']}, "
                f"mode={c['mode']!r}")
