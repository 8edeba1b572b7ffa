"""A multi-turn conversation through the model's chat template: the history is a list of messages.

    python examples/chat.py
"""

import argparse

import mlxllama

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default")
parser.add_argument("--max-tokens", type=int, default=48)
parser.add_argument("--backend", default="auto", choices=["auto", "mlx", "numpy"])
args = parser.parse_args()

model, tokenizer = mlxllama.load(args.model, backend=args.backend)
messages = [{"role": "system", "content": "You are a concise assistant."}]
for question in ["What is the capital of France?", "And what river runs through it?"]:
    messages.append({"role": "user", "content": question})
    reply = mlxllama.generate(model, tokenizer, messages, max_tokens=args.max_tokens)
    messages.append({"role": "assistant", "content": reply})
    print(f">> {question}\n{reply}\n")
