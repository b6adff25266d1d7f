"""Prototype: an int8 GEMM whose tensor-core work is pipelined across K steps, written in Gluon.

Why: Triton's Hopper pipeliner makes a `tl.dot` asynchronous only when its accumulator is
float32, so `samq_fx.gemm_epilogue`'s int8 kernels wait for every K step's wgmma before issuing
the next (`wgmma.wait_group 0`; the float8 kernels keep one in flight, `wait_group 1`), and they
take 17-36% longer than the float8 ones (best configs; same tile shapes) (bench/RESULTS.md, session 11).
Gluon issues wgmma itself: `warpgroup_mma(..., is_async=True)` then `warpgroup_mma_wait(1)`.

The kernel: persistent (one program an SM walks the output tiles), a ring of STAGES TMA-loaded
(x, w) tiles, int32 sums, and the int8 linear's epilogue of `gemm_epilogue`
((acc - col_zero[n])·col_scale[n]·s_x + bias[n], bf16 out). The next tile's first loads are
issued before this tile's epilogue, so they overlap it.

    PYTHONPATH=. python3 bench/int8_gluon_gemm.py --compile-only   # any machine: the PTX's wgmma
    PYTHONPATH=. python3 bench/int8_gluon_gemm.py --json bench/int8_gluon_gemm_h100.json   # Hopper
    PYTHONPATH=. python3 bench/int8_gluon_gemm.py --programs-per-sm 1 2   # two programs an SM too

On a GPU it checks each result against exact sums and times it against this project's Triton
int8 and float8 kernels on SAM-B's encoder shapes. Result (H100, session 11): the same values,
and no faster than the Triton int8 kernel (qkv 0.151 against 0.141 ms, lin2 0.142 against
0.143; float8 0.118 / 0.125), so the unpipelined wgmma is not what the int8 gap costs. Kept as
the measurement that shows it, and as a base for int8 kernels Triton's `tl.dot` cannot express.
Session 16 found the tensor cores' int8 rate at or above float8's (bench/tensor_core_peak.py)
and our Triton int8 kernels fastest at two programs an SM, one's drain and epilogue under the
other's tensor-core loop; `--programs-per-sm 2` runs this kernel that way (the configs with 2
stages, or 64-deep K steps, take 98 KB of shared memory: two fit an SM), which session 11 did
not time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from functools import partial
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INT8_WGMMA_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)
"""The N of an int8 wgmma instruction (PTX allows these; 256 is float-only in Triton)."""


@triton.constexpr_function
def _warps_per_cta(block_m, num_warps):
    return [num_warps, 1] if block_m >= 16 * num_warps else [4, num_warps // 4]


@triton.constexpr_function
def _instr_n(block_m, block_n, num_warps):
    n_reps = triton.cdiv(num_warps, triton.cdiv(block_m, 16))
    max_n = max(block_n // n_reps, 8)
    return next(n for n in INT8_WGMMA_N if n <= max_n and block_n % n == 0)


@gluon.jit
def _tile_offsets(tile, num_m, num_n, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr):  # fmt: skip
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_rows
    pid_n = (tile % per_group) // group_rows
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _issue_loads(x_desc, w_desc, x_ring, w_ring, ready, loads, off_m, off_n, k,
                 BYTES: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    slot = loads % STAGES
    mbarrier.expect(ready.index(slot), BYTES)
    tma.async_copy_global_to_shared(x_desc, [off_m, k], ready.index(slot), x_ring.index(slot))
    tma.async_copy_global_to_shared(w_desc, [off_n, k], ready.index(slot), w_ring.index(slot))
    return loads + 1


@gluon.jit
def _int8_linear_kernel(
    x_desc, w_desc, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, M, N, K,
    HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
    NUM_PROGRAMS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BLOCK_M: gl.constexpr = o_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = o_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0],
        warps_per_cta=_warps_per_cta(BLOCK_M, num_warps),
        instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 32],
    )
    x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [BLOCK_M, BLOCK_N], o_desc.layout)

    num_m = gl.cdiv(M, BLOCK_M)
    num_n = gl.cdiv(N, BLOCK_N)
    num_tiles = num_m * num_n
    k_tiles = gl.cdiv(K, BLOCK_K)
    loads = 0  # ring fills so far, over every tile: slot = count % STAGES
    used = 0  # ring slots consumed so far; phase = (count // STAGES) & 1
    tile = gl.program_id(0)
    off_m, off_n = _tile_offsets(tile, num_m, num_n, GROUP_M, BLOCK_M, BLOCK_N)
    for i in gl.static_range(STAGES - 1):  # the first tile's first K steps
        if i < k_tiles:
            loads = _issue_loads(x_desc, w_desc, x_ring, w_ring, ready, loads, off_m, off_n,
                                 i * BLOCK_K, BYTES, STAGES)  # fmt: skip
    while tile < num_tiles:
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, mma)
        for ki in range(k_tiles):
            slot = used % STAGES
            mbarrier.wait(ready.index(slot), (used // STAGES) & 1)
            x_tile = x_ring.index(slot)
            w_tile = w_ring.index(slot)
            acc = warpgroup_mma(x_tile, w_tile.permute((1, 0)), acc, is_async=True)
            # one wgmma left in flight: step ki - 1's is done, so its slot takes a new load
            acc, _, _ = warpgroup_mma_wait(1, deps=(acc, x_tile, w_tile))
            used += 1
            if ki + STAGES - 1 < k_tiles:
                loads = _issue_loads(x_desc, w_desc, x_ring, w_ring, ready, loads, off_m, off_n,
                                     (ki + STAGES - 1) * BLOCK_K, BYTES, STAGES)  # fmt: skip
        acc = warpgroup_mma_wait(0, deps=(acc,))
        # the next tile's first loads go out now and overlap this tile's epilogue
        next_tile = tile + NUM_PROGRAMS
        next_m, next_n = _tile_offsets(next_tile, num_m, num_n, GROUP_M, BLOCK_M, BLOCK_N)
        if next_tile < num_tiles:
            for i in gl.static_range(STAGES - 1):
                if i < k_tiles:
                    loads = _issue_loads(x_desc, w_desc, x_ring, w_ring, ready, loads, next_m,
                                         next_n, i * BLOCK_K, BYTES, STAGES)  # fmt: skip
        cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        n_ok = cols < N
        col_zero = gl.load(COL_ZERO + cols, mask=n_ok, other=0)
        col_scale = gl.load(COL_SCALE + cols, mask=n_ok, other=0.0) * gl.load(SCALES)
        y = (acc - col_zero[None, :]).to(gl.float32) * col_scale[None, :]
        if HAS_BIAS:
            y = y + gl.load(BIAS + cols, mask=n_ok, other=0.0).to(gl.float32)[None, :]
        tma.store_wait(pendings=0)  # the last tile's store has left o_smem
        o_smem.store(y.to(o_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [off_m, off_n], o_smem)
        tile = next_tile
        off_m = next_m
        off_n = next_n
    tma.store_wait(pendings=0)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))


def _descriptors(x, w, out, block: tuple[int, int, int]):
    bm, bn, bk = block
    layout = gl.NVMMASharedLayout.get_default_for
    return (
        TensorDescriptor.from_tensor(x, [bm, bk], layout([bm, bk], gl.int8)),
        TensorDescriptor.from_tensor(w, [bn, bk], layout([bn, bk], gl.int8)),
        TensorDescriptor.from_tensor(out, [bm, bn], layout([bm, bn], gl.bfloat16)),
    )


def linear(x, w, col_zero, col_scale, scales, bias, *, block=(128, 128, 128), stages=4,
           num_warps=8, programs=None) -> torch.Tensor:  # fmt: skip
    """(x·wᵀ - col_zero)·col_scale·scales[0] + bias, bf16: `gemm_epilogue`'s int8 linear."""
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    tiles = triton.cdiv(m, block[0]) * triton.cdiv(n, block[1])
    if programs is None:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    programs = min(programs, tiles)
    _int8_linear_kernel[(programs,)](
        *_descriptors(x, w, out, block), bias if bias is not None else scales, scales,
        col_zero, col_scale, m, n, k, HAS_BIAS=bias is not None, STAGES=stages, GROUP_M=8,
        NUM_PROGRAMS=programs, num_warps=num_warps)  # fmt: skip
    return out


