"""Wall-clock training throughput of LFNN-ℓ against backprop, side by side, on K processes (one per "device").

Methods (same model, split, global batch and synthetic data for all; each in a fresh process, fixed threads;
with --projection-only the one-process methods run one after another in one process, each on a fresh model):
  1. bp_single           plain backprop, one process using all K×T threads
  2. ddp                 data-parallel backprop (DistributedDataParallel): K processes × T threads, each on
                         1/K of the global batch, gradients all-reduced: what a practitioner picks when the
                         model fits on one device
  3. bp_model_parallel   the same K blocks on K processes, run sequentially (the paper's baseline)
  4. bp_gpipe, bp_1f1b   backprop pipelined with torch.distributed.pipelining, M micro-batches
  5. lfnn_pipeline       LFNN-ℓ with lfnnify.PipelineTrainer (block-wise); lfnn_pipeline_fw (filter-wise
                         workers); replay_pipeline (mode="replay": delayed end-to-end gradients)
  6. lfnn_single         LFNN-ℓ with the one-device lfnnify.Trainer (block after block), all threads
Plus a projection: per-block times measured in one process (each covering all a block does in a step)
predict the K-device step of every method, with transfers at --link-gbs GB/s, printed next to the measured
ones so the model of the pipeline is checked. Bytes each method moves per step are reported.

Synthetic data (one fixed batch) keeps the input pipeline out of the timing.

Reproduce:  python -m benchmarks.speedup --quick --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS, environment, hardware_tag, ranges_apart, write_json  # noqa: E402

WORKER = ["-m", "benchmarks.workers.speedup"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(method: str, args, *, nproc: int, threads: int, extra=(), name=None) -> dict:
    """One method in its own process (torchrun's processes when ``nproc`` > 1)."""
    result, launch = _launch([method], args, nproc=nproc, threads=threads, extra=extra)
    return _finish(name or method, method, result, launch, args)


def _run_in_one_process(methods: list[str], args, *, threads: int) -> dict:
    """Several one-process methods one after another in a single process, each on a freshly built model: what a
    one-device session runs, where every process start (imports, CUDA) costs seconds of the device's time."""
    together, launch = _launch(methods, args, nproc=1, threads=threads)
    return {m: _finish(m, m, together["methods"][m], {**launch, "shared_with": methods}, args) for m in methods}


def _launch(methods: list[str], args, *, nproc: int, threads: int, extra=()) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        common = [
            "--method", *methods, "--model", args.model, "--size", str(args.size), "--batch", str(args.batch),
            "--blocks", str(args.blocks), "--threads", str(threads), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--classes", str(args.classes), "--out", str(out), "--cuts", *args.cuts, *extra,
        ]
        if args.cifar:
            common.append("--cifar")
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0",
                   *WORKER, *common]
        else:
            cmd = [sys.executable, *WORKER, *common]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(methods)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
    return result, dict(processes=nproc, threads_per_process=threads, load_before=load_before,
                        load_after=os.getloadavg(), process_wall_s=wall, command=" ".join(cmd[1:]))


def _finish(name: str, method: str, result: dict, launch: dict, args) -> dict:
    """A method's result with how it was launched, its median step and samples/s; printed in one line."""
    result.update(launch)
    if "step_s" in result:
        med = statistics.median(result["step_s"])
        batch = args.batch // args.blocks if method == "bp_shard" else args.batch  # one DDP rank's share
        result.update(step_s_median=med, step_s_min=min(result["step_s"]), step_s_max=max(result["step_s"]),
                      samples_per_s=batch / med)
    print(f"  {name:<20} " + (f"{result['samples_per_s']:8.1f} samples/s  (median step "
                              f"{result['step_s_median'] * 1e3:.0f} ms)"
                               if "samples_per_s" in result else "done"), flush=True)
    return result


