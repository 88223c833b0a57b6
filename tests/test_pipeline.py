"""The pipeline trainer, started the way users start it (torch.distributed.run), on CPU over gloo.

Every scenario of tests/pipeline_worker.py is compared with the same training on one device; the one-device
trainer is itself checked against an independent reference (tests/test_replay_reference.py).
"""

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

import lfnnify
from lfnnify.pipeline.balance import TOLERANCE, balance_report
from tests import pipeline_worker as worker
from tests.launch import names, scenarios_run, torchrun
from tests.references import AqSgdReceiver, int8_round_trip


def _reference(name, *, steps=None):
    """The scenario's training on one device with the one-device trainer."""
    torch.set_num_threads(1)
    s = worker.spec(name)
    net = worker.build(name)
    trainer = lfnnify.Trainer(net, **worker.trainer_knobs(name))
    train, test = worker.loaders(name)
    trainer.fit(train, epochs=10, max_steps=steps or s["steps"], val_loader=test)
    return net, trainer


def _assert_close(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key].float(), sb[key].float(), rtol=1e-4, atol=1e-5), key


EQUAL = [pytest.param(n, marks=pytest.mark.xdist_group(f"torchrun-{worker.world(n)}")) for n in worker.SCENARIOS
         if worker.spec(n)["replicas"] == 1 and not worker.spec(n)["send"] and worker.spec(n)["model"] != "torchvision"
         and not worker.spec(n)["powersgd"]]


@pytest.mark.parametrize("name", EQUAL)
def test_pipeline_equals_one_device_trainer(name):
    # the paper's mode; delayed gradients with and without the local loss, stashing and weight prediction; a
    # switch either way mid-run (step 3, inside the first epoch); look-ahead heads refreshed from the next
    # block's rank; a resume from a pipeline checkpoint (kept batches and the gradient in flight included); and
    # 64 MiB messages both ways in replay. 7 steps of 5 batches per epoch cross an epoch boundary.
    world = worker.world(name)
    out = scenarios_run(world) / name
    piped = lfnnify.load(out / "ckpt", model=worker.build(name)._source if worker.spec(name)["model"] != "timm"
                         else None)
    reference, trainer = _reference(name)
    _assert_close(piped, reference)
    report = json.loads((out / "report.json").read_text())
    steps = worker.spec(name)["steps"] - (worker.spec(name)["resume_at"] or 0)  # timings since the resume
    assert len(report["timings"]) == world and all(t["steps"] == steps for t in report["timings"])
    assert all(t["busy_s"] > 0 for t in report["timings"])
    if steps >= 5:  # the balance report the trainer made after its first 5 steps (all of them here)
        assert report["balance"] == balance_report(report["timings"], worker.spec(name)["replicas"],
                                                   piped.config["balance"])
    else:
        assert report["balance"] is None
    expected = trainer.evaluate(worker.loaders(name)[1])
    assert report["metrics"]["val_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert report["metrics"]["val_block_accuracy"] == pytest.approx(expected["block_accuracy"], abs=1e-6)


@pytest.mark.xdist_group("torchrun-2")
def test_fit_returns_on_every_rank_only_after_every_rank_finished_its_steps():
    # LFNN-ℓ: block 0 waits for no gradient; its fit() still returns only once block 1 has taken the end-of-phase
    # message, after its last step, so a run timed on rank 0 (lfnnify train's train_seconds) counts every rank's work
    out = scenarios_run(2) / "2-local-resume"
    ranks = [json.loads((out / f"fit-rank{r}.json").read_text()) for r in range(2)]
    assert min(r["returned"] for r in ranks) >= max(r["last_step_ended"] for r in ranks), ranks


def test_every_scenario_is_launched():
    launched = sorted(n for w in (2, 3, 4) for n in names(w))
    assert launched == sorted(worker.SCENARIOS)


@pytest.mark.xdist_group("torchrun-3")
def test_the_refresh_and_the_large_messages_were_real():
    # the comparisons above can fail: without the refresh the heads differ, and the 64 MiB run sent 64 MiB
    refreshed, _ = _reference("3-lookahead-refresh")
    plain = worker.build("3-lookahead-refresh")
    knobs = {**worker.trainer_knobs("3-lookahead-refresh"), "refresh_heads_every": None, "refresh_momentum": 0.0}
    trainer = lfnnify.Trainer(plain, **knobs)
    trainer.fit(worker.loaders("3-lookahead-refresh")[0], epochs=10, max_steps=7)
    with pytest.raises(AssertionError):
        _assert_close(refreshed, plain)
    shape = worker.build("3-replay-64mib").plan.blocks[0].output_shape
    assert worker.LARGE["batch"] * torch.Size(shape[1:]).numel() * 4 >= 64 * 2**20


@pytest.mark.xdist_group("torchrun-2")
def test_bf16_activations_stay_close_to_float32():
    piped = lfnnify.load(scenarios_run(2) / "2-local-bf16" / "ckpt")
    reference, _ = _reference("2-local-bf16")
    sa, sb = piped.state_dict(), reference.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("blocks.1."))  # bf16 was really used
    for key in sa:
        assert torch.allclose(sa[key].float(), sb[key].float(), atol=5e-2), key


