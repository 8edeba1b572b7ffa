"""Convert a model (here the default GGUF) into an MLX folder, optionally requantized, then load it back.

    python examples/convert.py /tmp/smollm2-mlx
    python examples/convert.py /tmp/smollm2-8bit --quantize --bits 8 --group-size 64
"""

import argparse

import mlxllama
from mlxllama.convert import convert_model

parser = argparse.ArgumentParser()
parser.add_argument("dst")
parser.add_argument("--model", default="default")
parser.add_argument("--quantize", action="store_true")
parser.add_argument("--bits", type=int, default=4)
parser.add_argument("--group-size", type=int, default=64)
parser.add_argument("--backend", default="auto", choices=["auto", "mlx", "numpy"])
parser.add_argument("--force", action="store_true")
args = parser.parse_args()

out = convert_model(args.model, args.dst, quantize=args.quantize, bits=args.bits, group_size=args.group_size,
                    force=args.force)
print(f"wrote {out}")
model, tokenizer = mlxllama.load(str(out), backend=args.backend)
print(mlxllama.generate(model, tokenizer, "Say hello.", max_tokens=16, chat=True))
