"""The faults found by trying lfnnify as a new user would : each is correct, or refused in one line
that names the value, the rule and the fix. Real files, real processes and real models; nothing mocked."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lfnnify
from lfnnify.data import SyntheticImages, make_loader
from tests.forked import Forked
from tests.test_cli import in_process
from tests.test_faults import _Small, small_run

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"


def _sgd(ps):
    return torch.optim.SGD(ps, lr=0.05)


def _loader(n=32, batch=16, channels=1, size=16):
    return make_loader(SyntheticImages(n, shape=(channels, size, size), seed=1), batch_size=batch, seed=2)


# ---------------------------------------------------------------- saves never remove what lfnnify did not write


def test_a_save_refuses_a_folder_holding_other_files_and_leaves_them(tmp_path):
    net, _ = small_run(steps=0)
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "notes.safetensors").write_bytes(b"mine")
    with pytest.raises(lfnnify.CheckpointError, match=r"holds files lfnnify did not write \(notes.safetensors, "
                                                      r"results.json\).*sub-folder"):
        lfnnify.save(net, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors", "results.json"]
    lfnnify.save(net, tmp_path / "ckpt")  # a sub-folder is fine, and so is saving there again
    lfnnify.save(net, tmp_path / "ckpt")
    assert (tmp_path / "results.json").read_text() == "{}"


def test_a_save_inside_a_checkpoint_is_refused_and_the_checkpoint_survives(tmp_path):
    net, trainer = small_run(steps=1)
    lfnnify.save(net, tmp_path / "ckpt", trainer=trainer)
    version = tmp_path / "ckpt" / (tmp_path / "ckpt" / "CURRENT").read_text().split()[0]
    for target in (version, version / "sub", tmp_path / "ckpt" / "other"):
        with pytest.raises(lfnnify.CheckpointError, match=r"is inside the checkpoint at .*ckpt.*save to .*ckpt itself"):
            lfnnify.save(net, target)
    assert lfnnify.read_trainer_state(tmp_path / "ckpt")["step"] == 1


def test_a_flat_checkpoint_of_lfnnify_0_1_is_upgraded_and_only_its_own_files_go(tmp_path):
    net, trainer = small_run(steps=1)
    lfnnify.save(net, tmp_path / "new", trainer=trainer)
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "new" / (tmp_path / "new" / "CURRENT").read_text().split()[0], flat)
    assert lfnnify.read_trainer_state(flat)["step"] == 1  # 0.1's layout: the files directly in the folder
    lfnnify.save(net, flat)
    left = sorted(p.name for p in flat.iterdir())
    assert left[0] == "CURRENT" and len(left) == 2, left  # the flat files went; the new version is current


# ---------------------------------------------------------------- saves and loads side by side, in real processes

def test_two_savers_and_a_reader_side_by_side_all_succeed_and_leave_one_good_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    runs = [small_run(steps=s) for s in (1, 2)]
    lfnnify.save(runs[0][0], ckpt, trainer=runs[0][1])

    def saver(net, trainer):
        for _ in range(6):
            lfnnify.save(net, ckpt, trainer=trainer)

    def reader():
        for _ in range(15):
            lfnnify.load(ckpt, model=_Small())
            assert lfnnify.read_trainer_state(ckpt)["step"] in (1, 2)

    # three processes side by side; each saver pauses between publishing its version and replacing the pointer, the
    # reader between reading the pointer and the files: without the locks the saves collide and the reader finds its
    # version removed. The savers also pause where a save's folders prove nothing yet (a new version before its
    # marker, the pointer before its text, an old version half removed), which the other save's first look at the
    # folder must not take for files lfnnify did not write
    pauses = "before-pointer,before-marker,mid-pointer,mid-removal"
    children = [Forked(lambda net=net, trainer=trainer: saver(net, trainer), env={"LFNNIFY_PAUSE_AT": pauses},
                       errors=tmp_path / f"saver{i}.err") for i, (net, trainer) in enumerate(runs)]
    children.append(Forked(reader, env={"LFNNIFY_PAUSE_AT": "mid-read,pointer-read"}, errors=tmp_path / "reader.err"))
    for child in children:
        assert child.wait(timeout_s=300) == 0, child.error()
    left = sorted(p.name for p in ckpt.iterdir())
    assert len(left) == 2 and left[0] == "CURRENT", left  # one complete version, the one CURRENT names
    assert lfnnify.read_trainer_state(ckpt)["step"] in (1, 2)


# ---------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize("balance", ["flops", "params", "memory"])
def test_a_custom_head_that_serves_no_cut_is_refused_not_turned_into_one_block(balance):
    def identity(channels, num_classes, workers):
        return torch.nn.Identity()

    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(lfnnify.CutError, match=r"blocks=2 needs 1 cuts, but head=identity can serve only 0 of the .*"
                                               r"must return logits shaped"):
        lfnnify.convert(_Small(), blocks=2, head=identity, balance=balance, example_input=x)
    with pytest.raises(lfnnify.CutError, match=r"can serve only 0"):
        lfnnify.plan(_Small(), blocks=2, head=identity, balance=balance, example_input=x)


def test_an_empty_loader_and_fractional_epochs_are_refused():
    net, _ = small_run(steps=0)
    trainer = lfnnify.Trainer(net, optimizer=_sgd, progress=False)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long)), batch_size=4)
    for loader in ([], empty):
        with pytest.raises(lfnnify.DataError, match=r"yields no batches \(len 0\), so there is nothing to train on"):
            trainer.fit(loader, epochs=2)
    assert trainer.epoch == 0 and trainer.step == 0
    with pytest.raises(lfnnify.ConfigError, match=r"epochs=1.5 given to Trainer.fit must be a whole number >= 0 "
                                                  r"\(for part of an epoch, pass max_steps=\)"):
        trainer.fit(_loader(), epochs=1.5)
    with pytest.raises(lfnnify.ConfigError, match=r"weight_stashing='false' must be True or False"):
        lfnnify.convert(_Small(), cuts=["stem"], mode="replay", weight_stashing="false",
                        example_input=torch.zeros(1, 1, 16, 16))


def test_after_a_non_finite_loss_the_trainer_refuses_to_go_on_and_save_keeps_the_last_good_checkpoint(tmp_path):
    net, trainer = small_run(steps=2)
    lfnnify.save(net, tmp_path / "ckpt", trainer=trainer)
    bad = [(torch.full((16, 1, 16, 16), float("nan")), torch.zeros(16, dtype=torch.long))]
    with pytest.raises(lfnnify.NonFiniteLossError, match=r"block 0's loss is nan at step 2"):
        trainer.fit(bad, epochs=10)
    for attempt in (lambda: trainer.evaluate(_loader()), lambda: trainer.fit(_loader(), epochs=10)):
        with pytest.raises(lfnnify.NonFiniteLossError, match=r"stopped at step 2 on a non-finite loss in block 0.*"
                                                             r"Load the last checkpoint"):
            attempt()
    with pytest.raises(lfnnify.CheckpointError, match=r"holds inf or nan in .*stem.*the last good checkpoint there "
                                                      r"stays current"):
        lfnnify.save(net, tmp_path / "ckpt")
    assert lfnnify.read_trainer_state(tmp_path / "ckpt")["step"] == 2
    fresh = lfnnify.Trainer(net, optimizer=_sgd, progress=False)  # the model itself: its outputs say so
    with pytest.raises(lfnnify.NonFiniteLossError, match=r"outputs on the evaluation data are not finite"):
        fresh.evaluate(_loader())


# ---------------------------------------------------------------- the trainers' door


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return lfnnify.convert(_Small(), cuts=["stem"], example_input=torch.zeros(1, 1, 16, 16))


@pytest.mark.parametrize("x,y,pattern", [
    (torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long),
     r"shape \(4, 3, 16, 16\), but the model was converted for inputs shaped like \(1, 1, 16, 16\) \(1 channels\)"),
    (torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
     r"dtype torch.uint8.*x.float\(\) / 255"),
    (torch.zeros(4, 1, 16, 16, dtype=torch.float64), torch.zeros(4, dtype=torch.long),
     r"dtype torch.float64, the model's weights torch.float32"),
    (torch.zeros(4, 1, 16, 16), torch.zeros(3, dtype=torch.long), r"got 4 images but 3 labels"),
], ids=["channels", "uint8", "float64", "mismatch"])
def test_wrong_batches_are_refused_at_the_trainers_door(small_net, x, y, pattern):
    trainer = lfnnify.Trainer(small_net, optimizer=_sgd, progress=False)
    with pytest.raises(lfnnify.DataError, match=pattern):
        trainer.fit([(x, y)], epochs=1)
    with pytest.raises(lfnnify.DataError, match=pattern):
        trainer.evaluate([(x, y)])


def test_a_batch_of_one_is_refused_only_where_batchnorm_sees_one_value_per_channel(small_net):
    # 16x16 images: every BatchNorm channel sees 256 values even in a batch of 1, so it trains (no false
    # refusal); a BatchNorm1d after pooling sees 1 value per channel: one line, where and what to do
    one = [(torch.randn(1, 1, 16, 16), torch.zeros(1, dtype=torch.long))]
    trainer = lfnnify.Trainer(small_net, optimizer=_sgd, progress=False)
    trainer.fit(one, epochs=1)
    assert trainer.step == 1
    pooled = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    net = lfnnify.convert(pooled, cuts=["1"], num_classes=3, example_input=torch.zeros(2, 1, 16, 16))
    trainer = lfnnify.Trainer(net, optimizer=_sgd, progress=False)
    with pytest.raises(lfnnify.DataError, match=r"a batch of 1 example leaves a BatchNorm layer of block 1 .* one "
                                                r"value per channel .*drop_last=True"):
        trainer.fit([(torch.randn(1, 1, 16, 16), torch.zeros(1, dtype=torch.long))], epochs=1)


def test_three_item_batches_are_refused_and_int32_labels_train_as_long_ones():
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 10
    runs = []
    for labels in (y, y.int()):
        torch.manual_seed(0)
        net = lfnnify.convert(_Small(), cuts=["stem"], example_input=torch.zeros(1, 1, 16, 16))
        trainer = lfnnify.Trainer(net, optimizer=_sgd, progress=False)
        trainer.fit([(x, labels)], epochs=2)
        runs.append(net.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    with pytest.raises(lfnnify.DataError, match=r"has 3 items; the trainers take \(images, labels\) pairs"):
        trainer.fit([(x, y, torch.arange(8))], epochs=3)


# ---------------------------------------------------------------- settings that were silently ignored


def test_settings_that_would_be_ignored_are_refused(small_net):
    with pytest.raises(lfnnify.ConfigError, match=r"refresh_momentum=0.5 is used only with refresh_heads_every"):
        lfnnify.Trainer(small_net, optimizer=_sgd, refresh_momentum=0.5)
    with pytest.raises(lfnnify.ConfigError, match=r"unknown setting 'lr'; it takes optimizer, scheduler"):
        lfnnify.Trainer(small_net, optimizer=_sgd, lr=0.1)
    with pytest.raises(lfnnify.ConfigError, match=r"convert got unknown settings 'lr', 'modee'; it takes blocks, cuts"):
        lfnnify.convert(_Small(), blocks=2, modee="local", lr=0.1, example_input=torch.zeros(1, 1, 16, 16))
    for knobs in (dict(weight_stashing=True), dict(weight_prediction=True, spike_compensation=True)):
        local = lfnnify.convert(_Small(), cuts=["stem"], example_input=torch.zeros(1, 1, 16, 16), **knobs)
        named = ", ".join(f"{k}=True" for k in knobs)
        with pytest.raises(lfnnify.ConfigError, match=rf"{named}: .* mode='local' throughout, so nothing would use"):
            lfnnify.Trainer(local, optimizer=_sgd)
        momentum = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731 (spike compensation's rule)
        lfnnify.Trainer(local, optimizer=momentum, switch_mode_at=2, switch_to="replay")  # used from step 2
    fallen = lfnnify.convert(_Small(), cuts=["stage"], head="lookahead", example_input=torch.zeros(1, 1, 16, 16))
    with pytest.raises(lfnnify.ConfigError, match=r"converted with head='lookahead', but every head fell back"):
        lfnnify.Trainer(fallen, optimizer=_sgd, refresh_heads_every=5)


@pytest.mark.parametrize("knobs,pattern", [
    (dict(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)),
     r"optimizer= got a SGD instance; lfnnify makes one optimizer per block, so it takes a factory"),
    (dict(optimizer="sgd"), r"optimizer='sgd' must be a factory: optimizer=lambda params: "),
    (dict(optimizer=lambda ps: list(ps)), r"optimizer factory returned list for block 0; it must return"),
    # torch's own refusal of the arguments, which would surface as a bare "'<' not supported between 'str' and 'float'"
    (dict(optimizer=lambda ps: torch.optim.SGD(ps, lr="0.1")),
     r"the optimizer factory raised TypeError \('<' not supported .*\) when called with block 0's parameters; it is "
     r"called once per block"),
    (dict(optimizer=_sgd, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt)),
     r"the scheduler factory raised TypeError \(.*step_size.*\) when called with a block's optimizer"),
])
def test_optimizer_and_scheduler_factories_that_cannot_serve_are_refused_by_name(small_net, knobs, pattern):
    with pytest.raises(lfnnify.ConfigError, match=pattern):
        lfnnify.Trainer(small_net, **knobs).fit(_loader(), epochs=1, max_steps=1)


def test_a_replay_stash_state_is_not_resumed_into_another_conversion():
    x = torch.zeros(1, 1, 16, 16)
    stash = lfnnify.convert(_Small(), cuts=["stem"], mode="replay", weight_stashing=True, example_input=x)
    trainer = lfnnify.Trainer(stash, optimizer=_sgd, progress=False)
    trainer.fit(_loader(), epochs=1, max_steps=1)
    state = trainer.state_dict()
    for knobs in ({"mode": "local"}, {"mode": "replay"}):
        other = lfnnify.Trainer(lfnnify.convert(_Small(), cuts=["stem"], example_input=x, **knobs), optimizer=_sgd)
        with pytest.raises(lfnnify.ConfigError, match=r"saved from a model converted with mode='replay', "
                                                      r"weight_stashing=True, but this model has"):
            other.load_state_dict(state)


def test_recipes_take_1e_minus_3_and_refuse_settings_that_would_be_ignored(tmp_path):
    from lfnnify.app.recipes import load_recipe

    assert load_recipe(FMNIST, overrides=["convert.local_weight=1e-3"]).convert.local_weight == 0.001
    replay = load_recipe(FMNIST, overrides=["convert.mode=replay", "train.delay_lr_warmup=100"])
    assert replay.train.delay_lr_warmup == 100
    for override, pattern in [
        (["method=bp", "train.switch_mode_at=10", "train.switch_to=replay"], r"method is 'bp'"),
        (["train.refresh_momentum=0.5"], r"used only with train.refresh_heads_every"),
        (["train.delay_lr_warmup=100"], r"train.delay_lr_warmup: 100 applies to replay's delayed gradients, but "
                                        r"convert.mode is 'local'"),
        (["method=bp", "train.delay_lr_warmup=100"], r"method is 'bp' \(no delays\)"),
    ]:
        with pytest.raises(lfnnify.RecipeError, match=pattern):
            load_recipe(FMNIST, overrides=override)
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    for path, pattern in [(tmp_path, r"is a folder; give a recipe file"),
                          (tmp_path / "binary.yaml", r"is not a text file, so not a recipe")]:
        with pytest.raises(lfnnify.RecipeError, match=pattern):
            load_recipe(path)


# ---------------------------------------------------------------- checkpoint messages


def test_checkpoint_damage_is_named_where_it_is(tmp_path):
    net, trainer = small_run(steps=1)
    ckpt = tmp_path / "ckpt"
    lfnnify.save(net, ckpt, trainer=trainer)
    pointer = (ckpt / "CURRENT").read_text().split()
    version = ckpt / pointer[0]
    (ckpt / "CURRENT").write_text(f"{pointer[0]} {'0' * 64}\n")  # a wrong checksum in the pointer
    with pytest.raises(lfnnify.CheckpointError, match=r"CURRENT is damaged: the checksum it records .* while "
                                                      r"lfnnify.json and every file it lists are intact"):
        lfnnify.load(ckpt, model=_Small())
    (ckpt / "CURRENT").unlink()  # a deleted pointer: the complete version is offered
    with pytest.raises(lfnnify.CheckpointError, match=rf"has no CURRENT pointer .* holds the version folder "
                                                      rf"{pointer[0]}.*lfnnify.load\("):
        lfnnify.load(ckpt, model=_Small())
    assert lfnnify.read_trainer_state(version)["step"] == 1  # and it loads as offered
    (version / "trainer.json").unlink()
    with pytest.raises(lfnnify.CheckpointError, match=r"trainer.json is missing \(the checkpoint was saved with its "
                                                      r"trainer state, which is gone\)"):
        lfnnify.read_trainer_state(version)


# ---------------------------------------------------------------- the command line


def _main(capsys, *args):
    """The command line in this process (tests/test_cli.py's helper): (exit code, stderr)."""
    code, _, err = in_process(capsys, *args)
    return code, err


def test_the_command_line_names_environment_problems_in_one_line(tmp_path, capsys):
    for value in ("inf", "1e9", "0"):
        code, err = _main(capsys, "demo", "--budget", value)
        assert code == 2 and "more than 0 and at most 3600" in err and "Traceback" not in err, err
    code, err = _main(capsys, "train", tmp_path, "--out", tmp_path / "run")
    assert code == 2 and "is a folder; give a recipe file" in err and "Traceback" not in err, err
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
        pytest.skip("needs root to mount a read-only file system")
    try:
        code, err = _main(capsys, "train", FMNIST, "--out", ro / "run", "--set", "model.name=test_resnet", "--set",
                          "train.iterations=1", "--set", "data.train_subset=32", "--no-progress")
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert code == 2, err[-2000:]
    assert "Read-only file system" in err and "choose a folder you can write" in err
    assert "Traceback" not in err and "bug in lfnnify" not in err


def test_a_corrupt_image_is_named_even_from_a_loader_worker(tmp_path):
    from PIL import Image

    from lfnnify.app.cli import _one_line
    from lfnnify.data import _image_folders

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "good.png")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    train, _ = _image_folders(str(tmp_path), 8, augment=False)
    with pytest.raises(lfnnify.DataError) as info:  # in a worker process, as torchrun's runs load
        list(DataLoader(train, batch_size=2, num_workers=1))
    line = _one_line(info.value)
    assert line.startswith(f"{tmp_path / 'train' / 'cat' / 'broken.png'} is not a readable image "
                           f"(UnidentifiedImageError: ")
    assert line.endswith("remove or replace the file, and train again")
    assert "\n" not in line and "Traceback" not in line