class _RoundTrip(torch.autograd.Function):
    """int8 with a scale per channel and back, from the definition (tests/references.py, not lfnnify's code): the
    activation going forward, and the gradient coming back."""

    @staticmethod
    def forward(ctx, x):
        return int8_round_trip(x)

    @staticmethod
    def backward(ctx, grad):
        return int8_round_trip(grad)


@pytest.mark.xdist_group("torchrun-2")
def test_int8_sends_equal_the_one_device_trainer_whose_crossings_are_rounded_to_int8():
    # replay: the activation crosses forward as int8 and its gradient comes back as int8; one device with the same
    # rounding at block 1's input computes the same weights, and without it, other weights (int8 was really used)
    name = "2-replay-int8"
    piped = lfnnify.load(scenarios_run(2) / name / "ckpt")
    torch.set_num_threads(1)
    net = worker.build(name)
    net.blocks[1].register_forward_pre_hook(lambda module, args: (_RoundTrip.apply(args[0]), *args[1:]))
    trainer = lfnnify.Trainer(net, **worker.trainer_knobs(name))
    trainer.fit(worker.loaders(name)[0], epochs=10, max_steps=worker.spec(name)["steps"])
    _assert_close(piped, net)
    plain, _ = _reference(name)
    with pytest.raises(AssertionError):
        _assert_close(piped, plain)


class _SampleIds:
    """The scenario's indexed loader as the one-device trainer takes it, (images, labels), keeping each batch's
    sample indices for the reference's hook."""

    def __init__(self, loader):
        self.loader, self.sampler, self.batch_size, self.ids = loader, loader.sampler, loader.batch_size, None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y, ids in self.loader:
            self.ids = ids
            yield x, y


@pytest.mark.xdist_group("torchrun-2")
def test_int8_deltas_equal_the_one_device_trainer_whose_crossing_keeps_aq_sgds_memory():
    # LFNN-ℓ over 12 steps of 5-batch epochs (each sample crosses 2-3 times), sending each sample's change as int8:
    # one device whose block 1 takes what a receiver written from AQ-SGD's definition holds (a dict of
    # per-sample memories, zero at first) computes the same weights; a plain int8 crossing computes others
    name = "2-local-int8-deltas"
    piped = lfnnify.load(scenarios_run(2) / name / "ckpt")
    torch.set_num_threads(1)

    def one_device(crossing):
        net = worker.build(name)
        train = _SampleIds(worker.loaders(name)[0])
        net.blocks[1].register_forward_pre_hook(
            lambda module, args: (crossing(args[0], train.ids) if module.training else int8_round_trip(args[0]),
                                  *args[1:]))
        trainer = lfnnify.Trainer(net, **worker.trainer_knobs(name))
        trainer.fit(train, epochs=10, max_steps=worker.spec(name)["steps"])
        return net

    receiver = AqSgdReceiver()
    _assert_close(piped, one_device(receiver.send))
    assert len(receiver.memory) == worker.DATA  # every sample crossed, and the reference kept each one's memory
    with pytest.raises(AssertionError):
        _assert_close(piped, one_device(lambda x, ids: int8_round_trip(x)))


