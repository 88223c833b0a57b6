"""The benchmark scripts' code paths run end to end at tiny sizes, so they cannot rot."""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import here

ROOT = Path(__file__).resolve().parents[1]
SPEEDUP = "benchmarks.speedup"


def test_speedup_quick_path_writes_the_documented_json(tmp_path, capsys):
    # the LFNN-ℓ pipeline and the projection (one-process backprop and bp_shard run in the projection-only test
    # below; the worker's DDP in test_multihost's benchmark test, with PowerSGD; the replay pipeline's code path in the
    # pipeline tests); timm's test_resnet, a small ResNet, since the launches, not the model, are what this checks
    chosen = ("lfnn_pipeline",)
    code, out, err = here.module(capsys, SPEEDUP, "--quick", "--model", "test_resnet", "--batch", "8", "--size", "32",
                                 "--steps", "2", "--warmup", "1", "--balance", "flops", "--out", tmp_path,
                                 "--methods", *chosen)
    assert code == 0, out[-2000:] + err[-3000:]
    result = json.loads((tmp_path / "speedup.json").read_text())
    methods = result["methods"]
    assert set(methods) == set(chosen)
    for name in chosen:
        method = methods[name]
        assert len(method["step_s"]) == 2
        assert method["step_s_median"] == pytest.approx(statistics.median(method["step_s"]))
        assert method["samples_per_s"] == pytest.approx(8 / method["step_s_median"])  # the global batch over the step
    s = result["speedup"]
    assert s["vs_ddp"] is None and s["vs_bp_single"] is None  # not measured: said, not guessed
    assert set(result["env"]) >= {"commit", "torch", "device", "cores", "threads", "date"}
    p, moved = result["projection"], result["bytes_per_step"]
    assert p["predicted_speedup_vs_bp_model_parallel"] == pytest.approx(
        p["predicted_step_s"]["bp_model_parallel"] / p["predicted_step_s"]["lfnn_pipeline"])
    # one cut at K=2: the pipeline sends its activation once, replay and model-parallel BP also the gradient back;
    # DDP's ring all-reduce of two ranks sends the gradients once each way
    (act,) = p["activation_bytes"]
    assert moved["lfnn_pipeline"] == act and moved["replay_pipeline"] == moved["bp_model_parallel"] == 2 * act
    assert moved["ddp"] == pytest.approx(2 * moved["gradient_bytes"])
    assert act == 8 * 4 * math.prod(_cut_shape(result))  # batch 8, float32
    assert len(list(tmp_path.glob("*.png"))) == 1 and len(list(tmp_path.glob("*.md"))) == 1


def _cut_shape(result):
    """The activation shape at the speed-up run's cut, for one example (from lfnnify's plan)."""
    import lfnnify
    from lfnnify.app import create_model

    model = create_model(result["settings"]["model"], num_classes=10, cifar=True)
    plan = lfnnify.plan(model, cuts=result["settings"]["cuts"], example_input=torch.zeros(1, 3, 32, 32))
    return plan.blocks[0].output_shape[1:]


