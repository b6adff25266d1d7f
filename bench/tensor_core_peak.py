"""The tensor cores' own rate in int8, float8 and bf16, with no memory traffic: each program
loads one x tile and one w tile once, then runs `tl.dot` on them `--iters` times into one
accumulator. What separates an int8 GEMM from a float8 one at the same tile shape (session 11:
17-25% slower, the cause not found) is then either this rate or the GEMM's loads and epilogue.

    PYTHONPATH=. python3 bench/tensor_core_peak.py --json bench/tensor_core_peak_h100.json

Run `nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv -lms 100` beside it to
see whether a dtype lowers the clock; each row prints its wall-clock start and end for that.
Each row: dtype, tile (BLOCK_M x BLOCK_N x BLOCK_K), warps, programs, TFLOP/s (2 per
multiply-add), the wgmma instruction shapes in the PTX and its `wgmma.wait_group` counts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samq_fx.report import format_table  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

DTYPES = {"int8": torch.int8, "float8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
TILES = (  # (BLOCK_M, BLOCK_N, BLOCK_K for 8-bit, warps); bf16 takes half the K
    (64, 128, 128, 4), (64, 256, 128, 4), (128, 128, 128, 4), (128, 128, 128, 8),
    (128, 256, 128, 8),
)  # fmt: skip

if triton is not None:

    @triton.jit
    def _dot_loop(X, W, OUT, ITERS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, INT8: tl.constexpr):  # fmt: skip
        """acc += x·wᵀ ITERS times on tiles loaded once; the sum is stored so nothing is dead."""
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * BLOCK_K + ks[None, :])
        w = tl.load(W + cols[:, None] * BLOCK_K + ks[None, :])
        if INT8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(ITERS):
            acc = tl.dot(x, w.T, acc, out_dtype=acc.dtype)
        pid = tl.program_id(0)
        out = OUT + pid * BLOCK_M * BLOCK_N + rows[:, None] * BLOCK_N + cols[None, :]
        tl.store(out, acc.to(tl.float32))


def _operands(dtype: str, bm: int, bn: int, bk: int, device: str):
    """Small integers, exact in every dtype, so the loop's sums can be checked exactly."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x, w = (torch.randint(-3, 4, shape, generator=gen) for shape in ((bm, bk), (bn, bk)))
    return x.to(DTYPES[dtype]).to(device), w.to(DTYPES[dtype]).to(device)


def run(dtype: str, tile: tuple, iters: int, programs: int, device: str) -> dict:
    """One dtype at one tile: checks the sum against PyTorch, then times the loop."""
    bm, bn, bk, warps = tile
    if dtype == "bf16":
        bk //= 2
    x, w = _operands(dtype, bm, bn, bk, device)
    out = torch.empty(programs, bm, bn, dtype=torch.float32, device=device)

    def call(n_iter: int):
        return _dot_loop[(programs,)](
            x, w, out, n_iter, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INT8=dtype == "int8",
            num_warps=warps, num_stages=1,
        )  # fmt: skip

    compiled = call(3)
    expect = 3 * (x.double().cpu() @ w.double().cpu().t())
    if not torch.equal(out[0].double().cpu(), expect):  # small integers: exact in every dtype
        raise AssertionError(f"{dtype} {tile}: the loop's sum is not 3·x·wᵀ")
    row = {"dtype": dtype, "tile": f"{bm}x{bn}x{bk}", "warps": warps, "programs": programs,
           "iters": iters}  # fmt: skip
    if device == "cuda":
        from triton.testing import do_bench

        started = time.time()
        ms = do_bench(lambda: call(iters), warmup=50, rep=300)
        flops = 2.0 * bm * bn * bk * iters * programs
        row |= {"ms": ms, "tflops": flops / ms / 1e9, "start": started, "end": time.time()}
        ptx = compiled.asm.get("ptx", "")
        shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
        row["wgmma"] = " ".join(shapes) or ("mma.sync" if "mma.sync" in ptx else "none")
        row["wait_groups"] = " ".join(sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))))  # fmt: skip
        row["registers"] = compiled.n_regs
    return row


def _cell(v):
    return f"{v:.0f}" if isinstance(v, float) else v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--iters", type=int, default=4096)
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    if device == "cpu" and "bf16" in args.dtypes:  # Triton 3.8's interpreter loads bf16 wrong
        args.dtypes.remove("bf16")
    rows = []
    for tile in TILES:
        for per_sm in args.programs_per_sm:
            for dtype in args.dtypes:
                row = run(dtype, tile, args.iters, sms * per_sm, device)
                row["programs_per_sm"] = per_sm
                rows.append(row)
                print(json.dumps(row), flush=True)
    if device == "cuda":
        cols = ["dtype", "tile", "warps", "programs_per_sm", "tflops", "registers", "wgmma",
                "wait_groups"]  # fmt: skip
        print(format_table(cols, [[_cell(r.get(c, "")) for c in cols] for r in rows]))
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "torch": torch.__version__, "triton": triton.__version__, "date": time.ctime()}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
