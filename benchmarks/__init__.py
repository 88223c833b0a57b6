"""The benchmarks: one module per experiment, run from the repository's root as ``python -m benchmarks.<name>``.

Their workers (what torchrun starts on every rank) are in ``benchmarks.workers``; what they share is ``common``.
Every process a benchmark starts finds this package and lfnnify the same way, also on the testbed's hosts, which
work in folders of their own: the repository's root is put first on ``PYTHONPATH`` for them.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys([str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
