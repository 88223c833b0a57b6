"""``lfnnify train``: one recipe, one run folder (recipe, JSONL log, checkpoints, plots, final table)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import sys
import time
from pathlib import Path

import torch
import yaml

from .._jsonl import append_jsonl, read_jsonl
from .._writing import write_regular
from ..checkpoint import load_pretrained, read_trainer_state, save
from ..checkpoint.loading import load_weights_into
from ..checkpoint.store import exists as checkpoint_exists
from ..data import build_datasets, make_loader
from ..errors import ConfigError, DataError, DataNotFoundError
from ..plots import plot_curves, plot_leadership
from ..surgery.conversion import convert
from ..training.options import SEND_DTYPES_BY_NAME, TrainerOptions
from ..training.trainer import Trainer
from .recipes import NOT_IN_RECIPES, Recipe, recipe_to_dict
from .zoo import create_model

__all__ = ["train_from_recipe", "main_train"]


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
    device: str | None = None,
    backend: str | None = None,
) -> int:
    """Run one recipe into its run folder; returns the process exit code (128 + signal when interrupted).
    ``device`` (``--device``) overrides ``train.device``, ``backend`` (``--backend``) ``pipeline.backend``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    leader = int(os.environ.get("RANK", "0")) == 0
    out = Path(out) if out else _default_out(recipe_path)
    if (backend or recipe.pipeline.backend) == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend nccl (pipeline.backend): backend 'nccl' talks between GPUs, and torch sees none "
                          "here; use --backend gloo, or leave it out and the pipeline chooses by itself")
    if world == 1:  # under torchrun rank 0 decides, on its own disk, once every rank has joined (below)
        resume = _resume_decision(out, resume, recipe)
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    train_set, test_set, chans, classes, size = build_datasets(recipe, root=data_root, download=download)
    net = _build_net(recipe, chans=chans, classes=classes, size=size, pretrained=pretrained, world=world)
    place = resolve_device(device or t.device)
    if world == 1:
        net.to(place)  # the pipeline puts each rank's block on its own device
    pin = place.type == "cuda"
    workers = recipe.data.workers
    indexed = world > 1 and recipe.pipeline.send_deltas  # each sample's change is keyed by its index
    train_loader = make_loader(train_set, batch_size=recipe.data.batch_size, seed=t.seed, workers=workers,
                               pin_memory=pin, indexed=indexed)
    test_loader = make_loader(test_set, batch_size=recipe.data.eval_batch_size, shuffle=False, workers=workers,
                              pin_memory=pin)
    steps_per_epoch = _steps_per_epoch(len(train_loader), blocks=len(net.blocks), world=world)
    total = t.iterations if t.iterations is not None else t.epochs * steps_per_epoch
    trainer = _build_trainer(recipe, net, total=total, world=world, log_path=out / "log.jsonl", progress=progress,
                             device=place, backend=backend or recipe.pipeline.backend)
    if world > 1:  # the run folder lies on rank 0's host: it decides, and every rank takes its part from there
        resume = trainer.decide(lambda: _resume_decision(out, resume, recipe))
    if resume and world > 1:
        trainer.restore(out / "ckpt")
    elif resume:
        load_weights_into(net, out / "ckpt")
        trainer.load_state_dict(read_trainer_state(out / "ckpt"))
    elif leader:
        out.mkdir(parents=True, exist_ok=True)
        write_regular(out / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False).encode())
    if leader:
        print(net.plan if recipe.method == "lfnn" else f"{recipe.model.name}: backprop (method: bp)", flush=True)
        where = f"device {trainer.device}" + (" (rank 0; each rank its own)" if world > 1 else "")
        replicas = world // len(net.blocks)
        print(f"training {total} iterations ({total / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps)"
              f" on {where}, {train_loader.num_workers} loader workers"
              + (f", pipeline over {world} processes" if world > 1 else "")
              + (f" ({replicas} replicas per block, each step {replicas} batches)" if replicas > 1 else "")
              + (f", resuming at {trainer.step}" if resume else ""), flush=True)
    stopped, previous = _install_stop_handlers(trainer)
    start = time.perf_counter()
    try:
        evaluations, stop = _train(recipe, net, trainer, train_loader, test_loader, total=total,
                                   steps_per_epoch=steps_per_epoch, out=out, stopped=stopped, resume=resume,
                                   leader=leader, world=world)
    finally:  # a Python caller gets its own handlers back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:  # every rank agreed on it at the same step, so every rank saves (a collective) or none does
        save(net, out / "ckpt", trainer=trainer)
        if leader:
            print(f"interrupted at iteration {trainer.step} of {total}: checkpoint saved to {out / 'ckpt'}; "
                  f"continue with: "
                  f"lfnnify train {out / 'recipe.yaml'} --out {out} --resume", flush=True)
        return 128 + stop
    if leader:
        _finish(out, recipe, net, trainer, evaluations, time.perf_counter() - start)
    return 0


