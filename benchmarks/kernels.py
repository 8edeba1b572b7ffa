"""The fused CPU kernel (mlxllama/backends/qmatvec.py) on this machine: a 4096 x 4096 4-bit matrix (group 64,
float16 scales), one thread, per number of input rows.

    python benchmarks/kernels.py                   # the path this CPU uses, int16 and int8 inputs, and BLAS
    python benchmarks/kernels.py --isa generic,avx2 --rows 1,8,32 --reps 5

The cells time PackedLinear as the numpy backend calls it, so a row count runs the tiles it would there (octets of
weight rows against tiles of 8, 4, 2 or 1 input rows). "int8" rounds the inputs to llama.cpp's q8 steps (127) and
takes the int8 dot products (four inputs a 32-bit lane: vpdpbusd, or vpmaddubsw on avx2) where int16 takes pairs.

For each row count it prints G weights/s (weights read per second: the matrix's size over the time), G multiply-
adds/s (rows x weights over the time) and GB/s (the matrix's bytes over the time), for each kernel path and input
width, and for "blas": numpy's float32 sgemm on the weights dequantized once beforehand (not timed), the ceiling of
any dequantize-and-BLAS way, which the numpy backend took for long prefills before the octet tiles passed it at every
row count (numpy_kernels.fused_matmul). The last row, "ceiling", is each path's own multiply-add instruction run
alone on one core (no loads, decoding or scaling): the peak its cells are a share of. Each cell is the best of
--reps runs, the cells interleaved (A B A B) so that a shared machine's load hits each alike; compare cells of one
run only. Times are the calling thread's CPU time (everything runs on it), so that on a shared machine the slices
other processes take are not counted (--wall for the wall clock). The machine's lscpu model and flags are printed
first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

N = 4096


def lscpu() -> tuple[str, str]:
    """lscpu's model name and the SIMD flags that matter here."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no lscpu)", ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown").strip()
    flags = fields.get("Flags", "").split()
    keep = [f for f in flags if f.startswith(("avx", "fma", "f16c", "sse4", "amx")) or f in ("asimd", "asimddp")]
    return model, " ".join(keep)


def cells(args) -> list[tuple[str, object]]:
    from mlxllama.backends import qmatvec
    from mlxllama.quant import quantize

    rng = np.random.default_rng(0)
    qw = quantize(rng.standard_normal((N, N)).astype(np.float16), 64, 4)
    out = []
    for isa in args.isa:
        for act in args.act:
            out.append((f"{isa} int{act}", qmatvec.PackedLinear([qw], isa, act)))
    if args.blas:
        out.append(("blas", qmatvec.PackedLinear([qw], "generic", 16)))
    return out


CHAINS = 12  # independent sums in the ceiling's loop: enough to hide the multiply-add's latency on current cores