def choose_cuts(args) -> list[str]:
    """The K-block split every method uses, chosen once (by measured time by default)."""
    import torch

    import lfnnify
    from lfnnify.app import create_model

    torch.set_num_threads(args.threads)
    model = create_model(args.model, num_classes=args.classes, cifar=args.cifar)
    # time is measured at the training batch size: small batches are dominated by per-op overhead
    plan = lfnnify.plan(model, blocks=args.blocks, balance=args.balance,
                        example_input=torch.randn(args.batch, 3, args.size, args.size))
    print(plan, flush=True)
    return plan.cuts


def measure(args) -> dict:
    k, t = args.blocks, args.threads
    fw = ["--workers", str(args.fw_workers), "--leaders", str(args.fw_leaders)]
    methods = {}
    if args.projection_only:
        print(f"projection only: {args.model} (cifar={args.cifar}), {args.size}px, batch {args.batch}, K={k}, "
              f"one process", flush=True)
        methods = _run_in_one_process(["bp_single", "bp_shard", "lfnn_single", "projection"], args, threads=k * t)
        return {"methods": methods, "projection_raw": methods.pop("projection")}
    print(f"measuring {args.model} (cifar={args.cifar}), {args.size}px, batch {args.batch}, K={k}, "
          f"{t} thread(s) per process, {args.steps} timed steps after {args.warmup} warm-up", flush=True)
    runs = {  # name -> how to run it; every one by default, a few with --methods
        "bp_single": lambda: _run("bp_single", args, nproc=1, threads=k * t),
        "ddp": lambda: _run("ddp", args, nproc=k, threads=t),
        "bp_shard": lambda: _run("bp_shard", args, nproc=1, threads=t),
        "bp_model_parallel": lambda: _run("bp_model_parallel", args, nproc=k, threads=t),
        **{f"bp_{sched}": (lambda sched=sched: {**_run(
            "bp_pipelined", args, nproc=k, threads=t, name=f"bp_{sched}",
            extra=["--schedule", sched, "--microbatches", str(args.microbatches)]), "microbatches": args.microbatches})
           for sched in ("gpipe", "1f1b")},
        "lfnn_pipeline": lambda: _run("lfnn_pipeline", args, nproc=k, threads=t),
        "lfnn_pipeline_fw": lambda: _run("lfnn_pipeline", args, nproc=k, threads=t, extra=fw, name="lfnn_pipeline_fw"),
        "replay_pipeline": lambda: _run("lfnn_pipeline", args, nproc=k, threads=t, extra=["--mode", "replay"],
                                        name="replay_pipeline"),
        "lfnn_single": lambda: _run("lfnn_single", args, nproc=1, threads=k * t),
    }
    for name, run in runs.items():
        if not args.methods or name in args.methods:
            methods[name] = repeated([run() for _ in range(args.repeats)])
    proj = _run("projection", args, nproc=1, threads=t)
    return {"methods": methods, "projection_raw": proj}


