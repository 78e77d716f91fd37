#!/usr/bin/env bash
# A small draft model for speculative decoding with the embedded default model as target:
# the same corpus (KJV, see examples/default_model/reproduce.sh) tokenized with the default
# model's own tokenizer (`prepare --tokenizer`), so the two share token ids; 2 layers (one
# SSD, one DMA), d 128, no experts: 0.9M parameters against the target's 8.8M. About 10 min
# on 2 CPU cores.
#   bash examples/draft_model/reproduce.sh [WORKDIR]
#   python -m cheems_mlx.generate --draft-model WORKDIR/draft_model --num-draft-tokens 3 --prompt "..."
#   python -m cheems_mlx.bench speculative --draft-model WORKDIR/draft_model --out docs/bench
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${1:-$PWD/runs}"
mkdir -p "$WORK"
if [ ! -f "$WORK/kjv_chapters.txt" ]; then
    if ! command -v bible >/dev/null; then
        apt-get install -y -qq bible-kjv >/dev/null || (apt-get update -qq && apt-get install -y -qq bible-kjv)
    fi
    bible -f "gen1:1-rev22:21" > "$WORK/kjv.txt"
    python "$HERE/../default_model/prepare_kjv.py" "$WORK/kjv.txt" "$WORK/kjv_chapters.txt"
fi
DEFAULT_MODEL="$(python -c 'from cheems_mlx.loading import resolve_model_path; print(resolve_model_path(None))')"
python -m cheems_mlx.train prepare --text "$WORK/kjv_chapters.txt" --out "$WORK/draftdata" \
    --tokenizer "$DEFAULT_MODEL"
python -m cheems_mlx.train fit --data "$WORK/draftdata" --model-config "$HERE/model_config.json" \
    --out "$WORK/draft" --steps 600 --eval-every 200 --save-every 200 --eval-batches 8
python -m cheems_mlx.train export --run "$WORK/draft" --out "$WORK/draft_model" --dtype float16 --force
