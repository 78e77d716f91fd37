"""One rank of the sharded-model runs of test_distributed.py (started with MLX_RANK and
MLX_HOSTFILE, as mlx.launch starts it).

    python tests/dist_worker.py OUT_DIR PROMPT_IDS_JSON MODEL_DIR [MODEL_DIR ...]

For every model folder: load it shard by shard, then write OUT_DIR/rank{r}_{k}.npz with
the full-forward logits of the prompt, the logits of the same tokens fed through the
caches (a prefill, then one token at a time), 10 greedy tokens from mlx-lm's
generate_step, and this rank's parameter bytes and peak memory while loading.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np


def main():
    from mlx_lm.generate import generate_step

    from cheems_mlx import distributed

    out, ids, models = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
    group = distributed.init(30)
    r = group.rank()
    ids = mx.array(ids)[None]
    for k, path in enumerate(models):
        mx.reset_peak_memory()
        model, _ = distributed.sharded_load(path, group)
        peak_load = mx.get_peak_memory()
        full = model(ids)
        cache = model.make_cache()
        split = ids.shape[1] // 2
        steps = [model(ids[:, :split], cache=cache)]
        for t in range(split, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache=cache))
        decode = mx.concatenate(steps, axis=1)
        mx.eval(full, decode)
        tokens = [int(tok) for tok, _ in generate_step(ids[0, :8], model, max_tokens=10)]
        # generate_step leaves the next token computing on its own stream: wait for it, or
        # its collectives would interleave with the next ones and pair up wrongly
        mx.synchronize()
        np.savez(
            out / f"rank{r}_{k}.npz",
            full=np.array(full), decode=np.array(decode), tokens=np.array(tokens),
            param_bytes=distributed.parameter_bytes(model), peak_load=peak_load,
        )
        del model, cache
    distributed.finish(group)


if __name__ == "__main__":
    main()
