"""The command line and recipes: validation, a real short run, overrides, errors, SIGTERM and resume."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lfnnify.app.demo import WARMUP_STEPS
from lfnnify.app.recipes import RecipeError, load_recipe
from tests import here
from tests.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
FMNIST = ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"
# the recipe's data and loop at a small scale: timm's test_resnet (a small ResNet) trains 10x faster than resnet18
SHORT = ["--set", "model.name=test_resnet", "--set", "data.train_subset=256", "--set", "data.eval_subset=256",
         "--set", "train.threads=1", "--no-progress"]


def _current(ckpt):
    """The folder of a checkpoint's current version (what its CURRENT pointer names)."""
    return ckpt / (ckpt / "CURRENT").read_text().split()[0]


def in_process(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lfnnify args`` run in this process (the tests that need a real process, its
    exit code included, use _cli)."""
    return here.cli(capsys, *args)


def _cli(*args, timeout=300, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lfnnify", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, **kwargs)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.method == "lfnn" and (recipe.convert.blocks == 4)
    bp = load_recipe(path, overrides=["method=bp"])
    assert bp.method == "bp"


def test_recipe_count_covers_the_paper():
    names = {p.stem for p in RECIPES}
    for model in ("vgg19", "resnet50", "resnet101", "resnet152"):
        assert f"cifar10_{model}_k4" in names and f"tiny_imagenet_{model}_k4" in names
    assert {"imagenet_resnet101_k4", "imagenet_resnet152_k4", "fashion_mnist_resnet18_k4",
            "finetune_resnet50_k4"} <= names


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["convert.blokcs=4"], r"convert.blokcs: unknown key"),
        (["convert.blocks=0"], r"convert.blocks: 0 must be an int >= 1"),
        (["convert.leaders=1.5"], r"convert.leaders: 1.5 must be a fraction in \(0, 1\]"),
        (["train.optimizer.lr=fast"], r"train.optimizer.lr: expected a number, got 'fast'"),
        (["data.dataset=mnist"], r"data.dataset: 'mnist' is not one of"),
        (["train.refresh_heads_every=100"], r"train.refresh_heads_every: 100 needs look-ahead heads .*'linear'"),
    ],
)
def test_bad_recipes_name_the_key(overrides, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(FMNIST, overrides=overrides)


def test_run_length_needs_exactly_one_of_iterations_and_epochs():
    with pytest.raises(RecipeError, match=r"exactly one of train.iterations .*iterations=5, epochs=2"):
        load_recipe(data={"train": {"epochs": 2, "iterations": 5}})
    with pytest.raises(RecipeError, match=r"exactly one of train.iterations"):
        load_recipe(data={"train": {}})


def test_set_replaces_the_run_length():
    recipe = load_recipe(FMNIST, overrides=["train.iterations=7", "convert.workers=2", "convert.leaders=0.5"])
    assert recipe.train.iterations == 7 and recipe.train.epochs is None
    assert recipe.convert.workers == 2 and recipe.convert.leaders == 0.5


def test_train_writes_the_run_folder_and_export_gives_timm_the_trained_weights(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = in_process(capsys, "train", FMNIST, "--out", out, "--set", "train.iterations=4", "--set",
                                   "data.batch_size=64", "--set", "convert.workers=2", "--set", "convert.leaders=0.5",
                                   *SHORT)
    assert code == 0, err[-3000:]
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith("done: test accuracy") and str(out) in lines[-1]
    assert "on device cpu, 0 loader workers" in stdout  # the device is named in the first lines...
    assert "4 iterations in" in (out / "results.md").read_text() and "on cpu (" in (out / "results.md").read_text()
    for name in ("recipe.yaml", "log.jsonl", "results.md", "curves.png", "leadership.png", "ckpt/CURRENT"):
        assert (out / name).exists(), name
    assert (_current(out / "ckpt") / "lfnnify.json").exists()
    assert load_recipe(out / "recipe.yaml").train.iterations == 4
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and len(evals[-1]["block_accuracy"]) == 4

    code, _, err = in_process(capsys, "export", out / "ckpt", tmp_path / "small.safetensors")
    assert code == 0, err
    import timm
    import torch

    import lfnnify

    model = timm.create_model("test_resnet", pretrained=True, in_chans=1, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "small.safetensors"), num_classes=10))
    trained = lfnnify.load(out / "ckpt").eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained(x))  # timm loads exactly what was trained
    assert not any((tmp_path).glob(".*tmp*"))  # no temporary file left behind


def test_method_bp_trains_the_plain_model(tmp_path, capsys):
    code, _, err = in_process(capsys, "train", FMNIST, "--out", tmp_path / "bp", "--set", "method=bp", "--set",
                              "train.iterations=2", *SHORT)
    assert code == 0, err[-3000:]
    meta = json.loads((_current(tmp_path / "bp" / "ckpt") / "lfnnify.json").read_text())
    assert meta["cuts"] == [] and meta["config"]["blocks"] == 1


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--set", "convert.leaders=2"], "convert.leaders: 2.0 must be a fraction in (0, 1]"),
        (["--set", "data.dataset=cifar10", "--data", "/nonexistent/cifar"], "cifar10 not found in /nonexistent/cifar"),
        (["--set", "data.dataset=imagefolder", "--data", "/nonexistent/imgs"], "needs /nonexistent/imgs/train"),
        (["--set", "train.device=tpu"], "train.device: 'tpu' must be auto, cpu, cuda or cuda:N"),
        (["--set", "data.workers=-2"], "data.workers: -2 must be >= 0"),
        pytest.param(["--device", "cuda"], "torch sees no GPU here", marks=pytest.mark.skipif(
            __import__("torch").cuda.is_available(), reason="this machine has a GPU")),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, args, pattern, capsys):
    code, _, err = in_process(capsys, "train", FMNIST, "--out", tmp_path / "x", *args, "--no-progress")
    assert code == 2
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("lfnnify: error:")]
    assert len(error_lines) == 1 and pattern in error_lines[0], err


def test_missing_dataset_mentions_download(tmp_path, capsys):
    code, _, err = in_process(capsys, "train", FMNIST, "--set", "data.dataset=cifar10", "--data", tmp_path / "none",
                              "--no-progress")
    assert code == 2 and "--download" in err and "Traceback" not in err


def test_train_under_torchrun_uses_the_pipeline(tmp_path):
    # sending int8 deltas, which need the training loader to give sample indices: the recipe's run makes it so
    port = free_port()
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "lfnnify", "train", str(FMNIST), "--out", str(out),
           "--set", "train.iterations=3", "--set", "convert.blocks=2", "--set", "pipeline.send_dtype=int8",
           "--set", "pipeline.send_deltas=true", *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pipeline over 2 processes" in proc.stdout
    folder = _current(out / "ckpt")
    meta = json.loads((folder / "lfnnify.json").read_text())
    assert meta["pipeline"] == {"blocks": 2, "replicas": 1}
    assert (folder / "block0.safetensors").exists() and (folder / "block1.safetensors").exists()
    assert (out / "results.md").exists()


def test_an_epoch_of_data_parallel_backprop_under_torchrun_is_one_pass_over_the_data(tmp_path):
    # method: bp under torchrun: one block, two replicas; each step takes two batches (one per replica), so one
    # epoch of 256 images in batches of 32 is 4 steps, not 8 (not two epochs called one)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "lfnnify", "train", str(FMNIST), "--out", str(out),
           "--set", "method=bp", "--set", "train.epochs=1", "--set", "data.batch_size=32", *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "training 4 iterations (1.00 epochs of 4 steps)" in proc.stdout and "2 replicas per block" in proc.stdout
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [(e["step"], e["epoch"]) for e in evals] == [(4, 1.0)]
    assert json.loads((_current(out / "ckpt") / "lfnnify.json").read_text())["pipeline"] == {"blocks": 1,
                                                                                              "replicas": 2}


def test_resume_needs_a_run_and_a_fresh_run_needs_a_fresh_folder(tmp_path, capsys):
    code, _, err = in_process(capsys, "train", FMNIST, "--out", tmp_path / "nothing", "--resume", "--no-progress")
    assert code == 2 and "no checkpoint" in err


def test_help_gives_examples(capsys):
    for args in (["--help"], ["train", "--help"], ["plan", "--help"], ["demo", "--help"], ["export", "--help"]):
        code, out, _ = in_process(capsys, *args)
        assert code == 0 and "example" in out


def test_plan_command_and_unknown_model(capsys):
    code, out, _ = in_process(capsys, "plan", "resnet18", "--blocks", "2", "--input-size", "32", "--batch-size", "64",
                              "--link", "1gbit")
    assert code == 0 and "largest block / mean" in out and "DDP on 2 devices" in out
    code, _, err = in_process(capsys, "plan", "resnet_nope")
    assert code == 2 and "unknown model 'resnet_nope'" in err


def test_demo_quick(tmp_path, capsys):
    # every method, the two-process pipelines included, for one second each, on the same batches; memory; the two
    # hosts where the machine allows them; the picture and the summary
    code, out, err = in_process(capsys, "demo", "--quick", "--budget", "1", "--out", tmp_path / "demo")
    assert code == 0, out[-3000:] + err[-3000:]
    assert "bit for bit): True" in out
    for name in ("backprop", "replay pipeline, K=2", "LFNN-ℓ pipeline, K=2"):
        assert re.search(rf"{re.escape(name)} +test accuracy 0\.\d+ after +\d+ steps", out), name
    summary = out[out.index("summary ("):]
    assert "throughput on this machine:" in summary and "memory:" in summary
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert all(r["steps"] > WARMUP_STEPS and r["curve"] for r in result["results"].values())
    # the headline compares what each method reached at the end of the same budget (warm-up steps untimed)
    final = {name: r["curve"][-1] for name, r in result["results"].items()}
    assert all(p["seconds"] >= result["budget_s"] * 0.999 for p in final.values()), final
    ours, theirs = final["replay pipeline, K=2"]["accuracy"], final["backprop"]["accuracy"]
    headline = f"accuracy after 1 s of training each: replay pipeline, K=2 {ours:.4f} against backprop's {theirs:.4f}"
    assert headline in summary, summary
    from lfnnify.app.testbed import missing

    if missing() is None:  # two hosts: each method's bytes were counted on the link
        hosts = result["hosts"]
        ddp, powersgd = "data-parallel backprop (DDP)", "DDP with PowerSGD, rank 1"
        assert set(hosts) == {"LFNN-ℓ pipeline, K=2", ddp, powersgd}, hosts
        assert hosts[ddp]["bytes_per_step"] > 10 * hosts["LFNN-ℓ pipeline, K=2"]["bytes_per_step"] > 0
        assert hosts[ddp]["bytes_per_step"] > 10 * hosts[powersgd]["bytes_per_step"] > 0  # PowerSGD compressed
        fastest = max(hosts, key=lambda n: hosts[n]["samples_per_s"])
        assert f"- across two hosts at 1gbit, {fastest} trained the most samples/s;" in summary, summary
    else:
        assert "4. two hosts joined by a 1gbit link: skipped (" in out


def test_the_demo_trains_every_method_on_the_same_batches():
    # every method, backprop included, runs the trainers' resumable loop (an evaluation chunk does not restart the
    # epoch): stopping and going on sees the batches an uninterrupted run sees
    import torch
    from torch.utils.data import Subset

    import lfnnify
    from lfnnify.app.demo import demo_model
    from lfnnify.data import SyntheticImages, make_loader

    data = SyntheticImages(96, shape=(1, 28, 28), seed=3)
    seen = {}
    for chunks in ([6], [2, 2, 2]):
        net = lfnnify.convert(demo_model(), blocks=1, example_input=torch.zeros(1, 1, 28, 28))
        trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0), progress=False)
        batches = []
        trainer.train_step = lambda x, y, _b=batches, _t=trainer.train_step: (_b.append(y.clone()), _t(x, y))[1]
        done = 0
        for n in chunks:
            done += n
            trainer.fit(make_loader(Subset(data, range(96)), batch_size=16, seed=0), epochs=10**9, max_steps=done)
        seen[len(chunks)] = torch.cat(batches)
    assert torch.equal(seen[1], seen[3])
