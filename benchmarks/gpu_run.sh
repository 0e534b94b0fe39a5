#!/usr/bin/env bash
# Issues 18 and 14's GPU measurements in one go, on one H100/H200 (at most about 10 minutes; STAGE=reduction
# about 8, STAGE=steps about 3):
#
#   bash benchmarks/gpu_run.sh        # from the repository root; results in $OUT (default ./gpu-out)
#   (worst case about 7.5 minutes: each benchmark is ended at its budget + 10 s; a device run
#   with timeout_s 480 leaves it room)
#
# Writes at most 7 files to $OUT: env.txt (GPU, versions), run.log (everything printed),
# sensitivity.json (benchmarks/sensitivity.py: planted 1 % bugs on the 1B model in bf16),
# 1b.json (--path reduction: passes, training step, audit with 1 and 3 reductions),
# 8b.json (the same on the 8B shape), 8b-default.json (every default path and reduction within
# --max-memory 74.5), 1b-steps.json (--path trainer,accelerate against their
# own minimal passes). The 8B modes run each in its own process with its own timeout within a
# budget: an out-of-memory mode, one that times out or one that no time is left for is
# recorded as such in the JSON and the table, never a crash or a hang. The 1B modes run in one
# process each benchmark (--in-process: one start-up, the allocator emptied between modes),
# ended from outside at their budget; every JSON is rewritten after each mode, so an ended
# benchmark still leaves what it measured.
#
# The GPU machine's image has torch, transformers, accelerate and pandas. Where transformers or
# accelerate is missing there (or LOSSAUDIT_WHEELS=1), wheels from .whl/ are installed into
# /tmp/site first. Download them here, in the repository root, and carry .whl:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl transformers==5.25.0 accelerate==1.16.0
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
PY="${PY:-python3}"
# A dry run off the GPU: DEVICE=cpu DTYPE=float32 SMALL=tiny BIG=tiny OUT=/tmp/x bash benchmarks/gpu_run.sh
DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bfloat16}" SMALL="${SMALL:-1b}" BIG="${BIG:-8b}"

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if ! $PY -c 'import torch, transformers, accelerate' 2>>"$LOG" || [ "${LOSSAUDIT_WHEELS:-0}" = 1 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        say "installing .whl/ into /tmp/site"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl >>"$LOG" 2>&1 || say "wheel install failed"
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        say "transformers or accelerate missing and no .whl/ to install from"
    fi
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY - <<'EOF' 2>&1
import platform, torch, transformers
import lossaudit
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "lossaudit", getattr(lossaudit, "__version__", "?"))
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30, "GiB")
EOF
    git log --oneline -1 2>/dev/null
} > "$OUT/env.txt"
cat "$OUT/env.txt" >> "$LOG"

bench() {  # NAME BUDGET_S MODE_TIMEOUT_S ARGS...: one benchmark, killed at its budget plus a margin
    local name=$1 budget=$2 per_mode=$3
    shift 3
    say "bench $name (budget ${budget}s, ${per_mode}s per mode): $*"
    timeout -k 5 $((budget + 10)) $PY benchmarks/bench_audit.py --device "$DEVICE" --dtype "$DTYPE" \
        --budget "$budget" --timeout "$per_mode" --json "$OUT/$name.json" "$@" >>"$LOG" 2>&1
    say "bench $name: exit $?"
}

# The most wanted first: the 1B times (targets 1.15 and 1.10) and the bf16 sensitivity, then the
# 8B memory (1.4x the training step with one reduction; 75 GiB for the default audit within an
# 80 GB card's 74.5 GiB), then the Trainer and accelerate paths against their own passes (1.5).
# STAGE=reduction or STAGE=steps runs only that half (two shorter device runs).
STAGE="${STAGE:-all}"
if [ "$STAGE" != steps ]; then
    bench "$SMALL" 80 60 --size "$SMALL" --path reduction --in-process
    say "sensitivity $SMALL: a 1 % rescale and a 1 % reweighting must be found in $DTYPE, the correct loss must pass"
    (cd benchmarks && timeout -k 5 90 $PY sensitivity.py --size "$SMALL" --device "$DEVICE" --dtype "$DTYPE" \
        --json "$OUT/sensitivity.json" >>"$LOG" 2>&1); say "sensitivity: exit $?"
    bench "$BIG" 110 50 --size "$BIG" --path reduction
    bench "$BIG-default" 200 190 --size "$BIG" --path default --max-memory 74.5
fi
if [ "$STAGE" != reduction ]; then
    bench "$SMALL-steps" 150 120 --size "$SMALL" --path trainer,accelerate --in-process
fi
say "done"
