"""``python -m cheems_mlx.server``: mlx-lm's OpenAI-compatible HTTP server on our models.

Everything (routes, streaming, batching, prompt-cache reuse) is mlx-lm's; the one
change is the loader: models load through ``cheems_mlx.load`` (our classes, no
``--trust-remote-code``, the embedded default model when ``--model`` is omitted).
"""

import sys


def _load(model_path, adapter_path=None, tokenizer_config=None, return_config=False, **_):
    from .loading import load

    if model_path in (None, "default_model"):
        model_path = None
    return load(model_path, tokenizer_config=tokenizer_config, adapter_path=adapter_path, return_config=return_config)


def main(argv=None):
    import mlx_lm.server as server

    from .loading import LoadError, resolve_model_path

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    if "--model" not in sys.argv:
        try:  # fail now, not at the first request
            resolve_model_path(None)
        except LoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    server.load = _load
    server.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
