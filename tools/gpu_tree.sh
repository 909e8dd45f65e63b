#!/usr/bin/env bash
# The device tool sends the whole working tree (tracked files too) plus carried paths, at
# most 64 MiB; the tracked tree alone is ~84 MB, mostly test fixtures the GPU check does
# not read. `hide` moves those out of the working tree (to $HIDDEN, default
# /tmp/sdserve-gpu-hidden) so that the tree plus .gpu/ fits; `restore` moves them back
# (and `git checkout` restores anything missing). The GPU check needs only tools/,
# assets/, tests/fixtures/sd1 and tests/fixtures/sdxl, and .gpu/.
#
# Usage: bash tools/gpu_tree.sh hide | restore | size
set -euo pipefail
cd "$(dirname "$0")/.."
HIDDEN=${HIDDEN:-/tmp/sdserve-gpu-hidden}
UNNEEDED=(
    models/shapes tests/fixtures/single tests/fixtures/sd2v tests/fixtures/sd1_inpaint
    tests/fixtures/controlnets tests/fixtures/loras tests/fixtures/reference
    tests/fixtures/samplers tests/fixtures/ip_adapters tests/fixtures/t2i_adapters
    tests/fixtures/single_file_layouts
)

size() {
    local tree carried
    tree=$(git ls-files -z --cached --others --exclude-standard |
        { xargs -0 stat -c %s 2>/dev/null || true; } | awk '{ bytes += $1 } END { print bytes + 0 }')
    carried=$(du -sb .gpu 2>/dev/null | cut -f1 || echo 0)
    echo "tree $((tree / 1048576)) MiB + .gpu $((${carried:-0} / 1048576)) MiB (limit 64 MiB)"
}

case "${1:-size}" in
hide)
    for path in "${UNNEEDED[@]}"; do
        if [ -e "$path" ]; then
            mkdir -p "$HIDDEN/$(dirname "$path")"
            mv "$path" "$HIDDEN/$path"
        fi
    done
    size
    ;;
restore)
    for path in "${UNNEEDED[@]}"; do
        if [ -e "$HIDDEN/$path" ] && [ ! -e "$path" ]; then
            mv "$HIDDEN/$path" "$path"
        fi
    done
    git checkout -- "${UNNEEDED[@]}"
    git status --short -- "${UNNEEDED[@]}"
    size
    ;;
size) size ;;
*)
    echo "usage: $0 hide | restore | size" >&2
    exit 2
    ;;
esac