def compile_only(block=(128, 128, 128), stages=4, num_warps=8) -> dict:
    """Compile for sm_90a without a GPU; what the PTX holds."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    m, n, k = 32768, 2304, 768
    x = torch.zeros(m, k, dtype=torch.int8)
    w = torch.zeros(n, k, dtype=torch.int8)
    out = torch.zeros(m, n, dtype=torch.bfloat16)
    args = dict(zip(("x_desc", "w_desc", "o_desc"), _descriptors(x, w, out, block)))
    signature = {name: mangle_type(desc) for name, desc in args.items()}
    signature |= {"BIAS": "*bf16", "SCALES": "*fp32", "COL_ZERO": "*i32", "COL_SCALE": "*fp32",
                  "M": "i32", "N": "i32", "K": "i32"}  # fmt: skip
    constexprs = {"HAS_BIAS": True, "STAGES": stages, "GROUP_M": 8, "NUM_PROGRAMS": 132,
                  "num_warps": num_warps}  # fmt: skip
    signature |= dict.fromkeys(constexprs, "constexpr")
    source = GluonASTSource(_int8_linear_kernel, signature, constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})  # fmt: skip
    ptx = kernel.asm["ptx"]
    return {
        "block": list(block), "stages": stages, "num_warps": num_warps,
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx))),
        "wait_group": sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))),
        "shared_bytes": kernel.metadata.shared,
    }  # fmt: skip


def _exact(x, w, col_zero, col_scale, scales, bias) -> torch.Tensor:
    sums = x.double() @ w.double().t()
    return (sums - col_zero.double()) * col_scale.double() * scales[0].double() + bias.double()


SHAPES = {
    "qkv": (32768, 2304, 768),
    "proj": (32768, 768, 768),
    "lin1": (32768, 3072, 768),
    "lin2": (32768, 768, 3072),
}
"""SAM-B's encoder linears at batch 8 (lin1 without its GELU)."""


