"""Evaluation in a pipeline: every rank runs its block on the evaluation batches and counts; one all-reduce."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError, PipelineError
from ..surgery.model import main_output
from ..training.evaluation import EvalCounts
from ..training.inputs import check_batch, pair
from .comm import END, EVAL

__all__ = ["evaluate_stage"]


@torch.no_grad()
def evaluate_stage(trainer, loader=None) -> dict:
    """One rank's part of ``PipelineTrainer.evaluate``: run its block on every
    evaluation batch, pass the output on, count what its head and the model's output got right, and sum the
    counts of all ranks with one all-reduce. The counts stay on the device until then."""
    counts = EvalCounts(len(trainer.net.heads), trainer.net.config["workers"], trainer.device)
    block = trainer.net.blocks[trainer.stage]
    was_training = block.training
    trainer.net.eval()

    def run(x, y):
        with trainer._autocast():
            out = block(x)
        if not trainer.last:
            trainer.link.send(trainer.next_rank, EVAL, out, y)
            counts.head(trainer.stage, trainer.net.heads[trainer.stage](out), y)
        else:
            counts.output(main_output(out), y)

    if trainer.first:
        if loader is None:
            raise ConfigError(f"rank {trainer.rank} runs block 0: pass the evaluation loader to evaluate()")
        for i, batch in enumerate(loader):
            if i % trainer.replicas == trainer.replica:
                x, y = check_batch(*pair(batch, where="PipelineTrainer.evaluate"), trainer.batch_rules,
                                   where="PipelineTrainer.evaluate")
                run(x.to(trainer.device), y.to(trainer.device))
        if not trainer.last:
            trainer.link.send(trainer.next_rank, END)
    else:
        while True:
            kind, _, x, y, _ = trainer.link.recv(trainer.prev_rank, dtype=trainer._dtype())
            if kind == END:
                if not trainer.last:
                    trainer.link.send(trainer.next_rank, END)
                break
            if kind != EVAL:  # a training message here means the ranks are not in the same phase
                raise PipelineError(f"{trainer._label(trainer.rank)} was evaluating and received a message of kind "
                                    f"{kind} (not an evaluation batch) from {trainer._label(trainer.prev_rank)}: the "
                                    f"ranks are out of step; every rank must call evaluate() together")
            run(x, y)
    trainer.link.flush()
    trainer.net.train(was_training)
    counts.totals = counts.totals.to(trainer.link.comm_device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(counts.totals)
    return counts.metrics()
