#!/usr/bin/env bash
# The paper-claim runs behind docs/paper-claims.md, in the budget of a 2-core CPU
# (about 110 minutes in all). Outputs go to OUT (default runs/paper); then
#   python examples/paper/report.py OUT
# writes the tables and plots in docs/paper/ that docs/paper-claims.md shows.
#   bash examples/paper/run_all.sh [OUT] [KJV_DATA] [SECTION ...]
# SECTION: mqar256, rope, mqar512, mqar64 (default: all four, in that order).
# KJV_DATA: the default model's prepared corpus (examples/default_model/reproduce.sh
# makes it as WORKDIR/kjvdata).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$PWD/runs/paper}"
DATA="${2:-$PWD/runs/kjvdata}"
mkdir -p "$OUT"
SECTIONS=("${@:3}")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(mqar256 rope mqar512 mqar64)

mqar256() {
# 1. MQAR, length 256, width 64, 16 key-value pairs, 512-token vocabulary: 1,000 steps x 32
for mixer in attention ssd dma cheems; do
    python "$HERE/mqar.py" --mixer "$mixer" --width 64 --seq-len 256 --num-kv-pairs 16 \
        --vocab-size 512 --steps 1000 --batch-size 32 --eval-every 200 --test-examples 256 --out "$OUT/mqar"
done
}

rope() {
# 2. RoPE on B and C inside SSD: the same hybrid with and without, three seeds each
for seed in 0 1 2; do
    for rope in on off; do
        python -m cheems_mlx.train fit --data "$DATA" --model-config "$HERE/rope_ssd_$rope.json" \
            --out "$OUT/rope/${rope}_seed$seed" --steps 200 --batch-size 16 --seq-len 256 \
            --warmup 20 --eval-every 200 --save-every 200 --eval-batches 12 --seed "$seed"
    done
done
}

mqar512() {
# 3. MQAR, length 512, width 128, 32 key-value pairs, 512-token vocabulary: 150 steps x 16
for mixer in attention ssd dma cheems; do
    python "$HERE/mqar.py" --mixer "$mixer" --width 128 --seq-len 512 --num-kv-pairs 32 \
        --vocab-size 512 --steps 150 --batch-size 16 --warmup 15 --eval-every 75 --test-examples 128 \
        --out "$OUT/mqar"
done
}

mqar64() {
# 4. MQAR, length 64, width 64, 4 key-value pairs, 512-token vocabulary: 2,000 steps x 32
for mixer in attention ssd dma cheems; do
    python "$HERE/mqar.py" --mixer "$mixer" --width 64 --seq-len 64 --num-kv-pairs 4 \
        --vocab-size 512 --steps 2000 --batch-size 32 --eval-every 250 --test-examples 256 --out "$OUT/mqar"
done
}

for section in "${SECTIONS[@]}"; do
    "$section"
done
