"""The house rules a reader relies on: five folders that import only downward, no import cycles, small modules,
distributed code only in the pipeline's folder."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lfnnify"
FOLDERS = ("surgery", "training", "pipeline", "checkpoint", "app")
# what each folder may import from the others: each serves the ones after it, and none reaches back up
MAY_IMPORT = {
    "surgery": set(),
    "training": {"surgery"},
    "checkpoint": {"surgery"},
    "pipeline": {"surgery", "training", "checkpoint"},
    "app": {"surgery", "training", "checkpoint", "pipeline"},
    "": set(),  # the top level (errors, data, plots, the small shared rules) imports none of the folders
}
# torch.distributed: the pipeline's folder, and the demo's launched stage (it runs DDP beside the pipeline)
DISTRIBUTED_OUTSIDE_PIPELINE = {"app.demo_stage"}


def _folder(module: str) -> str:
    head = module.split(".")[0]
    return head if head in FOLDERS else ""


def _distributed(module: str) -> bool:
    return _folder(module) == "pipeline" or module in DISTRIBUTED_OUTSIDE_PIPELINE


def _modules() -> dict[str, Path]:
    """Every module of the package, sub-folders included, by dotted name relative to it (``pipeline``,
    ``training.options``); a package's ``__init__`` by the package's name."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] or ["__init__"]
        modules[".".join(parts)] = path
    return modules


def _module_imports(path: Path) -> tuple[set[str], set[str]]:
    """(lfnnify modules, other modules) imported at module level by ``path``; lfnnify modules by dotted name
    relative to the package, however deep ``path`` is and however many dots the import has."""
    here = list(path.relative_to(PACKAGE).parent.parts)
    ours, others = set(), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = here[: len(here) - (node.level - 1)]
            if node.module:
                ours.add(".".join([*base, node.module]))
            else:
                ours |= {".".join([*base, a.name]) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            others.add(node.module or "")
        elif isinstance(node, ast.Import):
            others |= {a.name for a in node.names}
    return ours, others


def test_no_import_cycles():
    modules = _modules()

    def known(name):  # "pkg.mod.Name" -> the longest prefix that is a module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {name: {known(m) for m in _module_imports(path)[0]} - {""} for name, path in modules.items()}
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


def test_the_layout_checks_see_every_module():
    # a module in a sub-folder is held to the same rules: the cycle check finds it, and its imports resolve
    assert set(_modules()) == {str(p.relative_to(PACKAGE).with_suffix("")).replace("/", ".").removesuffix(
        ".__init__") for p in PACKAGE.rglob("*.py")}
    assert _module_imports(PACKAGE / "training" / "trainer.py")[0] >= {"training.base", "surgery.model"}


MAX_LINES = 400


def test_modules_stay_small():
    sizes = {name: len(p.read_text().splitlines()) for name, p in _modules().items()}
    assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_type_checkers_see_every_lazily_loaded_name():
    # __init__ loads its public names on first use; its TYPE_CHECKING block imports the same names from the same
    # modules, so editors and type checkers see them
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    lazy = next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.AnnAssign | ast.Assign) and "_LAZY" in ast.unparse(n).split("=")[0])
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {a.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert seen == lazy


def test_every_module_lies_in_one_of_the_five_folders_or_is_a_small_shared_one():
    top = sorted(name for name in _modules() if _folder(name) == "")
    assert top == ["__init__", "__main__", "_checks", "_jsonl", "_version", "_writing", "data", "errors", "plots"], top


def test_each_folder_imports_only_the_folders_it_serves_on():
    for name, path in _modules().items():
        if name in ("__init__", "__main__"):  # the package's face: it names what the folders offer
            continue
        here = _folder(name)
        for imported in _module_imports(path)[0]:
            there = _folder(imported)
            assert there in (here, "") or there in MAY_IMPORT[here], f"{name} imports {imported}"


def test_only_the_pipeline_imports_torch_distributed():
    for name, path in _modules().items():
        _, others = _module_imports(path)
        if not _distributed(name):
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
    assert not {m for m in loaded if _distributed(m.removeprefix("lfnnify."))}, loaded


def test_the_readme_layout_names_every_folder_and_what_it_offers():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    for folder in FOLDERS:
        assert f"{folder}/" in layout, folder
        offered = ast.literal_eval(next(n.value for n in ast.parse((PACKAGE / folder / "__init__.py").read_text()).body
                                        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "__all__"))
        line = next(line for line in layout.splitlines() if f"{folder}/" in line)
        assert all(name in line for name in offered), (folder, offered, line)


def test_benchmarks_and_scripts_use_only_what_lfnnify_makes_public():
    # a benchmark is a user of the library: it imports lfnnify, its five folders' __init__ and its top-level
    # modules (data, plots, errors), never a name with a leading underscore or a module inside a folder; and it
    # runs as ``python -m benchmarks.x``, so nothing edits sys.path
    root = PACKAGE.parent
    offences = []
    for path in sorted([*(root / "benchmarks").rglob("*.py"), *(root / "scripts").glob("*.py")]):
        tree = ast.parse(path.read_text())
        where = path.relative_to(root)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lfnnify"):
                parts = node.module.split(".")
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name.startswith("lfnnify")]
                if not found:
                    continue
                parts, names = found[0].split("."), []
            elif (isinstance(node, ast.Attribute) and node.attr in ("insert", "append")
                  and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                  and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                offences.append(f"{where}:{node.lineno} edits sys.path")
                continue
            else:
                continue
            if any(p.startswith("_") for p in parts[1:] + names) or len(parts) > 2 and parts[1] in FOLDERS:
                offences.append(f"{where}:{node.lineno} imports {'.'.join(parts)} {names}")
    assert not offences, "\n".join(offences)
