"""The pipeline trainer, started the way users start it (torch.distributed.run), on CPU over gloo."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lfnnify
from lfnnify.data import SyntheticImages, make_loader
from tests import pipeline_worker as worker

WORKER = Path(worker.__file__)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, *args, timeout=240):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0",
        "--monitor-interval", "0.5", str(WORKER), *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - start


def _reference(blocks, steps, mode="local", local_weight=0.0, switch_at=None, switch_to=None, head="linear",
               refresh_every=None):
    """The same training on one device with the one-device trainer."""
    torch.set_num_threads(1)
    net = worker.build(blocks, mode, local_weight, head=head)
    trainer = lfnnify.Trainer(net, optimizer=worker.optimizer, scheduler=worker.scheduler, progress=False,
                              switch_mode_at=switch_at, switch_to=switch_to, refresh_heads_every=refresh_every,
                              refresh_momentum=0.5 if refresh_every else 0.0)
    train, test = worker.loaders()
    trainer.fit(train, epochs=10, max_steps=steps, val_loader=test)
    return net, trainer


def _assert_close(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key].float(), sb[key].float(), rtol=1e-4, atol=1e-5), key


# (blocks, mode, local_weight, switch_at, switch_to): the paper's mode, delayed gradients with and without the
# local loss, and a switch either way mid-run (at step 3, inside the first epoch)
RUNS = [
    (2, "local", 0.0, None, None),
    (3, "local", 0.0, None, None),
    (2, "replay", 0.0, None, None),
    (3, "replay", 0.5, None, None),
    (3, "replay-stash", 0.0, None, None),
    (3, "local", 0.0, 3, "replay"),
    (3, "replay", 0.5, 3, "local"),
]


def _run_id(run):
    blocks, mode, weight, at, to = run
    return f"{blocks}-{mode}" + (f"-w{weight}" if weight else "") + (f"-to-{to}-at-{at}" if at is not None else "")


@pytest.mark.parametrize("run", RUNS, ids=[_run_id(r) for r in RUNS])
def test_pipeline_equals_one_device_trainer(tmp_path, run):
    blocks, mode, weight, at, to = run
    steps = 7  # 5 batches per epoch (the last one smaller), so this crosses an epoch boundary
    extra = ["--mode", mode, "--local-weight", weight] + (["--switch-at", at, "--switch-to",
                                                           to] if at is not None else [])
    proc, _ = _torchrun(blocks, "--scenario", "train", "--blocks", blocks, "--steps", steps, "--out", tmp_path, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    piped = lfnnify.load(tmp_path / "ckpt")
    reference, trainer = _reference(blocks, steps, mode, weight, at, to)
    _assert_close(piped, reference)
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["timings"]) == blocks and all(t["steps"] == steps for t in report["timings"])
    assert all(t["busy_s"] > 0 for t in report["timings"])
    expected = trainer.evaluate(worker.loaders()[1])
    assert report["metrics"]["val_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert report["metrics"]["val_block_accuracy"] == pytest.approx(expected["block_accuracy"], abs=1e-6)


def test_look_ahead_heads_refreshed_in_the_pipeline_as_on_one_device(tmp_path):
    # every 2 steps each head takes half of the next block's weights from the rank that trains it; replay, so
    # that the weights travel upstream beside the delayed gradients; 7 steps cross an epoch boundary
    extra = ["--mode", "replay", "--head", "lookahead-layer", "--refresh-every", 2]
    proc, _ = _torchrun(3, "--scenario", "train", "--blocks", 3, "--steps", 7, "--out", tmp_path, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference, _ = _reference(3, 7, "replay", head="lookahead-layer", refresh_every=2)
    _assert_close(lfnnify.load(tmp_path / "ckpt"), reference)
    unrefreshed, _ = _reference(3, 7, "replay", head="lookahead-layer")
    with pytest.raises(AssertionError):  # the refresh changed the heads: the comparison above can fail
        _assert_close(reference, unrefreshed)


@pytest.mark.parametrize("mode", ["local", "replay"])
def test_resume_from_a_pipeline_checkpoint(tmp_path, mode):
    # replay: the checkpoint holds the kept batches and the gradient in flight, so the resume is exact
    first, _ = _torchrun(2, "--scenario", "train", "--blocks", 2, "--steps", 3, "--out", tmp_path / "a", "--mode", mode)
    assert first.returncode == 0, first.stderr[-3000:]
    second, _ = _torchrun(2, "--scenario", "train", "--blocks", 2, "--steps", 7, "--out", tmp_path / "b",
                          "--resume", tmp_path / "a" / "ckpt", "--mode", mode)
    assert second.returncode == 0, second.stderr[-3000:]
    reference, _ = _reference(2, 7, mode)
    _assert_close(lfnnify.load(tmp_path / "b" / "ckpt"), reference)


def test_a_failing_rank_stops_every_rank_quickly_and_is_reported_once(tmp_path):
    # a user's own script (not lfnnify train): the failing rank's traceback names its rank, once; its
    # neighbours stop with an error that names it (tests/test_faults.py checks the command line's one line)
    proc, seconds = _torchrun(3, "--scenario", "fail", "--blocks", 3, "--steps", 7, "--out", tmp_path, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert seconds < 90, f"took {seconds:.0f} s to stop"
    assert output.count("RuntimeError: injected failure at step 2") == 1, output[-4000:]
    assert output.count("lfnnify: this happened on rank 1 (block 1)") == 1, output[-4000:]
    assert "stops: rank 1 (block 1) exited" in output or "stops: rank 1 (block 1) did not answer" in output


@pytest.mark.parametrize("mode", ["replay"])
def test_two_blocks_two_replicas(tmp_path, mode):
    # 2 blocks x 2 replicas: replica r takes batches r, r+2, ... and the two average their gradients, which is
    # one process training on both batches at once (a model without BatchNorm and with one worker per head,
    # whose losses are means over the batch)
    if (os.cpu_count() or 1) < 2:
        pytest.fail("needs 2 cores")
    proc, _ = _torchrun(4, "--scenario", "train", "--blocks", 2, "--steps", 2, "--out", tmp_path, "--plain",
                        "--mode", mode)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [t["block"] for t in report["timings"]] == [0, 0, 1, 1]
    assert all(t["steps"] == 2 for t in report["timings"])
    torch.set_num_threads(1)
    net = worker.build(2, mode, plain=True)
    trainer = lfnnify.Trainer(net, optimizer=worker.optimizer, scheduler=worker.scheduler, progress=False)
    data = SyntheticImages(worker.DATA, shape=(1, worker.SIZE, worker.SIZE), seed=1)
    trainer.fit(make_loader(data, batch_size=2 * worker.BATCH, seed=2), max_steps=2)
    _assert_close(lfnnify.load(tmp_path / "ckpt", model=_plain_model()), net)


def _plain_model():
    return worker.build(2, plain=True)._source


def test_bf16_activations_stay_close_to_float32(tmp_path):
    proc, _ = _torchrun(2, "--scenario", "train", "--blocks", 2, "--steps", 3, "--out", tmp_path, "--send-bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    piped = lfnnify.load(tmp_path / "ckpt")
    reference, _ = _reference(2, 3)
    sa, sb = piped.state_dict(), reference.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("blocks.1."))  # bf16 was really used
    for key in sa:
        assert torch.allclose(sa[key].float(), sb[key].float(), atol=5e-2), key


def test_pipeline_refuses_lfnn_mode_and_needs_torchrun():
    net = lfnnify.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                              torch.nn.Linear(4 * 14 * 14, 3)),
                          cuts=["1"], mode="lfnn", num_classes=3, example_input=torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="mode='lfnn'"):
        lfnnify.PipelineTrainer(net, optimizer=worker.optimizer)
    net.config["mode"] = "local"
    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        with pytest.raises(RuntimeError, match="started by torchrun"):
            lfnnify.PipelineTrainer(net, optimizer=worker.optimizer)
