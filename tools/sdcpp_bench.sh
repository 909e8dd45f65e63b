#!/usr/bin/env bash
# Times stable-diffusion.cpp (ggml, CPU) on the same SD 1.5 files as `sdserve bench`, for
# the "stable-diffusion.cpp (ggml)" section of BENCHMARKS.md (issue 9).
#
# What is timed: sd.cpp's own CLI (`sd-cli`) doing txt2img with the euler sampler,
# cfg-scale 7.5 (each step runs the UNet twice: cond and uncond as two batch-1 passes, not
# one batch-2 pass), f32 weights, N threads, at each size for two step counts. Per run we
# read sd.cpp's own log lines: text conditioning ("get_learned_condition completed"),
# sampling ("sampling completed"), VAE decode ("decode_first_stage completed"), and the
# progress bar's per-step seconds. Per-step figures: the difference of the sampling times
# of the two step counts divided by the step difference (cancels one-off costs such as
# graph set-up), and the median of the progress bar's steps after the first.
#
# Usage:
#   tools/sdcpp_bench.sh build SDCPP_SRC BUILD_DIR      # cmake Release, native, CPU only
#   tools/sdcpp_bench.sh run   BUILD_DIR MODEL OUT_DIR [TAG]
#   tools/sdcpp_bench.sh summary OUT_DIR
#   tools/sdcpp_bench.sh all   SDCPP_SRC BUILD_DIR MODEL OUT_DIR   # build, 2 rounds, summary
#
# SDCPP_SRC: a checkout of leejet/stable-diffusion.cpp (measured: commit 97d29908) with its
# ggml submodule in SDCPP_SRC/ggml (measured: ggml-org/ggml 8e800cef). MODEL: a diffusers
# folder (sd.cpp reads unet/, vae/, text_encoder/ itself) or a single-file checkpoint (see
# tools/sdcpp_model.py). Environment: SIZES (default "256 512"), STEPS (default "2 4"),
# THREADS (default 2), CMAKE (default cmake), SDCPP_EXTRA (extra sd-cli arguments, e.g.
# --diffusion-fa), CMAKE_EXTRA (extra configure options, e.g. -DGGML_LLAMAFILE=ON: ggml's
# tinyBLAS matrix products, off by default in sd.cpp's build and in the measured one).
set -euo pipefail

SIZES=${SIZES:-"256 512"}
STEPS=${STEPS:-"2 4"}
THREADS=${THREADS:-2}
CMAKE=${CMAKE:-cmake}
SDCPP_EXTRA=${SDCPP_EXTRA:-}
CMAKE_EXTRA=${CMAKE_EXTRA:-}

