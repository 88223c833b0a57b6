"""What one pipeline checkpoint costs across hosts that share no disk: seconds, and bytes on the link.

A pipeline save gathers every rank's part to rank 0, which writes the checkpoint on its own disk
(``lfnnify/pipeline/shards.py``). This measures it where it costs most: K=4 hosts (network, PID, mount namespaces on
this machine, each its own /tmp), one rank each, joined by links shaped to ``--rate``, a timm ResNet converted
into 4 blocks, two training steps (so that the optimizer's momentum exists: the trainer state is about the size of
the weights again), then ``--repeats`` saves, each timed on rank 0 and counted in bytes on every host's link.

Reproduce:  python -m benchmarks.checkpoint_cost --models resnet50 resnet101 --rate 1gbit
Tiny (tests): --models test_resnet --repeats 2 --size 32
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

import torch

from .common import RESULTS, environment, hosts_ready, refuse_uncommitted, write_json  # noqa: E402

HOSTS = 4


def _tx(iface: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())


def worker(args) -> None:
    """One rank, inside its host: train two steps, then time ``args.repeats`` saves (rank 0 writes the result)."""
    import torch.distributed as dist

    import lfnnify
    from lfnnify.app import create_model
    from lfnnify.data import SyntheticImages, make_loader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000)
    net = lfnnify.convert(model, blocks=HOSTS, example_input=torch.zeros(1, 3, args.size, args.size))
    trainer = lfnnify.PipelineTrainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
                                      threads=1, timeout_s=600, progress=False)
    loader = None
    if trainer.first:
        data = SyntheticImages(2 * args.batch, shape=(3, args.size, args.size), classes=1000, seed=0)
        loader = make_loader(data, batch_size=args.batch, seed=0)
    trainer.fit(loader, max_steps=2)
    iface = os.environ["GLOO_SOCKET_IFNAME"]
    seconds, sent = [], []
    for _ in range(args.repeats):
        dist.barrier()
        before, start = _tx(iface), time.perf_counter()
        lfnnify.save(net, args.out / "ckpt", trainer=trainer)
        seconds.append(time.perf_counter() - start)
        sent.append(_tx(iface) - before)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rank": trainer.rank, "sent_bytes": sent, "seconds": seconds})
    if trainer.rank == 0:
        folder = args.out / "ckpt"
        current = folder / (folder / "CURRENT").read_text().split()[0]
        files = {p.name: p.stat().st_size for p in current.iterdir()}
        params = sum(p.numel() for p in model.parameters())
        (args.out / "result.json").write_text(json.dumps({"ranks": everyone, "files": files, "params": params}))
    dist.barrier()
    dist.destroy_process_group()


def measure(model: str, args) -> dict:
    import subprocess

    from lfnnify.app import Hosts

    cores = sorted(os.sched_getaffinity(0))
    with Hosts(HOSTS, rate=args.rate, cores=[[cores[i % len(cores)]] for i in range(HOSTS)]) as hosts, \
            tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / model
        script = ["-m", "benchmarks.checkpoint_cost", "--worker", "--model", model, "--size", str(args.size),
                  "--batch", str(args.batch),
                  "--repeats", str(args.repeats), "--out", str(out)]
        port = 29700 + os.getpid() % 200
        logs = [open(Path(tmp) / f"host{i}.log", "w") for i in range(HOSTS)]  # noqa: SIM115 - closed below
        procs = [hosts.popen(i, hosts.torchrun(i, script, port=port), stdout=logs[i], stderr=logs[i])
                 for i in range(HOSTS)]
        for p in procs:
            try:
                p.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        result = hosts.path(0, out / "result.json")
        if any(p.returncode for p in procs) or not result.exists():
            tail = "".join((Path(tmp) / f"host{i}.log").read_text()[-1500:] for i in range(HOSTS))
            raise SystemExit(f"checkpoint_cost.py: {model} failed (exit {[p.returncode for p in procs]}):\n{tail}")
        measured = json.loads(result.read_text())
    seconds = measured["ranks"][0]["seconds"]
    to_rank0 = [sum(r["sent_bytes"][i] for r in measured["ranks"][1:]) for i in range(args.repeats)]
    return {**measured, "save_s": seconds, "save_s_median": statistics.median(seconds),
            "save_s_range": [min(seconds), max(seconds)], "bytes_to_rank0": to_rank0,
            "bytes_to_rank0_median": statistics.median(to_rank0), "checkpoint_bytes": sum(measured["files"].values()),
            "link_bits_per_s": hosts_rate(args.rate)}


def hosts_rate(rate: str | None) -> int | None:
    from lfnnify.app import parse_rate

    return parse_rate(rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet101"])
    parser.add_argument("--rate", default="1gbit", help="every link's rate (tc), e.g. 1gbit, 100mbit")
    parser.add_argument("--size", type=int, default=64, help="input size of the two training steps")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help="run with uncommitted changes (quick looks only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.repeats < 1 or args.batch < 1 or args.size < 8:
        raise SystemExit("checkpoint_cost.py: --repeats and --batch must be at least 1, --size at least 8")
    refuse_uncommitted("checkpoint_cost.py", args.allow_dirty)
    env = hosts_ready("checkpoint_cost.py")
    rows = {}
    for model in args.models:
        rows[model] = r = measure(model, args)
        rate = r["bytes_to_rank0_median"] * 8 / r["save_s_median"] / 1e6
        print(f"{model}: {r['params'] / 1e6:.1f}M parameters, checkpoint {r['checkpoint_bytes'] / 1e6:.0f} MB; one "
              f"save {r['save_s_median']:.1f} s (range {r['save_s_range'][0]:.1f}-{r['save_s_range'][1]:.1f}), "
              f"{r['bytes_to_rank0_median'] / 1e6:.0f} MB sent to rank 0 ({rate:.0f} Mbit/s)", flush=True)
    payload = {"experiment": "checkpoint_cost", "hosts": HOSTS, "rate": args.rate, "results": rows,
               "env_before": env, "env": environment(1),
               "command": " ".join(["python -m benchmarks.checkpoint_cost", *sys.argv[1:]])}
    stem = args.name or f"checkpoint_cost-k{HOSTS}-{args.rate}-{payload['env']['date'][:10]}"
    print(f"wrote {write_json(args.out / f'{stem}.json', payload)}")
    return None


if __name__ == "__main__":
    main()
