"""Checkpoints of a pipeline run, on rank 0's disk only: no file system shared between the hosts is needed.

A save is a collective. Every rank serialises its own part in memory: replica 0 of each block its block and head,
every rank its own trainer state (each replica's kept batches, random state and gradients in flight are its own).
Rank 0 gathers the parts over the process group and writes the whole checkpoint as one new version on its own disk,
which it publishes only once every file is written (``checkpoint.store``): a rank or a link that fails mid-save
leaves the last version current and loadable on rank 0's host, and nothing half-written is ever taken for whole.
A restore is the same in reverse: rank 0 reads and checks the checkpoint and sends each rank its part.

What a save costs on the link: every rank but rank 0 sends its block and head once (replica 0) and its trainer
state (optimizer momentum, about the block's size again; with replay, its kept batches and stashed weights). Rank 0
holds all of it in memory once, as the bytes of the files it writes; for models that do not fit one host's memory,
save each rank's part on its own host with ``torch.distributed.checkpoint`` instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checkpoint import files as fileio
from ..checkpoint import store
from ..checkpoint.description import describe_checkpoint, read_meta
from ..checkpoint.saving import fingerprint_input, nonfinite, refuse_nonfinite
from ..checkpoint.trainer_state import parse_trainer_state, read_trainer_blobs, trainer_blobs, trainer_names
from ..errors import CheckpointError
from ..surgery.model import LFNNModel, main_output
from .comm import decided_by_rank0

__all__ = ["Shard", "keep_only_stage"]


@dataclass
class Shard:
    """Which part of a converted model this pipeline rank holds, and how it saves and restores that part.

    ``lfnnify.save`` hands a pipeline rank's model to :meth:`save`; ``source_shapes`` are the original
    model's weight shapes, taken before the rank freed the other blocks (a rebuild by name needs them).
    ``group`` carries the checkpoint's bytes (a gloo group when the pipeline talks over NCCL, so that they never
    take GPU memory); None is the default group.
    """

    stage: int
    replica: int
    replicas: int
    rank: int
    blocks: int = 1
    source_shapes: dict = field(default_factory=dict)
    talking: object = None  # the trainer's context that names a rank which stops answering (PipelineTrainer.talking)
    group: object = None

    @property
    def layout(self) -> dict:
        return {"blocks": self.blocks, "replicas": self.replicas}

    def own(self, weights: dict) -> dict:
        """The entries of a full state dict that belong to this rank's block and head."""
        prefixes = (f"blocks.{self.stage}.", f"heads.{self.stage}.")
        return {k: v for k, v in weights.items() if k.startswith(prefixes)}

    def _names(self) -> tuple[str, str]:
        return trainer_names(self.stage, self.replica)

    # ------------------------------------------------------------------ save

    def save(self, net: LFNNModel, path: Path, *, trainer=None) -> Path:
        """Save the whole model (and every rank's trainer state) to ``path`` on rank 0's disk. A collective: every
        rank calls it with the same ``path``."""
        if self.talking is None:
            return self._save(net, path, trainer=trainer)
        with self.talking("saving a checkpoint"):
            return self._save(net, path, trainer=trainer)

    def _save(self, net: LFNNModel, path: Path, *, trainer=None) -> Path:
        decided_by_rank0(lambda: store.check_target(path), group=self.group)  # rank 0's disk is the one written
        bad: list = [None] * dist.get_world_size()  # every rank refuses together if any block holds inf or nan
        dist.all_gather_object(bad, nonfinite(self.own(net.state_dict())), group=self.group)
        refuse_nonfinite([k for names in bad for k in names], path)
        meta = describe_checkpoint(net, self.source_shapes)
        meta["fingerprint"] = self._fingerprint(net, meta["input_shape"])
        part: dict[str, bytes] = {}
        if self.replica == 0:  # the replicas of a block hold the same weights and statistics: one copy
            part[f"block{self.stage}.safetensors"] = fileio.tensor_bytes(self.own(net.state_dict()))
        if trainer is not None:
            part.update(trainer_blobs(trainer, self._names()))
        store.fault_point("pipeline-gather")
        parts = self._to_rank0(part)
        meta["pipeline"] = self.layout
        # rank 0 writes and publishes the version, or removes it and says why; every rank then knows which
        decided_by_rank0(lambda: _write(path, meta, parts), group=self.group)
        return path

    def _to_rank0(self, part: dict[str, bytes]) -> list[dict[str, bytes]] | None:
        """Every rank's part, on rank 0 (None elsewhere). One send per rank, each at its own size: a gather would
        pad every part to the largest, and rank 0's link carries them one after another either way."""
        if self.rank != 0:
            dist.send_object_list([part], dst=0, group=self.group)
            return None
        parts = [part]
        for rank in range(1, dist.get_world_size()):
            received: list = [None]
            dist.recv_object_list(received, src=rank, group=self.group)
            parts.append(received[0])
        return parts

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
                dist.recv_object_list(received, src=self.rank - self.replicas, group=self.group)
                h = received[0]
            was_training = block.training
            block.eval()
            try:
                h = block(h.to(device)).cpu() if self.stage < last else main_output(block(h.to(device))).float().cpu()
            finally:
                block.train(was_training)
            if self.stage < last:
                dist.send_object_list([h], dst=self.rank + self.replicas, group=self.group)
            else:
                result = [h.flatten()[:32].tolist()]
        dist.broadcast_object_list(result, src=last * self.replicas, group=self.group)
        return result[0]

    # ------------------------------------------------------------------ restore

    def restore(self, net: LFNNModel, trainer, path: Path) -> None:
        """Load this rank's block, head and trainer state from the checkpoint at ``path`` on rank 0's disk (the
        other hosts need no copy). A collective. A checkpoint of another layout (blocks × replicas) or other cuts
        is refused on every rank, in one line naming both."""
        if self.talking is None:
            return self._restore(net, trainer, path)
        with self.talking("restoring a checkpoint"):
            return self._restore(net, trainer, path)

    def _restore(self, net: LFNNModel, trainer, path: Path) -> None:
        world = dist.get_world_size()
        parts = decided_by_rank0(lambda: self._read_parts(net, path, world), group=self.group)
        mine: list = [None]
        dist.scatter_object_list(mine, parts if self.rank == 0 else None, src=0, group=self.group)
        folder, blobs = mine[0]
        folder = Path(folder)
        name = f"block{self.stage}.safetensors"
        weights = self.own(fileio.tensors_from_bytes(blobs.pop(name), folder / name))
        missing, unexpected = net.load_state_dict(weights, strict=False)
        wanted = set(self.own(net.state_dict()))
        if unexpected or wanted & set(missing):
            raise CheckpointError(f"{folder / name} does not fit this model's block {self.stage}: missing "
                                  f"{sorted(wanted & set(missing))[:3]}, unexpected {unexpected[:3]}")
        if trainer is not None:
            trainer.load_state_dict(parse_trainer_state(blobs, self._names(), folder))

    def _read_parts(self, net: LFNNModel, path: Path, world: int) -> list:
        """Rank 0: every rank's part of the checkpoint at ``path`` (its block's file and its trainer state),
        checked against the checksums, or one error that names what does not fit."""
        with store.reading(path) as (folder, digest):
            meta = read_meta(folder, digest)
            saved = meta.get("pipeline") or {"blocks": 1, "replicas": 1}
            if saved != self.layout:
                raise CheckpointError(
                    f"{path} was saved by a run of {_layout(saved)}, and this pipeline runs {_layout(self.layout)}; "
                    f"a trainer state belongs to one rank of one layout. Resume with the layout it was saved with "
                    f"(torchrun with {saved['blocks'] * saved['replicas']} processes, convert with "
                    f"blocks={saved['blocks']}), or load only the weights: lfnnify.load({str(path)!r})"
                )
            if meta["cuts"] != net.plan.cuts:
                raise CheckpointError(f"{path} was cut at {meta['cuts']}, this model at {net.plan.cuts}; convert it "
                                      f"the same way")
            sums = meta.get("files", {})
            parts = []
            for rank in range(world):
                stage, replica = divmod(rank, self.replicas)
                name = f"block{stage}.safetensors"
                blobs = {name: fileio.read_verified(folder / name, sums.get(name))}
                blobs.update(read_trainer_blobs(folder, meta, trainer_names(stage, replica), path))
                parts.append((str(folder), blobs))
        return parts


def _layout(layout: dict) -> str:
    return f"{layout['blocks']} block(s) x {layout['replicas']} replica(s)"


def _write(path: Path, meta: dict, parts: list[dict[str, bytes]]) -> None:
    """Rank 0: write every rank's files and the description as the next version of ``path``, then publish it."""
    with store.writing(path) as tmp:
        sums = {}
        for part in parts:
            for name, data in part.items():
                (tmp / name).write_bytes(data)
                sums[name] = hashlib.sha256(data).hexdigest()
        meta["files"] = sums
        (tmp / store.META).write_bytes(fileio.describe(meta))


def keep_only_stage(net: LFNNModel, stage: int, device: torch.device) -> None:
    """Free the other blocks' parameters on this rank and move its own block and head to ``device``."""
    own = [net.blocks[stage]] + ([net.heads[stage]] if stage < len(net.heads) else [])
    keep = {id(p) for p in _tensors(*own)}
    net.held_blocks = [stage]
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
