"""``lfnnify train``: one recipe, one run folder (recipe, JSONL log, checkpoints, plots, final table)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import yaml

from .recipes import Recipe, recipe_to_dict

__all__ = ["train_from_recipe", "build_datasets"]


# ---------------------------------------------------------------- data


def build_datasets(recipe: Recipe, *, root: str | None, download: bool):
    """(train, test, in_chans, classes, input_size) for the recipe's dataset. Never downloads unless asked."""
    d = recipe.data
    root = root or d.root
    if d.dataset == "fashion_mnist":
        from .data import FashionMNIST

        train, test = FashionMNIST(root, train=True, augment=d.augment), FashionMNIST(root, train=False)
        chans, classes, size = 1, 10, 28
    elif d.dataset in ("cifar10", "cifar100"):
        import torchvision
        from torchvision import transforms as T

        cls = torchvision.datasets.CIFAR10 if d.dataset == "cifar10" else torchvision.datasets.CIFAR100
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if d.augment else []
        folder = root or "data/cifar"
        try:
            train = cls(folder, train=True, download=download, transform=T.Compose([*aug, T.ToTensor(), T.Normalize(mean, std)]))
            test = cls(folder, train=False, download=download, transform=T.Compose([T.ToTensor(), T.Normalize(mean, std)]))
        except RuntimeError as exc:
            raise FileNotFoundError(
                f"{d.dataset} not found in {Path(folder).resolve()} (torchvision layout); pass --data DIR, "
                f"or add --download to fetch it ({str(exc).splitlines()[0]})"
            ) from None
        chans, classes, size = 3, (10 if d.dataset == "cifar10" else 100), 32
    elif d.dataset == "imagefolder":
        import torchvision
        from torchvision import transforms as T

        if not root:
            raise FileNotFoundError("data.dataset is imagefolder but no folder was given: pass --data DIR (with train/ and val/)")
        size = d.input_size or 224
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        aug = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if d.augment else [T.Resize(size), T.CenterCrop(size)]
        folders = [Path(root) / "train", next((Path(root) / n for n in ("val", "test") if (Path(root) / n).is_dir()),
                                              Path(root) / "val")]
        for f in folders:
            if not f.is_dir():
                raise FileNotFoundError(f"image folder {f} not found: an imagefolder dataset needs {root}/train and {root}/val")
        train = torchvision.datasets.ImageFolder(folders[0], T.Compose([*aug, T.ToTensor(), T.Normalize(mean, std)]))
        test = torchvision.datasets.ImageFolder(
            folders[1], T.Compose([T.Resize(int(size * 1.14)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]))
        chans, classes = 3, len(train.classes)
    else:
        from .data import SyntheticImages

        size = d.input_size or 32
        chans = recipe.model.in_chans or 3
        classes = recipe.model.num_classes or 10
        train = SyntheticImages(d.train_subset or 512, shape=(chans, size, size), classes=classes, seed=recipe.train.seed)
        test = SyntheticImages(d.eval_subset or 256, shape=(chans, size, size), classes=classes, seed=recipe.train.seed + 1)
    if d.train_subset:
        from torch.utils.data import Subset

        train = Subset(train, range(min(d.train_subset, len(train))))
    if d.eval_subset:
        from torch.utils.data import Subset

        test = Subset(test, range(min(d.eval_subset, len(test))))
    return train, test, chans, classes, d.input_size or size


# ---------------------------------------------------------------- the run


def _default_out(recipe_path: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe_path.stem}-{stamp}"


def train_from_recipe(
    recipe: Recipe,
    *,
    recipe_path: Path,
    out: Path | None,
    data_root: str | None = None,
    pretrained: str | None = None,
    resume: bool = False,
    download: bool = False,
    progress: bool = True,
) -> int:
    import lfnnify

    from .data import make_loader
    from .models import create_model
    from .plots import plot_curves, plot_leadership

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out = Path(out) if out else _default_out(recipe_path)
    if resume and not (out / "ckpt" / "lfnnify.json").exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {out / 'ckpt'}; pass the --out folder of the run to continue")
    if not resume and (out / "ckpt").exists():
        raise FileExistsError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    train_set, test_set, chans, classes, size = build_datasets(recipe, root=data_root, download=download)
    model = create_model(recipe.model.name, num_classes=recipe.model.num_classes or classes,
                         in_chans=recipe.model.in_chans or (chans if chans != 3 else None), cifar=recipe.model.cifar)
    pretrained = pretrained or recipe.model.pretrained
    if pretrained:
        lfnnify.load_pretrained(model, pretrained)
    c = recipe.convert
    example = torch.zeros(1, chans, size, size)
    if recipe.method == "bp":  # one block, no heads: exactly backprop, through the same trainer
        net = lfnnify.convert(model, blocks=1, example_input=example)
    else:
        net = lfnnify.convert(
            model, blocks=c.blocks, cuts=c.cuts, workers=c.workers, leaders=c.leaders, mode=c.mode,
            follower_weight=c.follower_weight, balance="flops" if world > 1 and c.balance == "time" else c.balance,
            example_input=example,
        )
    train_loader = make_loader(train_set, batch_size=recipe.data.batch_size, seed=t.seed)
    test_loader = make_loader(test_set, batch_size=recipe.data.eval_batch_size, shuffle=False)
    total = t.iterations if t.iterations is not None else t.epochs * len(train_loader)

    o = t.optimizer
    if o.name == "sgd":
        def optimizer(ps):
            return torch.optim.SGD(ps, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
    else:
        def optimizer(ps):
            return torch.optim.AdamW(ps, lr=o.lr, weight_decay=o.weight_decay)
    scheduler = None
    if t.schedule.name == "cosine":
        def scheduler(opt):
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=t.schedule.final_lr)

    common = dict(optimizer=optimizer, scheduler=scheduler, amp=t.amp, grad_clip=t.grad_clip,
                  head_warmup_steps=t.head_warmup_steps, reselect=t.reselect, log_path=out / "log.jsonl",
                  progress=progress)
    if world > 1:
        p = recipe.pipeline
        trainer = lfnnify.PipelineTrainer(net, max_in_flight=p.max_in_flight, timeout_s=p.timeout_s,
                                          send_dtype=torch.bfloat16 if p.send_dtype == "bf16" else None,
                                          threads=t.threads, **common)
    else:
        trainer = lfnnify.Trainer(net, **common)
    leader = rank == 0
    if resume:
        lfnnify.checkpoint.load_weights_into(net, out / "ckpt")
        stage = getattr(trainer, "stage", None)
        trainer.load_state_dict(lfnnify.read_trainer_state(out / "ckpt", block=stage))
    elif leader:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    if leader:
        print(net.plan if recipe.method == "lfnn" else f"{recipe.model.name}: backprop (method: bp)", flush=True)
        print(f"training {total} iterations ({total / len(train_loader):.2f} epochs of {len(train_loader)} batches)"
              + (f", pipeline over {world} processes" if world > 1 else "") + (f", resuming at {trainer.step}" if resume else ""),
              flush=True)

    stopped = _install_stop_handlers(trainer)
    evaluations = _read_evaluations(out / "log.jsonl") if resume else []
    steps_per_epoch = len(train_loader)
    start = time.perf_counter()
    eval_every = t.eval_every or steps_per_epoch
    trained_s = 0.0  # training time only: evaluations and checkpoints are not counted
    while trainer.step < total and not stopped:
        next_eval = (trainer.step // eval_every + 1) * eval_every
        next_ckpt = (trainer.step // t.checkpoint_every + 1) * t.checkpoint_every
        target = min(total, next_eval, next_ckpt)
        chunk = time.perf_counter()
        trainer.fit(train_loader if _reads_data(trainer) else None, epochs=10**9, max_steps=target)
        trained_s += time.perf_counter() - chunk
        if stopped:
            break
        if trainer.step in (next_eval, total):
            metrics = trainer.evaluate(test_loader if _reads_data(trainer) else None)
            record = {"kind": "eval", "step": trainer.step, "epoch": trainer.step / steps_per_epoch,
                      "train_seconds": trained_s, "wall_seconds": time.perf_counter() - start, **metrics}
            evaluations.append(record)
            if leader:
                _append(out / "log.jsonl", record)
                print(f"step {trainer.step}: test accuracy {metrics['accuracy']:.4f}; heads "
                      + ", ".join(f"{a:.3f}" for a in metrics["block_accuracy"][:-1]), flush=True)
        lfnnify.save(net, out / "ckpt", trainer=trainer)
    if stopped:
        lfnnify.save(net, out / "ckpt", trainer=trainer)
        if leader:
            print(f"interrupted at iteration {trainer.step} of {total}: checkpoint saved to {out / 'ckpt'}; continue with: "
                  f"lfnnify train {recipe_path} --out {out} --resume", flush=True)
        return 128 + stopped.signal
    if leader:
        _finish(out, recipe, net, trainer, evaluations, time.perf_counter() - start, plot_curves, plot_leadership)
    return 0


def _reads_data(trainer) -> bool:
    return getattr(trainer, "first", True)


class _Stop:
    def __init__(self):
        self.signal = 0

    def __bool__(self):
        return self.signal != 0


def _install_stop_handlers(trainer) -> _Stop:
    stop = _Stop()

    def handler(signum, frame):
        if stop:  # a second signal: stop now
            raise KeyboardInterrupt
        stop.signal = signum
        trainer.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _read_evaluations(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "eval"]


def _finish(out, recipe, net, trainer, evaluations, seconds, plot_curves, plot_leadership) -> None:
    files = ["recipe.yaml", "log.jsonl", "ckpt/"]
    if evaluations:
        heads = len(evaluations[-1]["block_accuracy"])
        series = {("output" if k == heads - 1 else f"head {k}"): [100 * (1 - e["block_accuracy"][k]) for e in evaluations]
                  for k in range(heads)}
        plot_curves(series, out / "curves.png", xlabel="evaluation (end of each epoch)",
                    title=f"{recipe.name}: test error of every head")
        files.append("curves.png")
    if trainer.leadership and net.config["workers"] > 1:
        plot_leadership(trainer.leadership, out / "leadership.png")
        files.append("leadership.png")
    final = evaluations[-1] if evaluations else {}
    lines = [f"# {recipe.name}", "", f"method: {recipe.method}; model: {recipe.model.name}; "
             f"{trainer.step} iterations in {seconds:.0f} s", "", "| block | cut after | test accuracy |", "|---|---|---|"]
    cuts = net.plan.cuts + ["output"]
    for k, acc in enumerate(final.get("block_accuracy", [])):
        lines.append(f"| {k} | {cuts[k]} | {acc:.4f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    files.append("results.md")
    print("\n".join(lines))
    print(f"done: test accuracy {final.get('accuracy', float('nan')):.4f}; everything is in {out}/ ({', '.join(files)})")


def main_train(args) -> int:
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.set or [])
    return train_from_recipe(
        recipe, recipe_path=Path(args.recipe), out=args.out, data_root=args.data, pretrained=args.pretrained,
        resume=args.resume, download=args.download, progress=not args.no_progress and sys.stderr.isatty(),
    )
