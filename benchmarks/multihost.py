"""Two hosts joined by a shaped link (scripts/hosts.py): DDP, backprop pipelines and lfnnify's pipelines.

Two hosts of one core each (network and PID namespaces on this machine, lfnnify/app/testbed.py), a real
``torchrun --nnodes 2`` on each, at each link rate (unshaped, 10 Gbit/s, 1 Gbit/s, 100 Mbit/s; tc's token bucket):

- ``ddp``: data-parallel backprop (DistributedDataParallel), one replica per host, half the global batch each;
- ``ddp_fp16``, ``ddp_powersgd_r{1,2,4}``, ``local_sgd_h{4,16}``: the same with what DDP's users turn on for a slow
  link: the fp16 compression hook; PowerSGD at rank 1, 2 or 4 (error feedback and warm start, compressing from step
  2, within the warm-up; one gradient bucket, see benchmarks.workers.speedup.register_hook); local SGD averaging the
  parameters every 4 or 16 steps (``post_localSGD_hook`` and ``PeriodicModelAverager``). These change what the
  model learns; their accuracy is measured by the time-to-accuracy benchmark, not here;
- ``bp_gpipe``, ``bp_1f1b``: backprop pipelined with torch.distributed.pipelining, one block per host;
- ``lfnn_pipeline``: LFNN-ℓ with lfnnify.PipelineTrainer, one block per host;
- ``replay_pipeline``: delayed end-to-end gradients with weight stashing, one block per host;
- ``*_bf16``, ``*_int8``: the same two, sending activations (and replay's gradients) in bfloat16, or as int8 with a
  float32 scale per channel (``send_dtype``; lfnnify.pipeline.quantize).
Every pipeline overlaps its sends with compute (asynchronous, at most ``max_in_flight=2`` pending), but for
``*_no_overlap``: each step waits until its sends have completed (``overlap_sends=False``), to measure what the overlap
buys; and for ``*_ahead``: each block posts the receive of its next batch before computing this one
(``receive_ahead=True``), so that the batch crosses while the block computes.

The same model (timm resnet18, CIFAR variant, 32 px), global batch (64), synthetic batch, and cut for every method:
the K=2 split balanced by *measured time* on this machine (``lfnnify.plan(balance="time")`` at the training batch,
one thread), since FLOPs misjudge what a block costs here. Each method runs ``--repeats`` times (3 by default), each
a fresh launch; a run's samples/s are its timed steps' samples over their seconds (after warm-up), and a cell gives
the median of the runs with their range. "A beats B" is said only where the ranges do not overlap. Next to it, the
bytes that really crossed the link during the timed steps (the interfaces' counters: each host's received bytes over
its own steps, where they are complete; what each host sent is kept too), against what each method should send. A 4-host
run would need 4 cores of their own; this machine has 2, so K=4 is projected from
per-block times and bytes measured in one process (``--projection-k4``).

Reproduce:  python -m benchmarks.multihost --out benchmarks/results
Quick look: python -m benchmarks.multihost --rates 1gbit --methods ddp lfnn_pipeline --steps 4 --warmup 2 --out /tmp/mh
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lfnnify.app import Hosts, parse_rate  # noqa: E402

from .common import (  # noqa: E402
    RESULTS,
    commit,
    environment,
    hardware_tag,
    hosts_ready,
    ranges_apart,
    refuse_bad_arguments,
    time_balanced_plan,
    write_json,
)

WORKER = ["-m", "benchmarks.workers.speedup"]
RATES = ["unshaped", "10gbit", "1gbit", "100mbit", "10mbit"]
SENT_AS = ("bf16", "int8")  # the pipelines' send_dtype variants (float32 without a suffix)
METHODS = {  # name -> worker arguments
    "ddp": ["--method", "ddp"],
    "ddp_fp16": ["--method", "ddp", "--hook", "fp16"],
    **{f"ddp_powersgd_r{r}": ["--method", "ddp", "--hook", "powersgd", "--powersgd-rank", str(r)] for r in (1, 2, 4)},
    **{f"local_sgd_h{h}": ["--method", "ddp", "--hook", "local_sgd", "--local-sgd-every", str(h)] for h in (4, 16)},
    "bp_gpipe": ["--method", "bp_pipelined", "--schedule", "gpipe", "--microbatches", "4"],
    "bp_1f1b": ["--method", "bp_pipelined", "--schedule", "1f1b", "--microbatches", "4"],
    # every exact schedule torch 2.14 ships, at 2, 4 and 8 micro-batches; the interleaved and V schedules hold two
    # stages per host, so the model is cut in four (args.cuts4, chosen like the two-stage split)
    # (DualPipeV needs at least as many micro-batches as stages: 4 and 8 only)
    **{f"bp_{s}_m{m}": ["--method", "bp_pipelined", "--schedule", s, "--microbatches", str(m)]
       for s in ("gpipe", "1f1b", "interleaved1f1b", "interleaved_zb", "zbv", "dualpipev") for m in (2, 4, 8)
       if not (s == "dualpipev" and m < 4)},
    "fsdp": ["--method", "fsdp"],  # backprop sharded over the hosts (FSDP2): exact gradients, 1/2 of the weights each
    "lfnn_pipeline": ["--method", "lfnn_pipeline"],
    "replay_pipeline": ["--method", "lfnn_pipeline", "--mode", "replay", "--stash"],
    # the same, activations (and replay's gradients) sent in bfloat16, or in int8 with a scale per channel
    **{f"{m}_{d}": [*args, "--send-dtype", d] for d in SENT_AS for m, args in
       (("lfnn_pipeline", ["--method", "lfnn_pipeline"]),
        ("replay_pipeline", ["--method", "lfnn_pipeline", "--mode", "replay", "--stash"]))},
    # the same two, each step waiting until its sends have completed: what overlapping sends with compute buys
    "lfnn_pipeline_no_overlap": ["--method", "lfnn_pipeline", "--no-overlap"],
    "replay_pipeline_no_overlap": ["--method", "lfnn_pipeline", "--mode", "replay", "--stash", "--no-overlap"],
    # the same two, each block posting the receive of its next batch before computing this one (receive_ahead)
    "lfnn_pipeline_ahead": ["--method", "lfnn_pipeline", "--receive-ahead"],
    "replay_pipeline_ahead": ["--method", "lfnn_pipeline", "--mode", "replay", "--stash", "--receive-ahead"],
}
DDP_VARIANTS = [m for m in METHODS if m.startswith(("ddp", "local_sgd"))]
BEST_DDP = "best_ddp"  # in TARGETS: the DDP variant with the most samples/s at that rate
EXACT = [m for m in METHODS if m.startswith("bp_") or m == "fsdp"]  # backprop split over the hosts: exact gradients
BEST_EXACT = "best_exact"  # in TARGETS: the exact method (schedule and micro-batch count) with the most samples/s
TARGETS = {  # (method, against, rate) -> the ratio of samples/s the project aims for
    ("lfnn_pipeline", BEST_DDP, "100mbit"): 1.3, ("replay_pipeline", BEST_DDP, "100mbit"): 1.0,
    ("lfnn_pipeline", "ddp", "100mbit"): 5.0, ("replay_pipeline", "ddp", "100mbit"): 4.0,
    ("lfnn_pipeline", "ddp", "1gbit"): 1.8, ("replay_pipeline", "ddp", "1gbit"): 1.3,
    ("lfnn_pipeline", "ddp", "unshaped"): 1.2,
    **{("lfnn_pipeline", "bp_1f1b", r): 1.5 for r in RATES},
    **{(m, BEST_EXACT, r): 1.5 for m in ("lfnn_pipeline", "replay_pipeline") for r in RATES},
}
# and, without a target, each pipeline (bf16 and int8 sends included) against the best DDP variant at every rate
TARGETS = {**{(f"{m}{d}", BEST_DDP, r): None for m in ("lfnn_pipeline", "replay_pipeline")
              for d in ("", *(f"_{d}" for d in SENT_AS)) for r in RATES},
           **{(m, f"{m}_no_overlap", r): None for m in ("lfnn_pipeline", "replay_pipeline") for r in RATES},
           **{(f"{m}_ahead", against, r): None for m in ("lfnn_pipeline", "replay_pipeline")
              for against in (m, BEST_DDP) for r in RATES}, **TARGETS}


FOUR_STAGES = ("interleaved1f1b", "interleaved_zb", "zbv", "dualpipev")


def measured_time_cuts(args, blocks: int = 2) -> tuple[list[str], str]:
    plan = time_balanced_plan(args.model, batch=args.batch, example_shape=(3, args.size, args.size), link="1gbit",
                              blocks=blocks, cifar=True)
    return plan.cuts, str(plan)


def four_stages(name: str) -> bool:
    """Whether method ``name`` holds two stages per host (the model cut in four, at ``args.cuts4``)."""
    return any(name.startswith(f"bp_{s}_") for s in FOUR_STAGES)


def run_repeated(hosts: Hosts, name: str, args, port: int) -> dict:
    """``--repeats`` runs of ``name``, each a fresh launch: every run's figures, and the cell's median and range."""
    return cell([run_method(hosts, name, args, port + 2 * i) for i in range(args.repeats)], args.batch)


def run_figures(run: dict, batch: int) -> dict:
    """A run's samples/s, from its raw step times: the global batch times the timed steps over their seconds (not
    the median step: local SGD's averaging steps are the slow ones, one in H), and the bytes that crossed the link:
    each host's received bytes over its own timed steps (see benchmarks.workers.speedup._stamp), headers and all, and
    the payload in them: those bytes less each packet's headers (runs measured before packets were counted: none)."""
    steps = run["step_s"]
    hosts = run.get("link_bytes_per_step", [])
    received = [h["received"] for h in hosts]
    figures = {**run, "step_s_median": statistics.median(steps), "samples_per_s": batch * len(steps) / sum(steps),
               "measured_bytes_per_step": sum(b for b in received if b is not None)}
    if hosts and all(h.get("received_packets") is not None for h in hosts):
        figures["measured_payload_bytes_per_step"] = sum(h["received"] - h["received_packets"] * h["header_bytes"]
                                                         for h in hosts)
    return figures


