"""Across hosts, for real: two hosts that share nothing but a veth link (lfnnify/app/testbed.py: network, PID, mount
and UTS namespaces; each its own /tmp and working folder, the same host name), each on its own core, torchrun on each
with ``--nnodes 2``. Every file a host writes is read from outside through ``hosts.path``; one test keeps a folder
both hosts share (a network file system). Skipped, with the reason, where the machine has no root or no iproute2.

Every test removes what it created (the testbed is a context manager); each has a hard timeout.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lfnnify
from lfnnify.app import testbed as _testbed
from tests import here
from tests import pipeline_worker as worker
from tests.launch import free_port, on_hosts
from tests.test_pipeline import _assert_close, _reference

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"
# pipeline.timeout_s in the fault runs, and how long after it (a cut link) or after a host dies every process may take
# to end: about 2 s on a quiet machine, 9.7 s once on a 2-core machine also running the suite's other worker and a
# training run. The bound is there to catch a process that hangs (it would run to on_hosts' 120 s), not to time teardown
TIMEOUT_S, MARGIN_S = 6, 15
REASON = _testbed.missing()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=str(REASON)), pytest.mark.xdist_group("hosts")]


def _train_args(out, *extra):
    return ["-m", "lfnnify", "train", str(FMNIST), "--out", str(out), "--set", "convert.blocks=2",
            "--set", "model.name=test_resnet",
            "--set", "data.train_subset=512", "--set", "data.eval_subset=64", "--set", "data.batch_size=32",
            "--set", "train.threads=1", "--no-progress", *extra]


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@contextlib.contextmanager
def _two_hosts(**options):
    """Two hosts (``options``: Hosts' own, a shared folder), after removing any a killed run left behind."""
    _testbed.Hosts.remove_stale()
    with _testbed.Hosts(2, **options) as testbed:
        yield testbed
    assert testbed.tag not in _namespaces()  # nothing left behind


@pytest.fixture
def hosts():
    with _two_hosts() as testbed:
        yield testbed


def test_a_two_host_pipeline_equals_the_one_device_trainer_and_a_shared_folder_lets_every_rank_load(tmp_path):
    # one launch on two hosts: the paper's mode and replay, each host writing its own disk; and a user with a
    # network file system: their own script saves, then every rank loads the checkpoint and its trainer state from
    # the shared folder (lfnnify.load, read_trainer_state), and goes on as if uninterrupted
    own, shared = tmp_path / "own", tmp_path / "nfs"
    with _two_hosts(shared=[shared]) as hosts:
        sent = [hosts.tx_bytes(i) for i in range(2)]
        procs, outputs, _ = on_hosts(hosts, [str(ROOT / "tests" / "pipeline_worker.py"), "--scenarios", "2-local",
                                             "2-replay", "2-replay-resume", "--out", str(own), "--out-for",
                                             "2-replay-resume", str(shared)], timeout=400)
        assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        for name in ("2-local", "2-replay"):
            reference, _ = _reference(name)
            _assert_close(lfnnify.load(hosts.path(0, own / name / "ckpt")), reference)  # host 0's disk holds it all
            assert not hosts.path(1, own / name / "ckpt").exists()  # host 1 wrote nothing of it
        reference, _ = _reference("2-replay-resume")
        _assert_close(lfnnify.load(shared / "2-replay-resume" / "ckpt"), reference)
        # the activations really crossed the link: at least 14 training steps of batch 16 from host 0 (block 0),
        # at the cut's shape
        shape = worker.build("2-local").plan.blocks[0].output_shape
        activations = 14 * worker.BATCH * torch.Size(shape[1:]).numel() * 4
        assert hosts.tx_bytes(0) - sent[0] > activations


@pytest.mark.parametrize("fault", ["link-cut", "host-killed", "save-killed"])
def test_a_cut_link_or_a_killed_host_ends_every_process_in_time_with_one_line(hosts, tmp_path, fault):
    out = tmp_path / "run"
    args = _train_args(out, "--set", "train.iterations=2000", "--set", "train.checkpoint_every=2",
                       "--set", f"pipeline.timeout_s={TIMEOUT_S}")

    ckpt = hosts.path(0, out / "ckpt")
    envs = [hosts.env(0), dict(hosts.env(1), LFNNIFY_KILL_AT="pipeline-gather:2")] if fault == "save-killed" else None

    def strike(procs):
        deadline = time.monotonic() + 200
        while not (ckpt / "CURRENT").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (ckpt / "CURRENT").exists(), "the run never saved a checkpoint"
        if fault != "save-killed":  # that one: host 1's worker dies as it hands rank 0 its part of the second save
            hosts.cut(1) if fault == "link-cut" else hosts.kill(1)

    procs, outputs, seconds = on_hosts(hosts, args, during=strike, timeout=120, envs=envs)
    assert all(p.returncode != 0 for p in procs)
    bound = TIMEOUT_S + MARGIN_S if fault == "link-cut" else MARGIN_S
    if fault != "save-killed":  # that one strikes at its own moment, after `during` has returned
        assert seconds < bound, f"the last process ended {seconds:.1f} s after the {fault} (bound {bound} s)"
    # whatever the fault hit, a save included, host 0 holds the last complete checkpoint: every block, every
    # rank's trainer state, at one step; nothing half-written is taken for whole
    loaded = lfnnify.load(ckpt)
    steps = {lfnnify.read_trainer_state(ckpt, block=k)["step"] for k in range(2)}
    assert len(steps) == 1 and loaded.num_blocks == 2, steps
    if fault == "save-killed":
        assert steps == {2}, steps  # the first save's: the second never completed
        assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("v000001")) == ["CURRENT"]
    stops = [line for line in outputs[0].splitlines() if line.startswith("lfnnify: error:") and "stops:" in line]
    assert len(stops) == 1, "\n".join(x for x in outputs[0].splitlines() if "lfnnify" in x or "Error" in x)[-3000:]
    assert re.search(r"rank 0 \(block 0, on host0\) stops: rank 1 \(block 1, on host1\) (did not answer|went away|"
                     r"exited)", stops[0]), stops
    assert "ended it" not in stops[0]  # each host has its own PID namespace: no host signals another's processes
    if fault == "link-cut":  # the other side sees the same from its end
        assert "rank 1 (block 1, on host1) stops: rank 0 (block 0, on host0) did not answer" in outputs[1]


