"""Stream tokens as they are generated, with sampling, and print mlx-lm style statistics at the end.

    python examples/stream.py --prompt "Tell me a short story." --temperature 0.7 --top-p 0.9 --seed 0
"""

import argparse

import mlxllama

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default")
parser.add_argument("--prompt", default="Tell me a short story about a robot.")
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--temperature", type=float, default=0.7)
parser.add_argument("--top-p", type=float, default=0.9)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--backend", default="auto", choices=["auto", "mlx", "numpy"])
args = parser.parse_args()

model, tokenizer = mlxllama.load(args.model, backend=args.backend)
last = None
for r in mlxllama.stream_generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens, chat=True,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed):
    print(r.text, end="", flush=True)
    last = r
print()
print(f"prompt: {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tok/s; "
      f"generation: {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s; "
      f"finish: {last.finish_reason}; peak memory {last.peak_memory:.2f} GB")