def ceiling(isa: str, act: int, seconds: float = 0.3) -> float:
    """G multiply-adds/s of the path's own multiply-add (what _pair_sums or _quad_sums emits for 4-bit codes) on
    this core: CHAINS independent sums, no loads, no decoding, no scaling. The kernel's rates over this are the
    share of the instruction's peak the rest of its work leaves."""
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    import llvmlite.ir as ir
    from mlxllama.backends import qmatvec as q

    v8, v16 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.IntType(16), 16)
    narrow = isa == "avx2" and act == 8  # 4-bit codes: vpmaddubsw into int16 sums (qmatvec._quad_sums)

    def opaque(builder, v):  # a fresh value each turn, or LLVM hoists the products out of the loop
        return builder.call(ir.InlineAsm(ir.FunctionType(v.type, [v.type]), "", "=x,0", side_effect=True), [v])

    def step(builder, acc, codes, x):
        if act == 16:
            return q._dp(builder, isa, acc, builder.bitcast(codes, v16), builder.bitcast(x, v16))
        return q._dq(builder, isa, narrow, acc, codes, x)

    @intrinsic
    def loop(typingctx, n, seed):
        def codegen(context, builder, sig, args):
            s = q._splat(builder, builder.trunc(args[1], ir.IntType(32)), 8)
            codes, x = builder.and_(s, ir.Constant(v8, [0x0F0F0F0F] * 8)), builder.add(s, ir.Constant(v8, [3] * 8))
            zero = ir.Constant(v16 if narrow else v8, None)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(CHAINS)]
            with cgutils.for_range(builder, args[0]):
                for a in accs:
                    builder.store(step(builder, builder.load(a), opaque(builder, codes), x), a)
            total = builder.bitcast(builder.load(accs[0]), v8)
            for a in accs[1:]:
                total = builder.add(total, builder.bitcast(builder.load(a), v8))
            return builder.sext(builder.extract_element(total, ir.Constant(ir.IntType(32), 0)), ir.IntType(64))
        return types.int64(types.int64, types.int64), codegen

    run = njit(lambda n, seed: loop(n, seed))
    run(10, 1)
    macs = CHAINS * 8 * (2 if act == 16 else 4)  # a call: eight lanes of pairs or of quads
    n, best = 1 << 16, float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.thread_time()
        run(n, 7)
        best = min(best, time.thread_time() - t)
    return n * macs / best / 1e9


def timer(name: str, packed, rows: int):
    """A function running one product of `rows` rows (input rounding included)."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, N)).astype(np.float32)
    y = np.empty((rows, N), np.float32)
    if name == "blas":
        weights = packed.dequantize(0, N, np.empty((N, N), np.float32))

        def run():
            np.matmul(x, weights.T, out=y)
    else:
        bufs = packed.input_buffers(rows)

        def run():
            packed.rows(packed.quantize_input(x, bufs), y, 0, N)
    run()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default="", help="comma-separated kernel paths (default: the one this CPU uses)")
    ap.add_argument("--act", default="16,8", help="input widths, bits (16, 8)")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128", help="row counts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-blas", dest="blas", action="store_false", help="skip the sgemm cells")
    ap.add_argument("--wall", action="store_true", help="time by the wall clock instead of this thread's CPU time")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.wall else time.thread_time
    from threadpoolctl import threadpool_limits

    from mlxllama.backends import qmatvec

    args.isa = args.isa.split(",") if args.isa else [qmatvec.kernel_isa()]
    args.act = [int(a) for a in args.act.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    model, flags = lscpu()
    print(f"CPU: {model}\nflags: {flags}\nkernel paths on this CPU: {', '.join(qmatvec.available_isas())}; "
          f"in use: {qmatvec.kernel_isa()}\none thread, timed by {'wall clock' if args.wall else 'its CPU time'}; "
          "4096 x 4096 4-bit, group 64: "
          f"{N * N / 2 / 1e6 + N * N // 64 * 4 / 1e6:.1f} MB\n")
    kinds = cells(args)
    paths = {f"{isa} int{act}": (isa, act) for isa in args.isa for act in args.act}
    best: dict[tuple[str, int], float] = {}
    with threadpool_limits(1):
        runs = {(name, r): timer(name, packed, r) for name, packed in kinds for r in rows}
        for _ in range(args.reps):
            for key, run in runs.items():
                t = clock()
                run()
                best[key] = min(best.get(key, float("inf")), clock() - t)
    nbytes = kinds[0][1].nbytes
    print(f"| rows | {' | '.join(f'{name}: Gw/s, GMAC/s, GB/s' for name, _ in kinds)} |")
    print("|---:|" + "---|" * len(kinds))
    for r in rows:
        parts = [f"{N * N / best[name, r] / 1e9:.1f}, {r * N * N / best[name, r] / 1e9:.1f}, "
                 f"{nbytes / best[name, r] / 1e9:.1f}" for name, _ in kinds]
        print(f"| {r} | {' | '.join(parts)} |")
    peaks = [f"{ceiling(*paths[name]):.1f}" if name in paths else "-" for name, _ in kinds]
    print(f"| ceiling, GMAC/s | {' | '.join(peaks)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
