#!/usr/bin/env bash
# The one prepared run for a session that has the one-GPU `device` machine (H100/H200, 16 CPU cores).
# It ends within 8 min 30 s (every step is bounded, and a step that would not fit in what is left is skipped), so
# one rerun fits a 15-minute lease. Run it from the repository root there, with OUT set to a folder that comes back:
#   bash scripts/gpu_wheels.sh             (here, once: wheels for what the device may lack, into .whl/, git-ignored)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)       (device tool)
# It first installs .whl/ offline if it is there (pip --no-index), and checks, in seconds, that everything it needs
# imports (torch 2.11 / torchvision 0.26 there, no package index). Then:
#   - lfnnify's GPU code paths, checked one by one (benchmarks.gpu_paths: the trainer on the GPU, the on-device
#     non-finite check, `lfnnify train` on the GPU, a 2-process pipeline sharing the GPU over gloo);
# then measures, on one GPU, ResNet-101 and ResNet-152 at 224 px, batch 256, K=4:
#   - one-process BP, BP on a quarter of the batch (one DDP rank without its all-reduce), the one-device LFNN-ℓ
#     trainer, per-block step times of BP, LFNN-ℓ and replay, per-block peak memory, and the projected 4-GPU step
#     of each method (pipelines, model-parallel BP, DDP with a ring all-reduce at NVLink 4's 450 GB/s per
#     direction) next to the paper's 2.07x / 2.21x (speedup.py --projection-only);
#   - peak GPU memory of BP and of the one-device LFNN-ℓ trainer (memory.py, max_memory_allocated);
# and then, on the machine's 16 CPU cores, a real K=4 run of every method, DDP and replay included:
# 4 processes x 4 threads (speedup.py, no GPU).
# Results land in $OUT/results.tgz (re-packed after every step, so a run cut short still returns what it
# measured) and the log in $OUT/gpu_check.log. Unpack into benchmarks/results/ and commit with the date.
set -u
# a dry run on a machine without a GPU (it refuses otherwise), sizes shrunk:
#   GPU_CHECK_DRY_RUN=1 GPU_CHECK_BATCH=8 GPU_CHECK_SIZE=64 GPU_CHECK_STEPS=2 bash ...
B=${GPU_CHECK_BATCH:-256} S=${GPU_CHECK_SIZE:-224} N=${GPU_CHECK_STEPS:-8} T=${GPU_CHECK_CPU_THREADS:-4}
OUT=${OUT:-/tmp/gpu_check_out}
RES=$(mktemp -d /tmp/gpu_check_results.XXXXXX)  # fresh: results of an earlier run never mix in
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
BUDGET=${GPU_CHECK_BUDGET_S:-510}  # seconds for the whole script
pack() { tar czf "$OUT/results.tgz" -C "$RES" . ; }
step() {  # step NAME SECONDS command...: a bounded step; a failure is logged and the next step runs
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" ${name%% *} "* ]]; then return; fi
  if [ $((SECONDS + limit)) -gt "$BUDGET" ]; then
    echo "--- $name skipped: ${limit}s would not fit in the $((BUDGET - SECONDS))s left"; return
  fi
  echo "=== $name ($(date -u +%FT%TZ), limit ${limit}s)"
  timeout "$limit" "$@" || echo "!!! $name failed or timed out (exit $?)"
  pack  # every step's results leave as soon as it ends
}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # offline: the wheels scripts/gpu_wheels.sh fetched
  # only for what the device lacks or cannot import: a carried wheel never shadows a package the device already has
  lacking=$(timeout 60 python3 - <<'PY'
import importlib
needs = {"timm": "timm", "safetensors": "safetensors", "yaml": "PyYAML"}
for module, wheel in needs.items():
    try:
        importlib.import_module(module)
        if module == "timm":
            from timm.layers import get_notrace_functions, get_notrace_modules  # noqa: F401 - lfnnify's tracer
    except Exception:
        print(wheel.lower().replace("-", "_"))
PY
)
  wheels=$(for name in $lacking; do ls .whl/ | grep -i "^${name}-" | sed 's|^|.whl/|'; done)
  if [ -n "$wheels" ]; then
    echo "installing carried wheels for what the device lacks: $lacking"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lfnnify-site $wheels \
      && export PYTHONPATH=/tmp/lfnnify-site:$PYTHONPATH || echo "!!! installing .whl/ failed"
  else
    echo "the device has every package lfnnify needs: no carried wheel installed"
  fi
fi

date -u; nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"; nproc
# preflight: everything this script needs, in seconds, with the reason when something is missing; then whether a
# GPU is visible (exit 3 when none is and no dry run was asked for), in the same process: one import of torch
timeout 45 python3 - <<'PY'
import importlib, os, sys
missing = []
for name in ("torch", "torchvision", "timm", "safetensors", "yaml", "tqdm", "matplotlib"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("preflight: missing Python packages: " + "; ".join(missing) + ". Carry them as wheels (device README).")
import torch, torchvision, timm
from timm.layers import get_notrace_functions, get_notrace_modules  # lfnnify's tracer needs timm's registries
import lfnnify
net = lfnnify.convert(timm.create_model("resnet18", num_classes=10), blocks=2, example_input=torch.zeros(1, 3, 32, 32))
print(f"preflight ok: python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"timm {timm.__version__}, lfnnify {lfnnify.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
if os.environ.get("GPU_CHECK_DRY_RUN", "0") != "1" and not torch.cuda.is_available():
    print("gpu_check: no CUDA device is visible here (torch.cuda.is_available() is False), so nothing was measured; "
          "run it on the GPU machine, or set GPU_CHECK_DRY_RUN=1 to try the script on the CPU")
    sys.exit(3)
PY
preflight=$?
[ "$preflight" = 3 ] && { pack; exit 3; }
[ "$preflight" = 0 ] || { echo "!!! preflight failed: nothing was measured (see the line above)"; pack; exit 2; }
[ "${GPU_CHECK_PREFLIGHT_ONLY:-0}" = 1 ] && { echo "preflight only: done"; pack; exit 0; }
step "paths" 150 python3 -m benchmarks.gpu_paths --out "$RES/gpu_paths.jsonl" --checks ${GPU_CHECK_PATHS:-trainer nonfinite cli pipeline}
for model in resnet101 resnet152; do
  step "projection $model" 90 python3 -m benchmarks.speedup --projection-only --no-cifar --model "$model" \
    --size "$S" --batch "$B" --classes 1000 --blocks 4 --threads 4 --warmup 3 --steps "$N" --balance flops \
    --out "$RES/speedup-$model-k4-gpu" --name "speedup-$model-k4-b$B-gpu"
done
for model in resnet101 resnet152; do
  step "memory $model" 50 python3 -m benchmarks.memory --model "$model" --size "$S" --batch "$B" --blocks 4 --steps 2 \
    --balance memory --out "$RES/memory-$model-k4-gpu"
done
# the 16 CPU cores, measured for real: K=4 processes x 4 threads, GPUs hidden
step "cpu16 K=4x4" 120 env CUDA_VISIBLE_DEVICES= python3 -m benchmarks.speedup --model resnet18 --size 32 \
  --batch 64 --blocks 4 --threads "$T" --warmup 2 --steps "$((N + 2))" --balance flops --repeats 1 \
  --out "$RES/speedup-resnet18-k4-cpu16" --name "speedup-resnet18-k4-cpu16"
date -u
