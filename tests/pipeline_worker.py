"""Run by torchrun from the pipeline tests: every rank runs this same script (not a test module).

One launch runs several scenarios one after another in the same processes (``--scenarios a b c``), each with
its own model, trainer and output folder, because a launch costs more than a scenario here. ``SCENARIOS``
says what each one trains; the tests rebuild the same runs on one device from it.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lfnnify  # noqa: E402
import lfnnify.pipeline.trainer  # noqa: E402
from lfnnify.data import SyntheticImages, make_loader  # noqa: E402

# the balance report after 5 steps (not 10), so that 7-step scenarios make one
lfnnify.pipeline.trainer.CHECK_AFTER_STEPS = 5

# shared with the single-process references in the tests; the pipeline's properties need BatchNorm, residuals and
# several cuts, not size: timm's test_resnet (0.37M parameters) has them and trains 10x faster than resnet18 here
MODEL = "test_resnet"
TIMEOUT_S = 30  # how long a rank waits for a neighbour (PipelineTrainer timeout_s)
SIZE, BATCH, DATA = 16, 16, 72  # 72 images: the last batch of each epoch has 8, not 16
LARGE = dict(size=128, channels=64, batch=16, data=32)  # 16 x 64 x 128 x 128 floats: 64 MiB per message

# name -> what it trains: blocks, mode (local | replay | replay-stash), local_weight, switch_at/switch_to, head,
# refresh_every, predict, delay_lr (delay-aware step sizes over that many steps), send (send_dtype: bf16 | int8),
# deltas (send_deltas: each sample's change as int8, the loader giving sample indices), powersgd (the replicas
# average through PowerSGD at this rank, from step 2), overlap (False: each step waits for its sends), ahead
# (receive_ahead: the next batch's receive posted before this one computes),
# steps, resume_at (save there, load, go on), model (timm: MODEL | plain | large | torchvision), relayout (then
# resume the same ranks as that many blocks x 1 replica); the world size is blocks x replicas
SCENARIOS = {
    "2-local": dict(blocks=2),
    "2-replay": dict(blocks=2, mode="replay"),
    "2-local-bf16": dict(blocks=2, send="bf16", steps=3),
    "2-replay-int8": dict(blocks=2, mode="replay", send="int8", steps=3),
    # 12 steps: each sample seen 2-3 times
    "2-local-int8-deltas": dict(blocks=2, send="int8", deltas=True, steps=12, ahead=True),
    "2-local-resume": dict(blocks=2, resume_at=3),
    "2-replay-resume": dict(blocks=2, mode="replay", resume_at=3),
    "2-torchvision": dict(blocks=2, model="torchvision", steps=2),
    "3-local": dict(blocks=3),
    "3-replay-w0.5": dict(blocks=3, mode="replay", local_weight=0.5),
    "3-replay-stash": dict(blocks=3, mode="replay-stash"),
    "3-replay-stash-predict": dict(blocks=3, mode="replay-stash", predict=True),
    "3-replay-stash-delay-lr": dict(blocks=3, mode="replay-stash", delay_lr=4),
    "3-local-to-replay-at-3": dict(blocks=3, switch_at=3, switch_to="replay"),
    "3-replay-w0.5-to-local-at-3": dict(blocks=3, mode="replay", local_weight=0.5, switch_at=3, switch_to="local"),
    "3-lookahead-refresh": dict(blocks=3, mode="replay", head="lookahead-layer", refresh_every=2),
    # every message a step sends has arrived before the next step computes: activations, gradients and weights
    "3-lookahead-refresh-no-overlap": dict(blocks=3, mode="replay", head="lookahead-layer", refresh_every=2,
                                           overlap=False),
    # each block posts the receive of its next batch before it computes this one (replay: gradients and weights
    # cross too; 2-local-int8-deltas receives ahead as well: the sample memory decodes a batch received ahead)
    "3-lookahead-refresh-ahead": dict(blocks=3, mode="replay", head="lookahead-layer", refresh_every=2, ahead=True),
    "3-replay-64mib": dict(blocks=3, mode="replay", model="large", steps=3),
    "4-replicas-seeded-apart": dict(blocks=2, replicas=2, mode="replay", model="plain", steps=2),
    "4-replicas-batchnorm": dict(blocks=2, replicas=2, mode="replay-stash", steps=4, relayout=4),
    "4-replicas-powersgd": dict(blocks=2, replicas=2, mode="replay", model="plain", steps=4, powersgd=1),
    "2-powersgd-one-replica": dict(blocks=2, model="plain", steps=1, powersgd=1),  # refused: no replicas
}
DEFAULTS = dict(mode="local", local_weight=0.0, switch_at=None, switch_to=None, head="linear", refresh_every=None,
                predict=False, delay_lr=None, send=None, deltas=False, steps=7, resume_at=None, model="timm",
                replicas=1, relayout=None, powersgd=None, overlap=True, ahead=False)


def spec(name: str) -> dict:
    return {**DEFAULTS, **SCENARIOS[name]}


def world(name: str) -> int:
    s = spec(name)
    return s["blocks"] * s["replicas"]


def _plain():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 10))


def _large():
    c = LARGE["channels"]  # 1x1 convolutions: cheap to compute, 64 MiB activations (and gradients) between blocks
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, c, 1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 10))


def build(name: str, seed: int = 0):
    """The converted model of scenario ``name``, initialised from ``seed``."""
    import timm
    import torchvision

    s = spec(name)
    torch.manual_seed(seed)
    mode = "replay" if s["mode"] == "replay-stash" else s["mode"]
    knobs = dict(blocks=s["blocks"], mode=mode, local_weight=s["local_weight"],
                 weight_stashing=s["mode"] == "replay-stash", weight_prediction=s["predict"])
    if s["model"] == "plain":  # no BatchNorm, one worker: replicas averaging gradients equal the doubled batch
        return lfnnify.convert(_plain(), num_classes=10, example_input=torch.zeros(1, 1, SIZE, SIZE), **knobs)
    if s["model"] == "large":
        size = LARGE["size"]
        return lfnnify.convert(_large(), cuts=["1", "3"], num_classes=10, example_input=torch.zeros(1, 1, size, size),
                               **{k: v for k, v in knobs.items() if k != "blocks"})
    if s["model"] == "torchvision":  # a model lfnnify rebuilds by class and weight shapes
        return lfnnify.convert(torchvision.models.resnet18(num_classes=10), blocks=s["blocks"],
                               example_input=torch.zeros(1, 3, SIZE, SIZE))
    model = timm.create_model(MODEL, in_chans=1, num_classes=10)
    workers = dict(workers=2, leaders=0.5) if s["head"] == "linear" else {}  # look-ahead heads: one worker
    return lfnnify.convert(model, head=s["head"], example_input=torch.zeros(1, 1, SIZE, SIZE), **knobs, **workers)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def scheduler(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)


def trainer_knobs(name: str) -> dict:
    """What the trainer takes from the scenario (the pipeline and the one-device trainer alike)."""
    s = spec(name)
    return dict(optimizer=optimizer, scheduler=scheduler, progress=False, switch_mode_at=s["switch_at"],
                switch_to=s["switch_to"], refresh_heads_every=s["refresh_every"],
                refresh_momentum=0.5 if s["refresh_every"] else 0.0, delay_lr_warmup=s["delay_lr"])


def loaders(name: str, *, batch_scale: int = 1):
    s = spec(name)
    if s["model"] == "large":
        data = SyntheticImages(LARGE["data"], shape=(1, LARGE["size"], LARGE["size"]), seed=1)
        return make_loader(data, batch_size=LARGE["batch"] * batch_scale, seed=2), make_loader(data, batch_size=32,
                                                                                               shuffle=False)
    shape = (3, SIZE, SIZE) if s["model"] == "torchvision" else (1, SIZE, SIZE)
    data = SyntheticImages(DATA if s["model"] != "torchvision" else 32, shape=shape, seed=1)
    return (make_loader(data, batch_size=BATCH * batch_scale, seed=2, indexed=s["deltas"]),
            make_loader(data, batch_size=32, shuffle=False))


def _pipeline(net, name, **extra):
    s = spec(name)
    return lfnnify.PipelineTrainer(net, threads=1, timeout_s=TIMEOUT_S, max_in_flight=2,
                                   send_dtype={"bf16": torch.bfloat16, "int8": torch.int8}.get(s["send"]),
                                   send_deltas=s["deltas"], replicas_powersgd_rank=s["powersgd"],
                                   replicas_powersgd_start=2, overlap_sends=s["overlap"],
                                   receive_ahead=s["ahead"],
                                   **trainer_knobs(name), **extra)


def run(name: str, out: Path) -> None:
    s = spec(name)
    rank = int(os.environ["RANK"])
    replica = rank % s["replicas"]
    seed = 0 if replica == 0 else 100 + rank  # the replicas of a block start apart unless the pipeline aligns them
    train, test = loaders(name)
    net = build(name, seed)
    if s["powersgd"] and s["replicas"] == 1:  # refused when made, on every rank, in one line
        try:
            _pipeline(net, name)
            said = "accepted"
        except lfnnify.ConfigError as exc:
            said = str(exc)
        (out / f"refused-rank{rank}.txt").write_text(said)
        return
    trainer = _pipeline(net, name)
    first = trainer.first
    buffers = _record_buffers(trainer) if s["replicas"] > 1 else None
    if s["resume_at"] is not None:
        ends = _stamp_steps(trainer)
        trainer.fit(train if first else None, epochs=10, max_steps=s["resume_at"])  # no evaluation to wait on
        (out / f"fit-rank{rank}.json").write_text(json.dumps({"returned": time.time(), "last_step_ended": ends[-1]}))
        lfnnify.save(net, out / "a" / "ckpt", trainer=trainer)
        net = lfnnify.load(out / "a" / "ckpt")
        trainer = _pipeline(net, name)
        trainer.load_state_dict(lfnnify.read_trainer_state(out / "a" / "ckpt", block=trainer.stage))
    trainer.fit(train if first else None, epochs=10, max_steps=s["steps"],
                val_loader=test if first else None)
    lfnnify.save(net, out / "ckpt", trainer=trainer)
    timings = trainer.stage_timings()
    if trainer.rank == trainer.world - 1:
        (out / "report.json").write_text(json.dumps({"timings": timings, "history": trainer.history,
                                                     "metrics": trainer.history[-1], "balance": trainer.balance}))
    if s["replicas"] > 1:  # every replica's whole state, heads included, to compare replicas with each other
        part = {k: v for k, v in net.state_dict().items() if k.startswith((f"blocks.{trainer.stage}.",
                                                                             f"heads.{trainer.stage}."))}
        torch.save(part, out / f"state-rank{rank}.pt")
        torch.save(buffers, out / f"buffers-rank{rank}.pt")
    if s["relayout"]:  # the same ranks as another layout (4 blocks x 1 replica) resume from that checkpoint
        torch.manual_seed(0)
        import timm

        other = lfnnify.convert(timm.create_model(MODEL, in_chans=1, num_classes=10), blocks=s["relayout"],
                                example_input=torch.zeros(1, 1, SIZE, SIZE))
        try:
            _pipeline(other, name).restore(out / "ckpt")
            said = "restored"
        except lfnnify.CheckpointError as exc:
            said = str(exc)
        (out / f"relayout-rank{rank}.txt").write_text(said)


def _record_buffers(trainer) -> list[dict]:
    """This rank's block and head buffers (BatchNorm statistics) after each of its steps, from now on."""
    kept, step = [], trainer._stage_step

    def recorded(*batch):
        record = step(*batch)
        parts = {"block": trainer.net.blocks[trainer.stage]}
        if trainer.stage < len(trainer.net.heads):
            parts["head"] = trainer.net.heads[trainer.stage]
        kept.append({f"{p}.{n}": b.clone() for p, m in parts.items() for n, b in m.named_buffers()})
        return record

    trainer._stage_step = recorded
    return kept


