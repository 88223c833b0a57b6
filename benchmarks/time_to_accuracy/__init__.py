"""Time to accuracy on Fashion-MNIST: the training time at which each method first reaches the baseline's final
test accuracy, per seed and over seeds. One script, ``python -m benchmarks.time_to_accuracy``, in two settings:

- ``--hosts 1`` (the default), ``one_machine``: backprop in one process against an lfnnify pipeline of K
  processes on this machine;
- ``--hosts 2``, ``across_hosts``: DDP, plain and with its communication hooks, against lfnnify's pipelines on two
  hosts of one core joined by a shaped link (root, iproute2).

Every (method, seed) run is one file in ``--runs``, reused when its settings and commit match (``sweep``), so a
sweep can be spread over several sittings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..common import kept_run, write_json


def sweep(folder: Path, settings: dict, commit: str, seeds: list[int], methods: list[str],
          train: Callable[[str, int], dict]) -> dict:
    """Every (method, seed) of the sweep, seed by seed: the run kept in ``folder`` if it was made with these
    settings at this commit, else ``train(method, seed)``'s record, written to ``folder`` as soon as it ends."""
    runs = {}
    for seed in seeds:
        for name in methods:
            key = f"{name}-seed{seed}"
            path = folder / f"{key}.json"
            runs[key] = kept_run(path, settings, commit)
            if runs[key]:
                continue
            runs[key] = {"settings": settings, "commit": commit, "method": name, "seed": seed, **train(name, seed)}
            write_json(path, runs[key])
    return runs