@pytest.mark.xdist_group("torchrun-4")
def test_replicas_start_equal_however_their_ranks_were_seeded():
    # 2 blocks x 2 replicas, the second replica of each block built from another seed (other weights and heads):
    # the pipeline aligns them, replica r takes batches r, r+2, ... and the two average their gradients, which is
    # one process training on both batches at once (no BatchNorm, one worker per head, losses are batch means)
    if (os.cpu_count() or 1) < 2:
        pytest.fail("needs 2 cores")
    name = "4-replicas-seeded-apart"
    out = scenarios_run(4) / name
    report = json.loads((out / "report.json").read_text())
    assert [t["block"] for t in report["timings"]] == [0, 0, 1, 1]
    assert all(t["steps"] == 2 for t in report["timings"])
    states = [torch.load(out / f"state-rank{r}.pt") for r in range(4)]
    assert any(k.startswith("heads.0.") for k in states[0])
    for a, b in ((0, 1), (2, 3)):  # the replicas of each block hold the same block and the same head
        assert states[a].keys() == states[b].keys()
        assert all(torch.equal(states[a][k], states[b][k]) for k in states[a]), (a, b)
    apart = worker.build(name, seed=101)
    assert not torch.equal(apart.heads[0].weight, worker.build(name).heads[0].weight)  # they did start apart
    torch.set_num_threads(1)
    net = worker.build(name)
    trainer = lfnnify.Trainer(net, optimizer=worker.optimizer, scheduler=worker.scheduler, progress=False)
    trainer.fit(worker.loaders(name, batch_scale=2)[0], max_steps=2)
    _assert_close(lfnnify.load(out / "ckpt", model=worker.build(name)._source), net)


@pytest.mark.xdist_group("torchrun-4")
def test_replicas_averaging_through_powersgd_apply_the_same_compressed_average():
    # as above, but the replicas average through PowerSGD at rank 1 from step 2 of 4 (replicas_powersgd_rank): each
    # block's replicas end with the same block and head (every replica applies the same average), and with other
    # weights than the plain average's (the one process on the doubled batch), near them: compression was used
    name = "4-replicas-powersgd"
    out = scenarios_run(4) / name
    states = [torch.load(out / f"state-rank{r}.pt") for r in range(4)]
    for a, b in ((0, 1), (2, 3)):
        assert all(torch.equal(states[a][k], states[b][k]) for k in states[a]), (a, b)
    torch.set_num_threads(1)
    net = worker.build(name)
    trainer = lfnnify.Trainer(net, optimizer=worker.optimizer, scheduler=worker.scheduler, progress=False)
    trainer.fit(worker.loaders(name, batch_scale=2)[0], max_steps=worker.spec(name)["steps"])
    piped = lfnnify.load(out / "ckpt", model=worker.build(name)._source)
    with pytest.raises(AssertionError):
        _assert_close(piped, net)
    for key, value in piped.state_dict().items():
        assert torch.allclose(value, net.state_dict()[key], atol=0.05), key


@pytest.mark.xdist_group("torchrun-2")
def test_powersgd_for_replicas_is_refused_where_a_block_has_one_replica():
    out = scenarios_run(2) / "2-powersgd-one-replica"
    for rank in range(2):
        said = (out / f"refused-rank{rank}.txt").read_text()
        assert said.startswith("replicas_powersgd_rank=1: PowerSGD averages a block's replicas, and this run has one "
                               "replica per block (2 processes for 2 blocks)"), said


