"""Whether a pipeline's blocks are even: it runs at its slowest block's pace, so one slow block costs every rank.

``PipelineTrainer`` gathers every rank's busy time once, after its first ``CHECK_AFTER_STEPS`` steps, and warns
(rank 0, once) when the slowest block is more than ``TOLERANCE`` times the mean of the blocks. FLOPs misjudge
what a block costs on some machines (on an AMD EPYC, resnet18's 512-channel 3x3 convolutions at 1x1 spatial size
run their backward about ten times slower than their FLOPs say), hence the advice to balance by measured time.
"""

from __future__ import annotations

import statistics

CHECK_AFTER_STEPS = 10
TOLERANCE = 1.15


def balance_report(timings: list[dict], replicas: int, balance: str | None) -> dict:
    """Per block, the busy milliseconds per step (the mean of its replicas); the slowest block, its ratio to the
    mean, and a warning when that ratio is over ``TOLERANCE`` (``None`` otherwise)."""
    blocks = len(timings) // replicas
    per_block = []
    for k in range(blocks):
        ranks = [t for t in timings if t["rank"] // replicas == k]
        per_block.append(1e3 * statistics.mean(t["busy_s"] / max(t["steps"], 1) for t in ranks))
    mean = statistics.mean(per_block)
    slowest = max(range(blocks), key=per_block.__getitem__)
    ratio = per_block[slowest] / mean if mean > 0 else 1.0
    warning = None
    if ratio > TOLERANCE:
        each = ", ".join(f"{ms:.0f}" for ms in per_block)
        advice = ("convert with balance=\"time\" (recipe: convert.balance: time) to cut where the blocks' measured "
                  "times, not their FLOPs, are even" if balance != "time" else
                  "the cuts were already chosen by measured time: pass cuts=[...] by hand, or another number of blocks")
        warning = (f"the pipeline runs at its slowest block's pace, and block {slowest} was busy "
                   f"{per_block[slowest]:.0f} ms per step, {ratio:.2f}x the mean of the {blocks} blocks (ms per step: "
                   f"{each}); {advice}")
    return {"busy_ms_per_step": per_block, "slowest": slowest, "ratio_to_mean": ratio, "warning": warning}