def test_the_projection_times_a_blocks_whole_step(monkeypatch):
    # the projection timed hidden blocks from after their forward pass, which flattered LFNN-ℓ. On a clock that moves
    # only when a block runs its forward (one second each), every per-block time must count each forward of that
    # step: BP's and LFNN-ℓ's one, replay's two (the pass that goes on, then the recompute) in a hidden block and one
    # in the last; timed from after the forward, they would count none. No real clock: this cannot be flaky.
    from benchmarks.workers import speedup as worker
    from lfnnify.app import create_model

    clock = [0.0]
    monkeypatch.setattr(worker, "_now", lambda: clock[0])
    real_convert = worker._convert_on_device

    def ticking(model, args, **knobs):
        net = real_convert(model, args, **knobs)
        for block in net.blocks:
            block.register_forward_hook(lambda *_: clock.__setitem__(0, clock[0] + 1.0))
        return net

    monkeypatch.setattr(worker, "_convert_on_device", ticking)
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=10, cifar=True)
    args = argparse.Namespace(cuts=["layer2"], size=32, workers=1, leaders=1.0, warmup=1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    result = worker.projection(args, model, x, y)
    assert result["block_fwd_bwd_s"] == [1.0, 1.0] and result["block_lfnn_step_s"] == [1.0, 1.0]
    assert result["block_replay_step_s"] == [2.0, 1.0]


def test_a_speedup_cell_is_the_median_of_its_runs_with_their_range():
    from benchmarks.speedup import _apart, repeated

    def run(rate, tag):
        return {"samples_per_s": rate, "step_s_median": 64 / rate, "step_s": [64 / rate], "process_wall_s": 1.0,
                "stage_timings": tag}

    cell = repeated([run(100.0, "a"), run(120.0, "b"), run(90.0, "c")])
    assert cell["samples_per_s"] == 100.0 and cell["samples_per_s_range"] == [90.0, 120.0]
    assert cell["stage_timings"] == "a" and len(cell["runs"]) == 3  # the median run's details, every run's figures
    other = repeated([run(125.0, "x"), run(130.0, "y"), run(140.0, "z")])
    assert _apart({"a": cell, "b": other}, "a", "b") == " (ranges apart)"
    assert "overlap" in _apart({"a": cell, "b": repeated([run(119.0, "x"), run(130.0, "y")])}, "a", "b")
    assert repeated([run(100.0, "a")]) == run(100.0, "a")  # one run: as it was measured, no range to claim


def test_speedup_projection_only_path_runs_on_one_device(tmp_path, capsys):
    # what a one-GPU session runs (benchmarks/gpu_check.sh), here on the CPU at tiny sizes
    code, out, err = here.module(capsys, SPEEDUP, "--projection-only", "--no-cifar", "--model", "test_resnet",
                                 "--blocks", "4", "--batch", "8", "--size", "32", "--steps", "2", "--warmup", "1",
                                 "--balance", "flops", "--out", tmp_path)
    assert code == 0, out[-2000:] + err[-3000:]
    result = json.loads((tmp_path / "speedup.json").read_text())
    assert set(result["methods"]) == {"bp_single", "bp_shard", "lfnn_single"}
    p = result["projection"]
    assert len(p["block_fwd_bwd_s"]) == 4 and len(p["activation_bytes"]) == 3 and len(p["block_replay_step_s"]) == 4
    # the DDP projection: one process's step on a quarter of the batch, plus a ring all-reduce at the link's speed
    expected = result["methods"]["bp_shard"]["step_s_median"] + 2 * 3 / 4 * p["gradient_bytes"] / (450 * 1e9)
    assert p["predicted_step_s"]["ddp"] == pytest.approx(expected)
    assert result["settings"]["cifar"] is False
    assert "projected" in next(tmp_path.glob("*.md")).read_text()
    # one process start for all of them (each on a fresh model): on a lent GPU a start costs seconds of its time
    assert {r["command"] for r in result["methods"].values()} == {result["methods"]["bp_single"]["command"]}
    assert result["methods"]["lfnn_single"]["shared_with"] == ["bp_single", "bp_shard", "lfnn_single", "projection"]


def test_the_speedup_worker_runs_several_methods_in_one_process_only_where_each_is_a_one_process_method(
        tmp_path, monkeypatch):
    from benchmarks.workers import speedup as worker
    monkeypatch.setattr(sys, "argv", ["speedup.py", "--method", "bp_single", "ddp", "--cuts", "layer1",
                                      "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match=r"--method bp_single ddp: several methods .* each must be one of "
                                         r"\['bp_shard', 'bp_single', 'lfnn_single', 'projection'\]"):
        worker.main()
    assert not (tmp_path / "r.json").exists()


def test_gpu_check_script_dry_run_on_the_cpu(tmp_path):
    # the prepared accelerator run: its preflight, then its first step (lfnnify's GPU code paths, here on the CPU,
    # two of the four checks), each step's results packed as soon as it ends
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_ONLY": "paths", "GPU_CHECK_PATHS": "trainer nonfinite",
           "CUDA_VISIBLE_DEVICES": ""}
    refused = subprocess.run(["bash", "benchmarks/gpu_check.sh"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300, env=env)  # no GPU and no dry run asked for: one line, nothing measured
    assert refused.returncode == 3 and "gpu_check: no CUDA device is visible here" in refused.stdout, refused.stdout
    assert "=== paths" not in refused.stdout
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**env, "GPU_CHECK_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "preflight ok: python" in proc.stdout and "=== paths" in proc.stdout
    import tarfile

    with tarfile.open(tmp_path / "results.tgz") as tar:
        lines = tar.extractfile("./gpu_paths.jsonl").read().decode().splitlines()
    checks = [json.loads(line) for line in lines]
    assert [c["check"] for c in checks] == ["trainer", "nonfinite"] and all(c["ok"] for c in checks), checks


def test_the_fine_tuning_benchmark_runs_seeds_on_a_validation_split_and_reuses_its_runs(tmp_path, capsys):
    # benchmarks/finetune.py at a tiny size: one pretrained checkpoint for every run, two methods, two seeds, the
    # choice made on the validation split; a second call reuses the checkpoint and every run
    args = ["benchmarks.finetune", "--model", "test_resnet", "--pretrain-steps", "3", "--steps", "3",
            "--head-warmup", "1", "--methods", "bp", "replay_stash_delay_lr", "--seeds", "0", "1", "--validation",
            "200", "--train-subset", "256", "--threads", "1", "--allow-dirty", "--out", tmp_path, "--runs",
            tmp_path / "runs", "--name", "ft"]
    code, out, err = here.module(capsys, *args)
    assert code == 0, out[-2000:] + err[-3000:]
    assert "fine-tuning on 256 images of classes 5-9, 200 held out for validation" in out
    result = json.loads((tmp_path / "ft.json").read_text())
    assert sorted(p.name for p in (tmp_path / "runs").glob("*-seed*.json")) == [
        "bp-seed0.json", "bp-seed1.json", "replay_stash_delay_lr-seed0.json", "replay_stash_delay_lr-seed1.json"]
    for name, rows in result["runs"].items():
        assert [r["seed"] for r in rows] == [0, 1] and all(0 <= r["val_accuracy"] <= 1 for r in rows)
        mean, sd = result["summary"][name]["test_accuracy"]
        assert mean == pytest.approx(100 * statistics.mean(r["test_accuracy"] for r in rows))
        assert sd == pytest.approx(100 * statistics.stdev(r["test_accuracy"] for r in rows))
    assert result["chosen"] == "replay_stash_delay_lr" and "chosen on the validation split" in result["verdict"]
    assert result["one_commit"] is False or not result["commits"][0].endswith("+dirty")
    assert "| backprop | 2 |" in (tmp_path / "ft.md").read_text()
    code, again, _ = here.module(capsys, *args)
    assert code == 0 and again.count("reused") == 5, again[-2000:]  # the checkpoint and the four runs
    code, alone, err = here.module(capsys, *[a for a in args if a != "bp"])  # a table without bp
    assert code == 0, alone[-2000:] + err[-3000:]
    assert "no backprop row in this call (add bp to --methods)" in (tmp_path / "ft.md").read_text()


def test_memory_script_reports_every_method(tmp_path, capsys):
    code, _, err = here.module(capsys, "benchmarks.memory", "--model", "resnet18", "--size", "32",
                               "--batch", "2", "--classes", "10", "--steps", "2", "--threads", "1",
                               "--mmap-threshold", "131072", "--out", tmp_path)
    assert code == 0, err[-3000:]
    result = json.loads((tmp_path / "memory.json").read_text())
    assert set(result["peak_bytes"]) == {"bp", "bp_checkpointed", "lfnn"}
    assert all(v > 0 for v in result["peak_bytes"].values())
    assert all(len(r["step_s"]) == 2 and r["step_s_median"] == r["step_s"][1] for r in result["methods"].values())


def test_checkpointed_backprop_at_the_plans_cuts_computes_backprops_gradients():
    # the baseline is exact backprop: the same loss and gradients as the original model, only recomputed
    import copy

    import timm
    import torch
    import torch.nn.functional as F

    import lfnnify
    from benchmarks.memory import checkpointed_forward

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    reference = copy.deepcopy(model)
    net = lfnnify.convert(model, blocks=4, example_input=torch.zeros(1, 3, 32, 32), share_parameters=True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(checkpointed_forward(list(net.blocks), x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    ours = dict(model.named_parameters())
    assert len(ours) == len(dict(reference.named_parameters()))
    for name, p in reference.named_parameters():
        assert torch.allclose(ours[name].grad, p.grad, atol=1e-6), name


def test_time_to_accuracy_across_hosts_is_measured_against_ddp_of_the_same_seed(monkeypatch):
    from benchmarks.time_to_accuracy import across_hosts as tta

    def run(*points):
        return {"evaluations": [{"step": 10 * (i + 1), "train_seconds": s, "accuracy": a}
                                for i, (s, a) in enumerate(points)]}

    runs = {"ddp-seed0": run((10, 0.70), (20, 0.80)), "replay_pipeline-seed0": run((8, 0.75), (16, 0.81)),
            "lfnn_pipeline-seed0": run((5, 0.60), (10, 0.79)),
            "ddp-seed1": run((10, 0.82), (20, 0.80)), "replay_pipeline-seed1": run((12, 0.81), (24, 0.83)),
            "lfnn_pipeline-seed1": run((5, 0.90), (10, 0.91)),
            "ddp_powersgd_r1-seed0": run((6, 0.80), (12, 0.82)), "ddp_powersgd_r1-seed1": run((6, 0.70), (12, 0.75))}
    summary = tta.summarise(runs, [0, 1], ["lfnn_pipeline", "ddp", "ddp_powersgd_r1", "replay_pipeline"])
    # the methods in the benchmark's own order, each measured against plain DDP of its seed; local SGD was not run
    assert list(summary["final_accuracy"]) == ["ddp", "ddp_powersgd_r1", "replay_pipeline", "lfnn_pipeline"]
    assert summary["per_seed"][0]["ddp_powersgd_r1"]["ratio_to_ddp"] == 6 / 20
    assert summary["ratio_to_ddp"]["ddp_powersgd_r1"]["reached"] == "1 of 2 seeds"
    # seed 0: DDP reaches its final 0.80 at 20 s; replay at 16 s (0.8x); LFNN-ℓ never
    assert summary["per_seed"][0]["replay_pipeline"]["ratio_to_ddp"] == 16 / 20
    assert summary["per_seed"][0]["lfnn_pipeline"]["seconds"] is None
    # seed 1: DDP first reached its final accuracy (0.80) at 10 s, before it ended
    assert summary["per_seed"][1]["ddp_seconds"] == 10 and summary["per_seed"][1]["replay_pipeline"]["seconds"] == 12
    assert summary["ratio_to_ddp"]["lfnn_pipeline"]["reached"] == "1 of 2 seeds"
    assert summary["final_accuracy"]["ddp"]["mean"] == 0.80
    # one point lower (0.79 on seed 0): DDP first reaches it at 20 s, replay at 16 s, LFNN-ℓ now at 10 s
    lower = summary["minus_one_point"]["per_seed"][0]
    assert lower["ddp_seconds"] == 20 and lower["lfnn_pipeline"]["ratio_to_ddp"] == 10 / 20
    assert lower["replay_pipeline"]["ratio_to_ddp"] == 16 / 20
    # the budget of seed 0 is its shortest whole run (LFNN-ℓ's 10 s): each method's accuracy at its last evaluation
    # within 10 s of training
    budget = summary["at_budget"]["per_seed"][0]
    assert budget["seconds"] == 10
    assert budget["accuracy"] == {"ddp": 0.70, "ddp_powersgd_r1": 0.80, "replay_pipeline": 0.75,
                                  "lfnn_pipeline": 0.79}
    # seed 1's budget is 10 s too, where replay had no evaluation yet (its first came at 12 s): no mean for it
    assert summary["at_budget"]["per_seed"][1]["accuracy"]["replay_pipeline"] is None
    assert summary["at_budget"]["accuracy"]["replay_pipeline"] is None
    assert summary["at_budget"]["accuracy"]["ddp"]["values"] == [0.70, 0.82]
    # who got to DDP's final accuracy less one point first: those that reached it on every seed by mean time (LFNN-ℓ
    # 5 and 10 s, replay 16 and 12 s, DDP 20 and 10 s), then PowerSGD (seed 0 only); each pipeline against DDP, the
    # first exact-gradient method on every seed, and no schedule ran
    first = tta.first_to_target(summary, [0, 1])["minus_one_point"]
    assert first["order"] == ["lfnn_pipeline", "replay_pipeline", "ddp", "ddp_powersgd_r1"]
    assert first["reached"]["ddp_powersgd_r1"] == 1 and first["best_exact"]["method"] == "ddp"
    assert first["best_exact"]["pipelines"] == {"replay_pipeline": 14 / 15, "lfnn_pipeline": 7.5 / 15}
    assert first["split"]["method"] is None
    assert tta.first_text(first, 2).startswith(
        "lfnn_pipeline 8 s, replay_pipeline 14 s, ddp 15 s; not on every seed: ddp_powersgd_r1 (1 of 2); against the "
        "first exact-gradient method (ddp)")


def test_the_one_machine_time_to_accuracy_benchmark_runs_seeds_and_reuses_its_runs(tmp_path, capsys):
    # benchmarks.time_to_accuracy on one machine at a tiny size: backprop in one process and the replay pipeline
    # (stashing, delay-aware step sizes) under torchrun, one seed, each run in its own file; a second call trains
    # nothing
    args = ["benchmarks.time_to_accuracy", "--model", "test_resnet", "--train-subset", "256",
            "--eval-subset", "128", "--batch", "64", "--epochs", "1", "--eval-every", "2", "--cores", "1", "--stash",
            "--delay-lr-warmup", "2", "--seeds", "0", "--allow-dirty", "--runs", tmp_path / "runs", "--out", tmp_path,
            "--name", "tta"]
    code, out, err = here.module(capsys, *args)
    assert code == 0, out[-2000:] + err[-3000:]
    assert out.count("--set train.delay_lr_warmup=2") == 1  # the pipeline's run only; backprop has no delay
    result = json.loads((tmp_path / "tta.json").read_text())
    runs = {name: result["runs"][f"{name}-seed0"]["evaluations"] for name in ("bp", "pipeline")}
    for evals in runs.values():
        assert [e["step"] for e in evals] == [2, 4]  # one epoch of 256 images in batches of 64
        assert evals[-1]["train_seconds"] > evals[0]["train_seconds"] > 0
    seed = result["summary"]["per_seed"]["0"]
    assert seed["target"] == runs["bp"][-1]["accuracy"]
    hit = next((e for e in runs["pipeline"] if e["accuracy"] >= seed["target"]), None)
    assert seed["pipeline"]["seconds"] == (hit["train_seconds"] if hit else None)
    assert "| replay-stash-delay-lr pipeline |" in (tmp_path / "tta.md").read_text()
    code, again, _ = here.module(capsys, *args)
    assert code == 0 and again.count("reused") == 2 and "-m lfnnify train" not in again, again[-2000:]
    assert "per-block step times of a K=4 split, measured before" in again


def test_the_accuracy_table_is_made_from_its_seeded_runs_and_reuses_them(tmp_path, capsys):
    # benchmarks/accuracy_fashion_mnist.py at a tiny size: backprop and delay-aware replay, two seeds, one process per
    # run; the table's mean ± sd per epoch is the runs' own, the choice is made on validation error, a second call
    # trains nothing, and a kept run made with other settings is refused by name
    args = ["benchmarks.accuracy_fashion_mnist", "--model", "test_resnet", "--epochs", "1",
            "--train-subset", "128", "--eval-subset", "64", "--batch-size", "64", "--seeds", "0", "1",
            "--methods", "bp", "replay_stash_delay_lr", "--jobs", "2", "--allow-dirty", "--runs", tmp_path / "runs",
            "--out", tmp_path, "--name", "acc"]
    code, out, err = here.module(capsys, *args)
    assert code == 0, out[-2000:] + err[-3000:]
    assert out.count("started") == 4
    result = json.loads((tmp_path / "acc.json").read_text())
    for name in ("bp", "replay_stash_delay_lr"):
        runs = result["runs"][name]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["settings"]["model"] == "test_resnet" for r in runs)
        for r in runs:  # one epoch, evaluated on 64 validation and 64 test images
            assert len(r["val_error"]) == len(r["test_error"]) == 1
            assert all(math.isclose(e * 64 / 100, round(e * 64 / 100)) for e in r["val_error"] + r["test_error"])
        for key in ("val_error", "test_error"):
            errors = [r[key][0] for r in runs]
            assert result["summary"][name][key][0] == pytest.approx([statistics.mean(errors), statistics.stdev(errors)])
    assert result["chosen_on_validation"] == "replay_stash_delay_lr"  # the only pipeline-capable row
    assert len(result["commits"]) == 1  # every run at this tree's commit, marked "+dirty" when the tree is not clean
    assert result["one_commit"] == (not result["commits"][0].endswith("+dirty"))
    text = (tmp_path / "acc.md").read_text()
    assert "chosen on validation: replay, weight stashing, delay-aware step sizes" in text
    assert (tmp_path / "acc.png").stat().st_size > 0
    code, again, _ = here.module(capsys, *args)
    assert code == 0 and "started" not in again, again[-2000:]
    assert json.loads((tmp_path / "acc.json").read_text())["summary"] == result["summary"]
    kept = tmp_path / "runs" / "bp-seed1.json"
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "settings": {**result["settings"], "lr": 0.1}}))
    code, out, err = here.module(capsys, *args)
    assert code != 0 and f"{kept} was run with other settings" in out + err


def test_a_paused_or_killed_run_continues_from_its_last_epoch_and_ends_as_the_same_run(tmp_path, capsys):
    # a 30-epoch run outlives a working stretch, so a run keeps its state after every epoch and the next call continues
    # it. Backprop and the row with the most state (replay: kept batches, stashed weights, delay-aware step sizes,
    # spike compensation), trained straight and paused after epoch 1: the same errors and the same final weights, bit
    # for bit; a record a kill left ahead of the state is not read; a run continued at another commit is refused
    methods = ("bp", "replay_stash_delay_lr_sc")
    args = ["benchmarks.accuracy_fashion_mnist", "--model", "test_resnet", "--epochs", "2", "--train-subset", "128",
            "--eval-subset", "64", "--batch-size", "64", "--seeds", "0", "--methods", *methods, "--jobs", "2",
            "--allow-dirty", "--out", tmp_path]
    code, out, err = here.module(capsys, *args, "--runs", tmp_path / "straight", "--name", "straight")
    assert code == 0, out[-2000:] + err[-3000:]

    paused = [*args, "--runs", tmp_path / "paused", "--name", "paused", "--pause-after", "1"]
    code, out, err = here.module(capsys, *paused)
    assert code == 0 and "paused, to continue with the same command: bp seed 0, replay_stash_delay_lr_sc seed 0" in out
    for m in methods:
        folder = tmp_path / "paused" / f"{m}-seed0.partial"
        assert not (tmp_path / "paused" / f"{m}-seed0.json").exists() and (folder / "epoch-1.json").exists()
        record = json.loads((folder / "epoch-1.json").read_text())
        assert len(record["val_error"]) == 1
        # a kill after the next epoch's record was written and before its state was: that record must not be read
        (folder / "epoch-2.json").write_text(json.dumps({**record, "val_error": [50.0, 50.0]}))
    record_file = tmp_path / "paused" / "bp-seed0.partial" / "epoch-2.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "env_before": {**record["env_before"], "commit": "0000000"}}))
    code, out, err = here.module(capsys, *paused)
    assert code != 0 and "holds a run started at commit 0000000" in out + err and "git worktree add" in out + err
    record_file.write_text(json.dumps(record))

    code, out, err = here.module(capsys, *paused)
    assert code == 0, out[-2000:] + err[-3000:]
    for m in methods:
        straight, resumed = (json.loads((tmp_path / run / f"{m}-seed0.json").read_text())
                             for run in ("straight", "paused"))
        assert resumed["resumed_after"] == [1] and straight["resumed_after"] == []
        assert len(resumed["epoch_devices"]) == len(resumed["epoch_seconds"]) == 2
        for key in ("val_error", "test_error", "weights_sha256"):
            assert resumed[key] == straight[key], (m, key)
        assert resumed["env_before"]["date"] <= resumed["env"]["date"]
        assert not (tmp_path / "paused" / f"{m}-seed0.partial").exists()  # a finished run leaves only its file


def test_runs_under_way_continue_before_new_runs_start(tmp_path):
    from benchmarks.accuracy_fashion_mnist import started_first

    args = argparse.Namespace(runs=tmp_path)
    todo = [("bp", 0), ("local", 0), ("bp", 1), ("local", 1)]
    (tmp_path / "local-seed0.partial").mkdir()
    (tmp_path / "bp-seed1.partial").mkdir()
    assert started_first(todo, args) == [("local", 0), ("bp", 1), ("bp", 0), ("local", 1)]
    own = argparse.Namespace(runs=tmp_path / "30-epochs")  # an item may carry its own arguments (another length)
    (own.runs / "bp-seed0.partial").mkdir(parents=True)
    assert started_first([("bp", 0, args), ("bp", 0, own)], args) == [("bp", 0, own), ("bp", 0, args)]


def test_a_benchmark_that_makes_a_table_refuses_uncommitted_changes(monkeypatch):
    from benchmarks import common

    monkeypatch.setattr(common, "commit", lambda: "29ab660+dirty")
    with pytest.raises(SystemExit, match=r"time_to_accuracy.py: uncommitted changes .* --allow-dirty"):
        common.refuse_uncommitted("time_to_accuracy.py", allowed=False)
    common.refuse_uncommitted("time_to_accuracy.py", allowed=True)  # a quick look, marked by its '+dirty' commit
    monkeypatch.setattr(common, "commit", lambda: "29ab660")
    common.refuse_uncommitted("time_to_accuracy.py", allowed=False)


@pytest.mark.parametrize("script,args,words", [
    ("accuracy_fashion_mnist.py", ["--seeds", "0", "0"], "a seed is named twice"),
    ("accuracy_fashion_mnist.py", ["--jobs", "0"], "--jobs 0: must be at least 1"),
    ("accuracy_fashion_mnist.py", ["--jobs", "-1"], "--jobs -1: must be at least 1"),
    ("time_to_accuracy.py", ["--seeds", "0", "0"], "a seed is named twice"),
    ("finetune.py", ["--seeds", "1", "1"], "a seed is named twice"),
    ("time_to_accuracy.py", ["--hosts", "2", "--seeds", "2", "2"], "a seed is named twice"),
    ("time_to_accuracy.py", ["--rate", "100mbit"], "--rate applies to --hosts 2 only, and this run has --hosts 1"),
    ("time_to_accuracy.py", ["--hosts", "2", "--stash"], "--stash applies to --hosts 1 only"),
    ("error_vs_length.py", ["--seeds", "0", "0"], "a seed is named twice"),
    ("multihost.py", ["--unshaped-gbit", "-1"], "--unshaped-gbit -1.0: must be more than 0"),
    ("multihost.py", ["--unshaped-gbit", "0"], "--unshaped-gbit 0.0: must be more than 0"),
], ids=["acc-seeds", "acc-jobs-0", "acc-jobs-minus-1", "tta-seeds", "finetune-seeds", "multihost-tta-seeds",
        "tta-rate-on-one-machine", "tta-stash-across-hosts",
        "length-seeds", "unshaped-negative", "unshaped-zero"])
def test_benchmarks_refuse_arguments_that_would_hang_or_make_a_table_lie(capsys, script, args, words):
    # what would otherwise give "2 seeds, 90.62 ± 0.00" from one run counted twice, wait forever (--jobs 0), project
    # faster than an infinite link, or crash after every measurement: refused in one line before anything runs
    code, out, err = here.module(capsys, f"benchmarks.{script.removesuffix('.py')}", *args)
    assert code != 0 and words in out + err, out + err


def test_each_exact_schedule_holds_the_stages_torch_places_on_its_process():
    # the split-model baseline builds on each process the stages torch's schedule expects there; a wrong placement
    # would hang or train another model
    from torch.distributed.pipelining.schedules import generate_stage_to_rank_mapping

    from benchmarks.workers.speedup import LOOP_STAGES, SINGLE_STAGE, V_STAGES, stages_of

    for world in (2, 3, 4):
        for schedule in (*SINGLE_STAGE, *LOOP_STAGES, *V_STAGES):
            count = world * (1 if schedule in SINGLE_STAGE else 2)
            style = "v" if schedule in V_STAGES else "loop"
            torch_places = generate_stage_to_rank_mapping(world, count, style=style)
            for rank in range(world):
                assert sorted(stages_of(schedule, rank, world)) == sorted(
                    s for s, r in torch_places.items() if r == rank), (schedule, world, rank)


def test_the_error_against_length_table_says_which_cpus_trained_its_runs():
    from benchmarks.error_vs_length import _devices

    def run(device):
        return {"env": {"device": device}}

    xeon, epyc = "cpu (Intel(R) Xeon(R) Processor)", "cpu (AMD EPYC)"
    rows = {3: {"bp": [run(xeon)] * 3, "local": [run(xeon)] * 3}, 30: {"bp": [run(xeon), run(epyc), run(epyc)]}}
    assert _devices(rows) == {"cpu (AMD EPYC)": 2, "cpu (Intel(R) Xeon(R) Processor)": 7}


def test_the_length_sweeps_two_commits_train_every_row_alike(tmp_path):
    # the sweep's 30-epoch runs trained at two commits: 643b149, and 81e9980, which added continuing a killed run
    # (lfnnify changed much in between: pipelines, checkpoints, errors for bad input). A short run of every row at each
    # commit (resnet10t, 8 steps), kept beside the runs, gives the same validation and test errors, epoch by epoch:
    # the one-device training the sweep measures is the same at both, and the table says so; one error changed, or
    # a commit without its short runs, and it does not
    import shutil

    from benchmarks.error_vs_length import LONGEST_ONLY, ROWS, same_training

    runs = ROOT / "benchmarks" / "results" / "error_vs_length_runs" / "643b149"
    both, methods = ["643b149", "81e9980"], ROWS + LONGEST_ONLY
    assert same_training(runs, both, methods) is True
    kept = json.loads((runs / "same-training" / "81e9980" / "bp-seed0.json").read_text())
    assert kept["settings"]["model"] == "resnet10t" and kept["settings"]["cuts"] == ["layer1", "layer2", "layer3"]
    assert same_training(runs, ["643b149"], methods) is None
    assert same_training(runs, [*both, "1235ba2"], methods) is None
    shutil.copytree(runs / "same-training", tmp_path / "same-training")
    changed = tmp_path / "same-training" / "81e9980" / "replay_stash_delay_lr_sc-seed0.json"
    record = json.loads(changed.read_text())
    changed.write_text(json.dumps({**record, "test_error": [record["test_error"][0], record["test_error"][1] + 0.1]}))
    assert same_training(tmp_path, both, methods) is False


def test_the_length_sweep_makes_its_table_and_picture_from_kept_runs_of_two_commits(tmp_path, capsys):
    # The sweep's last step, run on kept runs as the committed table will be: every row at every length, the
    # longest-only row (spike compensation) at the longest length alone, runs of two commits whose short runs agree.
    # The runs: the committed short runs of 81e9980 (resnet10t, 2 epochs) as the 2-epoch column, seed 0, and the
    # same shifted by +1 point as seed 1; a 1-epoch column made from 643b149's, cut to their first epoch. Nothing
    # is trained: every cell is checked against the mean and sd computed here from the files.
    import shutil

    from benchmarks.error_vs_length import LONGEST_ONLY, ROWS

    kept = ROOT / "benchmarks" / "results" / "error_vs_length_runs" / "643b149" / "same-training"
    runs = tmp_path / "runs"
    shutil.copytree(kept, runs / "same-training")
    expected: dict[tuple[int, str], list[float]] = {}
    for length, commit in ((1, "643b149"), (2, "81e9980")):
        (runs / f"{length}-epochs").mkdir(parents=True)
        for m in ROWS + (LONGEST_ONLY if length == 2 else []):
            r = json.loads((kept / commit / f"{m}-seed0.json").read_text())
            assert r["commit"] == commit and r["settings"]["epochs"] == 2
            r = {**r, "settings": {**r["settings"], "epochs": length}}
            for key in ("val_error", "test_error", "epoch_seconds"):
                r[key] = r[key][:length]
            for seed, shift in ((0, 0.0), (1, 1.0)):
                run = {**r, "seed": seed, "val_error": [e + shift for e in r["val_error"]],
                       "test_error": [e + shift for e in r["test_error"]]}
                (runs / f"{length}-epochs" / f"{m}-seed{seed}.json").write_text(json.dumps(run))
                expected.setdefault((length, m), []).append(run["test_error"][-1])
    args = ["benchmarks.error_vs_length", "--lengths", "1", "2", "--seeds", "0", "1", "--train-subset", "512",
            "--eval-subset", "1000", "--runs", runs, "--out", tmp_path, "--name", "sweep", "--allow-dirty"]
    code, out, err = here.module(capsys, *args)
    assert code == 0, out[-2000:] + err[-3000:]
    assert "started" not in out  # every run was kept: none trained again

    text = (tmp_path / "sweep.md").read_text()
    test_table = text.split("final test error (%):")[1].split("\n\n")[1].splitlines()
    assert test_table[0] == "| method | 1 epochs | 2 epochs |"
    cells = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:] for line in test_table[2:]}
    payload = json.loads((tmp_path / "sweep.json").read_text())
    assert len(cells) == len(ROWS + LONGEST_ONLY)
    for m in ROWS + LONGEST_ONLY:
        row = cells[payload["labels"][m]]
        for column, length in enumerate((1, 2)):
            if (length, m) not in expected:
                assert row[column] == "–", (m, row)  # the longest-only row has no shorter cell
                continue
            errors = expected[(length, m)]
            assert row[column] == f"{statistics.mean(errors):.2f} ± {statistics.stdev(errors):.2f}", (m, length, row)
            gap = payload["summary"]["by_length"][str(length)][m]["test_gap_to_bp"]
            assert math.isclose(gap, statistics.mean(errors) - statistics.mean(expected[(length, "bp")]))
    assert "rows from 2 commits, 643b149, 81e9980, which train alike: a short run of every row gives the same " \
           "errors at each (runs/same-training); runs on " in text
    assert payload["same_training_across_commits"] is True and payload["commits"] == ["643b149", "81e9980"]
    assert [line for line in text.splitlines() if "chosen on validation" in line][0].startswith("1 epochs: ")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    from benchmarks.error_vs_length import provenance  # the other cases of that line

    assert provenance(["81e9980"], None, "r") == "rows from one commit, 81e9980"
    assert "DIFFER" in provenance(["643b149", "81e9980"], False, "r")
    assert "NOT one commit" in provenance(["643b149", "81e9980"], None, "r")
    assert "NOT clean" in provenance(["81e9980+dirty"], None, "r")