def _resume_decision(out: Path, resume: bool, recipe: Recipe) -> bool:
    """Whether this run resumes (asked for, or torchrun restarted the workers and a checkpoint exists), checked
    against the run folder ``out``: a new run only in a new or empty folder, a resumed one only with its recipe."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and checkpoint_exists(out / "ckpt"):  # torchrun restarted the workers after a failure
        resume = True
        print(f"torchrun restarted the workers (restart {restarts}): resuming from the last checkpoint in "
              f"{out / 'ckpt'}", flush=True)
    _check_out(out, resume)
    if resume:
        _check_same_run(out, recipe)
    return resume


def _check_out(out: Path, resume: bool) -> None:
    if resume and not checkpoint_exists(out / "ckpt"):
        raise DataNotFoundError(f"--resume: no checkpoint at {out / 'ckpt'}; pass the --out folder of the run to "
                                f"continue")
    if not resume and (out / "ckpt").exists():
        raise ConfigError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
    if not resume and (out.exists() or out.is_symlink()):
        if out.is_symlink() or not out.is_dir():
            raise ConfigError(f"--out {out} is not a folder (a file or a symbolic link); a run writes a folder of its "
                              f"own: choose another --out")
        inside = sorted(c.name for c in out.iterdir())
        if inside:
            shown = ", ".join(inside[:4]) + (f" and {len(inside) - 4} more" if len(inside) > 4 else "")
            raise ConfigError(
                f"{out} is not empty (it holds {shown}): a run writes its recipe, log, checkpoints and plots there "
                f"and would replace files of those names, so a new run starts only in a new or empty folder. Choose "
                f"another --out (for example {out / 'run'})")


# what a resumed run may change: where and how fast it runs, never what it computes
RESUME_MAY_CHANGE = ("name", "data.root", "data.workers", "train.device", "train.threads", "pipeline.timeout_s",
                     "pipeline.backend")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_same_run(out: Path, recipe: Recipe) -> None:
    """Refuse to resume the run in ``out`` with a recipe that would make it another run, naming the first setting
    that differs: the run folder keeps the recipe it ran (with every --set it was given)."""
    from .recipes import load_recipe

    kept = out / "recipe.yaml"
    if not kept.is_file():
        raise ConfigError(f"--resume: {out} holds no recipe.yaml, so lfnnify cannot check that this recipe is the "
                          f"run's own; resume a run folder lfnnify made, or start a new run")
    saved, given = _flat(recipe_to_dict(load_recipe(kept))), _flat(recipe_to_dict(recipe))
    differ = [k for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != given.get(k)]
    if differ:
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:4])})" if len(differ) > 1 else ""
        raise ConfigError(
            f"--resume: the run in {out} ran with {differ[0]}={saved[differ[0]]!r} ({kept}), and this recipe has "
            f"{differ[0]}={given.get(differ[0])!r}{more}; a resumed run must be the run it continues. Resume it with "
            f"its own recipe: lfnnify train {kept} --out {out} --resume (a resume may change only "
            f"{', '.join(RESUME_MAY_CHANGE)})")


def _build_net(recipe: Recipe, *, chans: int, classes: int, size: int, pretrained: str | None, world: int):
    """The recipe's model, pretrained weights loaded, converted (one block for method: bp)."""
    model = create_model(recipe.model.name, num_classes=recipe.model.num_classes or classes,
                         in_chans=recipe.model.in_chans or (chans if chans != 3 else None), cifar=recipe.model.cifar)
    pretrained = pretrained or recipe.model.pretrained
    if pretrained:
        load_pretrained(model, pretrained)
    example = torch.zeros(1, chans, size, size)
    if recipe.method == "bp":  # one block, no heads: exactly backprop, through the same trainer
        return convert(model, blocks=1, example_input=example)
    settings = _fields(recipe.convert)  # convert's own settings, field for field (recipes.ConvertSection)
    if world > 1 and settings["balance"] == "time":  # every rank must cut alike: measured times differ by rank
        settings["balance"] = "flops"
    return convert(model, **settings, example_input=example)


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; a GPU asked for where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no GPU here (torch.cuda.is_available() is False); use "
                              f"--device cpu, or install a CUDA build of torch")
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    elif name != "cpu":
        raise ConfigError(f"device {name!r} must be auto, cpu, cuda or cuda:N")
    return torch.device(name)