def test_the_settings_are_declared_once_and_both_trainers_show_them():
    import dataclasses
    import inspect

    from lfnnify.training.options import PipelineOptions, TrainerOptions

    shared = [f.name for f in dataclasses.fields(TrainerOptions)]
    own = [f.name for f in dataclasses.fields(PipelineOptions)]
    assert list(inspect.signature(lfnnify.Trainer).parameters) == ["net", *shared]
    assert list(inspect.signature(lfnnify.PipelineTrainer).parameters) == ["net", *own, *shared]


# ---------------------------------------------------------------- values accepted and then failing, and resumes


@pytest.mark.parametrize("setting,words", [
    ("train.optimizer.momentum=-1", "train.optimizer.momentum: -1.0 must be in [0, 1)"),
    ("train.optimizer.momentum=0", None),
    ("train.optimizer.nesterov=true", None),
    ("train.seed=1180591620717411303424", "train.seed: 1180591620717411303424 must be a whole number from 0 to"),
    ("train.schedule.final_lr=-1", "train.schedule.final_lr: -1.0 must be in [0, train.optimizer.lr]"),
    ("data.eval_subset=-5", "data.eval_subset: -5 must be >= 1"),
    ("pipeline.timeout_s=1e12",
     "pipeline.timeout_s: 1000000000000.0 must be a positive number of seconds, at most 86400"),
], ids=["momentum", "no-momentum", "nesterov-with-momentum", "seed-2**70", "final-lr", "eval-subset", "timeout"])
def test_recipe_values_that_would_fail_later_are_refused_at_the_door(setting, words):
    from lfnnify.app.recipes import load_recipe

    if words is None:  # momentum 0 alone is fine, Nesterov with the recipe's momentum too
        load_recipe(FMNIST, overrides=[setting])
        return
    with pytest.raises(lfnnify.RecipeError, match=re.escape(words)):
        load_recipe(FMNIST, overrides=[setting])
    if setting.startswith("train.optimizer.momentum"):
        with pytest.raises(lfnnify.RecipeError, match=r"train.optimizer.nesterov: True needs SGD with momentum > 0"):
            load_recipe(FMNIST, overrides=["train.optimizer.momentum=0", "train.optimizer.nesterov=true"])