def test_one_method_beats_another_only_where_their_ranges_are_apart():
    from benchmarks.multihost import cell, verdicts_of

    def runs(*per_run):  # each run: 4 steps of a global batch of 64 at that many samples/s
        return cell([{"step_s": [64 / v] * 4} for v in per_run], 64)

    row = {"ddp": runs(10, 11, 12), "ddp_powersgd_r1": runs(100, 104, 108), "local_sgd_h16": runs(90, 95, 99),
           "lfnn_pipeline": runs(105, 110, 115), "replay_pipeline": runs(109, 112, 120)}
    assert row["lfnn_pipeline"]["samples_per_s"] == pytest.approx(110)
    assert row["lfnn_pipeline"]["samples_per_s_range"] == pytest.approx([105, 115])
    ratios, verdicts = verdicts_of({"100mbit": row})
    said = {v.split(":")[0]: v for v in verdicts}
    lfnn = said["lfnn_pipeline / best_ddp (the best of the 3 DDP variants measured here"]  # ranges overlap
    assert "ddp_powersgd_r1" in lfnn and "neither beats the other" in lfnn and "target 1.3x: MISSED" in lfnn
    assert ratios["lfnn_pipeline/best_ddp@100mbit"] == pytest.approx(110 / 104)
    replay = [v for v in verdicts if v.startswith("replay_pipeline / best_ddp")][0]
    assert "replay_pipeline beats ddp_powersgd_r1 (ranges apart)" in replay
    # local SGD's slow averaging steps count: throughput is samples over all timed seconds, not the median step
    periodic = cell([{"step_s": [0.1, 0.1, 0.1, 0.9]}] * 3, 64)
    assert periodic["samples_per_s"] == pytest.approx(64 * 4 / 1.2)
    _, few = verdicts_of({"100mbit": {**row, "lfnn_pipeline": runs(500)}})
    assert "too few to say which is faster" in [v for v in few if v.startswith("lfnn_pipeline / ddp ")][0]


