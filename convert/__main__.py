"""``python -m cheems_mlx.convert`` (also the ``cheems-convert`` script): convert a Cheems /
Doge checkpoint to an mlx-lm model folder.

Expected failures print ``error: <message>`` on stderr and exit with status 1; usage
errors exit with status 2 (argparse).
"""

import argparse
import sys
from typing import List, Optional

from .convert import DTYPES, ROUTINGS, convert
from .formats import FormatError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cheems_mlx.convert",
        description="Convert a Cheems / Doge checkpoint (local folder or Hugging Face Hub repo) to MLX.",
    )
    p.add_argument(
        "--hf-path",
        "--model",
        required=True,
        help="checkpoint folder (config.json + safetensors or PyTorch weights) or Hub repo id",
    )
    p.add_argument("--mlx-path", required=True, help="output folder (must not exist unless --force)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the saved parameters (default: the source weights' dtype); A and CDMoE keys stay float32",
    )
    p.add_argument("--force", action="store_true", help="replace --mlx-path if it exists")
    p.add_argument(
        "--moe-routing",
        choices=ROUTINGS,
        default=None,
        help="Doge MoE routing: transformers_reshape (default for Doge; reproduces transformers, "
        "non-causal across a full forward) or per_token (causal)",
    )
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    q = p.add_argument_group(
        "quantization",
        "as in mlx_lm.convert; the model keeps its routers and dt_proj in floating point "
        "(Model.quant_predicate). A quantized cheems_mlx folder is accepted only with "
        "--dequantize: to quantize it with other settings, dequantize it first.",
    )
    q.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    q.add_argument("--q-bits", type=int, default=None, help="bits per weight: 2, 3, 4, 5, 6 or 8 (default 4)")
    q.add_argument("--q-group-size", type=int, default=None, help="group size: 32, 64 or 128 (default 64)")
    q.add_argument(
        "--q-mode",
        default=None,
        help="affine (default), mxfp4 (4 bits, group 32), nvfp4 (4 bits, group 16) or mxfp8 (8 bits, group 32)",
    )
    q.add_argument(
        "--quant-predicate",
        default=None,
        help="mlx-lm mixed-bit recipe: mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6 (affine; sets the bits)",
    )
    q.add_argument("-d", "--dequantize", action="store_true", help="dequantize a quantized cheems_mlx folder")
    return p


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(
            args.hf_path,
            args.mlx_path,
            dtype=args.dtype,
            force=args.force,
            moe_routing=args.moe_routing,
            revision=args.revision,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_mode=args.q_mode,
            quant_predicate=args.quant_predicate,
            dequantize=args.dequantize,
        )
    except FormatError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. permission denied / disk full while writing the output
        name = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error:{name} {_one_line(e.strerror or e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
