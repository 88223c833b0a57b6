"""Nothing lost, nothing read from outside: user files beside runs and checkpoints, checkpoints handed
over by someone else, crafted files. Real files, real devices and pipes, real processes."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lfnnify
from lfnnify.checkpoint import locks
from tests.forked import Forked
from tests.test_cli import in_process
from tests.test_faults import _Small, small_run

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"


def _saved(tmp_path, name="ckpt", trainer=True):
    net, t = small_run(steps=1)
    lfnnify.save(net, tmp_path / name, trainer=t if trainer else None)
    return net, tmp_path / name


def _version(ckpt: Path) -> Path:
    return ckpt / (ckpt / "CURRENT").read_text().split()[0]


def _forge(ckpt: Path, edit) -> Path:
    """Edit the current version's description with ``edit(meta)`` and make CURRENT agree, as a forger would."""
    import hashlib

    version = _version(ckpt)
    meta = json.loads((version / "lfnnify.json").read_text())
    edit(meta)
    data = json.dumps(meta).encode()
    (version / "lfnnify.json").write_bytes(data)
    (ckpt / "CURRENT").write_text(f"{version.name} {hashlib.sha256(data).hexdigest()}\n")
    return version


# ---------------------------------------------------------------- user files are never lost


def test_a_save_never_removes_a_folder_or_a_sibling_it_cannot_prove_it_made(tmp_path):
    mine = tmp_path / "d" / "v000001"
    mine.mkdir(parents=True)
    (mine / "data.csv").write_text("the user's")
    net, _ = small_run(steps=1)
    with pytest.raises(lfnnify.CheckpointError, match=r"holds files lfnnify did not write \(v000001\)"):
        lfnnify.save(net, tmp_path / "d")
    assert (mine / "data.csv").read_text() == "the user's"
    for name in (".ckpt.old-20240101", ".ckpt.tmp-2"):  # names like lfnnify 0.1's leftovers, but the user's
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("the user's")
    lfnnify.save(net, tmp_path / "ckpt")
    lfnnify.save(net, tmp_path / "ckpt")
    assert all((tmp_path / n / "notes.txt").read_text() == "the user's" for n in (".ckpt.old-20240101", ".ckpt.tmp-2"))
    unmarked = tmp_path / "ckpt" / "v000007.tmp-12"  # named like a killed save's folder, without its marker
    unmarked.mkdir()
    (unmarked / "notes.txt").write_text("the user's")  # (empty, it would hold nothing to lose: a save removes it)
    with pytest.raises(lfnnify.CheckpointError, match=r"did not write \(v000007.tmp-12\)"):
        lfnnify.save(net, tmp_path / "ckpt")
    assert (unmarked / "notes.txt").read_text() == "the user's"
    (tmp_path / "ckpt" / "CURRENT.tmp-12").write_text("the user's")  # named like a pointer, not reading as one
    (unmarked / "notes.txt").unlink()
    with pytest.raises(lfnnify.CheckpointError, match=r"did not write \(CURRENT.tmp-12\)"):
        lfnnify.save(net, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "CURRENT.tmp-12").read_text() == "the user's"


def test_export_refuses_a_checkpoints_path_anything_but_a_regular_file_and_a_file_not_an_earlier_export(tmp_path):
    net, ckpt = _saved(tmp_path)
    weights = _version(ckpt) / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(lfnnify.CheckpointError, match=r"is inside the checkpoint at .*ckpt.* would no longer load"):
        lfnnify.export(net, weights)
    assert weights.read_bytes() == before
    lfnnify.load(ckpt, model=_Small())  # still loads
    device, pipe, link, target = tmp_path / "null", tmp_path / "pipe", tmp_path / "link", tmp_path / "target"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a character device, as /dev/null is
    os.mkfifo(pipe)
    target.write_text("the user's")
    link.symlink_to(target)
    for path, kind in ((device, "a device or a pipe"), (pipe, "a device or a pipe"), (link, "a symbolic link")):
        with pytest.raises(lfnnify.CheckpointError, match=rf"is {kind}, not a regular file.*nothing was written"):
            lfnnify.export(net, path)
    assert stat.S_ISCHR(device.lstat().st_mode) and stat.S_ISFIFO(pipe.lstat().st_mode) and link.is_symlink()
    assert target.read_text() == "the user's"
    # a regular file: an earlier export (or an empty file) is replaced; anything else is the user's and is kept
    mine, earlier, empty = tmp_path / "model.pth", tmp_path / "earlier.safetensors", tmp_path / "empty.safetensors"
    mine.write_bytes(b"\x80the user's weights")
    with pytest.raises(lfnnify.CheckpointError, match=r"model.pth exists and is not a safetensors file: .*nothing was "
                                                      r"written. Give another file name, or remove"):
        lfnnify.export(net, mine)
    assert mine.read_bytes() == b"\x80the user's weights"
    safetensors.torch.save_file({"w": torch.zeros(2)}, earlier)
    empty.touch()
    for path in (earlier, empty):
        lfnnify.export(net, path)
        assert safetensors.torch.load_file(path).keys() == net._source.state_dict().keys()


