#!/usr/bin/env bash
# The GPU column of docs/speed.md and docs/overhead.md: the CPU tables' benchmarks, same scripts and models, on CUDA.
#
# Run by hand on a machine with a GPU, from the repository root (CI never runs this):
#
#     bash benchmarks/gpu_column.sh [OUTPUT_DIR]
#
# Each benchmark's full output goes to OUTPUT_DIR (default: $OUT if set, else benchmarks/results/gpu), one text file
# per benchmark, and a short summary is printed last. Each part runs under its own time limit, so one failure or
# overrun loses that part only. Environment:
#   DEVICE=cuda|cpu  default cuda when torch sees a GPU, else cpu (the CPU tables' commands are in docs/speed.md)
#   QUICK=1          smallest settings (a smoke test of this script, seconds per part; figures meaningless)
#   PKG=DIR          where lightning_align and example_modules are imported from (default: the repository root)
#   BUDGET=SECONDS   stop starting parts this long after the start (each part's limit is cut to what is left)
#   WHEELS=DIR       wheels to install first with pip --no-index --no-deps (pyhessian, curvlinops and their
#                    dependencies for a machine without internet), into a temporary folder on PYTHONPATH
set -u
OUTDIR=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
PKG=${PKG:-.}
if [ -n "${WHEELS:-}" ]; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
fi
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-0}
T0=$(date +%s)

{
    date -u +"date %Y-%m-%d %H:%M UTC"
    echo "commit $(cat "$PKG/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch, lightning; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "lightning", lightning.__version__); print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
    "$PY" -c 'import importlib.metadata as m, pyhessian, curvlinops; print("PyHessian", m.version("pyhessian"), "curvlinops", m.version("curvlinops-for-pytorch"))' 2>&1 | tail -1
    echo "DEVICE=$DEVICE QUICK=$QUICK PKG=$PKG"
} 2>&1 | tee "$OUTDIR/env.txt"

STATUS=()
part() {  # part NAME SECONDS COMMAND...: run one benchmark into OUTDIR/NAME.txt under a time limit
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    if [ "$BUDGET" -gt 0 ]; then
        local left=$((BUDGET - (start - T0)))
        if [ "$left" -lt 10 ]; then
            STATUS+=("$name: skipped (budget spent): $*")
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "\$ $*" >>"$OUTDIR/$name.txt"
    timeout "$limit" "$@" >>"$OUTDIR/$name.txt" 2>&1
    rc=$?
    STATUS+=("$name: rc $rc, $(($(date +%s) - start)) s")
    echo "== $name: rc $rc, $(($(date +%s) - start)) s: $*"
}

if [ "$QUICK" = 1 ]; then
    part syncs 60 "$PY" benchmarks/gpu_syncs.py --device "$DEVICE" --models mlp --every 2
    part sharpness 60 "$PY" benchmarks/sharpness.py --device "$DEVICE" --model mlp --width 32 --depth 2 --batch 64 --rounds 0 --repeats 1 --curvlinops
    part overhead 60 "$PY" benchmarks/overhead.py --device "$DEVICE" --implied --model quickstart --steps 4 --every 2 --repeats 1
    part ntk_memory 60 "$PY" benchmarks/ntk_memory.py --device "$DEVICE" --models resnet --steps 2
    part ntk 60 "$PY" benchmarks/ntk.py --device "$DEVICE" --repeats 1 --n-large 256
    part sharpness_overhead 60 "$PY" benchmarks/sharpness_overhead.py --device "$DEVICE" --epochs 1 --repeats 1
else
    # the settings of the CPU tables (docs/speed.md, docs/overhead.md), fewer repeats where marked
    part syncs 45 "$PY" benchmarks/gpu_syncs.py --device "$DEVICE"
    for model in mlp conv gpt; do
        part sharpness 40 "$PY" benchmarks/sharpness.py --device "$DEVICE" --model $model --rounds 0 --repeats 3 --curvlinops
    done
    part overhead 40 "$PY" benchmarks/overhead.py --device "$DEVICE" --implied --model quickstart --steps 40 --every 10 --repeats 2
    part overhead 40 "$PY" benchmarks/overhead.py --device "$DEVICE" --implied --model resnet --steps 40 --every 10 --repeats 2
    part overhead 60 "$PY" benchmarks/overhead.py --device "$DEVICE" --implied --model gpt --steps 30 --every 10 --repeats 1
    part ntk_memory 100 "$PY" benchmarks/ntk_memory.py --device "$DEVICE" --models gpt hf_gpt2 resnet --products --repeats 3
    part ntk 30 "$PY" benchmarks/ntk.py --device "$DEVICE" --repeats 3
    part sharpness_overhead 40 "$PY" benchmarks/sharpness_overhead.py --device "$DEVICE" --repeats 1  # CPU table: 3 repeats
fi

echo
echo "=== summary ($OUTDIR) ==="
cat "$OUTDIR/env.txt"
printf '%s\n' "${STATUS[@]}"
for f in syncs sharpness overhead ntk_memory ntk sharpness_overhead; do
    [ -f "$OUTDIR/$f.txt" ] || continue
    echo "--- $f"
    case $f in
        syncs) grep -E "^self-check|products, .* syncs|^ +[0-9]+ +lightning_align/measure/lanczos|profiler" "$OUTDIR/$f.txt" ;;
        sharpness) grep -E "^model:|^reference|tol=|faster|one Hessian" "$OUTDIR/$f.txt" ;;
        overhead) grep -E "one training step|^[A-Z][A-Za-z]+ +[0-9]+ |^whole suite" "$OUTDIR/$f.txt" ;;
        ntk_memory) grep -E "^(gpt|hf_gpt2|resnet) |one training step|^(torch\.func|kept)" "$OUTDIR/$f.txt" ;;
        ntk) grep -E "^full|^traced|lanczos|ms =" "$OUTDIR/$f.txt" ;;
        sharpness_overhead) grep -E "^quickstart|^(probe|defaults)" "$OUTDIR/$f.txt" ;;
    esac
    grep -E "^[A-Za-z]*Error|Traceback" "$OUTDIR/$f.txt" | head -5
done
