"""The golden losses: the first steps of fixed-seed K=4 runs on Fashion-MNIST, per block, in float64.

tests/test_golden.py compares every commit's losses with tests/golden/losses.json, so a change of numerics is
seen, not guessed. Everything is float64, the initialisation included, because CPUs of one machine kind differ:
torch draws float32 normal numbers with an AVX2 kernel on an AVX2 CPU and with scalar code on an AVX-512 one,
so the same seed gives initial weights that differ by about 1e-7, and float32 kernels round differently; over
20 replay steps the float32 losses of an Intel Xeon and an AMD EPYC drifted 0.03 apart. In float64 (weights
drawn in float64, where every CPU uses the same code) they agree far more closely (see tests/test_golden.py).
After a change that is meant to alter them, regenerate and say why in the commit:

    python scripts/golden_losses.py --update
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "losses.json"
RUNS = {  # name -> convert knobs; all: timm test_resnet (in_chans=1), K=4, SGD 0.05 momentum 0.9, batch 32
    "local_k4": dict(blocks=4),
    "filterwise_k4": dict(blocks=4, workers=4, leaders=0.5),
    "replay_k4": dict(blocks=4, mode="replay", local_weight=0.3),
    "replay_stash_k4": dict(blocks=4, mode="replay", weight_stashing=True),
    "replay_stash_predict_k4": dict(blocks=4, mode="replay", weight_stashing=True, weight_prediction=True),
}
STEPS, BATCH = 10, 32
# a small ResNet with the cuts K=4 needs: what the goldens guard is the method's arithmetic, which a small model
# exercises as a large one does, at a fraction of the float64 time (resnet18 took 8-11 s a run on the Xeon)
MODEL = "test_resnet"


def losses(knobs: dict, steps: int = STEPS) -> list[list[float]]:
    import timm

    import lfnnify
    from lfnnify.data import FashionMNIST, make_loader

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # timm's initialisation draws in float64: the same on every CPU
    try:
        model = timm.create_model(MODEL, in_chans=1, num_classes=10)
        net = lfnnify.convert(model, example_input=torch.zeros(1, 1, 28, 28), **knobs)
    finally:
        torch.set_default_dtype(default)
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), progress=False)
    loader = make_loader(FashionMNIST(train=True, augment=True), batch_size=BATCH, seed=0)
    loader.sampler.set_epoch(0)
    out = []
    for x, y in loader:
        if len(out) == steps:
            break
        out.append(trainer.train_step(x.double(), y)["block_losses"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="write tests/golden/losses.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {name: losses(knobs) for name, knobs in RUNS.items()}
    if args.update:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"model": MODEL, "steps": STEPS, "batch": BATCH, "dtype": "float64", "runs": runs},
                                     indent=1)
                          + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps(runs)[:2000])


if __name__ == "__main__":
    main()
