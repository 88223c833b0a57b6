"""Time to accuracy on Fashion-MNIST, on one machine (--hosts 1) or across two hosts and a shaped link (--hosts 2).

--hosts 1: backprop in one process at --cores threads against the lfnnify pipeline in --mode, K=--blocks
processes of one thread (torchrun); the target of a seed is backprop's final accuracy.
--hosts 2: DDP (plain, fp16, PowerSGD, local SGD; plain PyTorch) against the replay and LFNN-ℓ pipelines, one
process per host of one core, a link of --rate between them (root, iproute2); the target is plain DDP's final
accuracy.

Reproduce:  python -m benchmarks.time_to_accuracy --mode replay --stash --delay-lr-warmup 469 --seeds 0 1 2
            python -m benchmarks.time_to_accuracy --hosts 2 --rate 100mbit --eval-subset 10000 --eval-every 25 \
                --methods ddp ddp_powersgd_r1 local_sgd_h16 bp_1f1b_m2 replay_pipeline lfnn_pipeline
Step times for the rate map (one seed, 48 steps, timed from step 16 to 48, at another rate):
            python -m benchmarks.time_to_accuracy --hosts 2 --rate 10mbit --step-times --seeds 0 --hook-start 2 \
                --train-subset 6144 --eval-every 16 --eval-subset 128 --methods ddp_powersgd_r1 lfnn_pipeline ...
Quick look: python -m benchmarks.time_to_accuracy --model test_resnet --train-subset 256 --eval-subset 128 \\
                --batch 64 --epochs 1 --eval-every 2 --seeds 0 --allow-dirty --out /tmp/tta
            python -m benchmarks.time_to_accuracy --hosts 2 --model test_resnet --train-subset 512 \\
                --eval-subset 256 --eval-every 2 --seeds 0 --allow-dirty --out /tmp/tta
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..common import RESULTS, refuse_bad_arguments, refuse_uncommitted
from . import across_hosts, one_machine

SCRIPT = "time_to_accuracy"
# The flags of one setting only, and their defaults there; None on the command line means "not given".
ONE_MACHINE = {"epochs": 2, "blocks": 2, "cores": os.cpu_count() or 2, "mode": "replay", "stash": False,
               "delay_lr_warmup": None, "eval_every": 100, "train_subset": None, "eval_subset": None}
ACROSS_HOSTS = {"rate": "1gbit", "methods": list(across_hosts.METHODS), "hook_start": 10, "timeout": 3600.0,
                "eval_every": 15, "train_subset": 19200, "eval_subset": 2000, "step_times": False, "epochs": 1}
SHARED = {"eval_every", "train_subset", "eval_subset", "epochs"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPT}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=1, choices=[1, 2], help="1: this machine; 2: two hosts and a link")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="resnet18", help="a timm model (tests: test_resnet)")
    p.add_argument("--batch", type=int, default=128, help="the global batch")
    p.add_argument("--train-subset", type=int, default=None,
                   help="training images in an epoch (default: all on one machine, 19,200 across hosts)")
    p.add_argument("--eval-subset", type=int, default=None,
                   help="test images each evaluation reads (default: all on one machine, 2,000 across hosts)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: 100; 15)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training subset (default: 2; 1)")
    p.add_argument("--runs", type=Path, default=None, help="folder of per-run files (default: OUT/NAME-runs)")
    p.add_argument("--allow-dirty", action="store_true", help="run with uncommitted changes (quick looks only)")
    p.add_argument("--name", default=None, help="result file stem (default: experiment, setting, hardware, date)")
    p.add_argument("--out", type=Path, default=RESULTS)
    one = p.add_argument_group("one machine (--hosts 1)")
    one.add_argument("--blocks", type=int, default=None, help="the pipeline's K (default 2)")
    one.add_argument("--cores", type=int, default=None, help="backprop's threads (default: every core)")
    one.add_argument("--mode", default=None, choices=["local", "replay"], help="the pipeline's mode (default replay)")
    one.add_argument("--stash", action="store_const", const=True, default=None, help="replay with weight stashing")
    one.add_argument("--delay-lr-warmup", type=int, default=None,
                     help="replay: delay-aware step sizes over this many iterations (PipeMare)")
    two = p.add_argument_group("across two hosts (--hosts 2)")
    two.add_argument("--rate", default=None, help="the link's rate, as tc writes it (default 1gbit)")
    two.add_argument("--methods", nargs="+", default=None, choices=list(across_hosts.METHODS),
                     help="default: all of them")
    two.add_argument("--hook-start", type=int, default=None,
                     help="the step from which PowerSGD compresses and local SGD averages only every H steps "
                          "(default 10)")
    two.add_argument("--timeout", type=float, default=None, help="seconds one run may take (default 3600)")
    two.add_argument("--step-times", action="store_const", const=True, default=None,
                     help="short runs for the rate map (benchmarks.time_to_accuracy.rate_map): each method's seconds "
                          "per step at --rate, no target (--methods need not include ddp)")
    return p


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse a flag of the other setting (it would be silently ignored) and fill in this setting's defaults."""
    ours, theirs = (ONE_MACHINE, ACROSS_HOSTS) if args.hosts == 1 else (ACROSS_HOSTS, ONE_MACHINE)
    for name in theirs.keys() - SHARED:
        if name not in ours and getattr(args, name) is not None:
            flag, other = "--" + name.replace("_", "-"), 2 if args.hosts == 1 else 1
            raise SystemExit(f"{SCRIPT}: {flag} applies to --hosts {other} only, and this run has --hosts "
                             f"{args.hosts}; drop {flag} or pass --hosts {other}")
    for name, default in ours.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in theirs.keys() - ours.keys():
        delattr(args, name)
    return args


def main() -> None:
    args = settle(parser().parse_args())
    refuse_bad_arguments(SCRIPT, args, counts=[n for n in ("eval_every", "delay_lr_warmup", "hook_start", "epochs")
                                               if hasattr(args, n)])
    refuse_uncommitted(SCRIPT, args.allow_dirty)
    (one_machine if args.hosts == 1 else across_hosts).measure(args)


if __name__ == "__main__":
    main()