def test_the_speed_map_sets_each_pipeline_against_the_best_choice_of_its_case(tmp_path):
    from benchmarks.multihost import cell
    from benchmarks.speed_map import main, merge, speed_map

    def runs(*per_run):
        return cell([{"step_s": [64 / v] * 4} for v in per_run], 64)

    fast = {"unshaped": {"ddp": runs(300, 310, 320), "bp_interleaved_zb_m2": runs(200, 205, 210),
                         "lfnn_pipeline": runs(240, 245, 250), "replay_pipeline_int8": runs(190, 207, 215)}}
    slow = {"100mbit": {"ddp_powersgd_r1": runs(170, 175, 180), "bp_1f1b_m2": runs(100, 110, 111),
                        "fsdp": runs(5, 6, 7),
                        "lfnn_pipeline_int8": runs(230, 236, 240), "lfnn_pipeline": runs(190, 200, 210),
                        "replay_pipeline_int8": runs(160, 176, 190)}}

    def payload(results, commit="abc1234"):
        return {"results": results, "env_before": {"commit": commit}, "env": {"device": "cpu (test)"},
                "settings": {"batch": 64}}

    rows, commit = merge([payload(fast), payload(slow)])
    m = speed_map(rows)
    assert list(m) == ["100mbit", "unshaped"] and commit == "abc1234"
    # fits: every method is a choice (plain DDP is the best unshaped); split: only the exact schedules and FSDP
    assert m["unshaped"]["fits"]["baseline"] == "ddp" and m["unshaped"]["split"]["baseline"] == "bp_interleaved_zb_m2"
    lfnn = m["unshaped"]["fits"]["families"]["LFNN-ℓ"]
    assert lfnn["ratio"] == pytest.approx(245 / 310) and lfnn["verdict"] == "ddp wins (ranges apart)"
    assert m["unshaped"]["split"]["families"]["LFNN-ℓ"]["verdict"] == "lfnn_pipeline wins (ranges apart)"
    assert m["unshaped"]["split"]["families"]["replay"]["verdict"] == "level (ranges overlap)"
    slow_fits = m["100mbit"]["fits"]
    assert slow_fits["baseline"] == "ddp_powersgd_r1"
    assert slow_fits["families"]["LFNN-ℓ"]["method"] == "lfnn_pipeline_int8"
    assert m["100mbit"]["split"]["baseline"] == "bp_1f1b_m2"
    with pytest.raises(SystemExit, match="commits abc1234, def5678"):  # not commits of this repository
        merge([payload(fast), payload(slow, "def5678")])
    with pytest.raises(SystemExit, match="commits 1234567, 1234567\\+dirty"):
        merge([payload(fast, "1234567"), payload(slow, "1234567+dirty")])
    # two commits whose lfnnify/ and benchmarks/ code is the same (43780c4 changed only documents and tests after
    # 57fc309) merge; a commit that changed the measured code (3dac80a: int8 sends) does not
    assert merge([payload(fast, "57fc309"), payload(slow, "43780c4")])[1] == "43780c4, 57fc309"
    with pytest.raises(SystemExit, match="a map comes from one clean commit"):
        merge([payload(fast, "6b4d1cf"), payload(slow, "3dac80a")])
    files = []
    for i, results in enumerate((fast, slow)):
        files.append(tmp_path / f"f{i}.json")
        files[-1].write_text(json.dumps(payload(results)))
    main([*map(str, files), "--name", "map", "--out", str(tmp_path)])
    assert "| 100 Mbit/s | fits | ddp_powersgd_r1 175.0 (170.0–180.0) |" in (tmp_path / "map.md").read_text()
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_backprops_linear_probe_warm_up_trains_only_the_classifier_then_everything():
    # fine-tuning's equal budget: backprop gets lfnnify's head warm-up as a linear probe before its trunk steps
    import timm
    import torch

    from benchmarks.finetune import _bp_steps

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=5)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 5, (8,))) for _ in range(3)]

    class Loader(list):
        sampler = type("Sampler", (), {"set_epoch": staticmethod(lambda epoch: None)})()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    _bp_steps(model, Loader(data), 0, 0.1, probe=2)
    classifier = {f"{model.default_cfg['classifier']}.{n}" for n, _ in model.get_classifier().named_parameters()}
    after = model.state_dict()
    moved = {k for k, p in model.named_parameters() if not torch.equal(before[k], after[k])}
    assert moved == classifier  # the probe: only the new classifier learned
    assert any(not torch.equal(before[k], after[k]) for k in after if "running_mean" in k)  # BatchNorm moved
    assert all(p.requires_grad for p in model.parameters())  # and the trunk trains again afterwards
    _bp_steps(model, Loader(data), 2, 0.1, probe=1)
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before if k not in classifier
               and "running" not in k and "num_batches" not in k)