def cell(runs: list[dict], batch: int) -> dict:
    """One table cell from its runs: the median of the runs' samples/s, and their range."""
    good = [run_figures(r, batch) for r in runs if not r.get("failed")]
    if len(good) < len(runs) or not good:
        return {"failed": True, "failed_runs": len(runs) - len(good), "runs": runs}
    rates = sorted(r["samples_per_s"] for r in good)
    received = [r["measured_bytes_per_step"] for r in good]
    figures = {"runs": good, "samples_per_s": statistics.median(rates), "samples_per_s_range": [rates[0], rates[-1]],
               "measured_bytes_per_step": statistics.median(received), "hook": good[0].get("hook")}
    if all("measured_payload_bytes_per_step" in r for r in good):
        figures["measured_payload_bytes_per_step"] = statistics.median(r["measured_payload_bytes_per_step"]
                                                                       for r in good)
    return figures


def with_expected(r: dict, expected: int) -> dict:
    """Cell ``r`` with what its method should send per step, and what the link counted over that: all its bytes
    (TCP/IP headers and acknowledgements too, which weigh most where a method sends little) and, where its packets
    were counted, its payload alone."""
    r["expected_bytes_per_step"] = expected
    r["bytes_measured_over_expected"] = r["measured_bytes_per_step"] / expected
    if "measured_payload_bytes_per_step" in r:
        r["payload_measured_over_expected"] = r["measured_payload_bytes_per_step"] / expected
    return r


