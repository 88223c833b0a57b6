"""Shared by the benchmarks: the environment block every result file carries, JSON output, what the two
multi-host benchmarks share (their testbed's preflight and the measured-time split), and the time-to-target
arithmetic of the two time-to-accuracy benchmarks."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
from pathlib import Path

import torch

from lfnnify.app import cpu_name, status_bytes

RESULTS = Path(__file__).resolve().parent / "results"


MEASURED_CODE = ["../lfnnify", "*.py", "*.sh"]  # relative to benchmarks/: what a measurement runs, all of it


def same_measured_code(commits: list[str]) -> bool:
    """Whether these commits hold the same :data:`MEASURED_CODE` (git says their diff there is empty): files measured
    at two of them measured the same thing, whatever else (documents, tests) changed in between."""
    return all(subprocess.run(["git", "diff", "--quiet", commits[0], c, "--", *MEASURED_CODE],
                              cwd=Path(__file__).parent).returncode == 0 for c in commits[1:])


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *MEASURED_CODE], capture_output=True, text=True,
                cwd=Path(__file__).parent
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def refuse_uncommitted(script: str, allowed: bool) -> None:
    """A published table comes from one commit: stop where lfnnify/ or benchmarks/ have uncommitted changes, unless
    ``--allow-dirty`` was passed for a quick look (its files then carry the commit with ``+dirty``)."""
    if commit().endswith("+dirty") and not allowed:
        raise SystemExit(f"{script}: uncommitted changes to lfnnify/ or benchmarks/, and a table comes from one "
                         "commit. Commit first (or pass --allow-dirty for a quick look, which the table marks)")


def refuse_bad_arguments(script: str, args, *, counts=(), positives=()) -> None:
    """Refuse, before anything runs, arguments that would hang or make a table lie: a seed named twice (one run
    would count as two seeds), a count below 1 (``--jobs 0`` never starts a run), a rate or a size that is not
    above 0 (a projection faster than an infinite link). ``counts`` and ``positives`` name attributes of ``args``."""
    seeds = getattr(args, "seeds", None)
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise SystemExit(f"{script}: --seeds {' '.join(map(str, seeds))}: a seed is named twice, which would count one "
                         f"run twice in the mean and standard deviation; name each seed once")
    for name in counts:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"{script}: --{name.replace('_', '-')} {value}: must be at least 1")
    for name in positives:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SystemExit(f"{script}: --{name.replace('_', '-')} {value}: must be more than 0")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({cpu_name()})"


def environment(threads: int | None = None) -> dict:
    return {
        "commit": commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_name(),
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD"))},
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM), in bytes; 0 where /proc is missing."""
    return status_bytes("VmHWM")


def hardware_tag() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    return f"cpu{os.cpu_count()}"


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def hosts_ready(script: str) -> dict:
    """Before a run across hosts: stop with one line where this machine cannot build them, remove hosts an earlier
    run left behind, and return the environment as it was at the start."""
    from lfnnify.app import Hosts, missing

    reason = missing()
    if reason:
        raise SystemExit(f"{script}: {reason}")
    Hosts.remove_stale()
    return environment(1)


def time_balanced_plan(model_name: str, *, batch: int, example_shape: tuple[int, ...], link: str, blocks: int = 2,
                       **model_kwargs):
    """The plan of ``blocks`` blocks balanced by measured time at the training batch, on one thread (as a host
    runs it)."""
    import lfnnify
    from lfnnify.app import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, **model_kwargs)
    return lfnnify.plan(model, blocks=blocks, balance="time", example_input=torch.randn(batch, *example_shape),
                        batch_size=batch, link=link)


def kept_run(path: Path, settings: dict, at_commit: str) -> dict | None:
    """The run a sweep kept in ``path``, if it was made with these settings at this commit (then a later call
    reuses it instead of training again); None otherwise."""
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    if kept["settings"] != settings or kept["commit"] != at_commit:
        return None
    print(f"{path.stem}: reused {path}", flush=True)
    return kept


def first_reaching(evals: list[dict], target: float) -> dict | None:
    """The first evaluation (step, train_seconds, accuracy) at or above ``target``; None if none."""
    return next((r for r in evals if r["accuracy"] >= target), None)


def ranges_apart(a: list[float], b: list[float]) -> bool:
    """Whether two ranges ``[low, high]`` (of repeated runs) do not overlap: only then is one method faster."""
    return a[0] > b[1] or a[1] < b[0]


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def mean_sd_text(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat["sd"] is not None else "")


def ratios_text(values: list) -> str:
    return ", ".join("never" if v is None else f"{v:.2f}x" for v in values)


def time_to_target(runs: dict, seeds: list[int], methods: list[str], baseline: str, margin: float = 0.0) -> dict:
    """Per seed: the baseline's final accuracy less ``margin`` as the target, and the training time at which each
    method first reached it, against the baseline's own; then over seeds (mean ± sd of the ratios that exist, and of
    the final accuracies and seconds per step). ``runs`` maps ``<method>-seed<N>`` to ``{"evaluations": [...]}``."""
    others = [m for m in methods if m != baseline]
    per_seed, ratios = {}, {m: [] for m in others}
    for seed in seeds:
        base = runs[f"{baseline}-seed{seed}"]["evaluations"]
        target = base[-1]["accuracy"] - margin
        first = first_reaching(base, target)
        base_time = first["train_seconds"]
        row = {"target": target, f"{baseline}_seconds": base_time, f"{baseline}_step": first["step"]}
        for m in others:
            evals = runs[f"{m}-seed{seed}"]["evaluations"]
            hit = first_reaching(evals, target)
            row[m] = {"seconds": hit["train_seconds"] if hit else None, "step": hit["step"] if hit else None,
                      f"ratio_to_{baseline}": hit["train_seconds"] / base_time if hit else None,
                      "final_accuracy": evals[-1]["accuracy"], "best_accuracy": max(r["accuracy"] for r in evals),
                      "seconds_per_step": evals[-1]["train_seconds"] / evals[-1]["step"]}
            ratios[m].append(row[m][f"ratio_to_{baseline}"])
        row[f"{baseline}_seconds_per_step"] = base[-1]["train_seconds"] / base[-1]["step"]
        per_seed[seed] = row
    over = {}
    for m, values in ratios.items():
        reached = [v for v in values if v is not None]
        over[m] = {"reached": f"{len(reached)} of {len(values)} seeds",
                   "ratio_mean": statistics.mean(reached) if reached else None,
                   "ratio_sd": statistics.stdev(reached) if len(reached) > 1 else None}
    last = {m: [runs[f"{m}-seed{s}"]["evaluations"][-1] for s in seeds] for m in methods}
    return {"per_seed": per_seed, f"ratio_to_{baseline}": over,
            "final_accuracy": {m: mean_sd([e["accuracy"] for e in v]) for m, v in last.items()},
            "seconds_per_step": {m: mean_sd([e["train_seconds"] / e["step"] for e in v]) for m, v in last.items()}}
