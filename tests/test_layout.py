"""The house rules a reader relies on: no import cycles, small modules, distributed code only where it runs."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lfnnify"
# the only modules that import torch.distributed
DISTRIBUTED = {"pipeline", "_comm", "_shards", "_demo_stage", "_replicas", "_pipeline_eval"}


def _module_imports(path: Path) -> tuple[set[str], set[str]]:
    """(lfnnify modules, other modules) imported at module level by ``path``."""
    ours, others = set(), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            ours |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            others.add(node.module or "")
        elif isinstance(node, ast.Import):
            others |= {a.name for a in node.names}
    return ours, others


def test_no_import_cycles():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {name: _module_imports(path)[0] & set(modules) for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name, chain):
        if state.get(name) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*chain, name])}")
        if state.get(name) != 2:
            state[name] = 1
            for dep in graph[name]:
                visit(dep, [*chain, name])
            state[name] = 2

    for name in graph:
        visit(name, [])


def test_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 420, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_only_the_pipeline_imports_torch_distributed():
    for path in PACKAGE.glob("*.py"):
        _, others = _module_imports(path)
        if path.stem not in DISTRIBUTED:
            assert not any(m.startswith("torch.distributed") for m in others), path.name
            source = path.read_text()
            assert "torch.distributed" not in source.replace("torch.distributed.run", "").replace(
                "torch.distributed.elastic", ""), path.name


def test_convert_and_save_never_load_the_pipeline():
    code = ("import sys, torch, timm, lfnnify, tempfile; "
            "net = lfnnify.convert(timm.create_model('test_resnet', num_classes=10), blocks=2, "
            "example_input=torch.zeros(1, 3, 32, 32)); lfnnify.save(net, tempfile.mkdtemp() + '/c'); "
            "lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)); "
            "print(sorted(m for m in sys.modules if m.startswith('lfnnify')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    loaded = set(eval(out))  # noqa: S307 - our own printed list
    assert not loaded & {f"lfnnify.{m}" for m in DISTRIBUTED}, loaded