def test_a_run_starts_only_in_a_new_or_empty_folder_and_never_writes_through_a_link(tmp_path, capsys):
    short = ["--set", "model.name=test_resnet", "--set", "data.train_subset=64", "--set", "data.eval_subset=64",
             "--set", "data.batch_size=32", "--set", "train.iterations=2", "--set", "train.threads=1", "--no-progress"]
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("results.md", "recipe.yaml", "curves.png"):
        (folder / name).write_text("the user's")
    code, _, err = in_process(capsys, "train", FMNIST, "--out", folder, *short)
    assert code == 2 and "is not empty (it holds curves.png, recipe.yaml, results.md)" in err, err
    assert all((folder / n).read_text() == "the user's" for n in ("results.md", "recipe.yaml", "curves.png"))
    beside = tmp_path / "beside"  # --out . next to the recipe
    beside.mkdir()
    (beside / "recipe.yaml").write_text(FMNIST.read_text())
    cwd = os.getcwd()
    os.chdir(beside)
    try:
        code, _, err = in_process(capsys, "train", "recipe.yaml", "--out", ".", *short)
    finally:
        os.chdir(cwd)
    assert code == 2 and "is not empty (it holds recipe.yaml)" in err and (beside / "recipe.yaml").read_text() == \
        FMNIST.read_text()
    run = tmp_path / "run"
    code, _, err = in_process(capsys, "train", FMNIST, "--out", run, *short)
    assert code == 0, err[-2000:]
    elsewhere = tmp_path / "elsewhere.md"
    elsewhere.write_text("the user's")
    (run / "results.md").unlink()
    (run / "results.md").symlink_to(elsewhere)
    code, _, err = in_process(capsys, "train", run / "recipe.yaml", "--out", run, "--resume", *short)
    assert code == 2 and "results.md is a symbolic link, not a regular file" in err, err
    assert elsewhere.read_text() == "the user's"


# ---------------------------------------------------------------- a checkpoint reads only its own files


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["model"]["kwargs"].update(checkpoint_path="/etc/hostname"), "'checkpoint_path', which does not"),
    (lambda m: m["model"].update(name="local-dir:/etc"), "'local-dir:/etc', which is not in timm"),
    (lambda m: m["model"].update(name="hf-hub:timm/resnet18"), "'hf-hub:timm/resnet18', which is not in timm"),
    (lambda m: m["model"].update(library="pickle"), "names the library 'pickle'"),
], ids=["checkpoint_path", "local-dir", "hf-hub", "library"])
def test_a_checkpoint_rebuilds_only_registered_architectures_from_size_arguments(tmp_path, edit, words):
    import timm

    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    net = lfnnify.convert(model, blocks=2, example_input=torch.zeros(1, 1, 16, 16))
    lfnnify.save(net, tmp_path / "ckpt")
    assert lfnnify.load(tmp_path / "ckpt").num_blocks == 2  # as saved: rebuilt by name
    _forge(tmp_path / "ckpt", edit)
    with pytest.raises(lfnnify.CheckpointError, match=words):
        lfnnify.load(tmp_path / "ckpt")
    back = lfnnify.load(tmp_path / "ckpt", model=timm.create_model("test_resnet", num_classes=10, in_chans=1))
    assert back.num_blocks == 2  # the caller's own architecture: trusted, and the forged name never used


def _load_in_child(tmp_path, path, timeout_s=30):
    """lfnnify.load(path) in a child process forked from this one, bounded: (exit code, what it raised). A hang is a
    failure, not a stuck suite: the child is killed and the test fails."""
    errors = tmp_path / "child-error.txt"
    errors.unlink(missing_ok=True)

    def load():
        try:
            lfnnify.load(path, model=_Small())
        except lfnnify.CheckpointError as exc:
            errors.write_text(str(exc))
            os._exit(2)

    child = Forked(load, errors=errors)
    try:
        code = child.wait(timeout_s)
    except AssertionError:
        raise AssertionError(f"lfnnify.load did not return within {timeout_s} s: it blocked") from None
    return code, child.error()


def test_links_pipes_and_devices_in_a_checkpoint_are_refused_before_a_byte_is_read(tmp_path):
    _, ckpt = _saved(tmp_path)
    version = _version(ckpt)
    weights = version / "model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    code, err = _load_in_child(tmp_path, ckpt)
    assert code == 2 and "model.safetensors is not a regular file" in err, err
    weights.unlink()
    os.mkfifo(weights)
    code, err = _load_in_child(tmp_path, ckpt)
    assert code == 2 and "model.safetensors is not a regular file" in err, err
    (version / "lfnnify.json").unlink()
    os.mkfifo(version / "lfnnify.json")
    code, err = _load_in_child(tmp_path, ckpt)
    assert code == 2 and "lfnnify.json is not a regular file" in err, err


