#!/usr/bin/env bash
# The paper-claim runs behind docs/paper-claims.md, in the budget of a 2-core CPU
# (about 100 minutes in all). Outputs go to OUT (default runs/paper); then
#   python examples/paper/report.py OUT
# writes docs/paper-claims.md's tables and plots.
#   bash examples/paper/run_all.sh [OUT] [KJV_DATA]
# KJV_DATA: the default model's prepared corpus (examples/default_model/reproduce.sh
# makes it as WORKDIR/kjvdata).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$PWD/runs/paper}"
DATA="${2:-$PWD/runs/kjvdata}"
mkdir -p "$OUT"

# 1. MQAR, length 256, width 64 (32 key-value pairs): 1,000 steps x 32 examples
for mixer in attention ssd dma cheems; do
    python "$HERE/mqar.py" --mixer "$mixer" --width 64 --seq-len 256 --steps 1000 \
        --batch-size 32 --eval-every 250 --out "$OUT/mqar"
done

# 2. RoPE on B and C inside SSD: the same hybrid with and without, three seeds each
for seed in 0 1 2; do
    for rope in on off; do
        python -m cheems_mlx.train fit --data "$DATA" --model-config "$HERE/rope_ssd_$rope.json" \
            --out "$OUT/rope/${rope}_seed$seed" --steps 200 --batch-size 16 --seq-len 256 \
            --warmup 20 --eval-every 200 --save-every 200 --eval-batches 12 --seed "$seed"
    done
done

# 3. MQAR, length 512, width 128 (64 key-value pairs): 300 steps x 16 examples
for mixer in attention ssd dma cheems; do
    python "$HERE/mqar.py" --mixer "$mixer" --width 128 --seq-len 512 --steps 300 \
        --batch-size 16 --warmup 30 --eval-every 100 --test-examples 256 --out "$OUT/mqar"
done