def _stamp_steps(trainer) -> list[float]:
    """The wall-clock time at which each of this rank's steps ends, from now on."""
    ends, step = [], trainer._stage_step

    def stamped(*batch):
        record = step(*batch)
        ends.append(time.time())
        return record

    trainer._stage_step = stamped
    return ends


def fail(out: Path) -> None:
    """A user's own script whose data loader raises on rank 0 (block 0) at its third batch."""
    net = build("3-local")
    trainer = _pipeline(net, "3-local")
    train, _ = loaders("3-local")

    class Failing:
        def __len__(self):
            return len(train)

        def __iter__(self):
            for i, batch in enumerate(train):
                if i == 2:
                    print(f"lfnnify-fault: the loader raises at time {time.time():.3f}", flush=True)
                    raise OSError("injected: the data loader could not read batch 2")
                yield batch

    trainer.fit(Failing() if trainer.first else None, epochs=10, max_steps=7)


def out_of_step() -> None:
    """A user's own script whose ranks call different things: rank 0 trains while rank 1 evaluates."""
    net = build("2-local")
    trainer = _pipeline(net, "2-local")
    train, test = loaders("2-local")
    if trainer.first:
        trainer.fit(train, epochs=1, max_steps=2)
    else:
        trainer.evaluate()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", nargs="+", required=True, choices=[*SCENARIOS, "fail", "out-of-step"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--out-for", nargs=2, action="append", default=[], metavar=("SCENARIO", "FOLDER"),
                        help="write this scenario under FOLDER instead of --out (a folder the hosts share)")
    args = parser.parse_args()
    elsewhere = {name: Path(folder) for name, folder in args.out_for}
    for name in args.scenarios:
        folder = elsewhere.get(name, args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        if name == "fail":
            fail(folder)
        elif name == "out-of-step":
            out_of_step()
        else:
            run(name, folder)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
