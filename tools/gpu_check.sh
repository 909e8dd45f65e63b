#!/usr/bin/env bash
# The GPU check, run ON the lent device machine (one H200, no network, no Rust; CUDA 13,
# PyTorch and transformers in python3) from the repository root, with .gpu/ carried (made
# by tools/gpu_prepare.sh on a development machine). In one command, well inside 10 min:
#
#   1. smoke and parity: sdserve generate on the tiny fixtures (tests/fixtures/sd1, sdxl)
#      on cuda in f32, f16 and bf16 against the same request on the CPU in f32;
#   2. full-size random SD 1.5 and SDXL base, made on the GPU in fp16 from assets/configs
#      (tools/make_random_model.py; nothing is downloaded);
#   3. SD 1.5 512×512 and SDXL 1024×1024, 30 Euler steps with guidance: `sdserve bench`
#      (f16, cuda) then tools/gpu_bench_diffusers.py (fp16, same files, same GPU), with
#      the GPU memory used by each (nvidia-smi, sampled every 100 ms) and a table of ratios.
#
# Everything is logged to $OUT/gpu_check.log (the device tool brings $OUT back).
# Env: GPU_CHECK_SKIP_SDXL=1 (SD 1.5 only), GPU_CHECK_STEPS (default 30),
#      GPU_CHECK_REPEATS (default 3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
STEPS=${GPU_CHECK_STEPS:-30}
REPEATS=${GPU_CHECK_REPEATS:-3}
WORK=/tmp/gpu-check-work
mkdir -p "$WORK"
SDSERVE=$WORK/sdserve
if [ -f .gpu/sdserve.gz ]; then
    gunzip -c .gpu/sdserve.gz >"$SDSERVE" && chmod +x "$SDSERVE"
elif [ -f .gpu/sdserve ]; then
    cp .gpu/sdserve "$SDSERVE"
fi
started=$(date +%s)
stamp() { echo "=== [$(($(date +%s) - started)) s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
command -v nvcc >/dev/null && nvcc --version | tail -1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# Python packages the image lacks travel as wheels in .gpu/whl.
if ! python3 -c 'import diffusers' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c 'import diffusers; print("diffusers", diffusers.__version__)' || echo "NO DIFFUSERS"

# sdserve links libcudart/libcublas/libcublasLt/libnvrtc (.so.13) and libcurand (.so.10):
# the image has them in PyTorch's nvidia wheels; libcuda.so.1 comes with the driver.
lib_dirs=$(python3 - <<'EOF'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
wanted = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13"]
dirs = []
for root in roots:
    for name in wanted:
        for path in glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True):
            d = os.path.dirname(path)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="$lib_dirs:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:${LD_LIBRARY_PATH:-}"
if [ ! -x "$SDSERVE" ]; then
    echo "NO SDSERVE BINARY at $SDSERVE: run tools/gpu_prepare.sh and carry .gpu"
    SDSERVE=""
else
    ldd "$SDSERVE" | grep -E 'libcu|not found'
    if ldd "$SDSERVE" | grep -q 'not found'; then
        echo "sdserve is missing the libraries above (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
    fi
fi

# Runs "$@" while sampling the GPU's used memory; prints the peak afterwards.
with_gpu_memory() {
    local label=$1
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$WORK/mem.$label" &
    local sampler=$!
    "$@"
    local status=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    echo "$label: peak GPU memory used $(sort -n "$WORK/mem.$label" | tail -1) MiB (nvidia-smi, whole GPU)"
    return $status
}

if [ -n "$SDSERVE" ]; then
    stamp "smoke and parity on the tiny fixtures (cuda vs cpu f32, 8-bit images)"
    for family in sd1 sdxl; do
        generate() {
            "$SDSERVE" generate --model "tests/fixtures/$family" --prompt "a red cube on a table" \
                --steps 8 --seed 42 --sampler euler --width 64 --height 64 "$@" 2>&1 |
                grep -v '^step '
        }
        generate --device cpu --dtype f32 --output "$WORK/$family-cpu-f32.png" || true
        for dtype in f32 f16 bf16; do
            generate --device cuda --dtype $dtype --output "$WORK/$family-cuda-$dtype.png" || true
        done
        python3 - "$WORK" "$family" <<'EOF'
import sys, numpy as np
from PIL import Image
work, family = sys.argv[1:]
def load(tag):
    try:
        return np.asarray(Image.open(f"{work}/{family}-{tag}.png").convert("RGB"), dtype=np.int16)
    except Exception as error:
        print(f"{family} {tag}: no image ({error})")
ref = load("cpu-f32")
for dtype in ("f32", "f16", "bf16"):
    got = load(f"cuda-{dtype}")
    if ref is not None and got is not None:
        diff = np.abs(ref - got)
        print(f"{family} cuda {dtype} vs cpu f32: max |d| {diff.max()}/255, mean {diff.mean():.3f}/255")
EOF
    done
fi

stamp "full-size random models (fp16, made on the GPU)"
python3 tools/make_random_model.py --family sd1 --out "$WORK/sd15" --device cuda --dtype fp16
if [ -z "${GPU_CHECK_SKIP_SDXL:-}" ]; then
    python3 tools/make_random_model.py --family sdxl --out "$WORK/sdxl" --device cuda --dtype fp16
fi

bench_pair() {
    local name=$1 size=$2 repeats=$3
    if [ -n "$SDSERVE" ]; then
        stamp "sdserve $name ${size}x${size}"
        with_gpu_memory "sdserve-$name" "$SDSERVE" bench --model "$WORK/$name" --device cuda \
            --dtype f16 --size "$size" --repeats "$repeats" --request-steps "$STEPS" \
            --vae-tiling off | tee "$OUT/sdserve-$name.txt"
    fi
    stamp "diffusers $name ${size}x${size}"
    with_gpu_memory "diffusers-$name" python3 tools/gpu_bench_diffusers.py --model "$WORK/$name" \
        --size "$size" --dtype fp16 --repeats "$repeats" --steps "$STEPS" | tee "$OUT/diffusers-$name.txt"
}
bench_pair sd15 512 "$REPEATS"
if [ -z "${GPU_CHECK_SKIP_SDXL:-}" ]; then
    bench_pair sdxl 1024 "$REPEATS"
fi

stamp "side by side (median seconds; ratio = sdserve / diffusers)"
python3 - "$OUT" <<'EOF'
import re, sys, os
out = sys.argv[1]
line = re.compile(r"^(.*?)\s+median\s+([\d.]+) s")
def parse(path):
    parts = {}
    if os.path.exists(path):
        for text in open(path):
            m = line.match(text)
            if m:
                parts[m.group(1).strip()] = float(m.group(2))
    return parts
for name in ("sd15", "sdxl"):
    ours, theirs = parse(f"{out}/sdserve-{name}.txt"), parse(f"{out}/diffusers-{name}.txt")
    if not ours and not theirs:
        continue
    print(f"{name}: {'part':<34} {'sdserve':>9} {'diffusers':>10} {'ratio':>7}")
    for part in list(dict.fromkeys(list(theirs) + list(ours))):
        a, b = ours.get(part, float("nan")), theirs.get(part, float("nan"))
        print(f"{name}: {part:<34} {a:>9.3f} {b:>10.3f} {a / b if b else float('nan'):>7.2f}")
EOF
stamp "done"
sleep 1 # let tee write the last lines
