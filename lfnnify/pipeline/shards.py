"""Checkpoints of a pipeline run: each rank writes its own block, rank 0 writes the description."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checkpoint import files as fileio
from ..checkpoint import store
from ..checkpoint.api import describe_checkpoint, fingerprint_input, nonfinite, refuse_nonfinite, trainer_files
from ..surgery.model import LFNNModel, main_output

__all__ = ["Shard", "keep_only_stage"]


@dataclass
class Shard:
    """Which part of a converted model this pipeline rank holds, and how it saves that part.

    ``lfnnify.save`` hands a pipeline rank's model to :meth:`save`; ``source_shapes`` are the original
    model's weight shapes, taken before the rank freed the other blocks (a rebuild by name needs them).
    """

    stage: int
    replica: int
    replicas: int
    rank: int
    source_shapes: dict = field(default_factory=dict)
    talking: object = None  # the trainer's context that names a rank which stops answering (PipelineTrainer.talking)

    def own(self, weights: dict) -> dict:
        """The entries of a full state dict that belong to this rank's block and head."""
        prefixes = (f"blocks.{self.stage}.", f"heads.{self.stage}.")
        return {k: v for k, v in weights.items() if k.startswith(prefixes)}

    def save(self, net: LFNNModel, path: Path, *, trainer=None) -> Path:
        """Called on every rank (a collective): replica 0 of each block writes its block, head and trainer
        state; rank 0 writes the description and publishes the version. All ranks share the filesystem."""
        if self.talking is None:
            return self._save(net, path, trainer=trainer)
        with self.talking("saving a checkpoint"):
            return self._save(net, path, trainer=trainer)

    def _save(self, net: LFNNModel, path: Path, *, trainer=None) -> Path:
        store.check_target(path)
        bad: list = [None] * dist.get_world_size()  # every rank refuses together if any block holds inf or nan
        dist.all_gather_object(bad, nonfinite(self.own(net.state_dict())))
        refuse_nonfinite([k for names in bad for k in names], path)
        meta = describe_checkpoint(net, self.source_shapes)
        meta["fingerprint"] = self._fingerprint(net, meta["input_shape"])
        with contextlib.ExitStack() as stack:
            holder = [str(stack.enter_context(store.writing(path))) if self.rank == 0 else None]
            dist.broadcast_object_list(holder, src=0)
            tmp = Path(holder[0])
            files: list[str] = []
            if self.replica == 0:
                k = self.stage
                fileio.write_tensors(tmp / f"block{k}.safetensors", self.own(net.state_dict()))
                files.append(f"block{k}.safetensors")
                if trainer is not None:
                    files += trainer_files(trainer, tmp, f"trainer-block{k}.json", f"trainer-block{k}.safetensors")
            written: list = [None] * dist.get_world_size()
            dist.all_gather_object(written, files)
            if self.rank == 0:
                meta["pipeline"] = {"blocks": net.num_blocks, "replicas": self.replicas}
                meta["files"] = {name: fileio.sha256(tmp / name) for names in written for name in names}
                fileio.write_json(tmp / store.META, meta)
        # rank 0 has published the version (or removed it, if this rank or the gather failed)
        dist.barrier()
        return path

    @torch.no_grad()
    def _fingerprint(self, net: LFNNModel, input_shape) -> list[float]:
        """The whole model's outputs on the fixed fingerprint input, run through replica 0 of every stage."""
        last = net.num_blocks - 1
        result = [None]
        if self.replica == 0:
            block = net.blocks[self.stage]
            device = next((p.device for p in block.parameters()), torch.device("cpu"))
            if self.stage == 0:
                h = fingerprint_input(input_shape)
            else:
                received = [None]
                dist.recv_object_list(received, src=self.rank - self.replicas)
                h = received[0]
            was_training = block.training
            block.eval()
            try:
                h = block(h.to(device)).cpu() if self.stage < last else main_output(block(h.to(device))).float().cpu()
            finally:
                block.train(was_training)
            if self.stage < last:
                dist.send_object_list([h], dst=self.rank + self.replicas)
            else:
                result = [h.flatten()[:32].tolist()]
        dist.broadcast_object_list(result, src=last * self.replicas)
        return result[0]


def keep_only_stage(net: LFNNModel, stage: int, device: torch.device) -> None:
    """Free the other blocks' parameters on this rank and move its own block and head to ``device``."""
    own = [net.blocks[stage]] + ([net.heads[stage]] if stage < len(net.heads) else [])
    keep = {id(p) for p in _tensors(*own)}
    for k in range(net.num_blocks):
        if k != stage:
            for p in _tensors(net.blocks[k], net.heads[k] if k < len(net.heads) else None):
                if id(p) not in keep:
                    p.data = torch.empty(0, dtype=p.dtype)
    for m in own:
        m.to(device)


def _tensors(*modules: nn.Module | None) -> Iterable[Tensor]:
    for m in modules:
        if m is not None:
            yield from m.parameters()
