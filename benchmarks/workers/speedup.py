"""One method of benchmarks.speedup, in a fresh process (torchrun for the multi-process ones).

Every method trains the same model on the same synthetic batch; the process that finishes steps
(the last stage, or the single process) records the time at which each step completed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lfnnify  # noqa: E402
from lfnnify.app import create_model  # noqa: E402

SEND_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}  # the pipelines' --send-dtype
DEVICE = torch.device("cpu")  # cuda:LOCAL_RANK when GPUs are present: one GPU per rank


IFACE = None  # --iface: the network interface whose byte counters every step stamp also reads (multi-host runs)
TX: list[int] = []  # bytes sent on IFACE so far, read with each step's stamp
RX: list[int] = []  # bytes received on IFACE so far, read with each step's stamp
RX_PACKETS: list[int] = []  # packets received on IFACE so far: each carries its frame's headers (frame_header_bytes)


def _now() -> float:
    """A timestamp after this process's compute stream has finished its queued work. Never the whole device: that
    would also wait for NCCL's sends (the pipelines' and DDP's), each of which waits for its receiver."""
    if DEVICE.type == "cuda":
        torch.cuda.current_stream(DEVICE).synchronize()
    return time.perf_counter()


def _stamp() -> float:
    """The end of a training step: its timestamp, and (with --iface) the bytes this host has sent and received by then.

    A host has received everything its step needed when the step ends, while what it sent may still sit in its
    socket: the first stage of a pipeline runs up to ``max_in_flight`` messages ahead. So the bytes that crossed the
    link during the timed steps are counted where they arrive, each host at its own step ends."""
    if IFACE:
        stats = Path(f"/sys/class/net/{IFACE}/statistics")
        TX.append(int((stats / "tx_bytes").read_text()))
        RX.append(int((stats / "rx_bytes").read_text()))
        RX_PACKETS.append(int((stats / "rx_packets").read_text()))
    return _now()


def frame_header_bytes() -> int:
    """The bytes of headers in each frame the link's counters count: Ethernet (14), IPv4 (20) and TCP (20, and 12 more
    for the timestamp option where this network namespace turns it on, as Linux does by default). Every packet a
    collective or a pipeline sends is one of these (a pure acknowledgement is nothing else), so the payload that
    crossed the link is its bytes less its packets times this."""
    timestamps = Path("/proc/sys/net/ipv4/tcp_timestamps").read_text().strip() != "0"
    return 14 + 20 + 20 + (12 if timestamps else 0)


def _setup(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, cifar=args.cifar)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(DEVICE)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(DEVICE)
    return model, x, y


def _convert(model, args, **knobs):
    # the launcher chose the cuts once, so every method and every rank uses the same split
    return lfnnify.convert(model, cuts=args.cuts, example_input=torch.zeros(1, 3, args.size, args.size), **knobs)


