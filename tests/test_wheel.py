"""lfnnify as a user installs it: a wheel built from the checkout, installed into a fresh virtual environment and
used from a folder outside the checkout, where an editable install cannot hide a sub-package the wheel left out."""

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_whole_and_runs_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT / "lfnnify", source / "lfnnify", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            tmp_path / "dist", source], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lfnnify-*.whl")

    # A fresh environment that sees this machine's torch, timm and the rest (no index needed) as a plain folder on
    # its path, after its own site-packages. Not through system_site_packages: that would also run the .pth files
    # of the checkout's editable install, whose import hook can hand out the checkout instead of the wheel.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                         text=True, check=True).stdout.strip()
    Path(own, "machine.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: pip sees the editable install's metadata in that folder and would call the wheel
    # "already satisfied"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                                "--ignore-installed", "--no-index", wheel], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    script = (
        "import copy, lfnnify, timm, torch\n"
        "from pathlib import Path\n"
        "from lfnnify.app import load_recipe\n"
        f"assert Path(lfnnify.__file__).is_relative_to({str(env_dir)!r}), lfnnify.__file__\n"
        "model = timm.create_model('test_resnet', num_classes=10)\n"
        "original = copy.deepcopy(model).eval()\n"
        "net = lfnnify.convert(model, blocks=2, example_input=torch.zeros(1, 3, 32, 32)).eval()\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "assert torch.equal(net(x), original(x))  # the converted model computes what the original computed\n"
        "print('recipe', load_recipe('recipes/fashion_mnist_resnet18_k4.yaml').model.name)\n"
    )
    used = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=outside, timeout=300, env=env)
    assert used.returncode == 0, used.stdout[-2000:] + used.stderr[-3000:]
    assert "recipe resnet18" in used.stdout, used.stdout
    planned = subprocess.run([python, "-m", "lfnnify", "plan", "test_resnet", "--blocks", "2", "--input-size", "32"],
                             capture_output=True, text=True, cwd=outside, timeout=300, env=env)
    assert planned.returncode == 0, planned.stdout[-2000:] + planned.stderr[-3000:]
    assert "test_resnet: 16 valid cut points" in planned.stdout and "2 blocks, balanced by flops" in planned.stdout, \
        planned.stdout
    assert not list(outside.iterdir())  # and it wrote nothing where it ran


def test_a_recipe_is_found_by_path_or_by_built_in_name_and_a_wrong_one_is_named(tmp_path, monkeypatch):
    import lfnnify
    from lfnnify.app.recipes import builtin_recipes, find_recipe

    monkeypatch.chdir(tmp_path)  # outside the checkout: no recipes/ folder here
    shipped = builtin_recipes()
    assert "fashion_mnist_resnet18_k4" in shipped and len(shipped) >= 12
    for name in ("fashion_mnist_resnet18_k4", "fashion_mnist_resnet18_k4.yaml",
                 "recipes/fashion_mnist_resnet18_k4.yaml"):
        assert find_recipe(name) == shipped["fashion_mnist_resnet18_k4"]
    own = tmp_path / "recipes" / "fashion_mnist_resnet18_k4.yaml"  # a user's own file of that name wins
    own.parent.mkdir()
    own.write_text("model: {name: resnet18}\n")
    assert find_recipe("recipes/fashion_mnist_resnet18_k4.yaml") == Path("recipes/fashion_mnist_resnet18_k4.yaml")
    for wrong in ("fashion_mnist_resnet81_k4", "elsewhere/fashion_mnist_resnet18_k4.yaml"):
        try:
            find_recipe(wrong)
        except lfnnify.DataNotFoundError as exc:
            assert f"no recipe at {wrong}" in str(exc) and "cifar10_resnet50_k4" in str(exc), str(exc)
        else:
            raise AssertionError(f"{wrong} was found")
