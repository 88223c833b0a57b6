"""Recipes: a validated YAML schema for training runs, with ``--set a.b=c`` overrides."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .._checks import is_flag, is_int, is_number
from ..errors import DataNotFoundError, RecipeError
from ..training.options import MAX_TIMEOUT_S

MAX_SEED = 2**63 - 1  # the largest seed torch.manual_seed takes as a signed 64-bit number

__all__ = ["Recipe", "RecipeError", "load_recipe", "apply_overrides", "recipe_to_dict"]


@dataclass
class ModelSection:
    name: str = "resnet18"  # a timm name, or torchvision/<name>
    num_classes: int | None = None
    in_chans: int | None = None
    cifar: bool = False  # remove the max-pool after the stem (CIFAR-sized ResNets, as SEDONA/the paper)
    pretrained: str | None = None  # a local .safetensors/.pth file (timm or torchvision layout)


@dataclass
class ConvertSection:
    blocks: int | None = 4
    cuts: list[str] | None = None
    workers: int = 1
    leaders: float = 1.0
    mode: str = "local"  # local (LFNN-ℓ) | lfnn (Eq. 1, one device) | replay (delayed end-to-end gradients)
    head: str = "linear"  # linear (the paper's) | lookahead (a copy of the next block's first stage)
    follower_weight: float = 1.0
    local_weight: float = 0.0  # replay only: weight of each block's head loss
    weight_stashing: bool = False  # replay only: back-propagate through the first pass's weights (no recompute)
    weight_prediction: bool = False  # replay only: first passes with the weights predicted for the delayed update
    spike_compensation: bool = False  # replay only, SGD with momentum: rescale each delayed step (Kosson et al.)
    balance: str = "flops"


@dataclass
class DataSection:
    dataset: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | imagefolder | synthetic
    root: str | None = None
    input_size: int | None = None  # default: the dataset's own
    augment: bool = True
    batch_size: int = 128
    eval_batch_size: int = 512
    train_subset: int | None = None
    eval_subset: int | None = None
    workers: int | None = None  # loader processes; null: none for in-memory data, else one per core but one (<= 8)


@dataclass
class OptimizerSection:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False


@dataclass
class ScheduleSection:
    name: str = "cosine"  # cosine | constant
    final_lr: float = 0.0


@dataclass
class TrainSection:
    iterations: int | None = None  # the paper counts iterations
    epochs: int | None = None  # or epochs; exactly one of the two
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    amp: str | None = None
    grad_clip: float | None = None
    head_warmup_steps: int = 0
    reselect: str = "batch"
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # auto (cuda when there is a GPU, else cpu) | cpu | cuda | cuda:N
    checkpoint_every: int = 500
    eval_every: int | None = None  # iterations between evaluations (default: every epoch)
    switch_mode_at: int | None = None  # from this iteration on, train in mode switch_to
    switch_to: str | None = None  # local | replay
    refresh_heads_every: int | None = None  # look-ahead heads: take the next block's weights every N iterations
    refresh_momentum: float = 0.0  # 0 copies them; m keeps m of the head's own
    delay_lr_warmup: int | None = None  # replay: block k starts at lr/(K-1-k), full lr after this many iterations


@dataclass
class PipelineSection:
    max_in_flight: int = 2
    send_dtype: str | None = None  # null or bf16
    backend: str | None = None  # null: nccl when every process has its own GPU, else gloo
    timeout_s: float = 300.0


@dataclass
class Recipe:
    name: str = "run"
    method: str = "lfnn"  # lfnn | bp (the same model and data, trained end to end)
    model: ModelSection = field(default_factory=ModelSection)
    convert: ConvertSection = field(default_factory=ConvertSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)


_CHOICES = {
    "method": ("lfnn", "bp"),
    "convert.mode": ("local", "lfnn", "replay"),
    "convert.head": ("linear", "lookahead", "lookahead-layer"),
    "convert.balance": ("flops", "time", "params", "memory"),
    "train.switch_to": (None, "local", "replay"),
    "data.dataset": ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic"),
    "train.optimizer.name": ("sgd", "adamw"),
    "train.schedule.name": ("cosine", "constant"),
    "train.amp": (None, "bf16", "fp16"),
    "train.reselect": ("batch", "epoch"),
    "pipeline.send_dtype": (None, "bf16"),
    "pipeline.backend": (None, "nccl", "gloo"),
}


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


def _check(recipe: Recipe) -> None:
    flat = recipe_to_dict(recipe)

    def get(path):
        node = flat
        for part in path.split("."):
            node = node[part]
        return node

    for path, choices in _CHOICES.items():
        if get(path) not in choices:
            raise RecipeError(f"{path}: {get(path)!r} is not one of {', '.join(repr(c) for c in choices)}")
    c, d, t = recipe.convert, recipe.data, recipe.train
    if recipe.method == "lfnn":
        if c.blocks is None and not c.cuts:
            raise RecipeError("convert: give convert.blocks or convert.cuts")
        if c.blocks is not None and c.cuts:
            raise RecipeError("convert: give convert.blocks or convert.cuts, not both")
    rules = [
        ("convert.blocks", c.blocks is None or c.blocks >= 1, "must be >= 1"),
        ("convert.workers", c.workers >= 1, "must be >= 1"),
        ("convert.leaders", 0 < c.leaders <= 1, "must be in (0, 1]"),
        ("convert.follower_weight", c.follower_weight >= 0, "must be >= 0"),
        ("convert.local_weight", c.local_weight >= 0, "must be >= 0"),
        ("convert.workers", not c.head.startswith("lookahead") or c.workers == 1, "must be 1 with look-ahead heads"),
        ("data.batch_size", d.batch_size >= 1, "must be >= 1"),
        ("data.eval_batch_size", d.eval_batch_size >= 1, "must be >= 1"),
        ("data.input_size", d.input_size is None or d.input_size >= 8, "must be >= 8"),
        ("data.train_subset", d.train_subset is None or d.train_subset >= 1, "must be >= 1"),
        ("train.optimizer.lr", t.optimizer.lr > 0, "must be > 0"),
        ("train.optimizer.weight_decay", t.optimizer.weight_decay >= 0, "must be >= 0"),
        ("train.grad_clip", t.grad_clip is None or t.grad_clip > 0, "must be > 0"),
        ("train.head_warmup_steps", t.head_warmup_steps >= 0, "must be >= 0"),
        ("train.checkpoint_every", t.checkpoint_every >= 1, "must be >= 1"),
        ("train.eval_every", t.eval_every is None or t.eval_every >= 1, "must be >= 1"),
        ("train.threads", t.threads is None or t.threads >= 1, "must be >= 1"),
        ("train.device", t.device in ("auto", "cpu", "cuda") or (t.device.startswith("cuda:")
                                                                 and t.device[5:].isdigit()),
         "must be auto, cpu, cuda or cuda:N"),
        ("data.workers", d.workers is None or d.workers >= 0, "must be >= 0 (0 loads in the training process)"),
        ("pipeline.max_in_flight", recipe.pipeline.max_in_flight >= 1, "must be >= 1"),
        ("pipeline.timeout_s", 0 < recipe.pipeline.timeout_s <= MAX_TIMEOUT_S,
         f"must be > 0 and at most {MAX_TIMEOUT_S:g} (seconds a rank waits for a neighbour; a day at most)"),
        ("train.optimizer.momentum", 0 <= t.optimizer.momentum < 1, "must be in [0, 1)"),
        ("train.optimizer.nesterov", not t.optimizer.nesterov or (t.optimizer.name == "sgd"
                                                                  and t.optimizer.momentum > 0),
         "needs SGD with momentum > 0 (Nesterov's method is a kind of momentum); set train.optimizer.momentum, or "
         "drop nesterov"),
        ("train.seed", 0 <= t.seed <= MAX_SEED, f"must be a whole number from 0 to {MAX_SEED} (2**63 - 1)"),
        ("train.schedule.final_lr", 0 <= t.schedule.final_lr <= t.optimizer.lr,
         "must be in [0, train.optimizer.lr]: the learning rate the cosine schedule ends at"),
        ("data.eval_subset", d.eval_subset is None or d.eval_subset >= 1, "must be >= 1 (the images evaluated)"),
        ("train.switch_mode_at", t.switch_mode_at is None or t.switch_mode_at >= 0, "must be >= 0"),
        ("train.refresh_heads_every", t.refresh_heads_every is None or t.refresh_heads_every >= 1, "must be >= 1"),
        ("train.refresh_heads_every", t.refresh_heads_every is None or c.head.startswith("lookahead"),
         f"needs look-ahead heads (convert.head: lookahead or lookahead-layer; it is {c.head!r})"),
        ("train.refresh_momentum", 0 <= t.refresh_momentum < 1, "must be in [0, 1) (0 copies the weights)"),
        ("train.refresh_momentum", t.refresh_momentum == 0 or t.refresh_heads_every is not None,
         "is used only with train.refresh_heads_every (set it, or drop refresh_momentum)"),
        ("train.switch_mode_at", t.switch_mode_at is None or recipe.method == "lfnn",
         "switches lfnnify's training mode, but method is 'bp' (end-to-end backprop has no modes); drop "
         "train.switch_mode_at and train.switch_to, or use method: lfnn"),
        ("train.refresh_heads_every", t.refresh_heads_every is None or recipe.method == "lfnn",
         "refreshes lfnnify's look-ahead heads, but method is 'bp' (no heads); drop it, or use method: lfnn"),
        ("train.delay_lr_warmup", t.delay_lr_warmup is None or t.delay_lr_warmup >= 1, "must be >= 1"),
        ("train.delay_lr_warmup", t.delay_lr_warmup is None or recipe.method == "lfnn",
         "scales replay's delayed steps, but method is 'bp' (no delays); drop it, or use method: lfnn"),
        ("train.delay_lr_warmup", t.delay_lr_warmup is None or "replay" in (c.mode, t.switch_to),
         f"applies to replay's delayed gradients, but convert.mode is {c.mode!r} with no switch to replay; set "
         f"convert.mode: replay, or drop it"),
        ("train.switch_to", (t.switch_to is None) == (t.switch_mode_at is None),
         "and train.switch_mode_at go together: give both or neither"),
        ("train.switch_to", t.switch_to in (None, *({"local", "replay"} - {c.mode})),
         f"must be the other mode than convert.mode ({c.mode!r}); local and replay switch either way"),
    ]
    for path, ok, rule in rules:
        if not ok:
            raise RecipeError(f"{path}: {get(path)!r} {rule}")
    if (t.iterations is None) == (t.epochs is None):
        raise RecipeError(
            f"train: give exactly one of train.iterations (the paper counts iterations) or train.epochs "
            f"(got iterations={t.iterations!r}, epochs={t.epochs!r})"
        )
    if t.iterations is not None and t.iterations < 1:
        raise RecipeError(f"train.iterations: {t.iterations!r} must be >= 1")
    if t.epochs is not None and t.epochs < 1:
        raise RecipeError(f"train.epochs: {t.epochs!r} must be >= 1")


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
        if path.startswith("train.") and parts[-1] in ("iterations", "epochs") and value is not None:
            other = "epochs" if parts[-1] == "iterations" else "iterations"
            node[other] = None  # setting one length replaces the other
    return data


def load_recipe(path: str | Path | None = None, *, overrides: list[str] = (), data: dict | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises :class:`RecipeError` with the key path on any problem."""
    if data is None:
        path = Path(path)
        if not path.exists():
            raise DataNotFoundError(f"no recipe at {path}; the recipes/ folder lists the built-in ones")
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