GLUON_CONFIGS = (  # (block, stages, warps): one program an SM, and configs whose shared memory
    # (stages x (x + w tiles) + the bf16 output tile) fits two programs an SM
    ((128, 128, 128), 4, 8),
    ((128, 256, 128), 3, 8),
    ((128, 128, 128), 3, 4),
    ((128, 256, 64), 4, 8),
    ((128, 128, 128), 2, 4),
    ((128, 128, 64), 4, 4),
    ((128, 128, 128), 2, 8),
)


def gpu_rows(shapes, programs_per_sm=(1,)) -> list[dict]:
    from triton.testing import do_bench

    from samq_fx.gemm_epilogue import Int8Operands, launch

    rows = []
    dev = "cuda"
    for name in shapes:
        m, n, k = SHAPES[name]
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
        w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
        col_zero = 3 * w.sum(1, dtype=torch.int32)
        col_scale = torch.rand(n, device=dev, generator=g) * 1e-4
        scales = torch.tensor([1e-3, 1.0, 0.0], device=dev)
        bias = torch.randn(n, device=dev, generator=g).bfloat16()
        x8 = (torch.randn(m, k, device=dev, generator=g) * 30).to(torch.float8_e4m3fn)
        w8 = (torch.randn(n, k, device=dev, generator=g) * 9).to(torch.float8_e4m3fn)
        want = _exact(x, w, col_zero, col_scale, scales, bias)
        ops = Int8Operands(col_zero, col_scale)
        variants = {
            "triton int8 (gemm_epilogue.launch)": partial(
                launch, x, w, scales, bias, "none", codes="none", int8=ops,
                out_dtype=torch.bfloat16),
            "triton float8 (gemm_epilogue.launch)": partial(
                launch, x8, w8, scales, bias, "none", codes="none", out_dtype=torch.bfloat16),
        }  # fmt: skip
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        for (block, stages, warps), per_sm in itertools.product(GLUON_CONFIGS, programs_per_sm):
            variants[f"gluon int8 {block} s={stages} w={warps} x{per_sm}"] = partial(
                linear, x, w, col_zero, col_scale, scales, bias, block=block, stages=stages,
                num_warps=warps, programs=sms * per_sm)  # fmt: skip
        for label, fn in variants.items():
            row = {"shape": name, "M": m, "N": n, "K": k, "kernel": label}
            try:
                got = fn()
                if "int8" in label:
                    err = (got.double() - want).abs().max() / want.abs().max()
                    row["max_rel_err"] = float(err)
                row["ms"] = do_bench(fn, warmup=10, rep=60, return_mode="median")
                row["tops"] = 2 * m * n * k / row["ms"] / 1e9
            except Exception as err:  # a config that does not build: say so and go on
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--programs-per-sm", type=int, nargs="+", default=[1],
        help="persistent programs an SM (2: one's epilogue under the other's tensor-core loop)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.compile_only:
        rows = [compile_only(b, s, w) for b, s, w in GLUON_CONFIGS]
        for row in rows:
            print(json.dumps(row))
    else:
        rows = gpu_rows(args.shapes, tuple(args.programs_per_sm))
    if args.json:
        meta = {"triton": triton.__version__, "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
