"""The benchmark scripts' code paths run end to end at tiny sizes, so they cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speedup_quick_path_writes_the_documented_json(tmp_path):
    cmd = [sys.executable, "benchmarks/speedup.py", "--quick", "--batch", "8", "--size", "32", "--steps", "2",
           "--warmup", "1", "--balance", "flops", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "speedup.json").read_text())
    for name in ("bp_single", "bp_model_parallel", "bp_gpipe", "bp_1f1b", "lfnn_pipeline", "lfnn_pipeline_fw", "lfnn_single"):
        method = result["methods"][name]
        assert method["samples_per_s"] > 0 and len(method["step_s"]) == 2 and method["step_s_median"] > 0
    assert set(result["speedup"]) >= {"vs_bp_model_parallel", "vs_bp_pipelined", "vs_bp_single"}
    assert result["speedup"]["vs_bp_pipelined_schedule"] in ("gpipe", "1f1b")
    assert set(result["env"]) >= {"commit", "torch", "device", "cores", "threads", "date"}
    assert result["projection"]["predicted_speedup_vs_bp_model_parallel"] > 0
    assert len(list(tmp_path.glob("*.png"))) == 1 and len(list(tmp_path.glob("*.md"))) == 1


def test_speedup_projection_only_path_runs_on_one_device(tmp_path):
    # what a one-GPU session runs (benchmarks/gpu_check.sh), here on the CPU at tiny sizes
    cmd = [sys.executable, "benchmarks/speedup.py", "--projection-only", "--no-cifar", "--model", "resnet18",
           "--blocks", "4", "--batch", "4", "--size", "32", "--steps", "2", "--warmup", "1", "--balance", "flops",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "speedup.json").read_text())
    assert set(result["methods"]) == {"bp_single", "lfnn_single"}
    assert len(result["projection"]["block_fwd_bwd_s"]) == 4 and len(result["projection"]["activation_bytes"]) == 3
    assert result["projection"]["predicted_speedup_vs_bp_model_parallel"] > 0
    assert result["settings"]["cifar"] is False
    assert "projected" in next(tmp_path.glob("*.md")).read_text()


def test_memory_script_reports_both_methods(tmp_path):
    cmd = [sys.executable, "benchmarks/memory.py", "--model", "resnet18", "--size", "32", "--batch", "2",
           "--classes", "10", "--steps", "1", "--threads", "1", "--mmap-threshold", "131072", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "memory.json").read_text())
    assert set(result["peak_bytes"]) == {"bp", "lfnn"} and all(v > 0 for v in result["peak_bytes"].values())