def _convert_on_device(model, args, **knobs):
    return _convert(model, args, **knobs).to(DEVICE)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def bp_single(args, model, x, y):
    model.to(DEVICE).train()
    opt = _sgd(model.parameters())
    stamps = []
    for _ in range(args.warmup + args.steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        stamps.append(_stamp())
    return {"stamps": stamps}


def lfnn_single(args, model, x, y):
    net = _convert_on_device(model, args, workers=args.workers, leaders=args.leaders)
    trainer = lfnnify.Trainer(net, optimizer=_sgd, progress=False)
    stamps = []
    for _ in range(args.warmup + args.steps):
        trainer.train_step(x, y)
        stamps.append(_stamp())
    return {"stamps": stamps}


def lfnn_pipeline(args, model, x, y):
    net = _convert(model, args, workers=args.workers, leaders=args.leaders, mode=args.mode,
                   weight_stashing=args.stash)
    trainer = lfnnify.PipelineTrainer(net, optimizer=_sgd, threads=args.threads, progress=False,
                                      max_in_flight=args.in_flight, timeout_s=300,
                                      send_dtype=SEND_DTYPES[args.send_dtype], overlap_sends=not args.no_overlap,
                                      receive_ahead=args.receive_ahead)
    stamps = []
    step = trainer._stage_step

    def timed(*batch):
        out = step(*batch)
        stamps.append(_stamp())
        return out

    trainer._stage_step = timed
    batches = [(x, y)] * (args.warmup + args.steps)
    trainer.fit(batches if trainer.first else None, max_steps=len(batches))
    timings = trainer.stage_timings()
    return {"stamps": stamps, "stage_timings": timings}


def bp_model_parallel(args, model, x, y):
    """The paper's baseline: the same K blocks on K processes, one waiting for the other."""
    net = _convert(model, args)
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = _activation_shapes(net, x)
    block = net.blocks[rank].to(DEVICE)
    opt = _sgd(block.parameters())
    first, last = rank == 0, rank == world - 1
    stamps, busy, wait = [], 0.0, 0.0
    for _ in range(args.warmup + args.steps):
        t0 = _now()
        if first:
            inp = x
        else:
            inp = torch.empty(shapes[rank - 1], device=DEVICE)
            dist.recv(inp, src=rank - 1)
            inp.requires_grad_(True)
        t1 = _now()
        out = block(inp)
        opt.zero_grad(set_to_none=True)
        if last:
            F.cross_entropy(out, y).backward()
            t2 = t3 = _now()
        else:
            t2 = _now()
            dist.send(out.detach().contiguous(), dst=rank + 1)
            grad = torch.empty_like(out)
            dist.recv(grad, src=rank + 1)
            t3 = _now()
            out.backward(grad)
        if not first:
            dist.send(inp.grad.contiguous(), dst=rank - 1)
        opt.step()
        t4 = _now()
        busy += (t2 - t1) + (t4 - t3)
        wait += (t1 - t0) + (t3 - t2)
        stamps.append(t4)
    timings = _gather({"rank": rank, "block": rank, "busy_s": busy, "wait_s": wait, "steps": len(stamps)})
    return {"stamps": stamps, "stage_timings": timings}


SINGLE_STAGE = ("gpipe", "1f1b")  # one stage per process
LOOP_STAGES = ("interleaved1f1b", "interleaved_zb")  # two stages per process: r and r + world
V_STAGES = ("zbv", "dualpipev")  # two stages per process in a V: r and 2 * world - 1 - r
SCHEDULES = (*SINGLE_STAGE, *LOOP_STAGES, *V_STAGES)


def stages_of(schedule: str, rank: int, world: int) -> list[int]:
    """The pipeline stages process ``rank`` holds under ``schedule`` (the model cut into one stage per process,
    or two for the interleaved and V schedules, as torch.distributed.pipelining places them)."""
    if schedule in SINGLE_STAGE:
        return [rank]
    if schedule in LOOP_STAGES:
        return [rank, rank + world]
    return [rank, 2 * world - 1 - rank]


def schedule_class(name: str):
    """The ``torch.distributed.pipelining`` schedule class of ``name`` (one of SCHEDULES)."""
    from torch.distributed.pipelining import schedules

    return {"gpipe": schedules.ScheduleGPipe, "1f1b": schedules.Schedule1F1B,
            "interleaved1f1b": schedules.ScheduleInterleaved1F1B,
            "interleaved_zb": schedules.ScheduleInterleavedZeroBubble, "zbv": schedules.ScheduleZBVZeroBubble,
            "dualpipev": schedules.ScheduleDualPipeV}[name]


def bp_pipelined(args, model, x, y):
    """Backprop pipelined with torch.distributed.pipelining: exact gradients, M micro-batches, the schedule of
    ``--schedule``: GPipe, 1F1B, or, with the model cut into two stages per process (``--cuts`` then names
    2 x world - 1 cuts), Interleaved 1F1B, Interleaved Zero Bubble, ZBV Zero Bubble or DualPipeV."""
    from torch.distributed.pipelining import PipelineStage

    net = _convert(model, args)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = stages_of(args.schedule, rank, world)
    count = world * (1 if args.schedule in SINGLE_STAGE else 2)
    if net.num_blocks != count:
        raise SystemExit(f"--schedule {args.schedule} on {world} processes needs the model in {count} stages: "
                         f"--cuts names {net.num_blocks - 1} cut(s), give {count - 1}")
    stages = [PipelineStage(net.blocks[k].to(DEVICE), k, count, DEVICE) for k in mine]
    loss = lambda out, target: F.cross_entropy(out, target)  # noqa: E731
    schedule = schedule_class(args.schedule)(stages[0] if args.schedule in SINGLE_STAGE else stages,
                                             n_microbatches=args.microbatches, loss_fn=loss)
    params = [p for k in mine for p in net.blocks[k].parameters()]
    opt = _sgd(params)
    first, last = 0 in mine, count - 1 in mine
    stamps = []
    for _ in range(args.warmup + args.steps):
        if first and last:
            schedule.step(x, target=y, losses=[])
        elif first:
            schedule.step(x)
        elif last:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(_stamp())
    return {"stamps": stamps, "schedule": args.schedule, "microbatches": args.microbatches, "stages": mine}


def projection(args, model, x, y):
    """Per-block seconds on one process, for each way a block can train, and the bytes each cut sends.

    Every time covers the whole of what that block does in a step: BP's forward+backward; LFNN-ℓ's
    forward, head and backward; replay's forward without a graph (the pass whose output goes on), then the
    recompute with a graph, head and backward (the last block: one forward+backward). Medians of 3 runs.
    """
    net = _convert_on_device(model, args, workers=args.workers, leaders=args.leaders)
    net.train()
    blocks, local, replay, sizes, peaks = [], [], [], [], []
    h = x
    for k, block in enumerate(net.blocks):
        hidden = k < len(net.heads)
        times = {"bp": [], "lfnn": [], "replay": []}
        if DEVICE.type == "cuda":  # what this block's step adds on top of the weights already on the device
            torch.cuda.current_stream(DEVICE).synchronize()
            base = torch.cuda.memory_allocated(DEVICE)
            torch.cuda.reset_peak_memory_stats(DEVICE)
        for _ in range(args.warmup + 3):
            inp = h.detach().requires_grad_(k > 0)
            t0 = _now()
            out = block(inp)
            if hidden:
                out.backward(torch.ones_like(out) / out.numel())
            else:
                F.cross_entropy(out, y).backward()
            times["bp"].append(_now() - t0)
            net.zero_grad(set_to_none=True)
            t0 = _now()
            out = block(inp)
            (net.head_loss(k, out, y).loss if hidden else F.cross_entropy(out, y)).backward()
            times["lfnn"].append(_now() - t0)
            net.zero_grad(set_to_none=True)
            t0 = _now()
            if hidden:
                with torch.no_grad():
                    block(inp)  # the pass that goes on to the next block
                out = block(inp)  # the recompute of an older batch, with a graph
                out.backward(torch.ones_like(out) / out.numel(), inputs=[*block.parameters(), inp] if k else None)
            else:
                out = block(inp)
                F.cross_entropy(out, y).backward()
            times["replay"].append(_now() - t0)
            net.zero_grad(set_to_none=True)
        if DEVICE.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(DEVICE) - base)
        blocks.append(sorted(times["bp"][args.warmup:])[1])
        local.append(sorted(times["lfnn"][args.warmup:])[1])
        replay.append(sorted(times["replay"][args.warmup:])[1])
        if hidden:
            sizes.append(out.numel() * out.element_size())
        with torch.no_grad():
            h = block(h)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"block_fwd_bwd_s": blocks, "block_lfnn_step_s": local, "block_replay_step_s": replay,
            "activation_bytes": sizes, "gradient_bytes": params, "block_peak_bytes": peaks or None}


