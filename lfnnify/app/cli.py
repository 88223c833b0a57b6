"""The lfnnify command line: plan a model's cuts, and the demo that is the README's main job."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path

from .._version import __version__
from ..errors import ConfigError, LfnnifyError
from ..surgery.options import BALANCES, HEADS, MODES, ConvertOptions
from ..training.options import SEND_DTYPES_BY_NAME

EPILOG = """examples:
  lfnnify demo
  lfnnify plan resnet101 --blocks 4
  lfnnify train recipes/fashion_mnist_resnet18_k4.yaml
  lfnnify train recipes/cifar10_resnet101_k4.yaml --data ~/data/cifar10 --set train.iterations=1000
  torchrun --nproc-per-node 4 -m lfnnify train recipes/imagenet_resnet152_k4.yaml --data /datasets/imagenet
  lfnnify export runs/xyz/ckpt resnet101_trained.safetensors
"""


def _cmd_plan(args) -> int:
    import torch

    from ..surgery.facts import input_channels
    from ..surgery.planning import plan
    from .zoo import create_model

    if args.input_size is not None and args.input_size < 1:
        raise ConfigError(f"--input-size {args.input_size}: give a positive square size in pixels, e.g. "
                          f"--input-size 224")
    model = create_model(args.model, num_classes=args.num_classes)
    example = None
    if args.input_size is not None:
        example = torch.randn(1, input_channels(model), args.input_size, args.input_size)
    result = plan(model, blocks=args.blocks, cuts=args.cuts, workers=args.workers, balance=args.balance,
                  head=args.head, mode=args.mode, example_input=example, batch_size=args.batch_size, link=args.link,
                  send_dtype=SEND_DTYPES_BY_NAME[args.send_dtype])
    print(result)
    return 0


def _cmd_train(args) -> int:
    from .run import main_train

    return main_train(args)


def _cmd_export(args) -> int:
    from ..checkpoint import export, load

    net = load(args.checkpoint)
    export(net, args.output)
    print(f"wrote {args.output}: {type(net._source).__name__} weights with the original keys "
          f"(load with timm's pretrained_cfg_overlay=dict(file=...) or load_state_dict)")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    if args.budget is not None and not 0 < args.budget <= MAX_BUDGET_S:
        raise ConfigError(f"--budget {args.budget}: give the seconds each method trains, more than 0 and at most "
                          f"{MAX_BUDGET_S} (an hour), e.g. --budget 30")
    return run_demo(quick=args.quick, out=args.out, budget=args.budget)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfnnify",
        description="Convert VGG/ResNet/timm models into leader-follower networks trained with local errors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lfnnify {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "plan",
        help="show where a model can be cut and what each block costs",
        epilog="example:\n  lfnnify plan resnet101 --blocks 4\n  lfnnify plan resnet18 --cuts layer1 layer2\n"
               "  lfnnify plan resnet50 --blocks 4 --batch-size 256 --link 1gbit --send-dtype bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="timm model name, or torchvision/<name>")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--blocks", type=int, help="number of blocks K (balanced automatically)")
    group.add_argument("--cuts", nargs="+", help="explicit cut names")
    default = ConvertOptions()  # convert's own defaults and choices (surgery/options.py)
    p.add_argument("--workers", type=int, default=default.workers, help="filter-wise workers per head (default 1)")
    p.add_argument("--balance", default=default.balance, choices=BALANCES)
    p.add_argument("--head", default=default.head, choices=HEADS, help="head kind (default linear)")
    p.add_argument("--mode", default=default.mode, choices=MODES,
                   help="training mode; replay shows the inputs each block keeps")
    p.add_argument("--num-classes", type=int, help="classes the heads predict (default: the model's)")
    p.add_argument("--input-size", type=int, help="square input size (default: the model's pretrained_cfg)")
    p.add_argument("--batch-size", type=int, help="training batch: report what each cut and DDP send per step")
    p.add_argument("--link", help="a link rate (1gbit, 100mbit, 10gbit): also report how long each transfer takes")
    p.add_argument("--send-dtype", choices=list(SEND_DTYPES_BY_NAME), default="fp32",
                   help="activations (and replay's gradients) sent as (default fp32; int8: a scale per channel)")
    p.set_defaults(func=_cmd_plan)

    t = sub.add_parser(
        "train",
        help="train from a recipe (pipeline-parallel under torchrun when WORLD_SIZE > 1)",
        epilog="examples:\n  lfnnify train recipes/fashion_mnist_resnet18_k4.yaml\n"
               "  lfnnify train recipes/fashion_mnist_resnet18_k4.yaml --set method=bp --set train.epochs=1\n"
               "  torchrun --nproc-per-node 4 -m lfnnify train recipes/cifar10_resnet101_k4.yaml --data ~/cifar",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("recipe", help="a recipe YAML, or the name of a built-in one (fashion_mnist_resnet18_k4; "
                                  "lfnnify/recipes/ lists them)")
    t.add_argument("--data", help="dataset folder (overrides data.root)")
    t.add_argument("--out", type=Path, help="run folder (default runs/<recipe>-<time>)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe key, e.g. train.iterations=1000")
    t.add_argument("--pretrained", help="a local .safetensors/.pth checkpoint to fine-tune from")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--device", help="auto (default: cuda when there is a GPU), cpu, cuda or cuda:N "
                                    "(overrides train.device)")
    t.add_argument("--backend", choices=["nccl", "gloo"], help="pipeline communication (default: nccl when every "
                                                                 "process has its own GPU, else gloo)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser(
        "export",
        help="write a checkpoint's weights in the original architecture's layout (safetensors)",
        epilog="example:\n  lfnnify export runs/xyz/ckpt resnet101_trained.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("checkpoint")
    e.add_argument("output")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser(
        "demo",
        help="backprop against lfnnify's pipelines at equal wall-clock time, and memory, in one picture",
        epilog="example:\n  lfnnify demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--quick", action="store_true", help="a few seconds per method, a data subset (smoke tests)")
    d.add_argument("--budget", type=float, default=None, help="training seconds per method (default 25)")
    d.add_argument("--out", default=None, help="folder for the demo's plot and log (default runs/demo-<time>)")
    d.set_defaults(func=_cmd_demo)
    return parser


MAX_BUDGET_S = 3600
# errors of the machine, not of lfnnify: a read-only or full disk, a missing permission
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR}

BUG_REPORT = ("lfnnify: this is a bug in lfnnify, not in your input. Please report it with the traceback above "
              "and the command you ran.")


def _record_for_torchrun(exc: BaseException) -> bool:
    """Under torchrun, write the error where its failure summary reads it (torch.distributed.elastic's
    error file), so the summary shows this rank's traceback. A rank that only saw a neighbour go writes none.
    Returns whether it was written."""
    from ..errors import PipelineError

    if "TORCHELASTIC_ERROR_FILE" not in os.environ or (isinstance(exc, PipelineError) and "stops:" in str(exc)):
        return False
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception:  # noqa: BLE001 - reporting must never hide the error itself
        return False
    return True


def _one_line(exc: BaseException) -> str:
    """Our error's own message; one raised in a DataLoader worker arrives wrapped in that worker's traceback
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), whose last line is the message."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith("lfnnify.errors.") and ": " in last else last
    return text


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun other processes write to the same pipe, and print()'s
    separate write of the newline let their output land inside the line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the command line. lfnnify's own errors (bad input, missing data, damaged checkpoints, a pipeline
    neighbour that failed) print one line and exit with 2; anything else is a bug: its traceback is printed
    with a request to report it. Under torchrun a failing rank then exits at once, so that its neighbours
    see it go (and stop within seconds) instead of waiting out their timeout."""
    args = make_parser().parse_args(argv)
    try:
        code = args.func(args)
    except LfnnifyError as exc:
        where = getattr(exc, "pipeline_rank", None)
        _say(f"lfnnify: error: {where + ': ' if where else ''}{_one_line(exc)}")
        _record_for_torchrun(exc)
        code = 2
    except KeyboardInterrupt:
        _say("lfnnify: interrupted")
        code = 130
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            where = f" {exc.filename}" if exc.filename else ""
            _say(f"lfnnify: error: cannot use{where}: {exc.strerror}. This is the machine's file system, not "
                 f"lfnnify: choose a folder you can write (--out), or free some space")
            code = 2
        elif _record_for_torchrun(exc):  # torchrun's failure summary prints the traceback once
            where = getattr(exc, "pipeline_rank", None)
            _say(f"lfnnify: {where or 'this rank'} failed: {type(exc).__name__}: {exc} (its traceback is in "
                 f"torchrun's summary below). {BUG_REPORT.removeprefix('lfnnify: ')}")
            code = 1
        else:
            traceback.print_exc()
            _say(BUG_REPORT)
            code = 1
    if code and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the process group's teardown, which waits on the failed neighbour
    return code


if __name__ == "__main__":
    sys.exit(main())