def _agent_pids(hosts, i: int) -> list[int]:
    """The torchrun agent of host i (its PID outside the host), found among the host's processes."""
    pids = []
    for pid in _testbed._run("ip", "netns", "pids", hosts.names[i]).split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"torch.distributed.run" in command:
            pids.append(int(pid))
    return pids


def test_replicas_across_hosts_stop_together_resume_from_host_0_alone_restart_and_end_exactly(hosts, tmp_path):
    # K=2 blocks x R=2 replicas, two processes on each host (host 0: block 0's replicas, host 1: block 1's), replay
    # with weight stashing on a model with BatchNorm (timm test_resnet), against the same run uninterrupted:
    # 1. SIGTERM reaches host 1 only (its torchrun agent, as a cluster manager stops a machine): every rank stops
    #    and saves at the same step, on host 0's disk, each replica its own trainer state;
    # 2. host 1 loses its folders; --resume, under --max-restarts 1 and the dynamic c10d rendezvous, continues from
    #    host 0's checkpoint alone; host 1's first worker is killed two steps on: torchrun restarts every worker,
    #    and lfnnify train resumes by itself, again from host 0's disk;
    # 3. the run ends with the weights (and BatchNorm statistics) of the uninterrupted run.
    # (A resume into another layout is refused on every rank: test_pipeline's replicas tests, on one host.)
    out, alone = tmp_path / "run", tmp_path / "alone"
    common = ["--set", "convert.mode=replay", "--set", "convert.weight_stashing=true", "--set", "train.iterations=24",
              "--set", "train.checkpoint_every=2", "--set", "pipeline.timeout_s=20"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *_train_args(alone, *common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "2 replicas per block" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]

    ckpt = hosts.path(0, out / "ckpt")

    def sigterm_to_host_1(procs):
        deadline = time.monotonic() + 200
        while not (ckpt / "CURRENT").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in _agent_pids(hosts, 1):
            os.kill(pid, signal.SIGTERM)

    procs, outputs, _ = on_hosts(hosts, _train_args(out, *common), during=sigterm_to_host_1, timeout=300, nproc=2)
    stopped = re.search(r"interrupted at iteration (\d+) of 24: checkpoint saved", outputs[0])
    assert stopped, outputs[0][-3000:] + outputs[1][-3000:]
    step = int(stopped.group(1))
    states = [lfnnify.read_trainer_state(ckpt, block=k, replica=r) for k in range(2) for r in range(2)]
    assert [s["step"] for s in states] == [step] * 4  # every rank saved, at the same step
    kept = [s["stages"][0]["kept"] for s in states[:2]]  # block 0's replicas each keep the batch they saw last
    assert len(kept[0]) == len(kept[1]) == 1 and not torch.equal(kept[0][0]["x"], kept[1][0]["x"])
    assert 2 <= step < 24

    hosts.wipe(1)
    kill = [dict(hosts.env(i), LFNNIFY_FAULT="kill", LFNNIFY_FAULT_RANK="2", LFNNIFY_FAULT_STEP=str(step + 3))
            for i in range(2)]
    procs, outputs, _ = on_hosts(hosts, _train_args(out, *common, "--resume"), envs=kill, timeout=400, nproc=2,
                                 max_restarts=1, rendezvous="c10d")
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    both = outputs[0] + outputs[1]
    assert f"resuming at {step}" in both and f"lfnnify-fault: kill on rank 2 at step {step + 3}" in both
    assert "torchrun restarted the workers (restart 1): resuming" in both
    assert "24 iterations" in hosts.path(0, out / "results.md").read_text()
    restarted, uninterrupted = lfnnify.load(ckpt).state_dict(), lfnnify.load(alone / "ckpt").state_dict()
    assert any("running_mean" in key for key in uninterrupted)
    for key, value in uninterrupted.items():
        assert torch.equal(restarted[key], value), key


def test_a_hosts_processes_import_the_lfnnify_that_made_the_hosts_installed_or_not(hosts):
    # each host works in a folder of its own, so `python -m lfnnify...` there finds lfnnify only through the path the
    # testbed hands it (`lfnnify demo` run from a checkout that was never installed failed its two-host part)
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = hosts.popen(0, [sys.executable, "-S", "-c", "import os, lfnnify; print(lfnnify.__file__, os.getcwd())"],
                       env=hosts.env(0, base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.communicate(timeout=60)[0]  # -S: no site-packages, so no installed lfnnify either
    assert proc.returncode == 0, out
    found, cwd = out.split()
    assert Path(found) == Path(lfnnify.__file__).resolve() and not Path(cwd).resolve().is_relative_to(ROOT), out


def test_the_testbed_refuses_in_one_line_without_root(monkeypatch):
    monkeypatch.setattr(_testbed.os, "geteuid", lambda: 1000)
    with pytest.raises(_testbed.TestbedError, match="needs root"):
        _testbed.Hosts(2)
    with pytest.raises(lfnnify.ConfigError, match="link rate '1 gigabit'"):
        _testbed.parse_rate("1 gigabit")
    assert _testbed.parse_rate("100mbit") == 10**8 and _testbed.parse_rate(None) is None


def test_the_hosts_command_line_makes_runs_in_and_removes_hosts():
    def cli(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "hosts.py"), *args], capture_output=True,
                              text=True, timeout=60)

    try:
        up = cli("up", "--hosts", "2", "--rate", "100mbit")  # as the script's own help writes it
        assert up.returncode == 0 and "host1: lfhclih1, 10.213.0.2" in up.stdout and "links: 100mbit" in up.stdout
        again = cli("up", "--hosts", "2")  # a second testbed of that name: refused, and the first one left alone
        assert again.returncode == 2 and "already exists here" in again.stderr, again.stderr
        inside = cli("run", "1", "--", "sh", "-c", "cat /sys/class/net/lfhclie1/address; echo pid $$")
        assert inside.returncode == 0 and "pid 1" in inside.stdout  # its own network and its own PID namespace
        status = cli("status")
        assert "host0: 10.213.0.1, sent" in status.stdout
    finally:
        down = cli("down")
    assert down.returncode == 0 and "lfhcli" not in _namespaces()
    assert cli("status").returncode == 2  # gone: one line says so


def test_the_multihost_benchmark_runs_end_to_end(tmp_path, capsys):
    # benchmarks/multihost.py at a tiny size: its own testbed, DDP with PowerSGD, FSDP and the replay pipeline
    # sending int8, one rate, one run each, the JSON, table and picture (plain DDP's and float32 sends' bytes are
    # counted on the link in the time-to-accuracy test below and in the demo's test)
    code, out, err = here.module(capsys, "benchmarks.multihost", "--rates", "100mbit", "--methods",
                                 "ddp_powersgd_r1", "fsdp", "replay_pipeline_int8",
                                 "--model", "test_resnet",
                                 "--steps", "3", "--warmup", "2", "--repeats", "1", "--no-projection", "--out",
                                 tmp_path)
    assert code == 0, out[-2000:] + err[-3000:]
    import json

    result = json.loads(next(tmp_path.glob("multihost-*.json")).read_text())
    row = result["results"]["100mbit"]
    assert set(row) == {"ddp_powersgd_r1", "fsdp", "replay_pipeline_int8"}
    assert all(len(r["runs"]) == 1 and len(r["runs"][0]["step_s"]) == 3 for r in row.values())
    # the payload that crossed the link (its bytes less each packet's TCP/IP headers: acknowledgements and how TCP
    # cut the messages into packets vary from run to run) is what each method sends, and little more: FSDP on gloo
    # sends 4x the weights (two all-gathers, and a reduce-scatter that moves what an all-reduce moves); int8 sends a
    # quarter of the activations and gradients, and a scale per channel. The little more is gloo's own framing: a
    # 48-byte preamble on each message and a ready notice for each receive, a few dozen a step (measured on the AMD
    # EPYC: 3.7 kB a step for PowerSGD at rank 1 over its 74 kB, 16 kB for FSDP over its 6.0 MB, 1.4 kB for int8)
    for name, r in row.items():
        payload, expected = r["measured_payload_bytes_per_step"], r["expected_bytes_per_step"]
        assert 0.99 * expected <= payload <= 1.01 * expected + 6_000, (name, payload, expected)
        assert r["measured_bytes_per_step"] > payload  # the headers are counted, not guessed: each packet has them
    assert row["ddp_powersgd_r1"]["hook"] == {"hook": "powersgd", "rank": 1, "start_iter": 2, "error_feedback": True,
                                              "warm_start": True, "one_bucket": True}
    assert result["ratios"]["replay_pipeline_int8/best_ddp@100mbit"] > 0  # against the best DDP variant run
    sent = result["bytes"]["activation_sent_as"]
    assert sent["int8"] < sent["fp32"] / 3.5
    # one run each: no verdict says which is faster
    assert all("too few to say which is faster" in v for v in result["verdicts"]), result["verdicts"]
    assert next(tmp_path.glob("multihost-*.png")).read_bytes()[:4] == b"\x89PNG"
    assert "| fsdp |" in next(tmp_path.glob("multihost-*.md")).read_text()


def test_the_time_to_accuracy_benchmark_runs_end_to_end_and_compares_the_same_batches(tmp_path, capsys):
    # benchmarks.time_to_accuracy --hosts 2 at a tiny size: DDP (plain PyTorch, and with PowerSGD compressing from
    # step 2) and the LFNN-ℓ pipeline across its own two hosts, each run kept in its own file; a second call reuses
    # them (and the sweep's split) instead of training again. (Its exact schedules' worker is checked against backprop
    # in test_benchmarks, on one machine; their bytes per sample there too.)
    args = ["benchmarks.time_to_accuracy", "--hosts", "2", "--allow-dirty", "--model", "test_resnet",
            "--train-subset", "256", "--eval-subset", "128", "--eval-every", "2", "--batch", "64", "--seeds", "0",
            "--methods", "ddp", "ddp_powersgd_r1", "lfnn_pipeline", "--hook-start", "2", "--runs",
            tmp_path / "runs",
            "--out", tmp_path]
    code, out, err = here.module(capsys, *args)
    assert code == 0, out[-2000:] + err[-3000:]
    import json

    result = json.loads(next(tmp_path.glob("multihost_tta-*.json")).read_text())
    for name in ("ddp", "ddp_powersgd_r1", "lfnn_pipeline"):
        run = result["runs"][f"{name}-seed0"]
        assert [e["step"] for e in run["evaluations"]] == [2, 4]  # one epoch of 256 images in batches of 64
        assert run["evaluations"][-1]["train_seconds"] > 0 and min(run["bytes_sent"]) > 0
    plain, compressed = (sum(result["runs"][f"{n}-seed0"]["bytes_sent"]) for n in ("ddp", "ddp_powersgd_r1"))
    assert compressed < 0.6 * plain, (compressed, plain)  # PowerSGD really compressed its later steps
    # bytes per training sample from plan(): PowerSGD's below plain DDP's
    sent = result["bytes_per_sample"]
    assert sent["ddp_powersgd_r1"] < sent["ddp"] and sent["lfnn_pipeline"] > 0
    table = next(tmp_path.glob("multihost_tta-*.md")).read_text()
    assert "| ddp_powersgd_r1 |" in table and "| lfnn_pipeline |" in table and "test accuracy at the budget" in table
    code, again, _ = here.module(capsys, *args)
    assert code == 0 and again.count("reused") == 3, again[-2000:]
    assert "the 2-way split of this sweep, measured before:" in again  # not measured again: it could tip the other way