def _exact_worker(tmp_path, name: str, recipe: Path, *flags) -> dict:
    """The final weights of ``benchmarks.workers.exact_fashion_mnist`` trained by 2 processes of torchrun."""
    from safetensors.torch import load_file

    from tests.launch import free_port

    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0", "-m",
           "benchmarks.workers.exact_fashion_mnist", str(recipe), "--eval-every", "2", "--out", str(out), "--save",
           str(out / "weights.safetensors"), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    return load_file(str(out / "weights.safetensors"))


def test_the_two_host_time_to_accuracy_reports_each_methods_bytes_per_sample_from_the_models_own_shapes():
    # bytes per training sample for the summary: 1F1B over two stages sends the cut's activation and its gradient,
    # LFNN-ℓ the activation and the label, Interleaved Zero Bubble (stages 0 and 2 on host 0, 1 and 3 on host 1)
    # each of the three cuts' activation and gradient; LFNN-ℓ sending int8 deltas a byte per value, a float32 scale
    # per channel (of the batch: 4 / 64 bytes per sample), the label and the sample's index; the shapes come from
    # forward hooks on the timm model here, not from plan()
    from benchmarks.time_to_accuracy.across_hosts import bytes_per_sample
    from lfnnify.app import create_model

    model, shapes, channels = create_model("test_resnet", num_classes=10, in_chans=1), {}, {}
    def record(name, out):
        shapes[name], channels[name] = out[0].numel(), out.shape[1]

    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: record(name, o))
    model.eval()(torch.zeros(1, 1, 28, 28))
    args = argparse.Namespace(model="test_resnet", methods=["bp_1f1b_m2", "bp_interleaved_zb_m2", "lfnn_pipeline",
                                                            "lfnn_pipeline_int8_deltas"],
                              cuts=["layer2"], cuts4=["layer1", "layer2", "layer3"], batch=64)
    sent = bytes_per_sample(args)
    assert sent["bp_1f1b_m2"] == 2 * 4 * shapes["layer2"]
    assert sent["lfnn_pipeline"] == 4 * shapes["layer2"] + 8
    assert sent["lfnn_pipeline_int8_deltas"] == shapes["layer2"] + 4 * channels["layer2"] / 64 + 8 + 8
    assert sent["bp_interleaved_zb_m2"] == 2 * 4 * sum(shapes.values())


