"""Every figure the documents quote from a results file is remade here from that file: README.md, the benchmarks'
index (benchmarks/README.md), their full record (benchmarks/HISTORY.md) and the guides in docs/.

Each entry below names a document, the results file its figures come from, and how to write those figures from
the file, exactly as the document writes them. The test fails when a document no longer says what its source
says (a figure edited by hand, a file re-measured without the text following), and when the document stops
naming the file next to its figures. Whitespace and bold markers are ignored when matching; nothing else is.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README, BENCH, HISTORY = "README.md", "benchmarks/README.md", "benchmarks/HISTORY.md"
CHECKPOINTS = "docs/checkpoints.md"
GIB = 2**30


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("**", ""))


def _x(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}×"


def _pm(values, digits: int = 2) -> str:
    """Mean ± sample standard deviation, as the tables write them."""
    values = list(values)
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


# ---------------------------------------------------------------- one function per results file


def convert_time(d: dict) -> dict[str, list[str]]:
    s = d["convert_s"]
    return {HISTORY: [f"{d['convert_s_median']:.2f} s median ({len(s)} runs, {min(s):.2f}–{max(s):.2f} s)",
                    f"largest block / mean FLOPs = {d['imbalance']:.3f}"],
            README: [f"{d['convert_s_median']:.2f} s; largest block {d['imbalance']:.3f}× the mean"],
            BENCH: [f"{d['convert_s_median']:.2f} s; largest block {d['imbalance']:.3f}× the mean"]}


def memory(batch: int, allocator: str):
    def figures(d: dict) -> dict[str, list[str]]:
        bp, lf = d["peak_bytes"]["bp"] / GIB, d["peak_bytes"]["lfnn"] / GIB
        out = [f"| {batch} | {allocator} | {bp:.2f} GiB | {lf:.2f} GiB | {100 * d['lfnn_over_bp']:.1f}%"]
        if batch == 16:  # what training adds on top of what the process held before it
            bp_add, lf_add = ((d["methods"][m]["peak_rss_bytes"] - d["methods"][m]["rss_before_training_bytes"]) / GIB
                              for m in ("bp", "lfnn"))
            share = round(100 * lf_add / bp_add)
            out.append(f"{share}% of what BP needs at batch 16 ({lf_add:.2f} vs {bp_add:.2f} GiB, glibc default"
                       if allocator == "glibc default" else
                       f"{share}%, {lf_add:.2f} vs {bp_add:.2f} GiB, with the mmap threshold")
        if allocator != "glibc default":
            return {HISTORY: out}
        headline = (f"{100 * d['lfnn_over_bp']:.1f}% of BP's at batch 64" if batch == 64
                    else f"{100 * d['lfnn_over_bp']:.1f}% at batch 16")
        return {HISTORY: out, README: [headline], BENCH: [headline]}
    return figures


def memory_checkpointed(d: dict) -> dict[str, list[str]]:
    # one device: the LFNN-ℓ trainer against backprop with activation checkpointing at the same cuts, and plain BP
    def at(m):
        r = d["methods"][m]
        low, high = r["step_s_range"]
        return f"{r['peak_rss_bytes'] / GIB:.2f} GiB, {r['step_s_median']:.1f} s per step ({low:.1f}–{high:.1f})"

    text = (f"LFNN-ℓ {at('lfnn')}; backprop checkpointed at the same cuts {at('bp_checkpointed')}; plain backprop "
            f"{at('bp')}")
    short = (f"peaked at {d['lfnn_over_bp_checkpointed']:.2f}× checkpointed backprop's memory and took "
             f"{_x(d['lfnn_step_over_bp_checkpointed_step'])} its step time")
    return {README: [short], BENCH: [text]}


def speedup(d: dict) -> dict[str, list[str]]:
    m, s, p, b = d["methods"], d["speedup"], d["projection"], d["bytes_per_step"]
    rows = {"bp_single": "BP, one process, 2 threads", "ddp": "DDP, 2 processes × 1 thread, 32 examples each",
            "bp_model_parallel": "BP model-parallel, 2 processes (the paper's baseline)",
            "lfnn_pipeline": "LFNN-ℓ pipeline", "lfnn_pipeline_fw": "LFNN-ℓ pipeline, 4 filter-wise workers",
            "replay_pipeline": "replay pipeline (recompute)", "lfnn_single": "LFNN-ℓ one-device trainer, 2 threads"}
    fewer = sorted(round(b["ddp"] / b[k]) for k in ("replay_pipeline", "lfnn_pipeline"))
    return {
        HISTORY: [f"| {label} | {m[k]['samples_per_s']:.1f} |" for k, label in rows.items()]
        + [f"| BP GPipe / 1F1B, M=4 | {m['bp_gpipe']['samples_per_s']:.1f} / {m['bp_1f1b']['samples_per_s']:.1f} |",
           f"| LFNN-ℓ pipeline / BP model-parallel | {_x(s['vs_bp_model_parallel'])} (projected "
           f"{_x(p['predicted_speedup_vs_bp_model_parallel'])}) |",
           f"| LFNN-ℓ pipeline / BP 1F1B | {_x(s['vs_bp_pipelined'])} |",
           f"| LFNN-ℓ pipeline / DDP | {_x(s['vs_ddp'])} (replay: {_x(s['replay_vs_ddp'])}) |",
           f"| LFNN-ℓ pipeline / one-process BP | {_x(s['vs_bp_single'])} (replay: {_x(s['replay_vs_bp_single'])}) |",
           f"{b['ddp'] / 1e6:.1f} MB, {fewer[0]}–{fewer[1]}× less for these small inputs"],
        BENCH: [f"{_x(s['vs_bp_model_parallel'])} / {_x(s['vs_bp_pipelined'])} (projected "
                f"{_x(p['predicted_speedup_vs_bp_model_parallel'])})",
                f"{_x(s['vs_bp_single'])} ({_x(s['replay_vs_bp_single'])}) / {_x(s['vs_ddp'])} "
                f"({_x(s['replay_vs_ddp'])})"],
    }


MULTIHOST_ROWS = {
    "ddp": "DDP (`DistributedDataParallel`, one replica per host)",
    "bp_gpipe": "backprop, GPipe (`torch.distributed.pipelining`, 4 micro-batches)",
    "bp_1f1b": "backprop, 1F1B (the same, 4 micro-batches)",
    "lfnn_pipeline": "LFNN-ℓ pipeline",
    "replay_pipeline": "replay pipeline (weight stashing)",
    "lfnn_pipeline_bf16": "LFNN-ℓ pipeline, bfloat16 sends",
    "replay_pipeline_bf16": "replay pipeline, bfloat16 sends",
}


def multihost(d: dict) -> dict[str, list[str]]:
    r, rates = d["results"], d["settings"]["rates"]
    rows = []
    for k, label in MULTIHOST_ROWS.items():
        cells = [f"{r[rate][k]['samples_per_s']:.1f} ({r[rate][k]['measured_bytes_per_step'] / 1e6:.1f} / "
                 f"{r[rate][k]['expected_bytes_per_step'] / 1e6:.1f})" for rate in rates]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    ratio = d["ratios"]
    rows += [f"| LFNN-ℓ pipeline / DDP, 100 Mbit/s, ≥ 5× | {_x(ratio['lfnn_pipeline/ddp@100mbit'])} |",
             f"| replay pipeline / DDP, 100 Mbit/s, ≥ 4× | {_x(ratio['replay_pipeline/ddp@100mbit'])} |",
             f"| LFNN-ℓ pipeline / DDP, 1 Gbit/s, ≥ 1.8× | {_x(ratio['lfnn_pipeline/ddp@1gbit'])} |",
             f"| replay pipeline / DDP, 1 Gbit/s, ≥ 1.3× | {_x(ratio['replay_pipeline/ddp@1gbit'])} |",
             f"| LFNN-ℓ pipeline / DDP, unshaped, ≥ 1.2× | {_x(ratio['lfnn_pipeline/ddp@unshaped'])} |",
             "| LFNN-ℓ pipeline / backprop 1F1B, every rate, ≥ 1.5× | "
             + " / ".join(_x(ratio[f"lfnn_pipeline/bp_1f1b@{rate}"]) for rate in rates) + " |"]
    p = d["projection_k4"]["samples_per_s"]
    k4 = {m: [p[rate][m] / p[rate]["ddp"] for rate in ("unshaped", "1gbit", "100mbit")]
          for m in ("lfnn_pipeline", "replay_pipeline")}
    rows.append("LFNN-ℓ / DDP {} unshaped, {} at 1 Gbit/s and {} at 100 Mbit/s; replay {}, {} and {}".format(
        *(_x(v) for v in k4["lfnn_pipeline"][:2]), _x(k4["lfnn_pipeline"][2]),
        *(_x(v) for v in k4["replay_pipeline"][:2]), _x(k4["replay_pipeline"][2], 1)))
    expected = {k: r["1gbit"][k]["expected_bytes_per_step"] for k in ("ddp", "lfnn_pipeline", "replay_pipeline")}
    rows.append(f"{expected['ddp'] / expected['lfnn_pipeline']:.0f}× less for LFNN-ℓ, "
                f"{expected['ddp'] / expected['replay_pipeline']:.0f}× less for replay")
    apart = max(abs(x["bytes_measured_over_expected"] - 1) for by_method in r.values() for x in by_method.values())
    rows.append(f"at most {100 * apart:.1f}% apart")
    return {HISTORY: rows}


def _samples(cell: dict) -> str:
    low, high = cell["samples_per_s_range"]
    return f"{cell['samples_per_s']:.1f} ({low:.1f}–{high:.1f})"


DDP_VARIANT_NAMES = {"ddp": "plain DDP", "ddp_fp16": "DDP with the fp16 hook",
                     **{f"ddp_powersgd_r{k}": f"DDP with PowerSGD at rank {k}" for k in (1, 2, 4)},
                     **{f"local_sgd_h{h}": f"local SGD every {h} steps" for h in (4, 16)}}


def multihost_hooks(d: dict) -> dict[str, list[str]]:
    # two hosts against DDP's hooks: medians of 3 runs with their ranges, and the ratios to the best DDP variant
    from benchmarks.multihost import best_ddp

    r, ratio = d["results"], d["ratios"]
    slow = r["100mbit"]
    best_slow, best_fast = best_ddp(slow), best_ddp(r["1gbit"])
    headline = (f"LFNN-ℓ pipeline {_samples(slow['lfnn_pipeline'])} samples/s against "
                f"{DDP_VARIANT_NAMES[best_slow]}, the best DDP variant, {_samples(slow[best_slow])}: "
                f"{_x(ratio['lfnn_pipeline/best_ddp@100mbit'])}; replay {_samples(slow['replay_pipeline'])}, "
                f"{_x(ratio['replay_pipeline/best_ddp@100mbit'])}")
    rest = (f"with bfloat16 sends {_x(ratio['lfnn_pipeline_bf16/best_ddp@100mbit'])} and "
            f"{_x(ratio['replay_pipeline_bf16/best_ddp@100mbit'])}; at 1 Gbit/s "
            f"{_x(ratio['lfnn_pipeline/best_ddp@1gbit'])} and {_x(ratio['replay_pipeline/best_ddp@1gbit'])} the best "
            f"variant there ({DDP_VARIANT_NAMES[best_fast]}); plain DDP {_x(ratio['lfnn_pipeline/ddp@100mbit'])} and "
            f"{_x(ratio['lfnn_pipeline/ddp@1gbit'])}")
    short = (f"{_x(ratio['lfnn_pipeline/best_ddp@100mbit'])} (replay "
             f"{_x(ratio['replay_pipeline/best_ddp@100mbit'])}) the best DDP variant's samples/s at 100 Mbit/s")
    return {README: [short], BENCH: [headline, rest]}


SCHEDULE_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved1f1b": "Interleaved 1F1B",
                  "interleaved_zb": "Interleaved Zero Bubble", "zbv": "ZBV Zero Bubble", "dualpipev": "DualPipeV"}


def _schedule(name: str) -> str:
    schedule, micro = name.removeprefix("bp_").rsplit("_m", 1)
    return f"{SCHEDULE_NAMES[schedule]} at {micro} micro-batches"


def multihost_schedules(d: dict) -> dict[str, list[str]]:
    # a model split over two hosts: the pipelines against the best exact schedule (and micro-batch count) at each
    # rate, and against the best of the two schedules measured before (GPipe and 1F1B)
    from benchmarks.multihost import best_exact

    r, ratio = d["results"], d["ratios"]
    near, far = r["unshaped"], r["1gbit"]
    best_near, best_far = best_exact(near), best_exact(far)
    old = max((m for m in near if m.startswith(("bp_gpipe_", "bp_1f1b_"))), key=lambda m: near[m]["samples_per_s"])
    text = (f"unshaped link: LFNN-ℓ pipeline {_samples(near['lfnn_pipeline'])} samples/s against the best exact "
            f"schedule, {_schedule(best_near)}, {_samples(near[best_near])}: "
            f"{_x(ratio['lfnn_pipeline/best_exact@unshaped'])}; replay "
            f"{_x(ratio['replay_pipeline/best_exact@unshaped'])}; at 1 Gbit/s "
            f"{_x(ratio['lfnn_pipeline/best_exact@1gbit'])} and {_x(ratio['replay_pipeline/best_exact@1gbit'])} "
            f"against {_schedule(best_far)}; against the best of GPipe and 1F1B ({_schedule(old)}, unshaped) "
            f"{_x(near['lfnn_pipeline']['samples_per_s'] / near[old]['samples_per_s'])}")
    short = (f"{_x(ratio['lfnn_pipeline/best_exact@unshaped'])} (replay "
             f"{_x(ratio['replay_pipeline/best_exact@unshaped'])}) the best exact schedule's samples/s on an unshaped "
             f"link, {_x(ratio['lfnn_pipeline/best_exact@1gbit'])} ({_x(ratio['replay_pipeline/best_exact@1gbit'])}) "
             f"at 1 Gbit/s")
    return {README: [short], BENCH: [text]}


def multihost_fsdp(d: dict) -> dict[str, list[str]]:
    # the same split model sharded with FSDP2 across the two hosts, beside the best exact schedule at each rate
    from benchmarks.multihost import best_exact

    r, ratio = d["results"], d["ratios"]
    fsdp = {rate: r[rate]["fsdp"] for rate in ("unshaped", "1gbit", "100mbit")}
    slow = best_exact(r["100mbit"])
    slow_row = r["100mbit"]
    more = slow_row["bp_interleaved_zb_m2"]["expected_bytes_per_step"] / slow_row[slow]["expected_bytes_per_step"]
    text = (f"FSDP (`fully_shard`) {_samples(fsdp['unshaped'])} samples/s unshaped, {_samples(fsdp['1gbit'])} at "
            f"1 Gbit/s, {_samples(fsdp['100mbit'])} at 100 Mbit/s, sending "
            f"{fsdp['1gbit']['measured_bytes_per_step'] / 1e6:.0f} MB per step; at 100 Mbit/s the best exact method "
            f"measured is {_schedule(slow)} (the four-stage schedules send {more:.1f}× more), and the pipelines ran "
            f"{_x(ratio['lfnn_pipeline/best_exact@100mbit'])} (replay "
            f"{_x(ratio['replay_pipeline/best_exact@100mbit'])}) it")
    name = SCHEDULE_NAMES[slow.removeprefix("bp_").rsplit("_m", 1)[0]]
    short = (f"{_x(ratio['lfnn_pipeline/best_exact@100mbit'])} ({_x(ratio['replay_pipeline/best_exact@100mbit'])}) "
             f"{name} at 100 Mbit/s")
    return {README: [short], BENCH: [text]}


def multihost_int8(d: dict) -> dict[str, list[str]]:
    # the pipelines sending float32, bfloat16 and int8 against the best DDP variant measured, at 100 and 10 Mbit/s
    from benchmarks.multihost import best_ddp

    r, ratio = d["results"], d["ratios"]

    def at(rate, words):
        best = best_ddp(r[rate])
        sends = {m: " / ".join(_x(ratio[f"{m}{s}/best_ddp@{rate}"]) for s in ("", "_bf16", "_int8"))
                 for m in ("lfnn_pipeline", "replay_pipeline")}
        return (f"at {words} against {DDP_VARIANT_NAMES[best]}, the best DDP variant measured there, "
                f"{_samples(r[rate][best])} samples/s: LFNN-ℓ {sends['lfnn_pipeline']}, replay "
                f"{sends['replay_pipeline']} (float32 / bfloat16 / int8 sends); int8 LFNN-ℓ "
                f"{_samples(r[rate]['lfnn_pipeline_int8'])}, int8 replay {_samples(r[rate]['replay_pipeline_int8'])}")

    text = f"{at('100mbit', '100 Mbit/s')}; {at('10mbit', '10 Mbit/s')}"
    short = (f"with int8 sends {_x(ratio['lfnn_pipeline_int8/best_ddp@100mbit'])} (replay "
             f"{_x(ratio['replay_pipeline_int8/best_ddp@100mbit'])}) the best DDP variant's samples/s at 100 Mbit/s, "
             f"{_x(ratio['lfnn_pipeline_int8/best_ddp@10mbit'])} ({_x(ratio['replay_pipeline_int8/best_ddp@10mbit'])})"
             f" at 10 Mbit/s")
    return {README: [short], BENCH: [text]}


def _apart(a: dict, b: dict) -> str:
    (lo_a, hi_a), (lo_b, hi_b) = a["samples_per_s_range"], b["samples_per_s_range"]
    return "ranges apart" if lo_a > hi_b or hi_a < lo_b else "ranges overlap"


def multihost_overlap(d: dict) -> dict[str, list[str]]:
    # what overlapping sends with the next step's compute buys: each pipeline with and without, at each rate
    from benchmarks.speed_map import RATE_NAMES

    r = d["results"]
    cells = []
    for rate in d["settings"]["rates"]:
        pair = []
        for m, name in (("lfnn_pipeline", "LFNN-ℓ"), ("replay_pipeline", "replay")):
            on, off = r[rate][m], r[rate][f"{m}_no_overlap"]
            pair.append(f"{name} {_samples(on)} samples/s overlapping, {_samples(off)} not: "
                        f"{_x(on['samples_per_s'] / off['samples_per_s'])} ({_apart(on, off)})")
        cells.append(f"{RATE_NAMES[rate]}: " + "; ".join(pair))
    text = ". ".join(cells)
    return {BENCH: [text], HISTORY: [text]}


def multihost_ahead(d: dict) -> dict[str, list[str]]:
    # what receiving ahead buys: each pipeline with and without, and against DDP with PowerSGD at rank 1
    from benchmarks.speed_map import RATE_NAMES

    r = d["results"]
    cells = []
    for rate in d["settings"]["rates"]:
        best = r[rate]["ddp_powersgd_r1"]
        parts = []
        for m, name in (("lfnn_pipeline", "LFNN-ℓ"), ("replay_pipeline", "replay")):
            ahead, plain = r[rate][f"{m}_ahead"], r[rate][m]
            parts.append(f"{name} receiving ahead {_samples(ahead)} samples/s against {_samples(plain)} without "
                         f"({_x(ahead['samples_per_s'] / plain['samples_per_s'])}, {_apart(ahead, plain)}), "
                         f"{_x(ahead['samples_per_s'] / best['samples_per_s'])} DDP with PowerSGD at rank 1 "
                         f"({_apart(ahead, best)})")
        cells.append(f"{RATE_NAMES[rate]} (PowerSGD at rank 1 {_samples(best)}): " + "; ".join(parts))
    text = ". ".join(cells)
    at = r["100mbit"]
    short = (f"receiving ahead, the LFNN-ℓ pipeline sending float32 ran "
             f"{_x(at['lfnn_pipeline_ahead']['samples_per_s'] / at['ddp_powersgd_r1']['samples_per_s'])} DDP with "
             f"PowerSGD at rank 1 at 100 Mbit/s")
    return {README: [short], BENCH: [text], HISTORY: [text]}


def replicas_traffic(d: dict) -> dict[str, list[str]]:
    # what a block's replicas all-reduce per step, plain and through PowerSGD, counted as the pipeline calls torch
    res = d["results"]

    def mb(b):
        return b["all_reduce_bytes_per_step"] / 1e6

    def seconds(b, bits):
        return (b["all_reduce_bytes_per_step"] + b["broadcast_bytes_per_step"]) * 8 / bits

    blocks = []
    for k in sorted(res["plain"], key=int):
        plain, r1 = res["plain"][k], res["powersgd_r1"][k]
        ranks = " / ".join(f"{mb(res[f'powersgd_r{r}'][k]):.3f}" for r in (1, 2, 4))
        blocks.append(f"block {k}: {mb(plain):.2f} MB all-reduced per step plain, {ranks} MB through PowerSGD at rank "
                      f"1 / 2 / 4 ({plain['all_reduce_bytes_per_step'] / r1['all_reduce_bytes_per_step']:.0f}× less "
                      f"at rank 1; at 100 Mbit/s {seconds(plain, 1e8):.2f} s against {seconds(r1, 1e8):.3f} s per "
                      f"step, projected)")
    exact = all(b["all_reduce_bytes_per_step"] == b["expected_all_reduce_bytes"]
                for by_block in res.values() for b in by_block.values())
    text = ("; ".join(blocks) + f"; the activation crossing the cut: {d['activation_bytes_per_step'][0] / 1e6:.2f} MB "
            f"per step" + ("; every count equal to PowerSGD's rule" if exact else "; NOT equal to PowerSGD's rule"))
    less = [f"{res['plain'][k]['all_reduce_bytes_per_step'] / res['powersgd_r1'][k]['all_reduce_bytes_per_step']:.0f}× "
            f"(block {k})" for k in sorted(res["plain"], key=int)]
    short = f"through PowerSGD at rank 1 the replicas all-reduced {' and '.join(less)} fewer bytes per step"
    return {README: [short], BENCH: [text], "docs/pipeline.md": [text], HISTORY: [text]}


def speedup_repeats(d: dict) -> dict[str, list[str]]:
    # K=2 processes on one machine, every method 3 times: medians with their ranges
    m, s = d["methods"], d["speedup"]
    text = (f"LFNN-ℓ pipeline {_samples(m['lfnn_pipeline'])} samples/s, replay {_samples(m['replay_pipeline'])}, "
            f"one-process BP {_samples(m['bp_single'])}, DDP {_samples(m['ddp'])}: {_x(s['vs_bp_single'])} "
            f"({_x(s['replay_vs_bp_single'])}) / {_x(s['vs_ddp'])} ({_x(s['replay_vs_ddp'])}) one-process BP / DDP's "
            f"samples/s")
    short = text[text.index(": ") + 2:]  # the ratios
    return {README: [short], BENCH: [text], HISTORY: [text]}


def speed_map(d: dict) -> dict[str, list[str]]:
    # where the pipelines win on samples/s: per case, each rate's best baseline and each family's ratio to it
    from benchmarks.speed_map import RATE_NAMES

    def outcome(f):
        verdict = f["verdict"]
        if verdict.startswith(("lfnn_pipeline", "replay_pipeline")):
            return "wins"
        return "level" if verdict.startswith("level") else "loses"

    lines = {}
    for case in ("fits", "split"):
        cells = []
        for rate, cases in d["map"].items():
            c = cases[case]
            fam = c["families"]
            cells.append(f"{RATE_NAMES[rate]}: against {c['baseline']}, LFNN-ℓ {_x(fam['LFNN-ℓ']['ratio'])} "
                         f"({outcome(fam['LFNN-ℓ'])}), replay {_x(fam['replay']['ratio'])} ({outcome(fam['replay'])})")
        lines[case] = "; ".join(cells)
    text = f"model fits each host: {lines['fits']}. Model split: {lines['split']}"
    return {BENCH: [text]}


def tta_map(d: dict) -> dict[str, list[str]]:
    # who reached DDP's final accuracy less one point first, at every link rate: measured or projected
    from benchmarks.speed_map import RATE_NAMES

    cells = []
    for rate, targets in d["map"].items():
        fits, split = targets["minus_one_point"]["fits"], targets["minus_one_point"]["split"]
        each = ", ".join(f"{f['method']} {f['seconds']:.0f} s" if f else "none" for f in fits["first_per_seed"])
        spread = fits.get("baseline_spread")
        ranged = (f" ({spread['range_seconds'][0]:.0f}–{spread['range_seconds'][1]:.0f} s over "
                  f"{spread['repetitions']} short runs)" if spread else "")
        cell = (f"{RATE_NAMES[rate]} ({fits['baseline_kind']}): on every seed first {fits['baseline']} "
                f"{fits['baseline_seconds']:.0f} s{ranged}")
        if split["baseline"] != fits["baseline"]:
            cell += f" (of the schedules {split['baseline']} {split['baseline_seconds']:.0f} s)"
        cells.append(cell + f"; first on each seed {each}")
    text = "to DDP's final accuracy less one point, " + "; ".join(cells)
    error = f"the projection was within {d['max_abs_projection_error']:.0%} of the measurement"
    firsts = {rate: targets["minus_one_point"]["fits"] for rate, targets in d["map"].items()}
    short = "; ".join(f"{RATE_NAMES[rate]} ({f['baseline_kind']}) {f['baseline']} {f['baseline_seconds']:.0f} s"
                      for rate, f in firsts.items())
    return {README: [short, error], BENCH: [text, error], HISTORY: [text]}


def multihost_tta_powersgd(d: dict) -> dict[str, list[str]]:
    # PowerSGD at ranks 2 and 4 in the two-host time to accuracy, beside the same sweep's DDP
    s = d["summary"]
    acc, lower = s["final_accuracy"], s["minus_one_point"]["ratio_to_ddp"]
    text = (f"PowerSGD at rank 2 ended at {_pm(acc['ddp_powersgd_r2']['values'], 4)} test accuracy and at rank 4 at "
            f"{_pm(acc['ddp_powersgd_r4']['values'], 4)}, against DDP's {_pm(acc['ddp']['values'], 4)}; DDP's final "
            f"accuracy less one point was reached on {lower['ddp_powersgd_r2']['reached']} at rank 2 and "
            f"{lower['ddp_powersgd_r4']['reached']} at rank 4")
    return {BENCH: [text]}


def multihost_tta_localsgd4(d: dict) -> dict[str, list[str]]:
    """Local SGD every 4 steps in the two-host time to accuracy (1 Gbit/s), beside every 16 steps from the sweep
    against the strongest baselines (the same seeds; DDP's evaluations identical), and in the map at every rate."""
    sweep = json.loads((RESULTS / "multihost_tta-fashion_mnist-resnet18-k2-1gbit-intel-xeon-2026-12-06.json")
                       .read_text())
    rates = json.loads((RESULTS / "tta_map-fashion_mnist-resnet18-k2-intel-xeon-2026-12-07.json").read_text())
    acc = {m: p["summary"]["final_accuracy"][m] for m, p in (("local_sgd_h4", d), ("local_sgd_h16", sweep))}
    h4, h16 = (f"{acc[m]['mean']:.4f} ± {acc[m]['sd']:.4f}" for m in ("local_sgd_h4", "local_sgd_h16"))
    from benchmarks.speed_map import RATE_NAMES

    def cell(c):
        return f"{c['mean_seconds']:.0f} s" + (" (projected)" if c["kind"] == "projected" else "")

    seconds = "; ".join(f"{RATE_NAMES[rate]} {cell(cells['minus_one_point']['local_sgd_h4'])} against "
                        f"{cell(cells['minus_one_point']['local_sgd_h16'])}"
                        for rate, cells in rates["cells"].items())
    line = (f"local SGD every 4 steps ended at {h4} test accuracy (every 16 steps: {h16}); to DDP's final accuracy "
            f"less one point, every 4 steps against every 16: {seconds}")
    return {BENCH: [line], HISTORY: [line]}


def multihost_tta(d: dict) -> dict[str, list[str]]:
    s, seeds = d["summary"], d["seeds"]
    per = [s["per_seed"][str(seed)] for seed in seeds]
    labels = {"ddp": "DDP (plain `DistributedDataParallel`)", "replay_pipeline": "replay pipeline (weight stashing)",
              "lfnn_pipeline": "LFNN-ℓ pipeline (the paper's heads)"}

    def pm(stat, digits):
        return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"

    def reached(m):
        return ", ".join("never" if r[m]["ratio_to_ddp"] is None else _x(r[m]["ratio_to_ddp"]) for r in per)

    def speed(m):
        return ", ".join(_x(r[m]["seconds_per_step"] / r["ddp_seconds_per_step"]) for r in per)

    rows = [f"| {label} | {pm(s['final_accuracy'][m], 4)} | {pm(s['seconds_per_step'][m], 2)} | "
            + ("1 (own final accuracies " + ", ".join(f"{r['target']:.3f}" for r in per) + ")" if m == "ddp"
               else reached(m)) + " |" for m, label in labels.items()]
    final = {m: s["final_accuracy"][m]["mean"] for m in labels}
    return {HISTORY: rows + [f"on the AMD EPYC (next section): {reached('replay_pipeline')} | missed",
                           f"Its final accuracy is {100 * (final['ddp'] - final['replay_pipeline']):.2f} points below",
                           f"replay's seconds per step were {speed('replay_pipeline')} DDP's on the same seed, "
                           f"LFNN-ℓ's {speed('lfnn_pipeline')}",
                           f"ends {100 * (final['ddp'] - final['lfnn_pipeline']):.2f} points below DDP",
                           "(DDP " + " → ".join(f"{r['ddp_seconds_per_step']:.2f}" for r in per) + " s)"],
            BENCH: [
                f"replay reached DDP's final accuracy on {s['ratio_to_ddp']['replay_pipeline']['reached']} "
                f"({reached('replay_pipeline')}), ending at {pm(s['final_accuracy']['replay_pipeline'], 4)} "
                f"against DDP's {pm(s['final_accuracy']['ddp'], 4)}"]}


def multihost_tta_strongest(d: dict) -> dict[str, list[str]]:
    """The two-host time to accuracy against the strongest baselines, one file per link rate: its table and who
    reached each target first (HISTORY), and one summary per rate (benchmarks/README)."""
    from benchmarks.time_to_accuracy.across_hosts import first_text, first_to_target, markdown, seed_keys

    rate = {"100mbit": "100 Mbit/s", "1gbit": "1 Gbit/s"}[d["settings"]["rate"]]
    summary, seeds = seed_keys(d["summary"]), d["seeds"]
    table = [ln for ln in markdown(d).splitlines() if ln.startswith("| ") or ln.startswith("- First")]
    first = first_to_target(summary, seeds)
    budget = summary["at_budget"]
    seconds = [budget["per_seed"][s]["seconds"] for s in seeds]
    finals = ", ".join(f"{m} {summary['final_accuracy'][m]['mean']:.4f}" for m in summary["final_accuracy"])
    at = ", ".join(f"{m} {a['mean']:.4f}" for m, a in budget["accuracy"].items() if a)
    line = (f"at {rate}, final test accuracy (mean of {len(seeds)} seeds): {finals}; first to DDP's final accuracy "
            f"less one point: {first_text(first['minus_one_point'], len(seeds))}; test accuracy after "
            f"{min(seconds):.0f}–{max(seconds):.0f} s of training (each seed's shortest run): {at}")
    # seed by seed, the first to that target and its time against the split-model schedule's
    schedule = next(m for m in summary["final_accuracy"] if m.startswith("bp_"))
    lower = first["minus_one_point"]["seconds"]
    per_seed = []
    for i, seed in enumerate(seeds):
        reached = {m: v[i] for m, v in lower.items() if v[i] is not None}
        m = min(reached, key=reached.get)
        per_seed.append(f"seed {seed}: {m} {_x(reached[m] / lower[schedule][i])}")
    step = {m: summary["seconds_per_step"][m]["mean"] / summary["seconds_per_step"][schedule]["mean"]
            for m in ("replay_pipeline", "lfnn_pipeline")}
    gap = {m: 100 * (summary["final_accuracy"][schedule]["mean"] - summary["final_accuracy"][m]["mean"])
           for m in ("replay_pipeline", "lfnn_pipeline")}
    seeds_line = (f"{rate}: " + ", ".join(per_seed) + f" the time of {schedule}; seconds per step replay "
                  f"{_x(step['replay_pipeline'])}, LFNN-ℓ {_x(step['lfnn_pipeline'])} the schedule's; final accuracy "
                  f"{gap['replay_pipeline']:.2f} and {gap['lfnn_pipeline']:.2f} points below it")
    return {HISTORY: table + [seeds_line], BENCH: [line]}


def multihost_tta_int8(d: dict) -> dict[str, list[str]]:
    """The pipelines sending int8 in the two-host time to accuracy (1 Gbit/s), against their float32 runs of the
    same seeds in the sweep against the strongest baselines (accuracy per step does not depend on the link)."""
    fp32 = json.loads((RESULTS / "multihost_tta-fashion_mnist-resnet18-k2-1gbit-intel-xeon-2026-12-06.json")
                      .read_text())
    ddp_same = all(d["runs"][f"ddp-seed{s}"]["evaluations"][i]["accuracy"] == e["accuracy"]
                   for s in d["seeds"] for i, e in enumerate(fp32["runs"][f"ddp-seed{s}"]["evaluations"]))

    def acc(payload, m):
        a = payload["summary"]["final_accuracy"][m]
        return f"{a['mean']:.4f} ± {a['sd']:.4f}"

    line = (f"int8 sends, final test accuracy over {len(d['seeds'])} seeds: replay {acc(d, 'replay_pipeline_int8')} "
            f"(float32 sends {acc(fp32, 'replay_pipeline')}), LFNN-ℓ {acc(d, 'lfnn_pipeline_int8')} (float32 sends "
            f"{acc(fp32, 'lfnn_pipeline')}); DDP's evaluations {'identical to' if ddp_same else 'differ from'} "
            f"the float32 sweep's")
    return {HISTORY: [line], BENCH: [line]}


def multihost_tta_deltas(d: dict) -> dict[str, list[str]]:
    """The pipelines sending float32, int8 and int8 deltas (AQ-SGD) over three epochs of a subset, so that every
    sample crosses three times, in the two-host time to accuracy (1 Gbit/s)."""
    acc = d["summary"]["final_accuracy"]

    def three(m):
        return ", ".join(f"{what} {acc[m + suffix]['mean']:.4f} ± {acc[m + suffix]['sd']:.4f}"
                         for what, suffix in (("float32", ""), ("int8", "_int8"), ("int8 deltas", "_int8_deltas")))

    def gap(m):  # deltas less plain int8, seed by seed, in points
        finals = {suffix: [d["runs"][f"{m}{suffix}-seed{s}"]["evaluations"][-1]["accuracy"] for s in d["seeds"]]
                  for suffix in ("_int8", "_int8_deltas")}
        return ", ".join(f"{100 * (a - b):+.2f}" for a, b in zip(finals["_int8_deltas"], finals["_int8"]))

    s = d["settings"]
    line = (f"{s['epochs']} epochs of {s['train_subset']:,} images (each sample crosses {s['epochs']} times), final "
            f"test accuracy over {len(d['seeds'])} seeds: LFNN-ℓ sending {three('lfnn_pipeline')}; replay sending "
            f"{three('replay_pipeline')}; DDP {acc['ddp']['mean']:.4f} ± {acc['ddp']['sd']:.4f}. Deltas less plain "
            f"int8, seed by seed: LFNN-ℓ {gap('lfnn_pipeline')} points, replay {gap('replay_pipeline')} points")
    return {HISTORY: [line], BENCH: [line]}


def time_to_accuracy(d: dict) -> dict[str, list[str]]:
    def row(evals):
        return " | ".join(f"{e['accuracy']:.3f}"[1:] for e in evals)
    bp, pipe = d["bp"]["evaluations"], d["lfnn_pipeline"]["evaluations"]
    return {HISTORY: [f"| backprop, test accuracy | {row(bp)} |",
                      f"| replay K=2 pipeline, test accuracy | {row(pipe)} |",
                    f"reaches backprop's final accuracy ({d['target_accuracy']:.4f})"]}


def time_to_accuracy_seeds(d: dict) -> dict[str, list[str]]:
    # the three-seed time to accuracy, remade from its raw runs: final accuracy and seconds per step, mean ± sd,
    # the seeds the pipeline reached backprop's final accuracy on, and per seed its target, final and best
    def pm(values, digits=4):  # accuracies as fractions: four digits
        return _pm(values, digits)
    seeds = d["seeds"]
    runs = {m: [d["runs"][f"{m}-seed{s}"]["evaluations"] for s in seeds] for m in ("bp", "pipeline")}
    final = {m: [e[-1]["accuracy"] for e in ev] for m, ev in runs.items()}
    per_step = {m: [e[-1]["train_seconds"] / e[-1]["step"] for e in ev] for m, ev in runs.items()}
    targets = dict(zip(seeds, final["bp"]))
    reached = [s for s, ev in zip(seeds, runs["pipeline"]) if any(e["accuracy"] >= targets[s] for e in ev)]
    bp_steps = [next(e["step"] for e in ev if e["accuracy"] >= ev[-1]["accuracy"]) for ev in runs["bp"]]
    rows = [f"| {s} | {targets[s]:.4f} | {ev[-1]['accuracy']:.4f} | {max(e['accuracy'] for e in ev):.4f} |"
            for s, ev in zip(seeds, runs["pipeline"])]
    gap = 100 * (statistics.mean(final["bp"]) - statistics.mean(final["pipeline"]))
    sds = sorted(100 * statistics.stdev(v) for v in final.values())
    slower = statistics.mean(per_step["pipeline"]) / statistics.mean(per_step["bp"])
    mode = d["pipeline_mode"]
    return {HISTORY: [f"| backprop | {pm(final['bp'])} | {pm(per_step['bp'], 2)} |",
                    f"| {mode} pipeline | {pm(final['pipeline'])} | {pm(per_step['pipeline'], 2)} |",
                    f"reached on {len(reached)} of {len(seeds)} seeds",
                    "backprop reached it at iteration " + ", ".join(map(str, bp_steps)), *rows,
                    f"ended {gap:.2f} points below backprop's final accuracy on average (the spread is "
                    f"{sds[0]:.2f}–{sds[1]:.2f} points)", f"each of its steps took {slower:.1f}× backprop's"],
            **dict.fromkeys((README, BENCH), [
                f"reached on {len(reached)} of {len(seeds)} seeds in {d['settings']['epochs']} epochs (final "
                f"{pm(final['pipeline'])} against {pm(final['bp'])}; {slower:.1f}× BP's seconds per step)"])}


def finetune(d: dict) -> dict[str, list[str]]:
    m = d["methods"]
    bp = m["bp"]["test_accuracy"]
    rows = [f"| backprop | {bp:.4f} | – | {m['bp']['seconds']:.0f} |"]
    labels = {"replay": "replay (recompute)", "replay_stash": "replay, weight stashing",
              "local_lookahead_layer": "LFNN-ℓ, look-ahead heads (next layer)",
              "local": "LFNN-ℓ, GAP+linear heads (the paper)"}
    for k, label in labels.items():
        rows.append(f"| {label} | {m[k]['test_accuracy']:.4f} | −{100 * (bp - m[k]['test_accuracy']):.2f} | "
                    f"{m[k]['seconds']:.0f} |")
    return {HISTORY: rows}


def _finetune_table(d: dict, reference: str) -> dict:
    """A fine-tuning table's figures, remade from its raw runs: mean ± sd of validation and test accuracy (%) per
    method, and the mode chosen on validation against ``reference`` (its gap, per seed) and the paper's heads'."""
    pm = _pm
    val = {m: [100 * r["val_accuracy"] for r in runs] for m, runs in d["runs"].items()}
    test = {m: [100 * r["test_accuracy"] for r in runs] for m, runs in d["runs"].items()}
    best = d["chosen"]
    pairs = zip(d["runs"][best], d["runs"][reference])
    return {"val": val, "test": test, "best": best,
            "rows": [f"| {runs[0]['label']} | {len(runs)} | {pm(val[m])} | {pm(test[m])} |"
                     for m, runs in d["runs"].items()],
            "gap": statistics.mean(test[best]) - statistics.mean(test[reference]),
            "local_loss": statistics.mean(test[reference]) - statistics.mean(test["local"]),
            "seeds": "per seed, test accuracy " + ", ".join(
                f"{100 * a['test_accuracy']:.2f}% against {100 * b['test_accuracy']:.2f}%" for a, b in pairs)}


def finetune_seeds(d: dict) -> dict[str, list[str]]:
    # the three-seed fine-tuning table of 2026-12-06 (AMD EPYC): lfnnify's modes had 20 more steps than backprop
    t, pm = _finetune_table(d, "bp"), _pm
    versus = f"{pm(t['test'][t['best']])}% against backprop's {pm(t['test']['bp'])}% ({t['gap']:+.2f}"
    choice = f"{pm(t['val'][t['best']])}%\n  against plain stashing's {pm(t['val']['replay_stash'])}%"
    loss = f"LFNN-ℓ with the paper's heads loses {t['local_loss']:.2f}"
    return {HISTORY: [*t["rows"], t["seeds"], versus, choice, loss]}


def finetune_equal_budget(d: dict) -> dict[str, list[str]]:
    # the fine-tuning table with equal budgets: backprop gets lfnnify's head warm-up as a linear probe (bp_probe);
    # the mode chosen on validation against it, plain backprop beside it, and the paper's heads
    t, pm = _finetune_table(d, "bp_probe"), _pm
    versus = (f"{pm(t['test'][t['best']])}% against {pm(t['test']['bp_probe'])}% for backprop with the same "
              f"linear-probe warm-up ({t['gap']:+.2f} points)")
    plain = f"backprop without the warm-up {pm(t['test']['bp'])}%"
    lost = f"lost {t['local_loss']:.2f} points there ({pm(t['test']['local'])}%)"
    return {HISTORY: [*t["rows"], t["seeds"], versus, plain, lost], README: [versus, lost], BENCH: [versus, plain]}


def leaderboard_one_seed(d: dict) -> dict[str, list[str]]:
    # the 2026-11-29 table, one seed per row: every row's three test errors, in order
    return {HISTORY: ["| " + " | ".join(f"{e:.2f}" for e in m["test_error"]) + " |" for m in d["methods"].values()]}


def leaderboard_seeds(d: dict) -> dict[str, list[str]]:
    # the three-seed table, remade from the raw runs it holds: mean ± sd over seeds of every epoch's error
    def cells(runs, key):
        return " | ".join(f"{statistics.mean(r[key][e] for r in runs):.2f} ± "
                          f"{statistics.stdev(r[key][e] for r in runs):.2f}" for e in range(d["settings"]["epochs"]))
    rows = [f"| {d['labels'][name]} | {len(runs)} | {cells(runs, key)} |" for name, runs in d["runs"].items()
            for key in ("val_error", "test_error")]
    last = {name: (statistics.mean(r["test_error"][-1] for r in runs),
                   statistics.stdev(r["test_error"][-1] for r in runs)) for name, runs in d["runs"].items()}
    best = d["chosen_on_validation"]
    versus = f"{last[best][0]:.2f} ± {last[best][1]:.2f} against {last['bp'][0]:.2f} ± {last['bp'][1]:.2f}"
    return {HISTORY: rows + [versus]}


def leaderboard_delay_lr(d: dict) -> dict[str, list[str]]:
    # the AMD EPYC table of delay-aware replay against backprop: the three-seed table's figures, and per seed the
    # final test errors the text compares
    figures = leaderboard_seeds(d)
    pairs = zip(*(d["runs"][m] for m in ("replay_stash_delay_lr", "bp")))
    seeds = ", ".join(f"{a['test_error'][-1]:.2f} against {b['test_error'][-1]:.2f}" for a, b in pairs)
    return {HISTORY: figures[HISTORY] + [f"per seed, test error after epoch 3: {seeds}"]}


def leaderboard_first_seeds(d: dict) -> dict[str, list[str]]:
    # the first three-seed table (2026-12-02): only its weight-prediction row is still quoted (not re-run since)
    runs = d["runs"]["replay_stash_predict"]
    val, test = (_pm(r[key][-1] for r in runs) for key in ("val_error", "test_error"))
    return {HISTORY: [f"validation {val}, test {test}"]}


def leaderboard_xeon(d: dict) -> dict[str, list[str]]:
    # the six-row Intel Xeon table at one commit: every row per epoch, the chosen row against backprop, and the
    # last epoch's validation and test figures the text compares
    figures = leaderboard_seeds(d)
    val = {name: _pm(r["val_error"][-1] for r in runs) for name, runs in d["runs"].items()}
    test = {name: _pm(r["test_error"][-1] for r in runs) for name, runs in d["runs"].items()}
    mean = {name: statistics.mean(r["test_error"][-1] for r in runs) for name, runs in d["runs"].items()}
    best = d["chosen_on_validation"]
    row = "; ".join(f"{d['labels'][name]} {test[name]}%" for name in d["runs"])
    return {HISTORY: figures[HISTORY] + [
                f"chosen on validation, {d['labels'][best]}: {test[best]} against {test['bp']} "
                f"(+{mean[best] - mean['bp']:.2f})",
                f"the closest, delay-aware replay, is +{mean['replay_stash_delay_lr'] - mean['bp']:.2f}",
                f"look-ahead heads (next stage) {val['local_lookahead']}, delay-aware replay "
                f"{val['replay_stash_delay_lr']}, plain stashing {val['replay_stash']}",
                f"delay-aware replay lowest ({test['replay_stash_delay_lr']} against {test['local_lookahead']} and "
                f"{test['replay_stash']})",
                f"backprop ({val['bp']}), the paper's heads ({val['local']}) and the next-layer look-ahead heads "
                f"({val['local_lookahead_layer']})",
                f"({test['replay_stash_delay_lr']} against {test['replay_stash']})",
                f"level on the validation split ({val['replay_stash_delay_lr']} against {val['replay_stash']})"],
            README: [f"test {test['replay_stash_delay_lr']}% against backprop's {test['bp']}%",
                     f"| test {test['local_lookahead']}% |", f"| test {test['local']}%;",
                     f"backprop {test['bp']}%; best pipeline-capable rows on validation: look-ahead heads "
                     f"{test['local_lookahead']}%, delay-aware replay {test['replay_stash_delay_lr']}%"],
            BENCH: [f"3 seeds, one commit, chosen on validation: {row}"]}


def delay_lr_pilot(d: dict) -> dict[str, list[str]]:
    # the two-row pilot of delay-aware step sizes: every row's mean ± sd per epoch, validation then test
    def cells(runs, key):
        return " | ".join(f"{statistics.mean(r[key][e] for r in runs):.2f} ± "
                          f"{statistics.stdev(r[key][e] for r in runs):.2f}" for e in range(d["settings"]["epochs"]))
    rows = [f"| {d['labels'][name]} | {cells(runs, key)} |" for key in ("val_error", "test_error")
            for name, runs in d["runs"].items()]
    pairs = zip(*(d["runs"][m] for m in ("replay_stash", "replay_stash_delay_lr")))
    seeds = ", ".join(f"{b['val_error'][-1]:.2f} against {a['val_error'][-1]:.2f}" for a, b in pairs)
    return {HISTORY: rows + [f"per seed, validation error after epoch 2: {seeds}"]}


def error_vs_length(d: dict) -> dict[str, list[str]]:
    """Final test error against training length, each length its own cosine schedule: the tables (HISTORY), each
    row's gap to backprop at every length, and whether the paper's heads beat backprop at any of them."""
    from benchmarks.error_vs_length import table

    by, lengths, labels = d["summary"]["by_length"], d["lengths"], d["labels"]
    summary = {"by_length": {int(k): v for k, v in by.items()}}
    tables = [ln for key in ("val_error", "test_error") for ln in table(summary, lengths, key, labels).splitlines()
              if ln.startswith("| ") and not ln.startswith("| method")]
    at = " / ".join(str(length) for length in lengths)
    bp = " / ".join(f"{by[str(length)]['bp']['test_error'][0]:.2f}" for length in lengths)
    everywhere = [m for m in labels if all(m in by[str(length)] for length in lengths)]
    gaps = "; ".join(f"{labels[m]} " + " / ".join(f"{by[str(length)][m]['test_gap_to_bp']:+.2f}" for length in lengths)
                     for m in everywhere if m != "bp")
    beats = [str(length) for length in lengths if by[str(length)]["local"]["against_bp"] == "beats"]
    longest = str(max(lengths))
    only = "; ".join(f"{labels[m]} {by[longest][m]['test_gap_to_bp']:+.2f}" for m in labels
                     if m in by[longest] and m not in everywhere)
    line = (f"final test error at {at} epochs, mean of {len(d['seeds'])} seeds: backprop {bp}%; each row less "
            f"backprop, in points: {gaps}" + (f"; at {longest} epochs only: {only}" if only else ""))
    verdict = ("the paper's heads beat backprop at " + ", ".join(beats) + " epochs" if beats else
               f"the paper's heads beat backprop at none of the lengths measured ({at} epochs)")
    return {HISTORY: tables + [line, verdict], README: [line, verdict], BENCH: [line, verdict]}


def checkpoint_cost(d: dict) -> dict[str, list[str]]:
    # one pipeline save across four hosts: seconds on rank 0 (median, range) and the megabytes sent to rank 0
    def line(model):
        r = d["results"][model]
        lo, hi = r["save_s_range"]
        return (f"{model} {r['save_s_median']:.1f} s (range {lo:.1f}–{hi:.1f}), {r['bytes_to_rank0_median'] / 1e6:.0f} "
                f"MB")
    figures = [line("resnet50") + " sent to rank 0", "; " + line("resnet101")]
    return {CHECKPOINTS: figures, README: figures, BENCH: figures}


def demo_output(text: str) -> dict[str, list[str]]:
    # what the demo printed, line by line, but the picture's and run folder's temporary paths
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("picture:")]
    lines = [ln.split(" (set-up excluded)")[0] if ln.startswith("demo time") else ln for ln in lines]
    return {HISTORY: lines}


