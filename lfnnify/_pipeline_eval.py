"""Evaluation in a pipeline: every rank runs its block on the evaluation batches and counts; one all-reduce."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._comm import END, EVAL
from .errors import ConfigError
from .model import main_output
from .trainer import metrics_from_counts

__all__ = ["evaluate_stage"]


@torch.no_grad()
def evaluate_stage(trainer, loader=None) -> dict:
    """One rank's part of ``PipelineTrainer.evaluate``: run its block on every
    evaluation batch, pass the output on, count what its head and the model's output got right, and sum the
    counts of all ranks with one all-reduce. The counts stay on the device until then."""
    heads, workers = len(trainer.net.heads), trainer.net.config["workers"]
    # [per head-worker correct..., final correct, final loss sum, samples]
    totals = torch.zeros(heads * workers + 3, dtype=torch.float64, device=trainer.device)
    block = trainer.net.blocks[trainer.stage]
    was_training = block.training
    trainer.net.eval()

    def run(x, y):
        with trainer._autocast():
            out = block(x)
        if not trainer.last:
            trainer.link.send(trainer.next_rank, EVAL, out, y)
            logits = trainer.net.heads[trainer.stage](out)
            logits = logits.unsqueeze(0) if logits.dim() == 2 else logits
            offset = trainer.stage * workers
            totals[offset : offset + workers] += (logits.argmax(-1) == y).sum(-1).double()
        else:
            logits = main_output(out).float()
            totals[-3] += (logits.argmax(-1) == y).sum()
            totals[-2] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            totals[-1] += len(y)

    if trainer.first:
        if loader is None:
            raise ConfigError(f"rank {trainer.rank} runs block 0: pass the evaluation loader to evaluate()")
        for i, (x, y) in enumerate(loader):
            if i % trainer.replicas == trainer.replica:
                run(x.to(trainer.device), y.to(trainer.device))
        if not trainer.last:
            trainer.link.send(trainer.next_rank, END)
    else:
        while True:
            kind, _, x, y = trainer.link.recv(trainer.prev_rank, dtype=trainer._dtype())
            if kind == END:
                if not trainer.last:
                    trainer.link.send(trainer.next_rank, END)
                break
            run(x, y)
    trainer.link.flush()
    trainer.net.train(was_training)
    totals = totals.to(trainer.link.comm_device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(totals)
    totals = totals.cpu()
    correct_workers = totals[: heads * workers].view(heads, workers)
    return metrics_from_counts(correct_workers, totals[-3].item(), totals[-2].item(), totals[-1].item())
