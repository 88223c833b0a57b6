"""Recipes: a validated YAML schema for training runs, with ``--set a.b=c`` overrides.

A recipe's ``convert:``, ``train:`` and ``pipeline:`` sections are made of the fields of :class:`ConvertOptions`,
:class:`TrainerOptions` and :class:`PipelineOptions` (names, defaults and rules, declared once there), less what YAML
cannot hold (factories, log paths), plus the recipe's own fields, declared here the same way. A value that breaks a
field's rule is refused with the key path and the rule's words; the options' own checks across fields run as they
run for the API, in the recipe's key paths; what only a recipe can check (its method, its run length) is below.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .._checks import broken_rule, count, is_flag, is_int, is_number, one_of, optional, setting
from ..errors import ConfigError, DataNotFoundError, RecipeError
from ..surgery.options import ConvertOptions
from ..training.options import SEND_DTYPES_BY_NAME, PipelineOptions, TrainerOptions

__all__ = ["Recipe", "RecipeError", "load_recipe", "find_recipe", "builtin_recipes", "apply_overrides",
           "recipe_to_dict", "SEND_DTYPE_NAMES"]

# the paper's experiments, shipped inside the package (a checkout also shows them as recipes/ at its root)
BUILTIN = Path(__file__).resolve().parents[1] / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """The recipes that come with lfnnify, by name (``fashion_mnist_resnet18_k4``)."""
    return {p.stem: p for p in sorted(BUILTIN.glob("*.yaml"))}


def find_recipe(path: str | Path) -> Path:
    """The recipe file ``path`` names: the file itself where it exists, else the built-in recipe of that name
    (``fashion_mnist_resnet18_k4``, or ``recipes/fashion_mnist_resnet18_k4.yaml`` run outside a checkout)."""
    path = Path(path)
    if path.exists():
        return path
    builtin = builtin_recipes()
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in builtin and (path.parent == Path(".") or path.parent.name == "recipes"):
        return builtin[name]
    raise DataNotFoundError(f"no recipe at {path}; give a recipe YAML, or the name of a built-in one: "
                            f"{', '.join(builtin)}")

MAX_SEED = 2**63 - 1  # the largest seed torch.manual_seed takes as a signed 64-bit number
METHODS = ("lfnn", "bp")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
SEND_DTYPE_NAMES = tuple(SEND_DTYPES_BY_NAME)  # how a recipe names PipelineOptions.send_dtype


def _device(v) -> bool:
    return isinstance(v, str) and (v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()))


def _rule_of(options: type, name: str) -> dict:
    return next(f.metadata for f in dataclasses.fields(options) if f.name == name)


def _section(name: str, options: type, *, leave_out=(), yaml_fields=(), own=()) -> type:
    """A recipe section made of ``options``' fields (each with its default and rule), less ``leave_out``;
    ``yaml_fields`` gives a field the form YAML writes it in, ``own`` adds the recipe's own fields."""
    hints = typing.get_type_hints(options)
    replaced = {spec[0]: spec for spec in yaml_fields}
    fields = [replaced.get(f.name, (f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata)))
              for f in dataclasses.fields(options) if f.name not in leave_out]
    return dataclasses.make_dataclass(name, [*fields, *own])


@dataclass
class ModelSection:
    name: str = "resnet18"  # a timm name, or torchvision/<name>
    num_classes: int | None = setting(None, optional(count(1)), "must be >= 1")
    in_chans: int | None = setting(None, optional(count(1)), "must be >= 1")
    cifar: bool = False  # remove the max-pool after the stem (CIFAR-sized ResNets, as SEDONA/the paper)
    pretrained: str | None = None  # a local .safetensors/.pth file (timm or torchvision layout)


# convert(): blocks or cuts, workers, leaders, mode, head, follower_weight, local_weight, weight_stashing,
# weight_prediction, spike_compensation, balance (num_classes comes from model:)
ConvertSection = _section("ConvertSection", ConvertOptions, leave_out=("num_classes",), yaml_fields=[
    ("cuts", list[str] | None, dataclasses.field(default=None, metadata=_rule_of(ConvertOptions, "cuts"))),
    ("head", str, dataclasses.field(default="linear", metadata=_rule_of(ConvertOptions, "head"))),
])