def test_the_largest_seed_trains_and_orders_the_data():
    # 2**63 - 1 is accepted, so it must work: the sampler's per-epoch seed wraps instead of overflowing torch's
    from lfnnify.data import make_loader

    loader = make_loader(SyntheticImages(8, shape=(1, 8, 8)), batch_size=4, seed=2**63 - 1)
    loader.sampler.set_epoch(3)
    assert sum(len(y) for _, y in loader) == 8


@pytest.mark.parametrize("knobs,words", [
    (dict(send_dtype=torch.int16), "send_dtype=torch.int16 must be None (the block's own dtype) or one of"),
    (dict(send_dtype="bf16"), "send_dtype='bf16' must be None"),
    (dict(timeout_s=float("inf")), "timeout_s=inf must be a positive number of seconds, at most 86400"),
    (dict(timeout_s=1e12), "timeout_s=1000000000000.0 must be a positive number of seconds, at most 86400"),
    (dict(replicas_powersgd_rank=0), "replicas_powersgd_rank=0 must be None (replicas average with one all-reduce) or"),
    (dict(replicas_powersgd_start=1), "replicas_powersgd_start=1 must be an int >= 2"),
    (dict(overlap_sends="no"), "overlap_sends='no' must be True or False"),
    (dict(receive_ahead=1), "receive_ahead=1 must be True or False"),
], ids=["int8", "string", "inf", "1e12", "powersgd-rank-0", "powersgd-start-1", "overlap-string", "ahead-int"])
def test_pipeline_settings_that_failed_at_the_first_send_are_refused_when_made(knobs, words):
    from lfnnify.training.options import PipelineOptions

    with pytest.raises(lfnnify.ConfigError, match=re.escape(words)):
        PipelineOptions(**knobs)