@pytest.mark.xdist_group("torchrun-4")
def test_replicas_hold_the_same_batchnorm_statistics_after_every_step():
    # 2 blocks x 2 replicas of a model with BatchNorm, replay with weight stashing: each replica sees other batches,
    # so its own statistics would drift apart; after every step each takes its block's first replica's (as DDP
    # broadcasts buffers), so the replicas evaluate alike and the checkpoint holds the statistics they all used
    name = "4-replicas-batchnorm"
    out = scenarios_run(4) / name
    kept = [torch.load(out / f"buffers-rank{r}.pt") for r in range(4)]
    assert all(len(k) == worker.spec(name)["steps"] for k in kept)
    assert any("running_mean" in key for key in kept[0][0])
    for a, b in ((0, 1), (2, 3)):
        for step, (x, y) in enumerate(zip(kept[a], kept[b])):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x), (a, b, step)
    moved = [k for k in kept[0][0] if "running_mean" in k and not torch.equal(kept[0][0][k], kept[0][-1][k])]
    assert moved  # the statistics did change from step to step: the comparison could fail
    saved = lfnnify.load(out / "ckpt").state_dict()
    for key, value in kept[0][-1].items():  # the checkpoint's statistics are the ones every replica used
        part, rest = key.split(".", 1)
        assert torch.equal(saved[f"{part}s.0.{rest}"], value), key
    for rank in range(4):  # a resume into another layout on the same ranks: refused on every rank, in one line
        said = (out / f"relayout-rank{rank}.txt").read_text()
        assert re.search(r"was saved by a run of 2 block\(s\) x 2 replica\(s\), and this pipeline runs 4 block\(s\) x "
                         r"1 replica\(s\)", said), (rank, said)


def test_a_raising_data_loader_stops_every_rank_quickly_and_is_reported_once(tmp_path):
    # a user's own script (not lfnnify train) whose data loader raises on rank 0: its traceback names the rank,
    # once; its neighbours stop with an error that names it, within a few seconds (README: Faults)
    proc, _ = torchrun(3, "--scenarios", "fail", "--out", tmp_path, timeout=120)
    ended = time.time()
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    raised = float(re.search(r"lfnnify-fault: the loader raises at time ([\d.]+)", output).group(1))
    # quickly: the neighbours stop because rank 0's process exited, not because they waited out the pipeline's
    # timeout (30 s in pipeline_worker). That takes 3-4 s on a quiet AMD EPYC (docs/failures.md); the bound is half
    # the timeout, not a few seconds, so that a loaded machine (the suite's other worker beside 3 processes on 2
    # cores: once over 8 s) does not fail it, while a run that waits out the timeout still does
    bound = worker.TIMEOUT_S / 2
    took = ended - raised
    assert took < bound, f"every process ended {took:.1f} s after the loader raised (bound {bound} s)"
    assert output.count("OSError: injected: the data loader could not read batch 2") == 1, output[-4000:]
    assert output.count("lfnnify: this happened on rank 0 (block 0)") == 1, output[-4000:]
    assert "stops: rank 0 (block 0) exited" in output or "stops: rank 0 (block 0) did not answer" in output
    print(f"every process ended {ended - raised:.2f} s after the loader raised")


