"""Fine-tuning a pretrained checkpoint: backprop against every pipeline-capable mode, same steps, several seeds.

1. Pretrain timm resnet18 (in_chans=1, 10 outputs) with backprop on Fashion-MNIST classes 0-4 (seed 0), and save
   it in the runs folder as a safetensors file timm loads (``pretrained_cfg_overlay=dict(file=...)``): the one
   checkpoint every run starts from, as a published one would be.
2. Hold out ``--validation`` of the training images of classes 5-9 (fixed by ``--split-seed``, never augmented).
3. Fine-tune on the rest of classes 5-9 (as 5 new classes: the classifier is re-initialised by
   ``lfnnify.load_pretrained``) with backprop and with each pipeline-capable mode, for the same steps, the same
   optimizer and, for a seed, the same data order; the seed also draws the new classifier and lfnnify's heads.
   lfnnify's modes first warm their random heads up (``head_warmup_steps``) for ``--head-warmup`` extra steps with
   the trunk frozen, so that every method trains the trunk ``--steps`` steps. ``bp_probe`` gives backprop the same
   budget: ``--head-warmup`` steps of a linear probe (only the new classifier learns; BatchNorm statistics move as
   in lfnnify's warm-up), then ``--steps`` steps of backprop, under one cosine schedule over both; it is the
   reference the verdict compares with when it ran (``bp``, without the probe, otherwise).
4. Report, per method, the mean and standard deviation over seeds of the validation and test accuracy on classes
   5-9; the best pipeline-capable mode is chosen on the validation split.

Every (method, seed) is one file in ``--runs``, reused when its settings and commit match, so a table can be built
over several sittings; a run refuses uncommitted changes to lfnnify/ or benchmarks/ (``--allow-dirty`` for quick
looks, which the table marks).

Reproduce:  python -m benchmarks.finetune --seeds 0 1 2
Quick look: python -m benchmarks.finetune --pretrain-steps 20 --steps 20 --methods bp replay --seeds 0 --allow-dirty
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import (  # noqa: E402
    RESULTS,
    commit,
    environment,
    hardware_tag,
    kept_run,
    refuse_bad_arguments,
    refuse_uncommitted,
    write_json,
)

METHODS = {  # name -> (label, convert knobs); None = plain backprop
    "bp": ("backprop", None),
    "bp_probe": ("backprop after the same linear-probe warm-up", None),
    "local": ("LFNN-ℓ, GAP+linear heads", dict(blocks=4)),
    "local_lookahead_layer": ("LFNN-ℓ, look-ahead heads (next layer)", dict(blocks=4, head="lookahead-layer")),
    "replay": ("replay", dict(blocks=4, mode="replay")),
    "replay_stash": ("replay, weight stashing", dict(blocks=4, mode="replay", weight_stashing=True)),
    "replay_stash_delay_lr": ("replay, weight stashing, delay-aware step sizes over the first third (PipeMare)",
                              dict(blocks=4, mode="replay", weight_stashing=True)),
}
DELAY_LR = {"replay_stash_delay_lr": 3}  # delay_lr_warmup = steps // this (the leaderboard's: epoch 1 of 3)


def _split(dataset, classes: range):
    """The examples of ``classes``, relabelled 0..len(classes)-1."""
    from torch.utils.data import Dataset

    keep = torch.nonzero((dataset.labels >= classes.start) & (dataset.labels < classes.stop)).flatten().tolist()

    class Part(Dataset):
        def __len__(self):
            return len(keep)

        def __getitem__(self, i):
            x, y = dataset[keep[i]]
            return x, y - classes.start

    return Part()


def _sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def _bp_steps(model, loader, steps: int, lr: float, probe: int = 0) -> float:
    """``probe`` steps training only the model's classifier, then ``steps`` of backprop; one cosine schedule."""
    opt = _sgd(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps + probe)
    classifier = {id(p) for p in model.get_classifier().parameters()}
    trunk = [p for p in model.parameters() if id(p) not in classifier]
    model.train()
    done, start = 0, time.perf_counter()
    for p in trunk:
        p.requires_grad_(probe == 0)
    steps += probe
    while done < steps:
        loader.sampler.set_epoch(done // len(loader))
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            done += 1
            if done == probe:
                for p in trunk:
                    p.requires_grad_(True)
            if done == steps:
                break
    return time.perf_counter() - start


@torch.no_grad()
def _accuracy(model, loader) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / len(loader.dataset)


def _pretrained(args, train, test) -> tuple[Path, float]:
    """The checkpoint every run starts from, made once per runs folder (backprop on classes 0-4, seed 0)."""
    import timm

    from lfnnify.data import make_loader

    checkpoint = args.runs / f"{args.model}_fmnist_0-4_{args.pretrain_steps}steps.safetensors"
    facts = checkpoint.with_suffix(".json")
    if checkpoint.exists() and facts.exists():
        kept = json.loads(facts.read_text())
        print(f"pretrained checkpoint reused: {checkpoint} (test accuracy {kept['test_accuracy']:.4f} on classes 0-4)",
              flush=True)
        return checkpoint, kept["test_accuracy"]
    torch.manual_seed(0)
    base = timm.create_model(args.model, in_chans=1, num_classes=10)
    seconds = _bp_steps(base, make_loader(_split(train, OLD), batch_size=128, seed=0), args.pretrain_steps, 0.05)
    accuracy = _accuracy(base, make_loader(_split(test, OLD), batch_size=500, shuffle=False))
    from safetensors.torch import save_file

    save_file(base.state_dict(), str(checkpoint))
    loaded = timm.create_model(args.model, pretrained=True, in_chans=1, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(checkpoint), num_classes=10))
    expected = base.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())  # timm reads the file we wrote
    write_json(facts, {"test_accuracy": accuracy, "seconds": seconds, "steps": args.pretrain_steps,
                       "commit": commit()})
    print(f"pretrained on classes 0-4 for {args.pretrain_steps} steps ({seconds:.0f} s): test accuracy "
          f"{accuracy:.4f}; saved as a timm-loadable safetensors file", flush=True)
    return checkpoint, accuracy


