"""The fault suite: real kills, stops and errors in pipelines and in saves, damaged files, and bad input.

Every fault must give a clear error or the correct result: a killed save never loses the last good
checkpoint, damaged files are refused by name, and a pipeline fault ends every process within the
rank timeout plus a small margin, with one line that names the rank and block that failed.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lfnnify
from tests import here
from tests.forked import Forked

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"
TIMEOUT_S = 6  # pipeline.timeout_s in these runs
MARGIN_S = 8  # measured about 1 s alone; the suite runs two tests at a time, so the bound leaves room


# ---------------------------------------------------------------- pipeline faults


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline_with_fault(tmp_path, kind, rank, step=2, nproc=2, blocks=2, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LFNNIFY_FAULT": kind, "LFNNIFY_FAULT_RANK": str(rank),
           "LFNNIFY_FAULT_STEP": str(step)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), "--monitor-interval", "0.2", "-m", "lfnnify", "train", str(FMNIST),
           "--out", str(tmp_path / "run"), "--set", "train.iterations=8", "--set", f"convert.blocks={blocks}", *extra,
           "--set", "model.name=test_resnet",
           "--set", "data.train_subset=256", "--set", "data.eval_subset=64", "--set", "data.batch_size=64",
           "--set", "train.threads=1", "--set", f"pipeline.timeout_s={TIMEOUT_S}", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    ended = time.time()
    output = proc.stdout + proc.stderr
    fault = re.search(r"lfnnify-fault: \w+ on rank \d+ at step \d+, time ([\d.]+)", output)
    assert fault, output[-3000:]
    return proc, output, ended - float(fault.group(1))


def _survivors(tmp_path) -> list[int]:
    """Processes still running that were started for this run (the run folder is on their command line)."""
    mine = str(tmp_path / "run")
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if mine in cmdline:
            alive.append(int(pid))
    return alive


@pytest.mark.parametrize("kind,rank", [("raise", 1), ("kill", 0), ("kill", 1), ("stop", 1)],
                         ids=["exception-rank1", "kill9-rank0", "kill9-rank1", "sigstop-rank1"])
def test_a_pipeline_fault_ends_every_rank_in_time_with_one_line(tmp_path, kind, rank):
    proc, output, after_fault = _pipeline_with_fault(tmp_path, kind, rank)
    assert proc.returncode != 0
    bound = (TIMEOUT_S if kind == "stop" else 0) + MARGIN_S
    assert after_fault < bound, f"the last process ended {after_fault:.1f} s after the fault (bound {bound} s)"
    assert not _survivors(tmp_path)
    failed = f"rank {rank} (block {rank})"
    ours = [line for line in output.splitlines() if line.startswith("lfnnify: ")]
    if kind == "raise":  # the failing rank: its traceback once, and the neighbour's one line naming it
        assert output.count("Traceback (most recent call last):\n  File \"/") <= 2  # torchrun's own, and the rank's
        assert output.count('raise RuntimeError(f"injected failure at step {step}")') == 1, output[-4000:]
        assert f"lfnnify: {failed} failed: RuntimeError: injected failure at step 2" in output
        assert [line for line in ours if "stops:" in line] == [f"lfnnify: error: rank 0 (block 0) stops: {failed} "
                                                               f"exited"]
    else:  # a killed or stopped rank prints nothing: its neighbour names it, once
        other = 1 - rank
        stops = [line for line in ours if "stops:" in line]
        assert len(stops) == 1 and f"rank {other} (block {other}) stops: {failed}" in stops[0], output[-4000:]
        assert ("did not answer within" in stops[0]) == (kind == "stop")
        assert "Connection reset" not in output and "Connection closed" not in output


def test_with_three_ranks_and_the_last_stopped_only_the_stopped_one_is_ended_and_each_names_its_own_neighbour(
        tmp_path):
    # rank 2 stops (SIGSTOP); rank 1, waiting on it, ends it; rank 0, waiting on rank 1 (itself waiting, not stuck),
    # names rank 1 and leaves it alone (never blames or ends the healthy rank 1)
    proc, output, after_fault = _pipeline_with_fault(tmp_path, "stop", 2, nproc=3, blocks=3,
                                                     extra=["--set", "convert.mode=replay"])
    assert proc.returncode != 0 and not _survivors(tmp_path)
    stops = [line for line in output.splitlines() if line.startswith("lfnnify: error:") and "stops:" in line]
    ended = [line for line in stops if "ended it" in line]
    assert len(ended) == 1 and "rank 1 (block 1) stops: rank 2 (block 2) did not answer" in ended[0], stops
    assert not any("rank 0 (block 0) stops:" in line and "ended it" in line for line in stops), stops


def test_a_dead_replica_is_named_by_its_block_and_replica(tmp_path):
    # 2 blocks x 2 replicas; block 0's second replica is killed: its partner names it, not "another rank of 4"
    proc, output, _ = _pipeline_with_fault(tmp_path, "kill", 1, nproc=4)
    assert proc.returncode != 0 and not _survivors(tmp_path)
    assert "rank 0 (block 0, replica 0) stops: rank 1 (block 0, replica 1)" in output, output[-3000:]
    assert "another rank of 4" not in output


def test_sigterm_during_train_saves_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", FMNIST, "--out", out, "--set", "train.iterations=60", "--set", "train.checkpoint_every=3",
            "--set", "model.name=test_resnet",
            "--set", "data.batch_size=32", "--set", "data.train_subset=256", "--set", "data.eval_subset=256",
            "--set", "train.threads=1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lfnnify", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 240
    while not (out / "ckpt" / "CURRENT").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted at iteration" in stdout and "--resume" in stdout
    stopped_at = lfnnify.read_trainer_state(out / "ckpt")["step"]
    assert 0 < stopped_at < 60

    # the resume needs no process of its own (the interrupted run did: a signal, an exit code)
    code, stdout, err = here.cli(capsys, "train", FMNIST, "--out", out, "--resume", *args[4:])
    assert code == 0, err[-3000:]
    assert f"resuming at {stopped_at}" in stdout
    assert "60 iterations" in (out / "results.md").read_text()


# ---------------------------------------------------------------- killed saves

class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.stage = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.stage(self.stem(x)).mean((2, 3)))


def small_run(steps, start=None):
    """Train a small model to ``steps`` steps (from checkpoint ``start`` if given); deterministic."""
    from lfnnify.data import SyntheticImages, make_loader

    torch.manual_seed(0)
    if start is None:
        net = lfnnify.convert(_Small(), cuts=["stem"], example_input=torch.zeros(1, 1, 16, 16))
    else:
        net = lfnnify.load(start, model=_Small())
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), progress=False)
    if start is not None:
        trainer.load_state_dict(lfnnify.read_trainer_state(start))
    trainer.fit(make_loader(SyntheticImages(64, shape=(1, 16, 16), seed=1), batch_size=16, seed=2), epochs=10,
                max_steps=steps)
    return net, trainer


@pytest.mark.parametrize("point", ["before-write", "before-marker", "mid-write", "before-pointer", "mid-pointer",
                                   "after-pointer", "mid-removal"])
def test_a_save_killed_at_any_point_leaves_a_checkpoint_that_resumes_exactly(tmp_path, point):
    ckpt = tmp_path / "ckpt"
    net, trainer = small_run(steps=2)
    lfnnify.save(net, ckpt, trainer=trainer)  # the last good checkpoint, at step 2
    net, trainer = small_run(steps=4, start=ckpt)
    saver = Forked(lambda: lfnnify.save(net, ckpt, trainer=trainer), env={"LFNNIFY_KILL_AT": point},
                   errors=tmp_path / "saver.err")
    assert saver.wait() == -signal.SIGKILL, saver.error()  # killed inside the save, for real
    step = lfnnify.read_trainer_state(ckpt)["step"]
    assert step == (4 if point in ("after-pointer", "mid-removal") else 2)  # the old one, or the new once current
    resumed, _ = small_run(steps=6, start=ckpt)
    straight, _ = small_run(steps=6)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    net, trainer = small_run(steps=3)
    lfnnify.save(net, ckpt, trainer=trainer)  # the next save cleans up what the killed one left
    left = sorted(p.name for p in ckpt.iterdir())
    assert len(left) == 2 and left[0] == "CURRENT" and re.fullmatch(r"v\d{6}", left[1]), left


# ---------------------------------------------------------------- damaged and odd files


def _current(ckpt):
    return ckpt / (ckpt / "CURRENT").read_text().split()[0]


def _flip(file: Path, offset_from_end: int) -> None:
    data = bytearray(file.read_bytes())
    data[-offset_from_end] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.safetensors", "trainer.json"])
def test_a_flipped_byte_is_refused_as_damage_by_file(tmp_path, name):
    net, trainer = small_run(steps=1)
    lfnnify.save(net, tmp_path / "ckpt", trainer=trainer)
    _flip(_current(tmp_path / "ckpt") / name, 7)  # inside the last tensor's bytes (or the JSON's tail)
    with pytest.raises(lfnnify.CheckpointError, match=rf"{re.escape(name)} is damaged") as info:
        lfnnify.load(tmp_path / "ckpt", model=_Small())
        lfnnify.read_trainer_state(tmp_path / "ckpt")
    assert "model=" not in str(info.value)  # damage is not blamed on the architecture


@pytest.mark.parametrize("file,key", [("lfnnify.json", "cuts"), ("trainer.json", "state")])
def test_a_description_missing_a_key_names_it(tmp_path, file, key):
    net, trainer = small_run(steps=1)
    lfnnify.save(net, tmp_path / "ckpt", trainer=trainer)
    folder = _current(tmp_path / "ckpt")
    content = json.loads((folder / file).read_text())
    del content[key]
    (folder / file).write_text(json.dumps(content))
    if file == "lfnnify.json":  # its checksum is in CURRENT: rewrite the pointer as a hand edit would not
        (tmp_path / "ckpt" / "CURRENT").write_text(folder.name + "\n")
    else:
        meta = json.loads((folder / "lfnnify.json").read_text())
        meta["files"].pop(file)
        (folder / "lfnnify.json").write_text(json.dumps(meta))
        (tmp_path / "ckpt" / "CURRENT").write_text(folder.name + "\n")
    with pytest.raises(lfnnify.CheckpointError,
                       match=rf"{file} is damaged or not written by lfnnify: it lacks the key '{key}'"):
        lfnnify.load(tmp_path / "ckpt", model=_Small())
        lfnnify.read_trainer_state(tmp_path / "ckpt")


def test_a_file_at_the_save_path_is_refused_before_anything_is_touched(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("my notes")
    net, _ = small_run(steps=0)
    with pytest.raises(lfnnify.CheckpointError, match=r"is a file, not a checkpoint folder"):
        lfnnify.save(net, target)
    assert target.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------- bad input, as a table

def _resnet():
    import timm

    return timm.create_model("resnet18", num_classes=10)


def _net():
    return lfnnify.convert(_resnet(), blocks=2, example_input=torch.zeros(1, 3, 32, 32))


def _trainer():
    return lfnnify.Trainer(_net(), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), progress=False)


X = torch.zeros(2, 3, 32, 32)
BAD_INPUT = [
    ("labels out of range", lambda: _trainer().train_step(X, torch.tensor([0, 10])), lfnnify.LabelError,
     ["label 10", "[0, 10)", "num_classes"]),
    ("float labels", lambda: _trainer().train_step(X, torch.tensor([0.0, 1.0])), lfnnify.LabelError,
     ["dtype torch.float32", "labels.long()"]),
    ("(N, 1) labels", lambda: _net().local_losses(X, torch.tensor([[0], [1]])), lfnnify.LabelError,
     ["shape (2, 1)", "labels.squeeze(1)"]),
    ("one-hot labels", lambda: _net().local_losses(X, torch.eye(10)[:2]), lfnnify.LabelError,
     ["dtype torch.float32", "argmax(1)"]),
    ("a string for plan", lambda: lfnnify.plan("resnet18"), lfnnify.ConfigError,
     ["torch.nn.Module", "timm.create_model('resnet18')"]),
    ("an optimizer instance", lambda: lfnnify.Trainer(_net(), optimizer=torch.optim.SGD(_resnet().parameters(), lr=1)),
     lfnnify.ConfigError, ["SGD instance", "factory", "optimizer=lambda params"]),
    ("a wrong-channel input", lambda: _net().local_losses(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1])),
     lfnnify.ConfigError, ["1 channels", "converted for 3"]),
    ("an int example input", lambda: lfnnify.convert(_resnet(), blocks=2, example_input=torch.zeros(1, 3, 32, 32,
                                                                                                     dtype=torch.long)),
     lfnnify.ConfigError, ["dtype torch.int64", "floating-point"]),
    ("an example input the model cannot take", lambda: lfnnify.convert(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10)), blocks=2,
        example_input=torch.randn(8, 3, 2, 2)), lfnnify.ConfigError, ["shape (8, 3, 2, 2)", "example_input="]),
    ("an already converted model", lambda: lfnnify.convert(_net(), blocks=2), lfnnify.ConfigError,
     ["already converted", "lfnnify.export"]),
    ("an empty evaluation loader", lambda: _trainer().evaluate([]), lfnnify.ConfigError, ["no examples"]),
    ("a non-positive timeout", lambda: lfnnify.PipelineTrainer(_net(), optimizer=None, timeout_s=-5),
     lfnnify.ConfigError, ["timeout_s=-5", "positive"]),
    ("a missing data folder", lambda: lfnnify.data.FashionMNIST("/nonexistent"), lfnnify.DataNotFoundError,
     ["/nonexistent", "looked in"]),
]


@pytest.mark.parametrize("what,call,error,words", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_gets_a_clear_error(what, call, error, words):
    import lfnnify.data  # noqa: F401  (the table's data case)

    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (what, str(info.value))


@pytest.mark.parametrize(
    "args,words",
    [
        (["train", str(FMNIST), "--data", "/nonexistent", "--no-progress"], ["Fashion-MNIST not found",
                                                                             "/nonexistent"]),
        (["train", str(FMNIST), "--set", "data.root=/nonexistent", "--no-progress"], ["/nonexistent"]),
        (["train", str(FMNIST), "--set", "pipeline.timeout_s=-5", "--no-progress"],
         ["pipeline.timeout_s: -5.0 must be a positive number of seconds"]),
        (["plan", "resnet18", "--input-size", "-3"], ["--input-size -3", "positive"]),
    ],
    ids=["--data missing", "data.root missing", "timeout_s", "input-size"],
)
def test_the_command_line_refuses_bad_input_in_one_line(tmp_path, args, words, capsys):
    code, _, err = here.cli(capsys, *args, *(["--out", tmp_path / "r"] if args[0] == "train" else []))
    assert code == 2 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("lfnnify: error:") and all(w in line for w in words), line


def test_plan_accepts_the_documented_memory_balance(capsys):
    code, out, err = here.cli(capsys, "plan", "resnet18", "--blocks", "2", "--input-size", "32", "--balance",
                                "memory")
    assert code == 0 and "balanced by memory" in out, err[-2000:]