def run_method(hosts: Hosts, name: str, args, port: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        results = []
        for attempt in range(2):  # a port taken by another run is the one failure worth a second try
            procs = []
            for i in range(2):
                script = [*WORKER, *METHODS[name], "--model", args.model, "--cifar", "--size", str(args.size),
                          "--batch", str(args.batch), "--blocks", "2", "--threads", "1", "--cuts",
                          *(args.cuts4 if four_stages(name) else args.cuts),
                          "--warmup", str(args.warmup), "--steps", str(args.steps), "--iface", hosts.device(i),
                          "--out", str(out)]
                log = open(Path(tmp) / f"host{i}.log", "w")  # noqa: SIM115 - closed below
                procs.append((hosts.popen(i, hosts.torchrun(i, script, port=port + attempt), stdout=log,
                                          stderr=log), log))
            deadline = time.monotonic() + args.timeout
            for p, log in procs:
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - a stuck run is killed and reported, the next one runs
                    p.kill()
                log.close()
            codes = [p.returncode for p, _ in procs]
            written = hosts.path(1, out)  # the last rank writes the result, on its own host's disk
            if codes == [0, 0] and written.exists():
                results.append(json.loads(written.read_text()))
                break
            tail = (Path(tmp) / "host0.log").read_text()[-1500:] + (Path(tmp) / "host1.log").read_text()[-1500:]
            print(f"  {name}: failed (exit {codes}), attempt {attempt + 1}\n{tail}", flush=True)
        if not results:
            return {"failed": True}
    return results[0]


def four_stage_activations(model, example, cuts4: list[str] | None, batch: int) -> list[int] | None:
    """The activation bytes at each cut of the four-stage split (``cuts4``), at the training batch."""
    if not cuts4:
        return None
    import lfnnify

    plan = lfnnify.plan(model, cuts=cuts4, example_input=example, batch_size=batch)
    return [b - batch * 8 for b in plan.traffic.cut_bytes]  # without the labels: the schedules send none


def expected_bytes_of(names: list[str], model, example, *, cuts: list[str], cuts4: list[str] | None, batch: int):
    """What each method of ``names`` should send per step (``expected_bytes``) for ``model`` cut at ``cuts`` (and
    ``cuts4`` for the four-stage schedules) at the global ``batch``: ({name: bytes}, the float32 plan, the cut's
    activation bytes per send dtype)."""
    import lfnnify

    from .workers.speedup import SEND_DTYPES

    plans = {d: lfnnify.plan(model, cuts=cuts, example_input=example, batch_size=batch, send_dtype=SEND_DTYPES[d])
             for d in ("fp32", *SENT_AS)}  # what each pipeline sends
    plan, labels = plans["fp32"], batch * 8
    if not plan.traffic.powersgd_bytes or any(f"local_sgd_h{h}" in METHODS and h not in plan.traffic.local_sgd_bytes
                                              for h in (4, 16)):
        raise SystemExit("multihost.py: plan() did not report DDP's hooks; this benchmark needs them")
    activation = {d: each.traffic.cut_bytes[0] - labels for d, each in plans.items()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    activations4 = four_stage_activations(model, example, cuts4, batch)
    return ({name: expected_bytes(name, activation, labels, plan.traffic, buffers, activations4) for name in names},
            plan, activation)


def expected_bytes(name: str, activation: dict[str, int], labels: int, traffic, buffers: int,
                   activations4: list[int] | None = None) -> int:
    """What the two hosts together should send per step (payload only; TCP/IP adds its headers), from
    ``plan().traffic``; every DDP variant also broadcasts the first host's ``buffers`` (BatchNorm statistics) at
    each forward. ``activation``: the cut's activation bytes per step as each pipeline sends it (fp32, bf16, int8
    with its scales). A four-stage schedule sends each cut's activation and its gradient across the link wherever the
    two stages it joins sit on different hosts (``activations4``: the four-stage split's activation bytes)."""
    if four_stages(name):
        from .workers.speedup import stages_of

        schedule = METHODS[name][METHODS[name].index("--schedule") + 1]
        host = {stage: rank for rank in range(2) for stage in stages_of(schedule, rank, 2)}
        return sum(2 * a for c, a in enumerate(activations4) if host[c] != host[c + 1])
    if name.endswith(("_no_overlap", "_ahead")):  # the same messages, timed otherwise
        base = name.removesuffix("_no_overlap").removesuffix("_ahead")
        return expected_bytes(base, activation, labels, traffic, buffers)
    if name.endswith("_deltas"):  # int8 deltas: int8's bytes, and each sample's index (8 bytes) with it
        return expected_bytes(name.removesuffix("_deltas"), activation, labels, traffic, buffers) + labels
    sent_as = next((d for d in SENT_AS if name.endswith(f"_{d}")), "fp32")
    activation = activation.get(sent_as, 0)
    name = name.removesuffix(f"_{sent_as}")
    if name == "ddp":
        return 2 * traffic.ddp_bytes + buffers  # a ring all-reduce of two: each host sends the whole gradient once
    if name == "ddp_fp16":
        return 2 * traffic.ddp_fp16_bytes + buffers
    if name.startswith("ddp_powersgd_r"):
        return 2 * traffic.powersgd_bytes[int(name.removeprefix("ddp_powersgd_r"))] + buffers
    if name.startswith("local_sgd_h"):
        return 2 * traffic.local_sgd_bytes[int(name.removeprefix("local_sgd_h"))] + buffers
    if name == "fsdp":  # per step the weights are all-gathered twice (forward, and again in the backward: each host
        # sends its half each time) and the gradients reduce-scattered; gloo's reduce_scatter_tensor moves what an
        # all-reduce moves (each host sends the whole gradient: measured on loopback, 2.0x the tensor's bytes for two
        # processes, as for all_reduce), where a ring reduce-scatter (NCCL) would send half of it
        return 2 * traffic.gradient_bytes + 2 * traffic.gradient_bytes
    if name == "lfnn_pipeline":
        return activation + labels
    return 2 * activation + (labels if name == "replay_pipeline" else 0)  # the gradient comes back


def project_k4(args) -> dict:
    """K=4 on 4 hosts, projected: per-block step times measured in one process, transfers at each rate."""
    import subprocess

    import torch

    import lfnnify
    from lfnnify.app import create_model

    torch.set_num_threads(1)
    model = create_model(args.model, num_classes=10, cifar=True)
    plan = lfnnify.plan(model, blocks=4, balance="time", example_input=torch.randn(args.batch, 3, args.size, args.size))
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--model", args.model, "--cifar", "--size", str(args.size), "--batch", str(args.batch),
                  "--blocks", "4", "--cuts", *plan.cuts, "--threads", "1", "--warmup", "2", "--steps", "5"]
        raw = {}
        for method in ("projection", "bp_shard"):
            out = Path(tmp) / f"{method}.json"
            subprocess.run([sys.executable, *WORKER, "--method", method, *common, "--out", str(out)], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            raw[method] = json.loads(out.read_text())
    p, shard = raw["projection"], statistics.median(raw["bp_shard"]["step_s"])
    acts = list(p["activation_bytes"]) + [0]
    rows = {}
    for rate in RATES:
        bits = parse_rate(None if rate == "unshaped" else rate) or args.unshaped_gbit * 1e9
        per_byte = 8 / bits
        rows[rate] = {
            "lfnn_pipeline": args.batch / max(t + a * per_byte for t, a in zip(p["block_lfnn_step_s"], acts)),
            "replay_pipeline": args.batch / max(t + a * per_byte for t, a in zip(p["block_replay_step_s"], acts)),
            "ddp": args.batch / (shard + 2 * 3 / 4 * p["gradient_bytes"] * per_byte),
        }
    return {"cuts": plan.cuts, "samples_per_s": rows, "raw": p, "bp_shard_step_s": shard,
            "note": f"pipelines at their slowest block (its whole step plus sending its output, no overlap); DDP one "
                    f"quarter of the batch plus a ring all-reduce (no overlap); unshaped taken as "
                    f"{args.unshaped_gbit} Gbit/s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", nargs="+", default=RATES, choices=RATES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method, each a fresh launch")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one method may take")
    parser.add_argument("--unshaped-gbit", type=float, default=10.0, help="the unshaped link's rate in projections")
    parser.add_argument("--no-projection", action="store_true", help="skip the K=4 projection")
    parser.add_argument("--cuts", nargs="+", default=None,
                        help="the two-block split (default: balanced by time, measured here, as every earlier run)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summarize", type=Path, metavar="JSON",
                        help="measure nothing: remake the table, verdicts and picture of a kept result from its raw "
                             "step times (with this commit's summary), as --name in --out")
    args = parser.parse_args()
    if args.summarize:
        summarize(args)
        return
    refuse_bad_arguments("multihost.py", args, counts=("steps", "warmup", "batch", "size", "repeats"),
                         positives=("unshaped_gbit", "timeout"))
    env_before = hosts_ready("multihost.py")
    cuts_given = bool(args.cuts)
    if cuts_given:  # the split of earlier runs, so that their cells and these compare
        print(f"the split given: {args.cuts}", flush=True)
    else:
        args.cuts, plan_text = measured_time_cuts(args)
        print(plan_text, flush=True)
    args.cuts4 = None
    if any(four_stages(m) for m in args.methods):
        args.cuts4, plan4 = measured_time_cuts(args, blocks=4)
        print(plan4, flush=True)
    import torch

    from lfnnify.app import create_model

    model = create_model(args.model, num_classes=10, cifar=True)
    example = torch.zeros(1, 3, args.size, args.size)
    expected, plan, activation = expected_bytes_of(args.methods, model, example, cuts=args.cuts, cuts4=args.cuts4,
                                                   batch=args.batch)
    gradients = plan.traffic.gradient_bytes
    results: dict[str, dict] = {}
    port = 29600 - 2 * args.repeats
    with Hosts(2) as hosts:
        for rate in args.rates:
            hosts.shape(None if rate == "unshaped" else rate)
            results[rate] = {}
            for name in args.methods:
                port += 2 * args.repeats
                r = run_repeated(hosts, name, args, port)
                if not r.get("failed"):
                    with_expected(r, expected[name])
                    low, high = r["samples_per_s_range"]
                    print(f"  {rate:>8} {name:<20} {r['samples_per_s']:7.1f} samples/s ({low:.1f}-{high:.1f}, "
                          f"{args.repeats} runs)  sent {r['measured_bytes_per_step'] / 1e6:7.2f} MB/step (expected "
                          f"{r['expected_bytes_per_step'] / 1e6:7.2f})", flush=True)
                results[rate][name] = r
        notes = hosts.notes
    ratios, verdicts = verdicts_of(results)
    projection = None if args.no_projection else project_k4(args)
    payload = {"experiment": "multihost", "settings": {k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(args).items()},
               "cuts": args.cuts, "cuts4": args.cuts4,
               "cut_choice": ("given with --cuts" if cuts_given else
                              "balance='time' at the training batch, one thread, on this machine"),
               "bytes": {"activation": activation["fp32"], "activation_sent_as": activation,
                         "labels": args.batch * 8, "gradients": gradients,
                         "buffers": sum(b.numel() * b.element_size() for b in model.buffers())},
               "results": results, "ratios": ratios, "verdicts": verdicts, "projection_k4": projection,
               "testbed_notes": notes, "env_before": env_before, "env": environment(1),
               "command": " ".join(["python -m benchmarks.multihost", *sys.argv[1:]])}
    stem = args.name or f"multihost-{args.model}-k2-{hardware_tag()}-{env_before['date'][:10]}"
    publish(payload, args.out, stem)


def publish(payload: dict, out: Path, stem: str) -> None:
    path = write_json(out / f"{stem}.json", payload)
    chart(payload, out / f"{stem}.png")
    (out / f"{stem}.md").write_text(markdown(payload) + "\n")
    print("\n".join(payload["verdicts"]) + f"\nwrote {path}")


def summarize(args) -> None:
    """A kept result's cells, verdicts, table and picture remade from its raw runs, measuring nothing."""
    if not args.name:
        raise SystemExit("multihost.py: --summarize needs --name (the remade files' name; the kept one stays)")
    kept = json.loads(args.summarize.read_text())
    batch = kept["settings"]["batch"]
    activations4 = None
    if kept.get("cuts4"):  # four-stage schedules' bytes, from their own split
        import torch

        from lfnnify.app import create_model

        size = kept["settings"]["size"]
        activations4 = four_stage_activations(create_model(kept["settings"]["model"], num_classes=10, cifar=True),
                                              torch.zeros(1, 3, size, size), kept["cuts4"], batch)
    results = {}
    for rate, row in kept["results"].items():
        results[rate] = {}
        for name, old in row.items():
            new = cell(old.get("runs", []), batch)
            if "expected_bytes_per_step" in old:  # remade where it comes from the model alone
                if four_stages(name):
                    old["expected_bytes_per_step"] = expected_bytes(name, 0, 0, None, 0, activations4)
                elif name == "fsdp":
                    weights = argparse.Namespace(gradient_bytes=kept["bytes"]["gradients"])
                    old["expected_bytes_per_step"] = expected_bytes(name, 0, 0, weights, 0)
                new["expected_bytes_per_step"] = old["expected_bytes_per_step"]
                if not new.get("failed"):
                    with_expected(new, old["expected_bytes_per_step"])
            results[rate][name] = new
    ratios, verdicts = verdicts_of(results)
    payload = {**kept, "results": results, "ratios": ratios, "verdicts": verdicts,
               "summarized": {"from": str(args.summarize), "measured_at": kept["env"].get("commit"),
                              "summary_by": commit(), "command": " ".join(["python -m benchmarks.multihost",
                                                                           *sys.argv[1:]])}}
    publish(payload, args.out, args.name)


def best_ddp(row: dict) -> str | None:
    """The DDP variant with the most samples/s in ``row`` (one rate's results)."""
    return _best(row, DDP_VARIANTS)


def best_exact(row: dict) -> str | None:
    """The exact backprop schedule (with its micro-batch count) with the most samples/s in ``row``."""
    return _best(row, EXACT)


def _best(row: dict, among: list[str]) -> str | None:
    measured = [m for m in among if "samples_per_s" in row.get(m, {})]
    return max(measured, key=lambda m: row[m]["samples_per_s"], default=None)


def verdicts_of(results: dict) -> tuple[dict, list[str]]:
    """Each target's ratio of medians, met or missed, and whether the method's range lies wholly above (or below)
    the other's: only then does one beat the other."""
    ratios, verdicts = {}, []
    for (method, against, rate), target in TARGETS.items():
        row = results.get(rate, {})
        pick = {BEST_DDP: best_ddp, BEST_EXACT: best_exact}.get(against)
        other = pick(row) if pick else against
        if other is None or "samples_per_s" not in row.get(method, {}) or "samples_per_s" not in row.get(other, {}):
            continue
        a, b = row[method], row[other]
        value = a["samples_per_s"] / b["samples_per_s"]
        label = f"{method}/{against}@{rate}"
        ratios[label] = value
        if min(len(a["runs"]), len(b["runs"])) < 3:
            order = "fewer than 3 runs each: too few to say which is faster"
        elif ranges_apart(a["samples_per_s_range"], b["samples_per_s_range"]):
            faster, slower = (method, other) if a["samples_per_s"] > b["samples_per_s"] else (other, method)
            order = f"{faster} beats {slower} (ranges apart)"
        else:
            order = "ranges overlap: neither beats the other"
        among = DDP_VARIANTS if against == BEST_DDP else EXACT
        count = sum("samples_per_s" in row.get(m, {}) for m in among)
        which = {BEST_DDP: f" (the best of the {count} DDP variants measured here: {other})",
                 BEST_EXACT: f" (the best of the {count} exact methods measured here: {other})"}.get(against, "")
        aim = "no target" if target is None else f"target {target}x: {'met' if value >= target else 'MISSED'}"
        verdicts.append(f"{method} / {against}{which} at {rate}: {value:.2f}x, {order} ({aim})")
    return ratios, verdicts


def markdown(payload: dict) -> str:
    rates = list(payload["results"])
    methods = sorted({m for row in payload["results"].values() for m in row}, key=list(METHODS).index)
    lines = [f"2 hosts x 1 core ({payload['env']['device']}), timm resnet18 (CIFAR variant, 32 px), batch "
             f"{payload['settings']['batch']}, cut {payload['cuts']} (measured time); samples/s, the median of "
             f"{payload['settings']['repeats']} runs (their range), and MB sent per step measured / expected", "",
             "| method | " + " | ".join(rates) + " |", "|---|" + "---|" * len(rates)]
    for m in methods:
        cells = []
        for rate in rates:
            r = payload["results"][rate].get(m, {})
            if not r or r.get("failed"):
                cells.append("failed" if r else "–")
                continue
            sent, expected = r["measured_bytes_per_step"] / 1e6, r["expected_bytes_per_step"] / 1e6
            low, high = r["samples_per_s_range"]
            cells.append(f"{r['samples_per_s']:.1f} ({low:.1f}–{high:.1f}; {sent:.2f} / {expected:.2f} MB)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {v}" for v in payload["verdicts"]])


def chart(payload: dict, path: Path) -> None:
    from lfnnify.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rates = [r for r in reversed(RATES) if r in payload["results"]]
    for m in METHODS:
        ys = [payload["results"][r].get(m, {}).get("samples_per_s") for r in rates]
        if any(y is not None for y in ys):
            ax.plot(range(len(rates)), [y if y is not None else float("nan") for y in ys], marker="o", label=m)
    ax.set_xticks(range(len(rates)), rates)
    ax.set_xlabel("link between the two hosts")
    ax.set_ylabel("samples/s (global batch)")
    ax.set_yscale("log")
    ax.set_title(f"2 hosts x 1 core, timm resnet18 32 px, K=2 ({payload['env']['device'][:40]})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
