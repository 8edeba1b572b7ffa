"""Speculative decoding on real task shapes: plain against speculative greedy decoding, and llama.cpp's prompt
lookup decoding (llama-cpp-python's LlamaPromptLookupDecoding) on the same prompt token ids.

    python benchmarks/speculative.py                          # SmolLM2 default, numpy, 128 tokens, median of 3
    python benchmarks/speculative.py --backends numpy,mlx --reps 1 --n-gen 64
    python benchmarks/speculative.py --draft-model path/to/small-model --modes lookup,draft

Tasks (mlxllama.bench.speculative.TASKS, chat-templated): continue a quotation from a given passage, rewrite a
function with one change, summarize a text (prompt lookup finds their output in the prompt) and a free-form
question (the hard case: little to look up, so speculation has to back off). Each run is greedy, at most --n-gen
tokens, stopping at an end token; tok/s counts the tokens after the first (prefill excluded). Repetitions of every
engine and mode are interleaved, so that a shared machine's changing load hits each alike; tok/s is the median,
"x plain" the median of each run's ratio to the plain run just before it.

Columns: accept = kept drafts / drafted tokens; tok/fwd = tokens per target forward pass; eff. score = tok/s x the
bytes a plain decode step reads (the backend's weights as held, plus the KV cache at the mean context) / bandwidth
(the chip's rated bandwidth, else the measured read bandwidth): above 1.0 is past the batch-1 roofline. "same"
says whether the tokens equal that engine's plain greedy tokens. Targets (issue #14), numpy backend: quote and code
>= 1.8x plain with an effective score > 1.0; free >= 0.95x plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxllama import backends  # noqa: E402
from mlxllama.api import resolve  # noqa: E402
from mlxllama.bench import roofline  # noqa: E402
from mlxllama.bench import speculative as sb  # noqa: E402
from mlxllama.speculative import SpeculativeConfig, check_vocabulary  # noqa: E402


def llama_cpp_runner(gguf: Path, threads: int, n_ctx: int, num_pred: int):
    """(plain, lookup) generate functions over llama-cpp-python, or a reason it is not available."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as e:
        return f"llama-cpp-python not installed ({e})"
    if gguf.suffix != ".gguf":
        return "llama.cpp needs a .gguf model"
    kw = dict(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    llms = {"plain": Llama(**kw), "lookup": Llama(**kw, draft_model=LlamaPromptLookupDecoding(
        num_pred_tokens=num_pred))}

    def run(mode: str, ids: list[int], n_gen: int):
        llm = llms[mode]
        llm.reset()
        eos = llm.token_eos()
        out, t_first = [], None
        for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(int(t))
            if t == eos or len(out) >= n_gen:
                break
        elapsed = time.perf_counter() - t_first
        return out, (len(out) - 1) / elapsed if elapsed > 0 and len(out) > 1 else 0.0

    return run


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--backends", default="numpy", help="comma-separated: numpy, mlx")
    ap.add_argument("--modes", default="lookup", help="comma-separated: lookup, draft")
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--tasks", default=",".join(sb.TASKS))
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--num-draft", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (on a shared machine its two-thread "
                                                           "OpenMP barrier collapses when another process holds a core)")
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s to score against (default: the chip's "
                                                                  "rated bandwidth, else measured)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def _ours(args, path: Path, modes: list, tasks: list):
    """mlxllama's engines, one per backend: (engines, costs, ids_by_task). engines: name -> (run(mode, ids, n_gen)
    -> (tokens, tps, stats), bytes per token at ctx, bandwidth, what it is, modes); costs: name -> () ->
    verification costs, measured after the runs."""
    costs, engines, ids_by_task = {}, {}, None
    for name in [b for b in args.backends.split(",") if b]:
        ops = backends.get_ops(name)
        model, tok, acc = sb.load_for_bench(path, ops)
        draft = None
        if "draft" in modes:
            draft, dtok, _ = sb.load_for_bench(args.draft_model, ops)
            check_vocabulary(tok, dtok, model.args, draft.args)
        eos = set(tok.eos_ids) | set(model.args.eos_token_id)
        ids_by_task = ids_by_task or {t: sb.task_ids(tok, t) for t in tasks}
        bw, bw_what = sb.bandwidth_for(ops, args.bandwidth)

        def run(mode, ids, n_gen, model=model, eos=eos, draft=draft):
            config = None if mode == "plain" else SpeculativeConfig(mode, args.num_draft,
                                                                    draft_model=draft if mode == "draft" else None)
            r = sb.timed_generation(model, ids, n_gen, eos, config, mode=mode)
            return r.tokens, r.tps, r.stats

        engines[f"mlxllama {name}"] = (run, acc.bytes_per_token, bw, bw_what, ["plain"] + modes)
        costs[f"mlxllama {name}"] = lambda model=model: sb.verification_costs(model, ids_by_task[tasks[0]])
        print(f"mlxllama {name}: scored against {bw:.1f} GB/s ({bw_what}); {acc.weight_bytes_per_token / 1e6:.0f} MB "
              "of weights read per plain step", file=sys.stderr)
    return engines, costs, ids_by_task


def _add_llama_cpp(args, path: Path, ids_by_task: dict, engines: dict) -> None:
    n_ctx = max(len(v) for v in ids_by_task.values()) + args.n_gen + 64
    runner = llama_cpp_runner(path, args.threads, n_ctx, args.num_draft)
    if isinstance(runner, str):
        print(f"llama.cpp skipped: {runner}", file=sys.stderr)
        return
    from mlxllama import loaders

    a, w, _ = loaders.load(path)
    acc = roofline.account_weights(a, w, kv_bytes=2)  # GGUF blocks as stored, f16 KV
    bw, bw_what = sb.bandwidth_for(backends.get_ops("numpy"), args.bandwidth)
    engines["llama.cpp"] = (lambda mode, ids, n: (*runner(mode, ids, n), None), acc.bytes_per_token, bw, bw_what,
                            ["plain", "lookup"])


def _rows(results: dict, engines: dict, ids_by_task: dict) -> list:
    rows = []
    for (task, engine, mode), runs in results.items():
        _, per_ctx, bw, _, _ = engines[engine]
        tokens = runs[0][0]
        tps = statistics.median(r[1] for r in runs)
        stats = runs[0][2]
        plain_tokens = results[(task, engine, "plain")][0][0]
        ctx = len(ids_by_task[task]) + len(tokens) / 2
        rows.append(dict(task=task, engine=engine, mode=mode, n_gen=len(tokens), tps=tps, tps_runs=[r[1] for r in runs],
                         acceptance=None if stats is None or mode == "plain" or not stats.drafted
                         else stats.acceptance_rate,
                         tokens_per_forward=(1.0 if mode == "plain" else None) if stats is None or mode == "plain"
                         else stats.tokens_per_forward,
                         score=roofline.bandwidth_score(per_ctx(ctx), tps, bw),
                         same=tokens == plain_tokens if mode != "plain" else ""))
    return rows


def _print_table(rows: list, results: dict) -> None:
    # x plain: the median over repetitions of each run's tok/s over the plain run just before it (same engine and
    # task), which a shared machine's slow drifts in load affect less than a ratio of medians
    ratio = {(task, engine, mode): statistics.median(r[1] / p[1] for r, p in zip(runs, results[(task, engine, "plain")]))
             for (task, engine, mode), runs in results.items()}
    cols = ("task", "engine", "mode", "tokens", "tok/s", "x plain", "accept", "tok/fwd", "eff. score", "same")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [r["task"], r["engine"], r["mode"], str(r["n_gen"]), f"{r['tps']:.1f}",
                 f"{ratio[(r['task'], r['engine'], r['mode'])]:.2f}",
                 "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
                 "-" if r["tokens_per_forward"] is None else f"{r['tokens_per_forward']:.2f}",
                 f"{r['score']:.2f}", {True: "yes", False: "no", "": ""}[r["same"]]]
        print("| " + " | ".join(cells) + " |")


def _each_run(tasks: list, engines: dict):
    """(task, engine, run, mode) for every run of one repetition, in the order they are timed."""
    for task in tasks:
        for engine, (run, _, _, _, emodes) in engines.items():
            for mode in emodes:
                yield task, engine, run, mode


def main() -> int:
    args = _parser().parse_args()
    modes = [m for m in args.modes.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    path = resolve(args.model)
    engines, costs, ids_by_task = _ours(args, path, modes, tasks)
    if not args.no_llama_cpp:
        _add_llama_cpp(args, path, ids_by_task, engines)

    for task, _, run, mode in _each_run(tasks, engines):  # untimed: compiles, thread counts and pass costs
        run(mode, ids_by_task[task], min(args.n_gen, 16))
    results: dict = {}
    for rep in range(args.reps):
        for task, engine, run, mode in _each_run(tasks, engines):
            tokens, tps, stats = run(mode, ids_by_task[task], args.n_gen)
            results.setdefault((task, engine, mode), []).append((tokens, tps, stats))
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)

    rows = _rows(results, engines, ids_by_task)
    _print_table(rows, results)
    for engine, (_, _, bw, what, _) in engines.items():
        print(f"\n{engine}: effective score against {bw:.1f} GB/s ({what})", end="")
    print()
    for engine, measure in costs.items():
        print(f"\n{engine}: one forward pass scoring r positions, after the {tasks[0]} prompt (best of 5):\n")
        print(sb.format_costs(measure()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
