"""The lfnnify command line: plan a model's cuts, and the demo that is the README's main job."""

from __future__ import annotations

import argparse
import sys

import torch

from . import __version__
from .errors import CheckpointError, CutError, TraceError

EPILOG = """examples:
  lfnnify plan resnet101 --blocks 4
  lfnnify plan torchvision/vgg19 --blocks 4 --input-size 64
  lfnnify demo
"""


def build_model(name: str, *, num_classes: int | None = None, in_chans: int | None = None) -> torch.nn.Module:
    """A model by name, never pretrained: timm names (``resnet101``), or ``torchvision/<name>``."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name.startswith(("torchvision/", "tv/")):
        import torchvision

        arch = name.split("/", 1)[1]
        try:
            return torchvision.models.get_model(arch, weights=None, **kwargs)
        except ValueError as exc:
            raise ValueError(f"unknown torchvision model {arch!r}: {exc}") from None
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" Close: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown model {name!r}: give a timm model name, or torchvision/<name>.{hint}")
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    return timm.create_model(name, pretrained=False, **kwargs)


def _cmd_plan(args) -> int:
    from .plan import plan

    model = build_model(args.model, num_classes=args.num_classes)
    example = None
    if args.input_size:
        example = torch.randn(1, 3, args.input_size, args.input_size)
    result = plan(
        model, blocks=args.blocks, cuts=args.cuts, workers=args.workers, balance=args.balance, example_input=example
    )
    print(result)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick, out=args.out)


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
        epilog="example:\n  lfnnify plan resnet101 --blocks 4\n  lfnnify plan resnet18 --cuts layer1 layer2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="timm model name, or torchvision/<name>")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--blocks", type=int, help="number of blocks K (balanced automatically)")
    group.add_argument("--cuts", nargs="+", help="explicit cut names")
    p.add_argument("--workers", type=int, default=1, help="filter-wise workers per head (default 1)")
    p.add_argument("--balance", default="flops", choices=["flops", "time", "params"])
    p.add_argument("--num-classes", type=int, help="classes the heads predict (default: the model's)")
    p.add_argument("--input-size", type=int, help="square input size (default: the model's pretrained_cfg)")
    p.set_defaults(func=_cmd_plan)

    d = sub.add_parser(
        "demo",
        help="convert a timm ResNet, show its plan, check it computes what the original does, train briefly",
        epilog="example:\n  lfnnify demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--quick", action="store_true", help="a few steps only (for smoke tests)")
    d.add_argument("--out", default=None, help="folder for the demo's plot and log (default runs/demo-<time>)")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CutError, TraceError, CheckpointError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"lfnnify: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