def _build_trainer(recipe: Recipe, net, *, total: int, world: int, log_path: Path, progress: bool,
                   device: torch.device, backend: str | None):
    t, o = recipe.train, recipe.train.optimizer

    def optimizer(ps):
        if o.name == "sgd":
            return torch.optim.SGD(ps, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
        return torch.optim.AdamW(ps, lr=o.lr, weight_decay=o.weight_decay)

    def cosine(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=t.schedule.final_lr)

    trained = {f.name for f in dataclasses.fields(TrainerOptions)} - set(NOT_IN_RECIPES)  # the trainers' settings
    common = dict({k: v for k, v in _fields(t).items() if k in trained}, optimizer=optimizer, log_path=log_path,
                  scheduler=cosine if t.schedule.name == "cosine" else None, progress=progress)
    if world > 1:
        from ..pipeline.trainer import PipelineTrainer  # distributed code only under torchrun

        p = _fields(recipe.pipeline)
        p["send_dtype"] = SEND_DTYPES_BY_NAME.get(p["send_dtype"])
        p.update(backend=backend, threads=t.threads, device="cpu" if device.type == "cpu" else None)
        return PipelineTrainer(net, **p, **common)
    return Trainer(net, **common)


def _fields(section) -> dict:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _steps_per_epoch(batches: int, *, blocks: int, world: int) -> int:
    """Optimizer steps in one pass over the data: with R replicas per block (world = blocks x R) every step takes R
    batches, one per replica."""
    replicas = max(1, world // blocks)
    if batches < replicas:
        raise DataError(f"the training data gives {batches} batches, fewer than the {replicas} replicas of each block "
                        f"(world size {world}, {blocks} blocks); use a smaller data.batch_size or fewer processes")
    return batches // replicas


def _train(recipe, net, trainer, train_loader, test_loader, *, total, steps_per_epoch, out, stopped, resume,
           leader, world) -> tuple[list[dict], int]:
    """Train in chunks up to the next evaluation or checkpoint; returns every evaluation record, and the signal
    that stopped the run (0 when it ran to the end).

    Under torchrun the ranks agree after every chunk whether any of them was asked to stop (SIGTERM or Ctrl-C may
    reach one host only), so that all of them stop, and save, at the same step: a stop asked of block 0's rank
    ends the chunk at once; one asked of another rank takes effect at the end of the chunk."""
    t = recipe.train
    evaluations = read_jsonl(out / "log.jsonl", kind="eval") if resume and leader else []
    eval_every = t.eval_every or steps_per_epoch
    start, trained_s = time.perf_counter(), 0.0  # training time only: evaluations and checkpoints are not counted
    while trainer.step < total:
        next_eval = (trainer.step // eval_every + 1) * eval_every
        next_ckpt = (trainer.step // t.checkpoint_every + 1) * t.checkpoint_every
        chunk = time.perf_counter()
        stop_at = min(total, next_eval, next_ckpt)
        trainer.fit(train_loader if _reads_data(trainer) else None, epochs=10**9, max_steps=stop_at)
        trained_s += time.perf_counter() - chunk
        stop = trainer.max_over_ranks(stopped.signal) if world > 1 else stopped.signal
        if stop:
            return evaluations, stop
        if trainer.step in (next_eval, total):
            metrics = trainer.evaluate(test_loader if _reads_data(trainer) else None)
            record = {"kind": "eval", "step": trainer.step, "epoch": trainer.step / steps_per_epoch,
                      "train_seconds": trained_s, "wall_seconds": time.perf_counter() - start, **metrics}
            evaluations.append(record)
            if leader:
                append_jsonl(out / "log.jsonl", record)
                print(f"step {trainer.step}: test accuracy {metrics['accuracy']:.4f}; heads "
                      + ", ".join(f"{a:.3f}" for a in metrics["block_accuracy"][:-1]), flush=True)
        save(net, out / "ckpt", trainer=trainer)
    return evaluations, 0


def _reads_data(trainer) -> bool:
    return getattr(trainer, "first", True)


class _Stop:
    def __init__(self):
        self.signal = 0

    def __bool__(self):
        return self.signal != 0


def _install_stop_handlers(trainer) -> tuple[_Stop, dict]:
    """SIGTERM and Ctrl-C ask the trainer to stop after its step (a second one stops at once); returns the flag
    and the handlers they replaced."""
    stop = _Stop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        if stop:  # a second signal: stop now
            raise KeyboardInterrupt
        stop.signal = signum
        trainer.request_stop()

    for sig in previous:
        signal.signal(sig, handler)
    return stop, previous


def _finish(out, recipe, net, trainer, evaluations, seconds) -> None:
    files = ["recipe.yaml", "log.jsonl", "ckpt/"]
    if evaluations:
        heads = len(evaluations[-1]["block_accuracy"])
        series = {("output" if k == heads - 1 else f"head {k}"): [100 * (1 - e["block_accuracy"][k])
                                                                  for e in evaluations] for k in range(heads)}
        plot_curves(series, out / "curves.png", xlabel="evaluation (end of each epoch)",
                    title=f"{recipe.name}: test error of every head")
        files.append("curves.png")
    if trainer.leadership and net.config["workers"] > 1:
        plot_leadership(trainer.leadership, out / "leadership.png")
        files.append("leadership.png")
    final = evaluations[-1] if evaluations else {}
    lines = [f"# {recipe.name}", "", f"method: {recipe.method}; model: {recipe.model.name}; "
             f"{trainer.step} iterations in {seconds:.0f} s on {_device_name(trainer.device)}", "",
             "| block | cut after | test accuracy |",
             "|---|---|---|"]
    cuts = net.plan.cuts + ["output"]
    for k, acc in enumerate(final.get("block_accuracy", [])):
        lines.append(f"| {k} | {cuts[k]} | {acc:.4f} |")
    write_regular(out / "results.md", ("\n".join(lines) + "\n").encode())
    files.append("results.md")
    print("\n".join(lines))
    print(f"done: test accuracy {final.get('accuracy', float('nan')):.4f}; everything is in {out}/ "
          f"({', '.join(files)})")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    from .machine import cpu_name

    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def main_train(args) -> int:
    from .recipes import find_recipe, load_recipe

    path = find_recipe(args.recipe)
    recipe = load_recipe(path, overrides=args.set or [])
    return train_from_recipe(
        recipe, recipe_path=path, out=args.out, data_root=args.data, pretrained=args.pretrained,
        resume=args.resume, download=args.download, progress=not args.no_progress and sys.stderr.isatty(),
        device=args.device, backend=args.backend,
    )