def _fine_tune(name: str, seed: int, checkpoint: Path, parts, args) -> dict:
    """One (method, seed): validation and test accuracy on classes 5-9 after the same trunk steps."""
    import timm

    import lfnnify
    from lfnnify.data import make_loader

    train, val, test = parts
    loader = make_loader(train, batch_size=128, seed=1 + seed)
    val_loader, test_loader = (make_loader(d, batch_size=500, shuffle=False) for d in (val, test))
    label, knobs = METHODS[name]
    torch.manual_seed(1 + seed)
    model = lfnnify.load_pretrained(timm.create_model(args.model, in_chans=1, num_classes=5), checkpoint)
    if knobs is None:
        seconds = _bp_steps(model, loader, args.steps, args.lr, probe=args.head_warmup if name == "bp_probe" else 0)
        val_accuracy, test_accuracy = _accuracy(model, val_loader), _accuracy(model, test_loader)
    else:
        extra = {"delay_lr_warmup": max(1, args.steps // DELAY_LR[name])} if name in DELAY_LR else {}
        net = lfnnify.convert(model, example_input=torch.zeros(1, 1, 28, 28), **knobs)
        trainer = lfnnify.Trainer(
            net, optimizer=lambda ps: _sgd(ps, args.lr), head_warmup_steps=args.head_warmup, progress=False,
            scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps + args.head_warmup),
            **extra)
        start = time.perf_counter()  # the warm-up steps train only the heads: the trunk gets args.steps
        trainer.fit(loader, epochs=10**6, max_steps=args.steps + args.head_warmup)
        seconds = time.perf_counter() - start
        val_accuracy, test_accuracy = (trainer.evaluate(d)["accuracy"] for d in (val_loader, test_loader))
    return {"method": name, "label": label, "seed": seed, "val_accuracy": val_accuracy,
            "test_accuracy": test_accuracy, "seconds": seconds}


def _settings(args) -> dict:
    keys = ("model", "pretrain_steps", "steps", "head_warmup", "lr", "threads", "validation", "split_seed",
            "train_subset")
    return {k: getattr(args, k) for k in keys}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per method: mean and standard deviation over seeds of the validation and test accuracy (in points)."""
    return {name: {"label": METHODS[name][0], "seeds": [r["seed"] for r in rows],
                   "commits": sorted({r["commit"] for r in rows}),
                   "val_accuracy": _mean_sd([100 * r["val_accuracy"] for r in rows]),
                   "test_accuracy": _mean_sd([100 * r["test_accuracy"] for r in rows]),
                   "seconds": statistics.mean(r["seconds"] for r in rows)} for name, rows in runs.items()}


def choose(summary: dict) -> str | None:
    """The pipeline-capable mode with the highest mean validation accuracy."""
    capable = {m: s for m, s in summary.items() if METHODS[m][1] is not None}
    return max(capable, key=lambda m: capable[m]["val_accuracy"][0]) if capable else None


def markdown(payload: dict) -> str:
    s, summary = payload["settings"], payload["summary"]
    lines = [f"Fine-tuning {s['model']} (pretrained on Fashion-MNIST classes 0-4, {s['pretrain_steps']} steps: "
             f"{100 * payload['pretrain_test_accuracy']:.2f}% test accuracy) on classes 5-9: {s['steps']} trunk steps "
             f"for every method, seeds {', '.join(map(str, payload['seeds']))}, {s['validation']} training images "
             f"held out for validation; rows from commit(s) {', '.join(payload['commits'])}"
             + ("" if payload["one_commit"] else " (NOT one clean commit)") + ".", "",
             "| method | seeds | validation accuracy (%) | test accuracy (%) | s per run |", "|---|---|---|---|---|"]
    for r in summary.values():
        (vm, vs), (tm, ts) = r["val_accuracy"], r["test_accuracy"]
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {vm:.2f} ± {vs:.2f} | {tm:.2f} ± {ts:.2f} | "
                     f"{r['seconds']:.0f} |")
    if payload["chosen"]:
        lines += ["", payload["verdict"]]
    return "\n".join(lines)


OLD, NEW = range(0, 5), range(5, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a timm model (tests: test_resnet)")
    parser.add_argument("--pretrain-steps", type=int, default=235, help="backprop steps on classes 0-4 (1 epoch)")
    parser.add_argument("--steps", type=int, default=215, help="fine-tuning trunk steps on classes 5-9 (1 epoch of "
                                                               "the 27,500 images left after the validation split)")
    parser.add_argument("--head-warmup", type=int, default=20, help="lfnnify's head_warmup_steps")
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (pretraining: 0.05)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--validation", type=int, default=2500, help="training images of classes 5-9 held out")
    parser.add_argument("--split-seed", type=int, default=2026, help="which training images are held out")
    parser.add_argument("--train-subset", type=int, default=None, help="fine-tune on only the first N (quick looks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=None, help="folder of per-run files (default: OUT/NAME-runs)")
    parser.add_argument("--allow-dirty", action="store_true", help="run with uncommitted changes (quick looks only)")
    parser.add_argument("--name", default=None, help="result file stem (default: experiment, model, hardware, date)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    refuse_bad_arguments("finetune.py", args, counts=("pretrain_steps", "steps", "threads"))
    refuse_uncommitted("finetune.py", args.allow_dirty)

    from torch.utils.data import Subset

    from lfnnify.data import FashionMNIST

    torch.set_num_threads(args.threads)
    env_before = environment(args.threads)
    stem = args.name or f"finetune-fashion_mnist-{args.model}-k4-seeds-{hardware_tag()}-{env_before['date'][:10]}"
    args.runs = args.runs or args.out / f"{stem}-runs"
    args.runs.mkdir(parents=True, exist_ok=True)
    train = FashionMNIST(train=True, augment=True)
    test = FashionMNIST(train=False)
    checkpoint, pre_acc = _pretrained(args, train, test)
    new_train = _split(train, NEW)
    order = torch.randperm(len(new_train), generator=torch.Generator().manual_seed(args.split_seed)).tolist()
    held, kept = sorted(order[: args.validation]), sorted(order[args.validation :])
    if args.train_subset:
        kept = kept[: args.train_subset]
    parts = (Subset(new_train, kept), Subset(_split(FashionMNIST(train=True, augment=False), NEW), held),
             _split(test, NEW))
    print(f"fine-tuning on {len(kept)} images of classes 5-9, {len(held)} held out for validation", flush=True)

    settings, runs, at = _settings(args), {}, commit()
    for seed in args.seeds:
        for name in args.methods:
            path = args.runs / f"{name}-seed{seed}.json"
            result = kept_run(path, settings, at)
            if result:
                runs.setdefault(name, []).append(result)
                continue
            result = {**_fine_tune(name, seed, checkpoint, parts, args), "settings": settings, "commit": at}
            write_json(path, result)
            runs.setdefault(name, []).append(result)
            print(f"  {result['label']:<40} seed {seed}: validation accuracy {result['val_accuracy']:.4f}, test "
                  f"accuracy {result['test_accuracy']:.4f}  ({result['seconds']:.0f} s)", flush=True)

    summary = summarise(runs)
    commits = sorted({c for s in summary.values() for c in s["commits"]})
    chosen, verdict = choose(summary), None
    reference = "bp_probe" if "bp_probe" in summary else "bp"
    if chosen and reference in summary:
        gap = summary[chosen]["test_accuracy"][0] - summary[reference]["test_accuracy"][0]
        verdict = (f"chosen on the validation split: {summary[chosen]['label']}; its mean test accuracy is "
                   f"{gap:+.2f} points against {summary[reference]['label']}'s (target: within 0.3 points: "
                   f"{'met' if gap >= -0.3 else 'MISSED'})")
    elif chosen:
        verdict = (f"chosen on the validation split: {summary[chosen]['label']}; no backprop row in this call "
                   f"(add bp to --methods), so no comparison with it")
    payload = {
        "experiment": "finetune_fashion_mnist",
        "model": f"timm {args.model} (in_chans=1); pretrained on classes 0-4, fine-tuned on classes 5-9",
        "settings": settings, "seeds": args.seeds, "pretrain_test_accuracy": pre_acc, "runs": runs,
        "summary": summary, "chosen": chosen, "verdict": verdict, "commits": commits,
        "one_commit": len(commits) == 1 and not commits[0].endswith("+dirty"),
        "env_before": env_before, "env": environment(args.threads),
        "command": " ".join(["python -m benchmarks.finetune", *sys.argv[1:]]),
    }
    path = write_json(args.out / f"{stem}.json", payload)
    (args.out / f"{stem}.md").write_text(markdown(payload) + "\n")
    print("\n" + markdown(payload) + f"\nwrote {path}")


if __name__ == "__main__":
    main()