@dataclass
class DataSection:
    dataset: str = setting("fashion_mnist", one_of(*DATASETS), f"is not one of {', '.join(map(repr, DATASETS))}")
    root: str | None = None
    input_size: int | None = setting(None, optional(count(8)), "must be >= 8")  # default: the dataset's own
    augment: bool = True
    batch_size: int = setting(128, count(1), "must be >= 1")
    eval_batch_size: int = setting(512, count(1), "must be >= 1")
    train_subset: int | None = setting(None, optional(count(1)), "must be >= 1")
    eval_subset: int | None = setting(None, optional(count(1)), "must be >= 1 (the images evaluated)")
    # loader processes; null: none for in-memory data, else one per core but one (at most 8)
    workers: int | None = setting(None, optional(count(0)), "must be >= 0 (0 loads in the training process)")


@dataclass
class OptimizerSection:
    name: str = setting("sgd", one_of("sgd", "adamw"), "is not one of 'sgd', 'adamw'")
    lr: float = setting(0.1, lambda v: is_number(v) and v > 0, "must be > 0")
    momentum: float = setting(0.9, lambda v: is_number(v) and 0 <= v < 1, "must be in [0, 1)")
    weight_decay: float = setting(1e-4, lambda v: is_number(v) and v >= 0, "must be >= 0")
    nesterov: bool = False


@dataclass
class ScheduleSection:
    name: str = setting("cosine", one_of("cosine", "constant"), "is not one of 'cosine', 'constant'")
    final_lr: float = setting(0.0, lambda v: is_number(v) and v >= 0,
                              "must be in [0, train.optimizer.lr]: the learning rate the cosine schedule ends at")


# the trainers' settings: amp, grad_clip, head_warmup_steps, reselect, switch_mode_at, switch_to, refresh_heads_every,
# refresh_momentum, delay_lr_warmup; and the run's own
NOT_IN_RECIPES = ("optimizer", "scheduler", "log_path", "log_every", "progress")  # factories, the run's own paths
TrainSection = _section("TrainSection", TrainerOptions, leave_out=NOT_IN_RECIPES, own=[
    ("iterations", int | None, setting(None, optional(count(1)), "must be >= 1")),  # the paper counts iterations
    ("epochs", int | None, setting(None, optional(count(1)), "must be >= 1")),  # or epochs; exactly one of the two
    ("optimizer", OptimizerSection, field(default_factory=OptimizerSection)),
    ("schedule", ScheduleSection, field(default_factory=ScheduleSection)),
    ("seed", int, setting(0, lambda v: is_int(v) and 0 <= v <= MAX_SEED,
                          f"must be a whole number from 0 to {MAX_SEED} (2**63 - 1)")),
    ("threads", int | None, setting(None, optional(count(1)), "must be >= 1")),
    ("device", str, setting("auto", _device, "must be auto, cpu, cuda or cuda:N")),
    ("checkpoint_every", int, setting(500, count(1), "must be >= 1")),
    ("eval_every", int | None, setting(None, optional(count(1)), "must be >= 1")),  # default: every epoch
])

# the pipeline's settings: max_in_flight, send_dtype (by name), timeout_s, backend (threads and device: train:)
PipelineSection = _section("PipelineSection", PipelineOptions, leave_out=("threads", "device"), yaml_fields=[
    ("send_dtype", str | None, setting(None, one_of(None, *SEND_DTYPE_NAMES),
                                       f"is not one of null, {', '.join(SEND_DTYPE_NAMES)}")),
])


@dataclass
class Recipe:
    name: str = "run"
    method: str = setting("lfnn", one_of(*METHODS), "is not one of 'lfnn', 'bp'")  # bp: the same model, end to end
    model: ModelSection = field(default_factory=ModelSection)
    convert: ConvertSection = field(default_factory=ConvertSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)