def repeated(results: list[dict]) -> dict:
    """A method's runs (each a fresh launch) as one cell: the run with the median samples/s (its step times and stage
    timings), the median over the runs as its samples/s, their range, and every run's figures (``runs``)."""
    if len(results) == 1:
        return results[0]
    order = sorted(results, key=lambda r: r["samples_per_s"])
    cell = dict(order[(len(order) - 1) // 2])
    rates = [r["samples_per_s"] for r in results]
    cell.update(samples_per_s=statistics.median(rates), samples_per_s_range=[min(rates), max(rates)],
                runs=[{k: r[k] for k in ("samples_per_s", "step_s_median", "step_s", "process_wall_s")}
                      for r in results])
    return cell


def _apart(m: dict, a: str, b: str) -> str:
    """Whether the runs of ``a`` and ``b`` say which is faster: only where their ranges of samples/s do not overlap."""
    if a not in m or b not in m or "samples_per_s_range" not in m[a] or "samples_per_s_range" not in m[b]:
        return ""
    apart = ranges_apart(m[a]["samples_per_s_range"], m[b]["samples_per_s_range"])
    return " (ranges apart)" if apart else " (ranges overlap: neither is faster)"


PAPER_SPEEDUP_K4 = {"resnet101": 2.07, "resnet152": 2.21}  # ImageNet, 4 blocks on 4 GPUs (METHOD.md)


def summarise(args, measured: dict) -> dict:
    m = measured["methods"]

    def ratio(a: str, b: str) -> float | None:
        return m[a]["samples_per_s"] / m[b]["samples_per_s"] if a in m and b in m else None

    speedup = {"lfnn_single_vs_bp_single": ratio("lfnn_single", "bp_single")}
    if "lfnn_pipeline" in m:
        piped = [n for n in ("bp_gpipe", "bp_1f1b") if n in m]
        best_pipe = max(piped, key=lambda n: m[n]["samples_per_s"]) if piped else None
        speedup.update({
            "vs_bp_model_parallel": ratio("lfnn_pipeline", "bp_model_parallel"),
            "vs_bp_pipelined": ratio("lfnn_pipeline", best_pipe) if best_pipe else None,
            "vs_bp_pipelined_schedule": best_pipe.removeprefix("bp_") if best_pipe else None,
            "vs_bp_single": ratio("lfnn_pipeline", "bp_single"),
            "vs_ddp": ratio("lfnn_pipeline", "ddp"),
            "replay_vs_ddp": ratio("replay_pipeline", "ddp"),
            "replay_vs_bp_single": ratio("replay_pipeline", "bp_single"),
            "filter_wise_vs_bp_model_parallel": ratio("lfnn_pipeline_fw", "bp_model_parallel"),
        })
    projection = project(args, measured)
    projection["measured_speedup_vs_bp_model_parallel"] = speedup.get("vs_bp_model_parallel")
    return {"speedup": speedup, "projection": projection, "bytes_per_step": bytes_moved(args, measured)}


def bytes_moved(args, measured: dict) -> dict:
    """Bytes every method sends per training step, over all links together (the global batch)."""
    p, k = measured["projection_raw"], args.blocks
    acts, grads = sum(p["activation_bytes"]), p["gradient_bytes"]
    ring = 2 * (k - 1) / k * grads * k  # ring all-reduce: each of K ranks sends 2(K-1)/K of the gradients
    return {"lfnn_pipeline": acts, "replay_pipeline": 2 * acts, "bp_model_parallel": 2 * acts,
            "bp_pipelined": 2 * acts, "ddp": ring, "activation_bytes_per_cut": p["activation_bytes"],
            "gradient_bytes": grads}


def project(args, measured: dict) -> dict:
    """K-device step times predicted from one process's per-block times plus transfers at ``args.link_gbs``.

    Pipelines run at their slowest stage (its compute plus what it sends); model-parallel BP runs the blocks
    one after another; DDP is one process's step on 1/K of the batch plus a ring all-reduce of the gradients,
    with no overlap between the two (an upper bound: DDP overlaps part of it with the backward).
    """
    p, m, k = measured["projection_raw"], measured["methods"], args.blocks
    bw = args.link_gbs * 1e9
    acts = list(p["activation_bytes"]) + [0]
    lfnn = max(t + a / bw for t, a in zip(p["block_lfnn_step_s"], acts))
    replay = max(t + 2 * a / bw for t, a in zip(p["block_replay_step_s"], acts))
    bp_mp = sum(p["block_fwd_bwd_s"]) + 2 * sum(acts) / bw
    ddp = m["bp_shard"]["step_s_median"] + 2 * (k - 1) / k * p["gradient_bytes"] / bw if "bp_shard" in m else None
    one = m["bp_single"]["step_s_median"] if "bp_single" in m else None
    return {
        "block_fwd_bwd_s": p["block_fwd_bwd_s"],
        "block_lfnn_step_s": p["block_lfnn_step_s"],
        "block_replay_step_s": p["block_replay_step_s"],
        "activation_bytes": p["activation_bytes"],
        "gradient_bytes": p["gradient_bytes"],
        "block_peak_bytes": p.get("block_peak_bytes"),
        "link_gbs": args.link_gbs,
        "predicted_step_s": {"lfnn_pipeline": lfnn, "replay_pipeline": replay, "bp_model_parallel": bp_mp,
                             "ddp": ddp, "bp_single": one},
        "predicted_bp_model_parallel_step_s": bp_mp,
        "predicted_lfnn_pipeline_step_s": lfnn,
        "predicted_speedup_vs_bp_model_parallel": bp_mp / lfnn,
        "predicted_speedup_vs_bp_single": one / lfnn if one else None,
        "predicted_speedup_vs_ddp": ddp / lfnn if ddp else None,
        "predicted_replay_speedup_vs_bp_single": one / replay if one else None,
        "predicted_replay_speedup_vs_ddp": ddp / replay if ddp else None,
        "paper_speedup_k4": PAPER_SPEEDUP_K4.get(args.model) if args.blocks == 4 and not args.cifar else None,
        "note": "per-block times cover everything a block does in a step (LFNN-ℓ: forward, head, backward; replay: "
                "forward without a graph, recompute, backward); transfers at link_gbs GB/s per direction",
    }


def _x(value) -> str:
    return f"{value:.2f}×" if value is not None else "– (not measured)"


def _ms(value) -> str:
    return f"{value * 1e3:.1f}" if value is not None else "–"


def markdown(payload: dict) -> str:
    m, s, p, b = payload["methods"], payload["speedup"], payload["projection"], payload["bytes_per_step"]
    cfg = payload["settings"]
    lines = [
        f"# Speed-up, {cfg['model']} ({cfg['size']}px, batch {cfg['batch']}), K={cfg['blocks']}, "
        f"{payload['env']['device']}, {payload['env']['date'][:10]}",
        "",
        f"Synthetic data; {cfg['threads']} thread(s) per process; median of {cfg['steps']} steps after "
        f"{cfg['warmup']} warm-up" + (f"; samples/s: the median of {cfg['repeats']} runs, each a fresh launch (their "
                                       f"range), the step times of the median run"
                                       if cfg.get("repeats", 1) > 1 else "") + f". Commit {payload['env']['commit']}.",
        "",
        "| method | processes | samples/s | median step (ms) | min–max (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, r in m.items():
        spread = (f" ({r['samples_per_s_range'][0]:.1f}–{r['samples_per_s_range'][1]:.1f})"
                  if "samples_per_s_range" in r else "")
        lines.append(f"| {name} | {r['processes']}×{r['threads_per_process']}t | {r['samples_per_s']:.1f}{spread} | "
                     f"{r['step_s_median'] * 1e3:.0f} | {r['step_s_min'] * 1e3:.0f}–{r['step_s_max'] * 1e3:.0f} |")
    k, gbs = cfg["blocks"], p["link_gbs"]
    pred = p["predicted_step_s"]
    paper = p.get("paper_speedup_k4")
    lines += [
        "",
        f"Projected {k}-device step from one process's per-block times, transfers at {gbs:g} GB/s per direction "
        f"(DDP: its all-reduce not overlapped with the backward, an upper bound):",
        "",
        "| method | projected step (ms) | bytes moved per step (MB) |",
        "|---|---|---|",
        f"| one device, backprop | {_ms(pred['bp_single'])} | 0 |",
        f"| DDP, {k} devices | {_ms(pred['ddp'])} | {b['ddp'] / 1e6:.1f} |",
        f"| BP model-parallel | {_ms(pred['bp_model_parallel'])} | {b['bp_model_parallel'] / 1e6:.1f} |",
        f"| LFNN-ℓ pipeline | {_ms(pred['lfnn_pipeline'])} | {b['lfnn_pipeline'] / 1e6:.1f} |",
        f"| replay pipeline | {_ms(pred['replay_pipeline'])} | {b['replay_pipeline'] / 1e6:.1f} |",
        "",
        f"- projected LFNN-ℓ pipeline vs BP model-parallel: **{_x(p['predicted_speedup_vs_bp_model_parallel'])}** "
        f"(ideal {k}.0×" + (f"; the paper measured {paper:.2f}× on 4 GPUs" if paper else "") + ")",
        f"- projected LFNN-ℓ pipeline vs DDP: **{_x(p['predicted_speedup_vs_ddp'])}**; vs one device: "
        f"{_x(p['predicted_speedup_vs_bp_single'])}",
        f"- projected replay pipeline vs DDP: **{_x(p['predicted_replay_speedup_vs_ddp'])}**; vs one device: "
        f"{_x(p['predicted_replay_speedup_vs_bp_single'])}",
        "",
        "| block | BP forward+backward (ms) | LFNN-ℓ step with head (ms) | replay step (ms) | activation sent (MB) |",
        "|---|---|---|---|---|",
    ]
    sent = list(p["activation_bytes"]) + [0]
    for i, (bp, lf, rp) in enumerate(zip(p["block_fwd_bwd_s"], p["block_lfnn_step_s"], p["block_replay_step_s"])):
        lines.append(f"| {i} | {bp * 1e3:.1f} | {lf * 1e3:.1f} | {rp * 1e3:.1f} | {sent[i] / 1e6:.1f} |")
    lines += ["", f"- one-device LFNN-ℓ trainer vs one-process BP: {_x(s['lfnn_single_vs_bp_single'])}"]
    if "vs_bp_model_parallel" not in s:  # --projection-only: one device
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Measured on this machine:",
        "",
        f"- LFNN-ℓ pipeline vs BP model-parallel: **{_x(s['vs_bp_model_parallel'])}** (ideal {k}.0×; projected "
        f"{_x(p['predicted_speedup_vs_bp_model_parallel'])})",
        f"- LFNN-ℓ pipeline vs DDP: **{_x(s['vs_ddp'])}**{_apart(m, 'lfnn_pipeline', 'ddp')}; replay pipeline vs "
        f"DDP: **{_x(s['replay_vs_ddp'])}**{_apart(m, 'replay_pipeline', 'ddp')}",
        f"- LFNN-ℓ pipeline vs BP pipelined ({s['vs_bp_pipelined_schedule']}, M={cfg['microbatches']}): "
        f"**{_x(s['vs_bp_pipelined'])}**",
        f"- LFNN-ℓ pipeline vs one-process BP on the same cores: **{_x(s['vs_bp_single'])}**"
        f"{_apart(m, 'lfnn_pipeline', 'bp_single')}; replay: {_x(s['replay_vs_bp_single'])}"
        f"{_apart(m, 'replay_pipeline', 'bp_single')}",
        f"- filter-wise LFNN-ℓ pipeline vs BP model-parallel: {_x(s['filter_wise_vs_bp_model_parallel'])}",
        "",
        "Per-stage time of the LFNN-ℓ pipeline (seconds over all steps):",
        "",
        "| rank | block | busy | waiting to receive | waiting for sends |",
        "|---|---|---|---|---|",
    ]
    for t in m.get("lfnn_pipeline", {}).get("stage_timings", []):
        lines.append(f"| {t['rank']} | {t['block']} | {t['busy_s']:.2f} | {t['recv_wait_s']:.2f} | "
                     f"{t['send_wait_s']:.2f} |")
    return "\n".join(lines) + "\n"


def chart(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = payload["methods"]
    names = list(m)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.barh(names, [m[n]["samples_per_s"] for n in names],
             color=["tab:blue" if n.startswith("bp") else "tab:green" for n in names])
    ax1.set_xlabel("samples / s")
    ax1.set_title("throughput (higher is better)", fontsize=10)
    if "lfnn_pipeline" not in m:  # --projection-only: per-block times on one device
        p = payload["projection"]
        labels = [f"block {k}" for k in range(len(p["block_fwd_bwd_s"]))]
        ax2.barh([f"{lb} BP" for lb in labels], [v * 1e3 for v in p["block_fwd_bwd_s"]], color="tab:blue")
        ax2.barh([f"{lb} LFNN-ℓ" for lb in labels], [v * 1e3 for v in p["block_lfnn_step_s"]], color="tab:green")
        ax2.set_xlabel("ms per step (one device)")
        ax2.set_title(f"per block; projected speed-up {p['predicted_speedup_vs_bp_model_parallel']:.2f}×", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    stages = m["lfnn_pipeline"].get("stage_timings", [])
    labels = [f"rank {t['rank']}" for t in stages]
    busy = [t["busy_s"] for t in stages]
    recv = [t["recv_wait_s"] for t in stages]
    send = [t["send_wait_s"] for t in stages]
    ax2.barh(labels, busy, label="busy")
    ax2.barh(labels, recv, left=busy, label="waiting to receive")
    ax2.barh(labels, send, left=[a + b for a, b in zip(busy, recv)], label="waiting for sends")
    ax2.set_xlabel("seconds")
    ax2.set_title("LFNN-ℓ pipeline, per stage", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="K=2, CIFAR-sized resnet18, few steps (< 3 min on 2 cores)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--cifar", action=argparse.BooleanOptionalAction, default=True,
                        help="remove the stem max-pool (default on; --no-cifar for ImageNet-sized inputs)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method, each a fresh launch (--quick: 1)")
    parser.add_argument("--balance", default="time", choices=["flops", "time", "params"],
                        help="how the split is chosen (once, for every method)")
    parser.add_argument("--fw-workers", type=int, default=4)
    parser.add_argument("--fw-leaders", type=float, default=0.75)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="measure only these methods (default: all of them; the projection always runs)")
    parser.add_argument("--link-gbs", type=float, default=450.0,
                        help="link bandwidth for the projection, GB/s per direction (default: NVLink 4, 450)")
    parser.add_argument("--projection-only", action="store_true",
                        help="one device only (e.g. one GPU): measure one-process BP, the one-device LFNN-ℓ trainer "
                             "and per-block times, and project the K-device speed-up; nothing runs on K processes, "
                             "and these methods share one process (one start, one CUDA initialisation)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="file name stem (default: speedup-<model>-k<K>-<hw>-<date>)")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.steps, args.warmup, args.repeats = 2, min(args.steps, 12), min(args.warmup, 2), 1
    if args.repeats < 1:
        raise SystemExit(f"speedup.py: --repeats {args.repeats}: must be at least 1")
    import torch

    if torch.cuda.is_available() and not args.projection_only and torch.cuda.device_count() < args.blocks:
        raise SystemExit(f"K={args.blocks} processes need one GPU each, but {torch.cuda.device_count()} GPU(s) are "
                         f"visible: run with --projection-only on one GPU, or with CUDA_VISIBLE_DEVICES= on the CPUs")
    cores = os.cpu_count() or 1
    if args.blocks * args.threads > cores:
        print(f"warning: K×threads = {args.blocks * args.threads} > {cores} cores: processes will oversubscribe "
              f"and the numbers will not mean much", file=sys.stderr)

    env_before = environment(args.threads)
    args.cuts = choose_cuts(args)
    measured = measure(args)
    payload = {
        "experiment": "speedup",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": "synthetic: one fixed random batch, so the input pipeline is not timed",
        "methods": measured["methods"],
        **summarise(args, measured),
        "env_before": env_before,
        "env": environment(args.threads),
        "command": " ".join(["python -m benchmarks.speedup", *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "speedup.json", payload)
    stem = args.name or f"speedup-{args.model}-k{args.blocks}-{hardware_tag()}-{env_before['date'][:10]}"
    write_json(args.out / f"{stem}.json", payload)  # beside its table and picture, wherever --out is
    (args.out / f"{stem}.md").write_text(markdown(payload))
    chart(payload, args.out / f"{stem}.png")
    print()
    print(markdown(payload))
    print(f"wrote {args.out / 'speedup.json'}, {stem}.md and {stem}.png")


if __name__ == "__main__":
    main()
