"""Generate text from a prompt with the Python API.

    python examples/generate.py --prompt "Why is the sky blue?" --max-tokens 64
"""

import argparse

import mlxllama

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default", help="folder, .gguf file, HF repo id or 'default'")
parser.add_argument("--prompt", default="Write one sentence about memory bandwidth.")
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--backend", default="auto", choices=["auto", "mlx", "numpy"])
args = parser.parse_args()

model, tokenizer = mlxllama.load(args.model, backend=args.backend)
text = mlxllama.generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens, chat=True, verbose=False)
print(text)