def test_the_exact_baselines_of_the_two_host_time_to_accuracy_apply_the_whole_batchs_gradient(tmp_path):
    # The baselines' worker, as DDP (each process on half of each batch) and as torch's 1F1B schedule over two stages
    # and two micro-batches, against backprop on one process written here from the definition: each batch in two
    # halves, forward each (BatchNorm sees a half at a time), the mean of the two halves' mean losses, the recipe's
    # SGD and cosine schedule. 4 steps of 32 synthetic images, test_resnet.
    from lfnnify.app import create_model, load_recipe
    from lfnnify.data import build_datasets, make_loader

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text((ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml").read_text())
    sets = ["model.name=test_resnet", "data.dataset=synthetic", "data.input_size=28", "data.train_subset=128",
            "data.eval_subset=64", "data.batch_size=32", "data.augment=false", "train.epochs=1", "train.threads=1",
            "train.seed=3"]
    flags = [x for s in sets for x in ("--set", s)]
    ddp = _exact_worker(tmp_path, "ddp", recipe, *flags)
    piped = _exact_worker(tmp_path, "1f1b", recipe, *flags, "--schedule", "1f1b", "--microbatches", "2",
                          "--stage-cuts", '["layer2"]')

    r = load_recipe(recipe, overrides=sets)
    o = r.train.optimizer
    torch.manual_seed(r.train.seed)
    train_set, _, chans, classes, _ = build_datasets(r)
    model = create_model("test_resnet", num_classes=classes, in_chans=chans)
    loader = make_loader(train_set, batch_size=32, seed=r.train.seed)
    loader.sampler.set_epoch(0)
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(loader), eta_min=r.train.schedule.final_lr)
    for x, y in loader:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (torch.nn.functional.cross_entropy(model(xs), ys) / 2).backward()
        opt.step()
        sched.step()
    ref = model.state_dict()
    params = dict(model.named_parameters())
    assert set(piped) == set(ref) and set(params) <= set(ddp)
    for name, t in ref.items():  # the split model's every weight and BatchNorm statistic
        assert torch.allclose(piped[name].float(), t.float(), atol=1e-5), name
    for name in params:  # DDP: the weights (rank 0's BatchNorm statistics come from its own half of each batch)
        assert torch.allclose(ddp[name], params[name], atol=1e-5), name


def _tta_payload(rate: str, curves: dict, seconds_per_step: dict, seeds=(0, 1), hook_start=2, ddp_step=None):
    """A two-host time-to-accuracy result file: ``curves`` method -> seed -> accuracies at steps 2, 4, ...; each
    step taking ``seconds_per_step[method]`` (a hooked method's first ``hook_start`` steps plain DDP's)."""
    runs = {}
    for method, by_seed in curves.items():
        for seed in seeds:
            evals = []
            for i, accuracy in enumerate(by_seed[seed]):
                step = 2 * (i + 1)
                plain = min(step, hook_start) if method.startswith(("ddp_", "local_sgd")) else 0
                spent = plain * seconds_per_step["ddp"] + (step - plain) * seconds_per_step[method]
                evals.append({"step": step, "train_seconds": spent, "accuracy": accuracy})
            runs[f"{method}-seed{seed}"] = {"evaluations": evals}
    return {"settings": {"model": "m", "batch": 8, "train_subset": 64, "eval_subset": 16, "eval_every": 2,
                         "rate": rate, "hook_start": hook_start, "cuts": ["x"]},
            "seeds": list(seeds), "runs": runs, "env": {"device": "cpu"}, "env_before": {"commit": "abc"}}


def test_the_rate_map_carries_each_methods_steps_to_a_target_to_other_rates_at_their_seconds_per_step(tmp_path):
    # Two whole runs (100 Mbit/s and 1 Gbit/s: the same evaluations, other times) and short runs at 10 Mbit/s and
    # 1 Gbit/s. Worked by hand: DDP ends at 0.8 (seed 0) and 0.7 (seed 1); PowerSGD reaches 0.8 at step 6 on seed 0
    # and 0.7 at step 4 on seed 1; the LFNN-ℓ pipeline reaches 0.8 at step 4 and never reaches 0.7 (seed 1);
    # 1F1B reaches them at step 8 and 6.
    from benchmarks.time_to_accuracy import rate_map

    curves = {"ddp": {0: [0.5, 0.6, 0.7, 0.8], 1: [0.4, 0.5, 0.6, 0.7]},
              "ddp_powersgd_r1": {0: [0.5, 0.7, 0.8, 0.8], 1: [0.5, 0.7, 0.7, 0.7]},
              "bp_1f1b_m2": {0: [0.5, 0.6, 0.7, 0.8], 1: [0.4, 0.6, 0.7, 0.7]},
              "lfnn_pipeline": {0: [0.6, 0.8, 0.8, 0.8], 1: [0.5, 0.6, 0.6, 0.65]}}
    slow = {"ddp": 10.0, "ddp_powersgd_r1": 2.0, "bp_1f1b_m2": 1.5, "lfnn_pipeline": 1.0}
    fast = {"ddp": 1.0, "ddp_powersgd_r1": 0.8, "bp_1f1b_m2": 0.5, "lfnn_pipeline": 0.4}
    ten = {"ddp": 100.0, "ddp_powersgd_r1": 5.0, "bp_1f1b_m2": 6.0, "lfnn_pipeline": 3.0}
    wholes = [_tta_payload("100mbit", curves, slow), _tta_payload("1gbit", curves, fast)]
    shorts = [_tta_payload("10mbit", curves, ten, seeds=(0,)),
              _tta_payload("1gbit", curves, {**fast, "lfnn_pipeline": 0.44}, seeds=(0,))]
    result = rate_map.rate_map(wholes, shorts)
    cells = result["cells"]
    # measured where a whole run exists: its own seconds
    assert cells["100mbit"]["final"]["ddp_powersgd_r1"]["seconds"] == [2 * 10 + 4 * 2.0, 2 * 10 + 2 * 2.0]
    assert cells["100mbit"]["final"]["ddp_powersgd_r1"]["kind"] == "measured"
    # projected at 10 Mbit/s: PowerSGD's first 2 steps at plain DDP's step time, the rest at its own
    ten_cells = cells["10mbit"]["final"]
    assert ten_cells["ddp_powersgd_r1"]["seconds"] == [2 * 100 + 4 * 5.0, 2 * 100 + 2 * 5.0]
    assert ten_cells["ddp_powersgd_r1"]["kind"] == "projected"
    assert ten_cells["ddp"]["seconds"] == [800.0, 800.0] and ten_cells["bp_1f1b_m2"]["seconds"] == [48.0, 36.0]
    assert ten_cells["lfnn_pipeline"]["seconds"] == [12.0, None] and ten_cells["lfnn_pipeline"]["mean_seconds"] is None
    # the map: 1F1B first of the choices at 10 Mbit/s in both cases; the pipeline reached it on 1 of 2 seeds, and
    # was first on seed 0
    fits = result["map"]["10mbit"]["final"]["fits"]
    assert fits["baseline"] == "bp_1f1b_m2" and fits["baseline_seconds"] == 42.0
    assert fits["families"]["LFNN-ℓ"] == {"method": "lfnn_pipeline", "seconds": None, "kind": "projected",
                                          "reached": "1 of 2 seeds"}
    assert [f and f["method"] for f in fits["first_per_seed"]] == ["lfnn_pipeline", "bp_1f1b_m2"]
    assert result["map"]["100mbit"]["final"]["split"]["baseline"] == "bp_1f1b_m2"
    # at 1 Gbit/s both exist: the projection is checked against the measurement (0.44 against 0.4 s per step)
    errors = [e for e in result["projection_errors"] if e["method"] == "lfnn_pipeline"]
    assert errors and all(e["relative_error"] == pytest.approx(0.1) for e in errors)
    assert result["max_abs_projection_error"] == pytest.approx(0.1)
    # files, a table that says which cells are projected, a picture
    for name, payload in (("w100", wholes[0]), ("w1g", wholes[1]), ("s10", shorts[0]), ("s1g", shorts[1])):
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    rate_map.main([str(tmp_path / "w100.json"), str(tmp_path / "w1g.json"), "--steps-from", str(tmp_path / "s10.json"),
                   str(tmp_path / "s1g.json"), "--name", "map", "--out", str(tmp_path)])
    table = (tmp_path / "map.md").read_text()
    assert "| 10 Mbit/s | final | fits | bp_1f1b_m2 42 s (projected) |" in table
    assert "within 10% of the measurement" in table
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
    # a short run repeated twice more at 10 Mbit/s (1F1B at 5 and 9 s per step): the projection takes the median (6 s
    # per step: 42 s) and gives the range over the three runs (35 s to 63 s), in the cell and in the table
    again = [_tta_payload("10mbit", curves, {**ten, "bp_1f1b_m2": v}, seeds=(0,)) for v in (5.0, 9.0)]
    repeated = rate_map.rate_map(wholes, [*shorts, *again])
    one = repeated["cells"]["10mbit"]["final"]["bp_1f1b_m2"]
    assert one["seconds"] == [48.0, 36.0] and one["repetitions"] == 3 and one["range_seconds"] == [35.0, 63.0]
    base = repeated["map"]["10mbit"]["final"]["fits"]
    assert base["baseline"] == "bp_1f1b_m2" and base["baseline_spread"] == {"range_seconds": [35.0, 63.0],
                                                                             "repetitions": 3}
    assert "bp_1f1b_m2 42 s (projected; 35–63 s over 3 short runs)" in rate_map.markdown(
        {**repeated, "device": "cpu", "setting": "s", "commits": {"whole_runs": ["a"], "short_runs": ["b"]}})
    assert result["map"]["10mbit"]["final"]["fits"]["baseline_spread"] is None  # one short run: no range to give
    later = _tta_payload("10mbit", curves, ten, seeds=(0,), hook_start=4)
    with pytest.raises(SystemExit, match="time different steps"):
        rate_map.step_seconds([shorts[0], later])
    # the projection rests on equal evaluations at every rate: files that differ are refused
    other = _tta_payload("1gbit", {**curves, "lfnn_pipeline": {0: [0.6, 0.8, 0.8, 0.9], 1: curves["lfnn_pipeline"][1]}},
                         fast)
    with pytest.raises(SystemExit, match="lfnn_pipeline seed 0 evaluated differently"):
        rate_map.rate_map([wholes[0], other], shorts)


def test_step_time_runs_for_the_rate_map_need_no_ddp_and_write_each_methods_seconds_per_step(tmp_path, capsys):
    from benchmarks.time_to_accuracy import across_hosts

    args = argparse.Namespace(methods=["lfnn_pipeline"], step_times=False, hook_start=10)
    with pytest.raises(SystemExit, match="must include ddp.*--step-times"):
        across_hosts.measure(args)
    # the files of a --step-times sweep, from its runs (here made by hand: 2 s per step before the first evaluation,
    # then 1 s per step: the steps before it are not counted)
    evals = [{"step": s, "train_seconds": t, "accuracy": 0.1} for s, t in ((8, 16.0), (16, 24.0), (24, 32.0))]
    args = argparse.Namespace(rate="10mbit", seeds=[0], cuts=["layer1"], cuts4=None, out=tmp_path)
    settings = {"rate": "10mbit", "hook_start": 10, "step_times": True}
    across_hosts.step_times_files(args, "steps", settings, {"lfnn_pipeline-seed0": {"evaluations": evals}}, [],
                                  {"commit": "abc"})
    result = json.loads((tmp_path / "steps.json").read_text())
    assert result["step_seconds"]["lfnn_pipeline"] == {"seconds_per_step": 1.0, "repetitions": [1.0], "steps": [8, 24],
                                                       "hook_start": 10}
    assert "| lfnn_pipeline | 1.000 | 8–24 |" in (tmp_path / "steps.md").read_text()
