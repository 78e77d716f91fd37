#!/usr/bin/env bash
# Reproduces the embedded default model (cheems_mlx/default_model/) from scratch.
#   bash examples/default_model/reproduce.sh [WORKDIR]
# Corpus: the King James Version of the Bible (public domain) from Debian's bible-kjv
# package (installed here, never at run time). About 45 min on 2 CPU cores.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${1:-$PWD/runs}"
mkdir -p "$WORK"
if ! command -v bible >/dev/null; then
    apt-get install -y -qq bible-kjv >/dev/null || (apt-get update -qq && apt-get install -y -qq bible-kjv)
fi
bible -f "gen1:1-rev22:21" > "$WORK/kjv.txt"
python "$HERE/prepare_kjv.py" "$WORK/kjv.txt" "$WORK/kjv_chapters.txt"
python -m cheems_mlx.train prepare --text "$WORK/kjv_chapters.txt" --out "$WORK/kjvdata" \
    --vocab-size 4096 --val-fraction 0.05
python -m cheems_mlx.train fit --data "$WORK/kjvdata" --model-config "$HERE/model_config.json" \
    --out "$WORK/default" --steps 800 --eval-every 100 --save-every 100 --eval-batches 12
python -m cheems_mlx.train export --run "$WORK/default" --out "$WORK/default_model" --dtype float16 --force
python -m cheems_mlx.evaluate --model "$WORK/default_model" --data "$WORK/kjvdata" --split val