build() {
    local src=$1 build=$2
    # Partial source snapshots may lack the large tokenizer vocabularies of other model
    # families (T5, Qwen, Mistral, Gemma...); SD 1.x only uses the CLIP one. An absent one
    # gets an empty array so the library still compiles; an SD 1.x run never reads it.
    local vocab=$src/src/tokenizers/vocab
    test -f "$vocab/clip_merges.hpp" || { echo "missing $vocab/clip_merges.hpp (SD 1.x needs it)" >&2; exit 1; }
    # Header -> array name, as vocab.cpp at 97d29908 includes and reads them.
    local pair header symbol
    for pair in gemma2_merges:gemma2_merges_utf8_c_str gemma2_vocab:gemma2_vocab_json_utf8_c_str \
        gemma_merges:gemma_merges_utf8_c_str gemma_vocab:gemma_vocab_json_utf8_c_str \
        gpt_oss_merges:gpt_oss_merges_utf8_c_str gpt_oss_vocab:gpt_oss_vocab_json_utf8_c_str \
        mistral_merges:mistral_merges_utf8_c_str mistral_vocab:mistral_vocab_json_utf8_c_str \
        qwen_merges:qwen2_merges_utf8_c_str t5:t5_tokenizer_json_str umt5:umt5_tokenizer_json_str; do
        header=${pair%%:*}.hpp symbol=${pair##*:}
        if [ ! -s "$vocab/$header" ]; then
            echo "placeholder for absent $header" >&2
            printf '// absent from this snapshot; unused by SD 1.x\nstatic const unsigned char %s[] = {0};\n' \
                "$symbol" >"$vocab/$header"
        fi
    done
    "$CMAKE" -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DSD_WEBP=OFF -DSD_WEBM=OFF $CMAKE_EXTRA
    "$CMAKE" --build "$build" -j"$(nproc)" --target sd-cli
    "$build/bin/sd-cli" --version 2>/dev/null || true
}

run_round() {
    local build=$1 model=$2 out=$3 tag=${4:-r$(date +%s)}
    mkdir -p "$out"
    local size steps log model_flag=-m
    for size in $SIZES; do
        for steps in $STEPS; do
            log=$out/s${size}-n${steps}-${tag}.log
            echo "sd.cpp ${size}² ${steps} steps ($tag) -> $log" >&2
            # shellcheck disable=SC2086
            /usr/bin/time -v "$build/bin/sd-cli" $model_flag "$model" \
                -p "a photograph of an astronaut riding a horse" \
                -W "$size" -H "$size" --steps "$steps" --cfg-scale 7.5 \
                --sampling-method euler --seed 42 -t "$THREADS" --type f32 --eager-load \
                -o "$out/s${size}-n${steps}-${tag}.png" -v $SDCPP_EXTRA >"$log" 2>&1
        done
    done
}

summary() {
    python3 - "$1" <<'PY'
import pathlib, re, statistics, sys
from collections import defaultdict

out = pathlib.Path(sys.argv[1])
runs = defaultdict(list)  # (size, steps) -> [dict]
for log in sorted(out.glob("s*-n*-*.log")):
    size, steps = map(int, re.match(r"s(\d+)-n(\d+)-", log.name).groups())
    text = log.read_text(errors="replace")
    def taking(label):
        m = re.search(re.escape(label) + r" completed, taking ([\d.]+)s", text)
        return float(m.group(1)) if m else None
    # The progress bar rewrites one line with '\r'; keep the last figure shown per step.
    per_step = {}
    for step, value, unit in re.findall(r"\|\s*(\d+)/\d+ - ([\d.]+)(s/it|it/s)", text):
        v = float(value)
        per_step[int(step)] = v if unit == "s/it" else 1.0 / v
    # One line per text-encoder graph: the prompt, then the empty negative prompt.
    graphs = [float(ms) / 1000 for ms in
              re.findall(r"computing condition graph completed, taking (\d+) ms", text)]
    tiled = "processing " in text and " tiles" in text  # sd.cpp logs its tile count
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    runs[(size, steps)].append({
        "te": taking("get_learned_condition"),
        "te_graphs": graphs,
        "tiled": tiled,
        "sampling": taking("sampling"),
        "vae": taking("decode_first_stage"),
        "steps": [per_step[k] for k in sorted(per_step)],
        "rss_gib": int(rss.group(1)) / 2**20 if rss else None,
        "log": log.name,
    })

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")

print(f"sd.cpp runs in {out}")
for (size, steps), rs in sorted(runs.items()):
    for r in rs:
        print(f"  {r['log']}: text {r['te']} s (graphs {r['te_graphs']}), sampling {r['sampling']} s, "
              f"per-step {['%.2f' % s for s in r['steps']]}, VAE {r['vae']} s, "
              f"peak RSS {r['rss_gib'] and round(r['rss_gib'], 2)} GiB, VAE tiling {r['tiled']}")
print("medians (wall s):")
for size in sorted({k[0] for k in runs}):
    counts = sorted(n for (s, n) in runs if s == size)
    line = f"  {size}²:"
    te = med([r["te"] for n in counts for r in runs[(size, n)]])
    one_prompt = med([g for n in counts for r in runs[(size, n)] for g in r["te_graphs"]])
    vae = med([r["vae"] for n in counts for r in runs[(size, n)]])
    later = med([s for n in counts for r in runs[(size, n)] for s in r["steps"][1:]])
    first = med([r["steps"][0] for n in counts for r in runs[(size, n)] if r["steps"]])
    line += f" text encoder (2 prompts) {te:.3f}, per prompt {one_prompt:.3f}, VAE decode {vae:.3f}, guided step (progress bar, steps >= 2) {later:.3f}, first step {first:.3f}"
    if len(counts) >= 2:
        lo, hi = counts[0], counts[-1]
        slope = (med([r["sampling"] for r in runs[(size, hi)]]) -
                 med([r["sampling"] for r in runs[(size, lo)]])) / (hi - lo)
        line += f", guided step (sampling {hi} - {lo} steps) {slope:.3f}"
    rss = max((r["rss_gib"] or 0) for n in counts for r in runs[(size, n)])
    line += f", peak RSS {rss:.2f} GiB"
    print(line)
PY
}

case ${1:-} in
build) build "$2" "$3" ;;
run) run_round "$2" "$3" "$4" "${5:-}" ;;
summary) summary "$2" ;;
all)
    build "$2" "$3"
    run_round "$3" "$4" "$5" r1
    run_round "$3" "$4" "$5" r2
    summary "$5"
    ;;
*)
    sed -n '2,26p' "$0"
    exit 2
    ;;
esac