SOURCES = {  # results file -> how to write its figures, per document that quotes them
    "convert_time-resnet101-k4-cpu2-2026-11-26.json": convert_time,
    "memory-resnet101-k4-b64-memory-cpu2-2026-11-27.json": memory(64, "glibc default"),
    "memory-resnet101-k4-b64-memory-mmap-cpu2-2026-11-27.json": memory(64, "`--mmap-threshold 131072`"),
    "memory-resnet101-k4-b16-memory-cpu2-2026-11-27.json": memory(16, "glibc default"),
    "memory-resnet101-k4-b64-memory-cpu2-2026-12-06.json": memory_checkpointed,
    "memory-resnet101-k4-b16-memory-mmap-cpu2-2026-11-27.json": memory(16, "`--mmap-threshold 131072`"),
    "speedup-resnet18-k2-cpu2-2026-11-29.json": speedup,
    "multihost-resnet18-k2-cpu2-2026-12-02.json": multihost,
    "multihost_tta-fashion_mnist-resnet18-k2-1gbit-cpu2-2026-12-05.json": multihost_tta,
    "multihost_tta-fashion_mnist-resnet18-k2-100mbit-intel-xeon-2026-12-06.json": multihost_tta_strongest,
    "multihost_tta-fashion_mnist-resnet18-k2-1gbit-intel-xeon-2026-12-06.json": multihost_tta_strongest,
    "multihost_tta-int8-fashion_mnist-resnet18-k2-1gbit-intel-xeon-2026-12-06.json": multihost_tta_int8,
    "multihost_tta-localsgd4-fashion_mnist-resnet18-k2-1gbit-intel-xeon-2026-12-07.json": multihost_tta_localsgd4,
    ("multihost_tta-deltas-fashion_mnist-resnet18-k2-1gbit-3epochs-"
     "intel-xeon-2026-12-07.json"): multihost_tta_deltas,
    "multihost-hooks-resnet18-k2-intel-xeon-2026-12-06-summary.json": multihost_hooks,
    "multihost-schedules-resnet18-k2-intel-xeon-2026-12-06-summary.json": multihost_schedules,
    "multihost-fsdp-resnet18-k2-intel-xeon-2026-12-06.json": multihost_fsdp,
    "multihost-int8-resnet18-k2-intel-xeon-2026-12-06.json": multihost_int8,
    "speed_map-resnet18-k2-intel-xeon-2026-12-06.json": speed_map,
    "multihost-overlap-resnet18-k2-intel-xeon-2026-12-07.json": multihost_overlap,
    "multihost-ahead-resnet18-k2-intel-xeon-2026-12-07.json": multihost_ahead,
    "replicas_traffic-resnet18-k2x2-intel-xeon-2026-12-07.json": replicas_traffic,
    "speedup-resnet18-k2-repeats-intel-xeon-2026-12-07.json": speedup_repeats,
    "tta_map-fashion_mnist-resnet18-k2-intel-xeon-2026-12-07.json": tta_map,
    "multihost_tta-powersgd-fashion_mnist-resnet18-k2-1gbit-intel-xeon-2026-12-06.json": multihost_tta_powersgd,
    "time_to_accuracy-fashion_mnist-resnet18-k2-replay-stash-cpu2-2026-11-29.json": time_to_accuracy,
    ("time_to_accuracy-fashion_mnist-resnet18-k2-replay-stash-delay-lr-"
     "intel-xeon-2026-12-06.json"): time_to_accuracy_seeds,
    "finetune-fashion_mnist-resnet18-k4-cpu2-2026-11-29.json": finetune,
    "finetune-fashion_mnist-resnet18-k4-seeds-amd-epyc-2026-12-06.json": finetune_seeds,
    "finetune-fashion_mnist-resnet18-k4-equal-budget-intel-xeon-2026-12-06.json": finetune_equal_budget,
    "demo-intel-xeon-2026-12-02.txt": demo_output,
    "demo-amd-epyc-2026-12-02.txt": demo_output,
    "accuracy_fashion_mnist-resnet18-k4-cpu2-2026-11-29.json": leaderboard_one_seed,
    "accuracy_fashion_mnist-resnet18-k4-seeds-cpu2-2026-12-02.json": leaderboard_first_seeds,
    "accuracy_fashion_mnist-resnet18-k4-delay-lr-pilot-cpu2-2026-12-05.json": delay_lr_pilot,
    "accuracy_fashion_mnist-resnet18-k4-seeds-amd-epyc-2026-12-05.json": leaderboard_delay_lr,
    "accuracy_fashion_mnist-resnet18-k4-seeds-intel-xeon-2026-12-06.json": leaderboard_xeon,
    "checkpoint_cost-k4-1gbit-2026-12-06.json": checkpoint_cost,
    "error_vs_length-fashion_mnist-resnet10t-k4-3to12-intel-xeon-2026-12-07.json": error_vs_length,
    "error_vs_length-fashion_mnist-resnet10t-k4-bp-local-3to30-2026-12-07.json": error_vs_length,
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_quoted_figure_matches_its_results_file(name):
    path = RESULTS / name
    source = path.read_text()
    figures = SOURCES[name](json.loads(source) if name.endswith(".json") else source)
    problems = []
    for doc, expected in figures.items():
        text = (ROOT / doc).read_text()
        flat = _flat(text)
        problems += [f"{doc} no longer says what {name} says: {f}" for f in expected if _flat(f) not in flat]
        if path.stem not in text:
            problems.append(f"{doc} quotes {name} without naming it")
    assert not problems, "\n".join(problems)


def test_the_check_fails_on_a_changed_figure():
    d = json.loads((RESULTS / "multihost-resnet18-k2-cpu2-2026-12-02.json").read_text())
    d["results"]["1gbit"]["ddp"]["samples_per_s"] *= 1.01  # a figure edited by 1%
    flat = _flat((ROOT / HISTORY).read_text())
    assert any(_flat(f) not in flat for f in multihost(d)[HISTORY])


def test_the_xeon_table_reproduces_the_first_three_seed_table():
    # benchmarks/README.md says backprop, the paper's heads and plain stashing gave the 2026-12-02 table's figures to
    # the last digit at a later commit on the same CPU kind: every epoch's errors, run by run
    first = json.loads((RESULTS / "accuracy_fashion_mnist-resnet18-k4-seeds-cpu2-2026-12-02.json").read_text())
    later = json.loads((RESULTS / "accuracy_fashion_mnist-resnet18-k4-seeds-intel-xeon-2026-12-06.json").read_text())
    assert first["runs"]["bp"][0]["commit"] != later["runs"]["bp"][0]["commit"]
    for name in ("bp", "local", "replay_stash"):
        for a, b in zip(first["runs"][name], later["runs"][name], strict=True):
            assert (a["seed"], a["val_error"], a["test_error"]) == (b["seed"], b["val_error"], b["test_error"]), name


def _named_results(text: str) -> list[str]:
    """Every results path a document names (``results/...`` from benchmarks/, ``benchmarks/results/...`` from the
    root), its ``{json,md,png}`` braces expanded and its elided ``...`` parts as wildcards."""
    def expand(path: str) -> list[str]:
        brace = re.search(r"\{([^}]*)\}", path)
        if not brace:
            return [path.replace("...", "*")]
        return [p for alt in brace.group(1).split(",")
                for p in expand(path[:brace.start()] + alt + path[brace.end():])]

    named = (m.group(0).rstrip(".,") for m in re.finditer(r"(?<![\w/])(?:benchmarks/)?results/[\w.\-{},/*]+", text))
    return [p if p.startswith("benchmarks/") else f"benchmarks/{p}" for raw in named for p in expand(raw)]


def test_every_results_file_the_documents_name_exists():
    # a results file or run folder renamed or removed leaves no document pointing at nothing (the changelog keeps
    # the names things had when they happened)
    docs = [README, BENCH, HISTORY, *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")))]
    named = {doc: _named_results((ROOT / doc).read_text()) for doc in docs}
    assert sum(map(len, named.values())) > 100  # the documents do name their results, and the pattern finds them
    missing = [f"{doc}: {p}" for doc, paths in named.items() for p in paths if not any(ROOT.glob(p))]
    assert not missing, "\n".join(missing)
    assert _named_results("see results/a-{json,png}, results/b-...-1gbit.md.") == [
        "benchmarks/results/a-json", "benchmarks/results/a-png", "benchmarks/results/b-*-1gbit.md"]