def test_nccl_without_a_gpu_is_refused_in_one_line_not_called_a_bug(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine kind; holds on a GPU box too
    code, err = _main(capsys, "train", FMNIST, "--backend", "nccl", "--no-progress")
    assert code == 2 and "backend 'nccl' talks between GPUs" in err and "bug" not in err, err


def test_a_resume_continues_only_its_own_run_and_survives_a_torn_log(tmp_path, capsys):
    out = tmp_path / "run"
    short = ["--set", "model.name=test_resnet", "--set", "data.train_subset=64", "--set", "data.eval_subset=64",
             "--set", "data.batch_size=32", "--set", "train.threads=1", "--no-progress"]
    code, err = _main(capsys, "train", FMNIST, "--out", out, "--set", "train.iterations=4",
                      "--set", "train.checkpoint_every=2", "--set", "train.optimizer.lr=0.02", *short)
    assert code == 0, err[-2000:]
    # another length, batch, learning rate: refused, naming the setting (never silently as another run)
    for change, key in (("train.iterations=1407", "train.iterations"), ("data.batch_size=128", "data.batch_size"),
                        ("train.optimizer.lr=0.1", "train.optimizer.lr")):
        code, err = _main(capsys, "train", FMNIST, "--out", out, "--resume", "--set", "train.iterations=4",
                          "--set", "train.optimizer.lr=0.02", *short, "--set", change)
        assert code == 2 and f"--resume: the run in {out} ran with {key}=" in err, err
        assert f"lfnnify train {out / 'recipe.yaml'} --out {out} --resume" in err
    with open(out / "log.jsonl", "a") as f:  # a crash mid-write leaves the last line torn
        f.write('{"kind": "eval", "step": 4, "accur')
    code, err = _main(capsys, "train", out / "recipe.yaml", "--out", out, "--resume", "--set", "train.threads=2",
                      "--no-progress")  # its own recipe; a setting that changes only how fast it runs may differ
    assert code == 0, err[-2000:]