def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise RecipeError(f"{where}: unknown key; {path or 'the recipe'} takes {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        where = f"{path}.{f.name}" if path else f.name
        if f.name not in data:
            continue
        values[f.name] = _coerce(hints[f.name], data[f.name], where)
    return cls(**values)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not is_flag(value):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if not is_int(value):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: take it as the number it spells
            try:
                value = float(value) if math.isfinite(float(value)) else value
            except ValueError:
                pass
        if not is_number(value, finite=False):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _rules(obj, path: str) -> None:
    """Every field of ``obj`` (a section, its sub-sections too) against its own rule, named by its key path."""
    broken = broken_rule(obj)
    if broken is not None:
        name, value, text = broken
        raise RecipeError(f"{path}{name}: {value!r} {text}")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _rules(value, f"{path}{f.name}.")


def _as_options(build, section: str, names) -> None:
    """The options' own checks across fields, as they run for the API, in the recipe's key paths."""
    try:
        build()
    except ConfigError as exc:
        text = re.sub(rf"\b({'|'.join(names)})=", lambda m: f"{section}.{m.group(1)}=", str(exc))
        raise RecipeError(f"{section}: {text}") from None


def _check(recipe: Recipe) -> None:
    _rules(recipe, "")
    c, t, o = recipe.convert, recipe.train, recipe.train.optimizer
    values = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    _as_options(lambda: ConvertOptions(**values), "convert", values)
    trainer = {f.name: getattr(t, f.name) for f in dataclasses.fields(TrainerOptions) if f.name not in NOT_IN_RECIPES}
    _as_options(lambda: TrainerOptions(optimizer=object, **trainer), "train", trainer)
    rules = [  # what only a recipe can check: its method, its optimizer's settings together, its run's length
        ("train.optimizer.nesterov", not o.nesterov or (o.name == "sgd" and o.momentum > 0),
         "needs SGD with momentum > 0 (Nesterov's method is a kind of momentum); set train.optimizer.momentum, or "
         "drop nesterov"),
        ("train.schedule.final_lr", t.schedule.final_lr <= o.lr,
         "must be in [0, train.optimizer.lr]: the learning rate the cosine schedule ends at"),
        ("train.refresh_heads_every", t.refresh_heads_every is None or c.head.startswith("lookahead"),
         f"needs look-ahead heads (convert.head: lookahead or lookahead-layer; it is {c.head!r})"),
        ("train.switch_mode_at", t.switch_mode_at is None or recipe.method == "lfnn",
         "switches lfnnify's training mode, but method is 'bp' (end-to-end backprop has no modes); drop "
         "train.switch_mode_at and train.switch_to, or use method: lfnn"),
        ("train.refresh_heads_every", t.refresh_heads_every is None or recipe.method == "lfnn",
         "refreshes lfnnify's look-ahead heads, but method is 'bp' (no heads); drop it, or use method: lfnn"),
        ("train.delay_lr_warmup", t.delay_lr_warmup is None or recipe.method == "lfnn",
         "scales replay's delayed steps, but method is 'bp' (no delays); drop it, or use method: lfnn"),
        ("train.delay_lr_warmup", t.delay_lr_warmup is None or "replay" in (c.mode, t.switch_to),
         f"applies to replay's delayed gradients, but convert.mode is {c.mode!r} with no switch to replay; set "
         f"convert.mode: replay, or drop it"),
        ("train.switch_to", t.switch_to in (None, *({"local", "replay"} - {c.mode})),
         f"must be the other mode than convert.mode ({c.mode!r}); local and replay switch either way"),
        ("pipeline.send_deltas", not recipe.pipeline.send_deltas or recipe.pipeline.send_dtype == "int8",
         f"sends each sample's change rounded to int8 (AQ-SGD), but pipeline.send_dtype is "
         f"{recipe.pipeline.send_dtype!r}; set pipeline.send_dtype: int8, or drop send_deltas"),
    ]
    flat = recipe_to_dict(recipe)
    for path, ok, rule in rules:
        if not ok:
            value = flat
            for part in path.split("."):
                value = value[part]
            raise RecipeError(f"{path}: {value!r} {rule}")
    if (t.iterations is None) == (t.epochs is None):
        raise RecipeError(
            f"train: give exactly one of train.iterations (the paper counts iterations) or train.epochs "
            f"(got iterations={t.iterations!r}, epochs={t.epochs!r})"
        )


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.iterations=1000", "convert.leaders=0.7"]`` applied to a raw recipe dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. --set train.iterations=1000")
        path, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise RecipeError(f"--set {item!r}: {part} is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        for pair in (("train.iterations", "train.epochs"), ("convert.blocks", "convert.cuts")):
            if path in pair and value is not None:  # setting one of a pair replaces the other
                node[pair[1 - pair.index(path)].split(".")[1]] = None
    return data


def load_recipe(path: str | Path | None = None, *, overrides: list[str] = (), data: dict | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises :class:`RecipeError` with the key path on any problem."""
    if data is None:
        path = find_recipe(path)
        if path.is_dir():
            raise RecipeError(f"{path} is a folder; give a recipe file (a .yaml), e.g. "
                              f"recipes/fashion_mnist_resnet18_k4.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError:
            raise RecipeError(f"{path} is not a text file, so not a recipe; give a recipe YAML (see recipes/)") \
                from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path} holds a YAML {type(data).__name__}, not a recipe (a mapping of sections "
                              f"such as model:, convert:, train:); see recipes/")
    data = apply_overrides(data, list(overrides))
    recipe = _build(Recipe, data, "")
    _check(recipe)
    return recipe