def test_an_evaluation_that_receives_a_training_batch_refuses_it_by_name(tmp_path):
    # rank 0 trains while rank 1 evaluates: rank 1 must not count the training batches as evaluation batches
    proc, _ = torchrun(2, "--scenarios", "out-of-step", "--out", tmp_path, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 (block 1) was evaluating and received a message of kind 1 (not an evaluation batch)" in output, \
        output[-3000:]


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


@pytest.mark.parametrize(
    "requested,gpus,local,expected",
    [
        (None, 0, 2, ("gloo", False)),  # no GPU: gloo, nothing to say
        (None, 4, 4, ("nccl", False)),  # one GPU per process
        (None, 1, 2, ("gloo", True)),  # two processes would share a GPU: NCCL refuses that, so gloo, said once
        ("nccl", 1, 2, ("nccl", False)),  # the user decides
    ],
)
def test_nccl_only_when_every_process_has_its_own_gpu(requested, gpus, local, expected, monkeypatch):
    from lfnnify.pipeline import processes as _comm

    monkeypatch.setattr(_comm.dist, "is_nccl_available", lambda: True)
    backend, note = _comm.choose_backend(requested, gpus=gpus, local_processes=local)
    assert (backend, note is not None) == expected
    if note:
        assert f"{local} processes on this machine share {gpus} GPU(s)" in note
    with pytest.raises(lfnnify.PipelineError, match="backend='mpi' must be 'nccl' or 'gloo'"):
        _comm.choose_backend("mpi", gpus=0, local_processes=1)


def test_a_stuck_neighbour_is_ended_only_on_this_machine_only_if_stopped_and_only_if_its_pid_still_names_it():
    # real processes: the identity is (boot id and PID namespace, PID, start time); a neighbour that only waits
    # (perhaps for another rank that is stuck) is left alone, and a PID whose start time changed (the neighbour
    # exited and its PID was reused) is never signalled
    import signal
    import subprocess
    import sys

    from lfnnify.pipeline import processes as _comm

    here = _comm.machine_identity()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert here == f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        machine, pid, started = _comm.process_identity()[0], child.pid, _comm._start_time(child.pid)
        assert started > 0
        assert not _comm.end_if_here((machine, pid, started))  # waiting (sleeping), not shown to be stuck
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _comm._state(pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _comm.end_if_here(("another-boot-id/pid:[1]", pid, started))  # same host name, another machine
        assert not _comm.end_if_here((machine, pid, started - 1))  # another process that had this PID before
        assert child.poll() is None  # none of these was signalled
        assert not _comm.end_if_here(_comm.process_identity())  # never itself
        assert _comm.end_if_here((machine, pid, started))  # stopped, here, the same process: ended
        assert child.wait(timeout=10) == -9
    finally:
        child.kill()
        child.wait()


def test_the_balance_report_names_the_slow_block_and_the_fix():
    def timing(rank, ms):
        return {"rank": rank, "busy_s": ms * 20 / 1e3, "recv_wait_s": 0.0, "send_wait_s": 0.0, "steps": 20}

    slow = balance_report([timing(0, 130), timing(1, 70)], replicas=1, balance="flops")
    assert slow["busy_ms_per_step"] == pytest.approx([130, 70]) and slow["slowest"] == 0
    assert slow["ratio_to_mean"] == pytest.approx(1.3)
    assert "block 0 was busy 130 ms per step, 1.30x the mean of the 2 blocks" in slow["warning"]
    assert 'balance="time"' in slow["warning"]
    # already cut by measured time: another fix
    assert "cuts=[...]" in balance_report([timing(0, 130), timing(1, 70)], replicas=1, balance="time")["warning"]
    # within the tolerance: no warning; replicas of a block are averaged
    under = 200 / (TOLERANCE - 0.01) - 100  # block 1 this fast: block 0 is 0.01 under TOLERANCE x the mean
    assert balance_report([timing(0, 100), timing(1, under)], replicas=1, balance="flops")["warning"] is None
    assert balance_report([timing(0, 100), timing(1, under - 2)], replicas=1, balance="flops")["warning"]
    both = balance_report([timing(0, 100), timing(1, 140), timing(2, 100), timing(3, 100)], replicas=2,
                          balance="flops")
    assert both["busy_ms_per_step"] == pytest.approx([120, 100]) and both["warning"] is None
