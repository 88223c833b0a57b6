"""What a checkpoint's description, ``lfnnify.json``, holds, and how it is read: every key checked before use.

A checkpoint may come from someone else. Its description is read as untrusted data: a regular file of bounded size,
its format and version known, every key lfnnify reads of the right type and range, and every file it lists a plain
name inside its own folder. Anything else is one :class:`~lfnnify.CheckpointError` that names the file and the key,
raised before any other file is opened.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lfnnify.checkpoint.files as fileio
import lfnnify.checkpoint.store as store

from .._checks import is_count, is_flag, is_int, is_number
from .._version import __version__
from ..errors import CheckpointError
from ..surgery.facts import describe_model
from ..surgery.model import LFNNModel
from ..surgery.options import MODES

__all__ = ["describe_checkpoint", "read_meta", "check_meta", "WEIGHTS"]

WEIGHTS = "model.safetensors"
_REQUIRED = ("format", "config", "cuts", "input_shape", "model")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def describe_checkpoint(net: LFNNModel, source_shapes: dict | None = None) -> dict:
    """The description ``lfnnify.json`` holds: how the model was converted and how to rebuild it."""
    return {
        "format": fileio.FORMAT,
        "format_version": fileio.FORMAT_VERSION,
        "lfnnify_version": __version__,
        "config": net.config,
        "cuts": net.plan.cuts,
        "input_shape": list(net.plan.input_shape),
        "model": net.config.get("model") or describe_model(net._source),
        "source_state_shapes": source_shapes or {k: list(v.shape) for k, v in net._source.state_dict().items()},
    }


def read_meta(folder: Path, digest: str | None) -> dict:
    """The checked description of the checkpoint version in ``folder`` (from :func:`store.reading`)."""
    store.check_description(folder, digest)
    file = folder / store.META
    meta = fileio.read_json(file, _REQUIRED, expected_sha256=digest)
    check_meta(meta, file)
    return meta


def _bad(file: Path, key: str, value, rule: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{file} is damaged or not written by lfnnify: its {key!r} is {shown}, and {rule}")


def _check(file: Path, key: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise _bad(file, key, value, rule)


def check_meta(meta: dict, file: Path) -> None:
    """Refuse a description whose format, version or any key lfnnify reads is not what lfnnify writes."""
    if meta.get("format") != fileio.FORMAT:
        raise CheckpointError(f"{file} is not an lfnnify checkpoint description (format={meta.get('format')!r})")
    version = meta.get("format_version", 1)
    _check(file, "format_version", version, is_count(version, 1), "it must be a whole number from 1")
    if version > fileio.FORMAT_VERSION:
        raise CheckpointError(
            f"{file} was written by a newer lfnnify ({meta.get('lfnnify_version', 'unknown')!s:.20}, format version "
            f"{version}); this lfnnify {__version__} reads format versions up to {fileio.FORMAT_VERSION}: upgrade "
            f"lfnnify to load it")
    config = meta["config"]
    _check(file, "config", config, isinstance(config, dict), "it must be an object")
    for key, ok, rule in (
        ("workers", is_count(config.get("workers"), 1), "it must be a whole number from 1"),
        ("leaders", is_number(config.get("leaders")) and 0 < config.get("leaders") <= 1, "it must be in (0, 1]"),
        ("mode", config.get("mode") in MODES, f"it must be one of {MODES}"),
        ("follower_weight", is_number(config.get("follower_weight")) and config.get("follower_weight") >= 0,
         "it must be a number >= 0"),
        ("num_classes", is_count(config.get("num_classes"), 1), "it must be a whole number from 1"),
        ("local_weight", is_number(config.get("local_weight", 0.0)) and config.get("local_weight", 0.0) >= 0,
         "it must be a number >= 0"),
        ("head", isinstance(config.get("head", "linear"), str), "it must be a head's name"),
    ):
        _check(file, f"config.{key}", config.get(key), ok, rule)
    for key in ("weight_stashing", "weight_prediction", "spike_compensation"):
        _check(file, f"config.{key}", config.get(key), is_flag(config.get(key, False)), "it must be true or false")
    cuts = meta["cuts"]
    _check(file, "cuts", cuts, isinstance(cuts, list) and all(isinstance(c, str) for c in cuts),
           "it must be a list of cut names")
    shape = meta["input_shape"]
    _check(file, "input_shape", shape, isinstance(shape, list) and 2 <= len(shape) <= 5
           and all(is_count(d, 1) and d <= 1 << 16 for d in shape), "it must list 2 to 5 sizes, each from 1")
    _check(file, "model", meta["model"], isinstance(meta["model"], dict), "it must be an object")
    shapes = meta.get("source_state_shapes", {})
    _check(file, "source_state_shapes", shapes, isinstance(shapes, dict) and all(
        isinstance(k, str) and isinstance(v, list) and all(is_count(d, 0) for d in v) for k, v in shapes.items()),
        "it must map weight names to lists of sizes")
    printed = meta.get("fingerprint")
    _check(file, "fingerprint", printed, printed is None or (isinstance(printed, list) and all(
        is_number(v, finite=False) and not math.isnan(v) for v in printed)), "it must be a list of numbers")
    listed = meta.get("files", {})
    _check(file, "files", listed, isinstance(listed, dict), "it must map file names to checksums")
    for name, digest in listed.items():
        fileio.check_name(name, file)
        _check(file, f"files.{name}", digest, isinstance(digest, str) and bool(_SHA256.match(digest)),
               "it must be a SHA-256 checksum")
    layout = meta.get("pipeline")
    if layout is not None:
        _check(file, "pipeline", layout, isinstance(layout, dict) and is_count(layout.get("blocks"), 1)
               and is_count(layout.get("replicas"), 1) and is_int(layout.get("blocks")),
               "it must name the run's blocks and replicas, each a whole number from 1")