def _my_share(args, x, y):
    """This process's 1/K of the global batch, for the data-parallel methods (DDP and FSDP)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by {world} processes")
    share = args.batch // world
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def ddp(args, model, x, y):
    """Data-parallel backprop: K processes, each on 1/K of the same global batch, gradients all-reduced by DDP;
    with ``--hook``, as DDP's users cut that all-reduce on a slow link (see ``register_hook``)."""
    from torch.nn.parallel import DistributedDataParallel

    xs, ys = _my_share(args, x, y)
    model.to(DEVICE).train()
    wrapped = DistributedDataParallel(model, device_ids=[DEVICE.index] if DEVICE.type == "cuda" else None,
                                      **bucket_settings(model, args))
    averager = register_hook(wrapped, args)
    opt = _sgd(wrapped.parameters())
    stamps = []
    for _ in range(args.warmup + args.steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(xs), ys).backward()  # DDP all-reduces the gradients during the backward
        opt.step()
        if averager is not None:
            averager.average_parameters(wrapped.parameters())  # local SGD: every --local-sgd-every steps
        stamps.append(_stamp())
    return {"stamps": stamps, "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "hook": hook_settings(args)}


def fsdp(args, model, x, y):
    """Backprop sharded over the processes (FSDP2, ``torch.distributed.fsdp.fully_shard``), what a user whose model
    must be split but who wants exact gradients also picks: each process keeps 1/K of every parameter, gathers each
    top-level module's parameters for its forward and backward, and reduce-scatters its gradients; each process
    takes 1/K of the global batch. Each top-level module with parameters is one unit (its own all-gather), then
    the root, as FSDP's documentation shards a model layer by layer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    xs, ys = _my_share(args, x, y)
    model.to(DEVICE).train()
    mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _sgd(model.parameters())
    stamps = []
    for _ in range(args.warmup + args.steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs), ys).backward()  # all-gathers in the forward and backward, reduce-scatters
        opt.step()
        stamps.append(_stamp())
    return {"stamps": stamps, "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}  # global


def add_hook_arguments(parser) -> None:
    """The command-line settings of DDP's communication hook (``register_hook``)."""
    parser.add_argument("--hook", default="none", choices=["none", "fp16", "powersgd", "local_sgd"],
                        help="ddp: DDP's communication hook (or local SGD)")
    parser.add_argument("--powersgd-rank", type=int, default=1)
    parser.add_argument("--local-sgd-every", type=int, default=4)
    parser.add_argument("--hook-start", type=int, default=2,
                        help="the step from which PowerSGD compresses and local SGD stops all-reducing (> 1)")


def bucket_settings(model, args) -> dict:
    """DDP's bucket setting for ``--hook``: one bucket for PowerSGD (see ``register_hook``), else DDP's default."""
    if args.hook != "powersgd":
        return {}
    return {"bucket_cap_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1}


def hook_settings(args) -> dict:
    if args.hook == "powersgd":
        return {"hook": "powersgd", "rank": args.powersgd_rank, "start_iter": args.hook_start, "error_feedback": True,
                "warm_start": True, "one_bucket": True}
    if args.hook == "local_sgd":
        return {"hook": "local_sgd", "period": args.local_sgd_every, "start_iter": args.hook_start}
    return {"hook": args.hook}


def register_hook(wrapped, args):
    """DDP's communication hook of ``--hook``, set up as torch's documentation says; returns local SGD's averager.

    - ``fp16``: ``fp16_compress_hook`` (the bf16 hook does not run on gloo: pytorch/pytorch#111131).
    - ``powersgd``: ``powerSGD_hook`` at ``--powersgd-rank`` with error feedback and warm start, compressing from
      step ``--hook-start`` (torch's default, 1,000, would never compress in a short run; it must be > 1). DDP gets
      one gradient bucket: the hook starts its P and Q all-reduces from the callbacks of earlier ones, so with
      several buckets in flight each process can start the next bucket's all-reduce and a callback's in another
      order, and gloo pairs collectives by the order they start in ("Received data size doesn't match expected
      size"); one bucket makes the order one chain on every process. It gives up the overlap of the all-reduce
      with the backward, which a host of one core has little of anyway.
    - ``local_sgd``: ``post_localSGD_hook`` (plain DDP until ``--hook-start``, then all-reduces only within each
      host's processes) with a ``PeriodicModelAverager`` averaging the parameters every ``--local-sgd-every`` steps.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    if args.hook == "none":
        return None
    if args.hook == "fp16":
        wrapped.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if args.hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                            start_powerSGD_iter=args.hook_start, use_error_feedback=True,
                                            warm_start=True)
        wrapped.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))  # this host's processes
    subgroup, _ = dist.new_subgroups(group_size=local)
    state = post_localSGD_hook.PostLocalSGDState(process_group=None, subgroup=subgroup,
                                                 start_localSGD_iter=args.hook_start)
    wrapped.register_comm_hook(state, post_localSGD_hook.post_localSGD_hook)
    return PeriodicModelAverager(period=args.local_sgd_every, warmup_steps=args.hook_start)


def bp_shard(args, model, x, y):
    """One process of data-parallel backprop without its all-reduce: one step on 1/K of the global batch."""
    share = args.batch // args.blocks
    return bp_single(args, model, x[:share], y[:share])


def _activation_shapes(net, x):
    """Each cut's activation shape, computed on the CPU before any block moves to its device."""
    shapes = []
    with torch.no_grad():
        h = x.cpu()
        for block in list(net.blocks)[:-1]:
            h = block(h)
            shapes.append(tuple(h.shape))
    return shapes


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


METHODS = {
    "bp_single": bp_single,
    "lfnn_single": lfnn_single,
    "lfnn_pipeline": lfnn_pipeline,
    "bp_model_parallel": bp_model_parallel,
    "bp_pipelined": bp_pipelined,
    "projection": projection,
    "ddp": ddp,
    "fsdp": fsdp,
    "bp_shard": bp_shard,
}


ONE_PROCESS = {"bp_single", "lfnn_single", "projection", "bp_shard"}


def _with_step_times(result: dict, warmup: int) -> dict:
    """The seconds of each timed step, from the stamps after the warm-up."""
    stamps = result.pop("stamps", None)
    if stamps is not None:
        result["step_s"] = [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:])]
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True, nargs="+", choices=list(METHODS),
                        help="one method; or several one-process methods, one after another in this process, each "
                             "on a freshly built model (--out then maps each method to its result)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--cifar", action="store_true")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--cuts", nargs="+", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--leaders", type=float, default=1.0)
    parser.add_argument("--mode", default="local", choices=["local", "replay"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="gpipe", choices=SCHEDULES)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--stash", action="store_true", help="replay with weight stashing")
    parser.add_argument("--send-dtype", default="fp32", choices=list(SEND_DTYPES),
                        help="pipelines send activations (and replay's gradients) as (int8: a scale per channel)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="pipelines: each step waits until its sends have arrived (overlap_sends=False)")
    parser.add_argument("--receive-ahead", action="store_true",
                        help="pipelines: post the next batch's receive before computing this one (receive_ahead=True)")
    parser.add_argument("--iface", default=None, help="count the bytes this host sends on this interface")
    add_hook_arguments(parser)  # --hook-start 2: within the warm-up, so every timed step is compressed
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    global DEVICE, IFACE
    IFACE = args.iface
    distributed = "RANK" in os.environ
    if torch.cuda.is_available():
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(DEVICE)
    if len(args.method) > 1:  # a process start (imports, CUDA) costs more than these methods' warm-up
        if distributed or IFACE or set(args.method) - ONE_PROCESS:
            raise SystemExit(f"--method {' '.join(args.method)}: several methods run only one after another in one "
                             f"process, so each must be one of {sorted(ONE_PROCESS)}, without torchrun or --iface")
        results = {}
        for method in args.method:
            model, x, y = _setup(args)
            results[method] = _with_step_times(METHODS[method](args, model, x, y), args.warmup)
        args.out.write_text(json.dumps({"methods": results}))
        return
    (method,) = args.method
    if distributed:
        dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    model, x, y = _setup(args)
    result = METHODS[method](args, model, x, y)
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if IFACE and distributed:  # each host's bytes over the timed steps (from the stamp before the first timed one)
        steps = len(TX) - args.warmup
        sent = (TX[-1] - TX[args.warmup - 1]) / steps if steps > 0 else None
        received = (RX[-1] - RX[args.warmup - 1]) / steps if steps > 0 else None
        packets = (RX_PACKETS[-1] - RX_PACKETS[args.warmup - 1]) / steps if steps > 0 else None
        result["link_bytes_per_step"] = _gather({"rank": rank, "iface": IFACE, "sent": sent, "received": received,
                                                 "received_packets": packets, "header_bytes": frame_header_bytes()})
    if rank == world - 1:  # on its own host's disk: the folder may exist only where the run was started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_with_step_times(result, args.warmup)))
    if distributed:
        # the model and its optimizer go before the process group: FSDP's sharded parameters and their pending
        # collectives, freed at interpreter exit after the group, ended some runs in "terminate called without an
        # active exception" once every step was done
        del model, result
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