def test_a_file_list_leading_out_of_the_folder_is_refused_the_same_whatever_the_file_holds(tmp_path):
    import hashlib

    secret = tmp_path / "secret.txt"
    secret.write_text("42")
    messages = []
    for guess in ("42", "43"):  # the true contents and a false guess
        _, ckpt = _saved(tmp_path, name=f"ckpt-{guess}")
        digest = hashlib.sha256(guess.encode()).hexdigest()
        relative = os.path.relpath(secret, _version(ckpt))
        for name in (relative, str(secret)):
            _forge(ckpt, lambda m, n=name, d=digest: m["files"].update({n: d}))
            with pytest.raises(lfnnify.CheckpointError, match="not a plain file name inside the checkpoint") as info:
                lfnnify.load(ckpt, model=_Small())
            messages.append(str(info.value).replace(str(ckpt), "<ckpt>"))
    assert messages[0] == messages[2] and messages[1] == messages[3]  # the same words for the true and false guess


@pytest.mark.parametrize("edit,words", [
    (lambda m: m.update(format_version=3), r"written by a newer lfnnify .* format version 3.* reads format versions "
                                           r"up to 2"),
    (lambda m: m.update(cuts=5), r"its 'cuts' is 5, and it must be a list of cut names"),
    (lambda m: m["config"].update(workers="x"), r"its 'config.workers' is 'x', and it must be a whole number"),
    (lambda m: m["config"].pop("mode"), r"its 'config.mode' is None, and it must be one of"),
    (lambda m: m.update(input_shape="abc"), r"its 'input_shape' is 'abc'"),
    (lambda m: m.update(config=[1]), r"its 'config' is \[1\], and it must be an object"),
    (lambda m: m.update(files={"model.safetensors": 7}), r"its 'files.model.safetensors' is 7"),
], ids=["newer-format", "cuts", "workers", "mode-missing", "input-shape", "config-type", "checksum-type"])
def test_forged_descriptions_get_one_error_naming_the_file_and_the_key(tmp_path, edit, words):
    _, ckpt = _saved(tmp_path)
    _forge(ckpt, edit)
    with pytest.raises(lfnnify.CheckpointError, match=words):
        lfnnify.load(ckpt, model=_Small())


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path):
    _, ckpt = _saved(tmp_path)
    version = _version(ckpt)
    deep = "[" * 100_000 + "]" * 100_000
    (version / "trainer.json").write_text('{"state": ' + deep + "}")
    _forge(ckpt, lambda m: m["files"].pop("trainer.json"))  # no checksum: the parser itself must hold
    with pytest.raises(lfnnify.CheckpointError, match=r"trainer.json is damaged: it nests deeper"):
        lfnnify.read_trainer_state(ckpt)
    _forge(ckpt, lambda m: m.update(cuts=json.loads("[" * 50 + "]" * 50)))
    with pytest.raises(lfnnify.CheckpointError, match=r"its 'cuts' is"):
        lfnnify.load(ckpt, model=_Small())


def test_an_edited_description_is_named_not_the_pointer(tmp_path):
    # lfnnify.json changed by hand, CURRENT as saved: the description is the one that changed (its own checksum);
    # the other way round (a damaged pointer) is tests/test_misuse.py's
    _, ckpt = _saved(tmp_path)
    version = _version(ckpt)
    meta = json.loads((version / "lfnnify.json").read_text())
    meta["cuts"] = ["stage"]
    (version / "lfnnify.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(lfnnify.CheckpointError, match=r"lfnnify.json is damaged: its checksum differs") as info:
        lfnnify.load(ckpt, model=_Small())
    assert "CURRENT is damaged" not in str(info.value)


# ---------------------------------------------------------------- a stopped reader or saver bounds the wait


def _holding(ckpt: Path, how: str) -> subprocess.Popen:
    """A process that takes a checkpoint's lock as lfnnify does (a load reading it, or a save writing it) and
    then stops (SIGSTOP), as a stopped program would."""
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom lfnnify.checkpoint import store\n"
            f"path = Path({str(ckpt)!r})\n"
            + ("with store.reading(path):\n" if how == "load" else "with store.writing(path):\n")
            + "    print('holding', flush=True); os.kill(os.getpid(), signal.SIGSTOP)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_stopped_load_or_save_holds_no_other_save_forever_and_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "LOCK_WAIT_S", 1.0)
    net, ckpt = _saved(tmp_path, trainer=False)
    reader = _holding(ckpt, "load")
    try:
        old = _version(ckpt)
        start = time.monotonic()
        with pytest.warns(UserWarning, match=rf"{old.name} is still being read by process {reader.pid} .*next save"):
            lfnnify.save(net, ckpt)  # the new version is published; the old one stays while it is being read
        assert time.monotonic() - start < 30 and _version(ckpt) != old and old.is_dir()
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.wait()
        reader.stdout.close()
    writer = _holding(ckpt, "save")
    try:
        with pytest.raises(lfnnify.CheckpointError, match=rf"is locked by process {writer.pid} .*held it for more"):
            lfnnify.save(net, ckpt)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    lfnnify.save(net, ckpt)  # the killed save's folder is proven a leftover and removed; the old version too
    assert sorted(p.name for p in ckpt.iterdir()) == ["CURRENT", _version(ckpt).name]
