"""Commands run in the test's own process: the same code as ``lfnnify ...`` or ``python -m benchmarks.x ...``,
without the seconds a new process spends importing torch and timm (about 7 s each on this project's slower machine
kind). What needs a process of its own (an exit code after a signal, a fresh interpreter, torchrun's workers, the
processes a benchmark starts) still gets one.
"""

import runpy
import sys

import torch


def _exit_code(run) -> int:
    threads = torch.get_num_threads()  # a recipe's train.threads or a script's own count must not outlive the call
    try:
        code = run()
    except SystemExit as exc:  # argparse's usage errors, a script's one-line refusal
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    finally:
        torch.set_num_threads(threads)
    return code


def cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lfnnify args``."""
    from lfnnify.app.cli import main

    code = _exit_code(lambda: main([str(a) for a in args]))
    out = capsys.readouterr()
    return code, out.out, out.err


def module(capsys, name: str, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m name args`` (a benchmark: ``benchmarks.speedup``), run as
    ``__main__`` with its own ``sys.argv``."""
    argv = sys.argv
    sys.argv = [name, *map(str, args)]
    imported = sys.modules.pop(name, None)  # as a fresh ``python -m`` would find it; another test may hold it
    try:
        code = _exit_code(lambda: runpy.run_module(name, run_name="__main__", alter_sys=True) and 0)
    finally:
        sys.argv = argv
        if imported is not None:
            sys.modules[name] = imported
    out = capsys.readouterr()
    return code, out.out, out.err


def script(capsys, path, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python path args``, run as ``__main__`` with its own ``sys.argv``; the
    import path it extends is put back afterwards."""
    argv, path_before = sys.argv, list(sys.path)
    sys.argv = [str(path), *map(str, args)]
    try:
        code = _exit_code(lambda: runpy.run_path(str(path), run_name="__main__") and 0)
    finally:
        sys.argv, sys.path[:] = argv, path_before
    out = capsys.readouterr()
    return code, out.out, out.err
