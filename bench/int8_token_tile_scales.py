"""Whether int8-dynamic's MLP can skip its bf16 round trip: per-token scales against scales per
token and 128-column tile (1 x 128 groups, as DeepSeek-V3's float8 recipe scales activations).

int8-dynamic quantizes each activation row with its own scale. lin2's input rows are 3072 wide,
and the GEMM tile that writes them (lin1's) holds 128 columns of a row, so lin1 writes bf16 and
a separate pass quantizes it (bench/RESULTS.md, session 20: 0.196 ms a block on SAM-B at batch 8,
plus 0.07 ms of lin1's wider output). With a scale per row and 128-column tile, lin1's epilogue
can write lin2's codes itself; lin2's K loop then rescales each 128-deep tile's int32 sums by
its rows' scales before adding them up. This script times both pipelines' kernels on SAM-B's
MLP at batch 8, on the persistent TMA GEMM at `_pick`'s usual tile (128 x 128 x 128, 4 warps,
3 stages, two programs an SM):

  lin1, bf16 out       `gemm_epilogue._linear_act_kernel_tma`, per-token row scales + GELU,
                       bf16 out (what int8-dynamic runs now)
  per-token pass       `quantize_int8_per_token` compiled by inductor on lin1's output
  lin2, row scales     the production kernel on per-token codes
  lin1, tile codes     the same GEMM; its epilogue writes codes and a scale per row and tile
  lin2, tile, i2f      the K loop rescales each tile's int32 sums, converted by I2F
  lin2, tile, magic    the same, the conversion by adding 1.5·2^23 in the integer domain and
                       subtracting it as a float (exact: a 128-deep sum is below 2^22)

`--check` runs every kernel under Triton's interpreter on small shapes (CPU) against float64
references, and compares the two granularities' error on GELU-like rows.

    PYTHONPATH=. python3 bench/int8_token_tile_scales.py [--production] [--json out.json]
    TRITON_INTERPRET=1 PYTHONPATH=. python3 bench/int8_token_tile_scales.py --check   # CPU

`--wide` times 256-column groups against 128 (lin1 at a 256-wide tile, lin2 rescaling once
every two K steps): half the rescales, at 31.9 dB against 34.3 on the GELU rows above.

`--flat` asks what slows the group-scaled lin2: flat K loops with the row scales loaded a group
ahead or not, groups of 128 and 256 columns, beside the production kernel on row and group
scales.

`--production` times `gemm_epilogue`'s own kernels instead (lin1 writing bf16 or group codes,
lin2 on row or group scales with the residual), each at the configs its autotuner can pick.

Written in session 20; run on the H100 in session 21 (bench/int8_token_tile_scales_h100.json,
bench/int8_group_production_h100.json; bench/RESULTS.md). That run decided `lower`'s
int8-dynamic MLP: group-scaled codes written by lin1's epilogue. Session 22 ran `--wide` and
`--flat` (bench/int8_wide_groups_h100.json, bench/int8_flat_groups_h100.json): no variant beat
the production group-scaled lin2 by more than 7%, none came near the row-scaled one, and per-head
scales made the projection slower than the per-token pass they would remove.
"""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # variant_timing, beside this file
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402
from variant_timing import parse_args, time_alternating  # noqa: E402

from samq_fx import gemm_epilogue as ge  # noqa: E402
from samq_fx.gemm_epilogue import _epilogue, _in_registers, _tile, _tile_sums  # noqa: E402
from samq_fx.triton_attention import int8_codes  # noqa: E402

SAM_B_LIN1, SAM_B_LIN2 = (32768, 3072, 768), (32768, 768, 3072)
CONFIG = (128, 128, 128, 4, 3)  # BLOCK_M, BLOCK_N (= the scale tile), BLOCK_K, warps, stages
LIN2_SWEEP = (
    (128, 128, 128, 4, 3),
    (128, 128, 128, 8, 3),
    (128, 64, 128, 4, 4),
    (64, 128, 128, 4, 4),
)


@triton.jit
def _lin1_tile_codes(
    x_desc, w_desc, o_desc, TILE_SCALES, BIAS, SCALES, COL_ZERO, COL_SCALE, ROW_SCALE, M, N, K,
    HW_APPROX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr, SCALES_T: tl.constexpr = False,
):  # fmt: skip
    """lin1 on per-token codes, + GELU, written as int8 codes with a scale per row and
    BLOCK_N-column tile: TILE_SCALES (M, cdiv(N, BLOCK_N)) float32, or (cdiv(N, BLOCK_N), M)
    with SCALES_T (lin2 then reads each K step's scales contiguously)."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile(tile, num_m, num_n, 8)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = _tile_sums(x_desc, w_desc, off_m, off_n, tl.cdiv(K, BLOCK_K), BLOCK_M, BLOCK_N,
                         BLOCK_K, True, False)  # fmt: skip
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        y = _epilogue(acc, BIAS, SCALES, COL_ZERO, COL_SCALE, ROW_SCALE, offs_m, offs_n, M, N,
                      True, "gelu", "none", True, True, HW_APPROX)  # fmt: skip
        amax = tl.max(tl.where((offs_n < N)[None, :], tl.abs(y), 0.0), axis=1)
        scale = tl.maximum(amax / 127.0, 1e-12)
        o_desc.store([off_m, off_n], int8_codes(y / scale[:, None], 0.0).to(tl.int8))
        if SCALES_T:
            tl.store(TILE_SCALES + pid_n * M + offs_m, scale, mask=offs_m < M)
        else:
            tl.store(TILE_SCALES + offs_m * num_n + pid_n, scale, mask=offs_m < M)


@triton.jit
def _store_lin2(acc, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, offs_m, off_m, col0, M, N,
                WIDTH: tl.constexpr, HW_APPROX: tl.constexpr):  # fmt: skip
    """The bench lin2 kernels' output: `_epilogue` (bias, column scales, no activation) on the
    float32 sums of columns col0 .. col0 + WIDTH, stored through o_desc."""
    offs_n = col0 + tl.arange(0, WIDTH)
    y = _epilogue(acc, BIAS, SCALES, COL_ZERO, COL_SCALE, SCALES, offs_m, offs_n, M, N,
                  True, "none", "none", True, False, HW_APPROX)  # fmt: skip
    o_desc.store([off_m, col0], y.to(o_desc.dtype))


@triton.jit
def _lin2_tile_scaled(
    x_desc, w_desc, o_desc, A_SCALES, BIAS, SCALES, COL_ZERO, COL_SCALE, M, N, K,
    MAGIC: tl.constexpr, HW_APPROX: tl.constexpr, A_IN_REGISTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr,
    SCALES_T: tl.constexpr = False,
):  # fmt: skip
    """lin2 on codes with a scale per row and BLOCK_K-deep tile of K (A_SCALES (M, K / BLOCK_K),
    or (K / BLOCK_K, M) with SCALES_T): each tile's int32 sums, to float32, times its rows'
    scales, summed in float32."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile(tile, num_m, num_n, 8)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            if A_IN_REGISTERS:
                a = _in_registers(a)
            part = tl.dot(a, w_desc.load([off_n, ki * BLOCK_K]).T, out_dtype=tl.int32)
            if SCALES_T:
                scale = tl.load(A_SCALES + ki * M + offs_m, mask=offs_m < M, other=0.0)
            else:
                scale = tl.load(A_SCALES + offs_m * k_tiles + ki, mask=offs_m < M, other=0.0)
            if MAGIC:  # |part| <= 128·127·127 < 2^22: 1.5·2^23 + part is exact in float32
                f = (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            else:
                f = part.to(tl.float32)
            acc += f * scale[:, None]
        _store_lin2(acc, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, offs_m, off_m, off_n, M, N,
                    BLOCK_N, HW_APPROX)  # fmt: skip


@triton.jit
def _lin2_wide_groups(
    x_desc, w_desc, o_desc, A_SCALES, BIAS, SCALES, COL_ZERO, COL_SCALE, M, N, K,
    GROUP_STEPS: tl.constexpr, HW_APPROX: tl.constexpr, A_IN_REGISTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr,
):  # fmt: skip
    """lin2 on codes with a scale per row and group of GROUP_STEPS·BLOCK_K columns of K
    (A_SCALES (K / group, M)): the int32 sums accumulate over a group's steps in the tensor
    cores, and the float32 rescale runs once a group, not once a step (a group as wide as a
    256-column lin1 tile halves the rescales of 128-column groups)."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    groups = tl.cdiv(K, BLOCK_K * GROUP_STEPS)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile(tile, num_m, num_n, 8)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for gi in range(groups):
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for si in range(GROUP_STEPS):
                k0 = (gi * GROUP_STEPS + si) * BLOCK_K
                a = x_desc.load([off_m, k0])
                if A_IN_REGISTERS:
                    a = _in_registers(a)
                part = tl.dot(a, w_desc.load([off_n, k0]).T, part, out_dtype=tl.int32)
            scale = tl.load(A_SCALES + gi * M + offs_m, mask=offs_m < M, other=0.0)
            acc += part.to(tl.float32) * scale[:, None]
        _store_lin2(acc, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, offs_m, off_m, off_n, M, N,
                    BLOCK_N, HW_APPROX)  # fmt: skip


@triton.jit
def _lin2_flat_groups(
    x_desc, w_desc, o_desc, A_SCALES, BIAS, SCALES, COL_ZERO, COL_SCALE, M, N, K,
    GROUP_STEPS: tl.constexpr, PREFETCH: tl.constexpr, HW_APPROX: tl.constexpr,
    A_IN_REGISTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr,
):  # fmt: skip
    """`_lin2_wide_groups` with its group's K steps unrolled (`tl.static_range`), so that the K
    loop stays one flat loop the pipeliner overlaps (the nested loop ran 0.32 ms against 0.21),
    and, with PREFETCH, each group's row scales loaded one group ahead: the scale load's latency
    then hides behind a group of tensor-core steps instead of stalling the rescale."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    groups = tl.cdiv(K, BLOCK_K * GROUP_STEPS)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile(tile, num_m, num_n, 8)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        scale = tl.load(A_SCALES + offs_m, mask=m_ok, other=0.0)
        for gi in range(groups):
            if PREFETCH:  # the next group's scales, issued before this group's dots
                ahead = tl.load(A_SCALES + (gi + 1) * M + offs_m, mask=m_ok & (gi + 1 < groups),
                                other=0.0)  # fmt: skip
            else:
                scale = tl.load(A_SCALES + gi * M + offs_m, mask=m_ok, other=0.0)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for si in tl.static_range(GROUP_STEPS):
                k0 = (gi * GROUP_STEPS + si) * BLOCK_K
                a = x_desc.load([off_m, k0])
                if A_IN_REGISTERS:
                    a = _in_registers(a)
                part = tl.dot(a, w_desc.load([off_n, k0]).T, part, out_dtype=tl.int32)
            acc += part.to(tl.float32) * scale[:, None]
            if PREFETCH:
                scale = ahead
        _store_lin2(acc, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, offs_m, off_m, off_n, M, N,
                    BLOCK_N, HW_APPROX)  # fmt: skip


@triton.jit
def _lin2_halves(
    x_desc, w_desc, o_desc, A_SCALES, BIAS, SCALES, COL_ZERO, COL_SCALE, M, N, K,
    HW_APPROX: tl.constexpr, A_IN_REGISTERS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr,
):  # fmt: skip
    """The group-scaled lin2 at the row-scaled kernel's 128 x 128 tile: there, an int32 step
    sum beside the float32 one needs 256 registers a thread and spills, which pushed lin2 to a
    64-row tile (0.21 ms against 0.15). Here each K step runs as two dots of BLOCK_N / 2
    columns, each rescaled into its own float32 half before the next, so only half a tile of
    int32 sums is live. w_desc and o_desc have (BLOCK_N / 2)-column blocks; A_SCALES (K / 128,
    M)."""
    HALF: tl.constexpr = BLOCK_N // 2
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile(tile, num_m, num_n, 8)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        acc0 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            if A_IN_REGISTERS:
                a = _in_registers(a)
            scale = tl.load(A_SCALES + (ki * BLOCK_K // 128) * M + offs_m, mask=offs_m < M,
                            other=0.0)[:, None]  # fmt: skip
            part = tl.dot(a, w_desc.load([off_n, ki * BLOCK_K]).T, out_dtype=tl.int32)
            acc0 += part.to(tl.float32) * scale
            part = tl.dot(a, w_desc.load([off_n + HALF, ki * BLOCK_K]).T, out_dtype=tl.int32)
            acc1 += part.to(tl.float32) * scale
        _store_lin2(acc0, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, offs_m, off_m, off_n, M, N,
                    HALF, HW_APPROX)  # fmt: skip
        _store_lin2(acc1, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, offs_m, off_m, off_n + HALF,
                    M, N, HALF, HW_APPROX)  # fmt: skip


def _codes(m: int, k: int, g: torch.Generator, device: str) -> torch.Tensor:
    return torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8, generator=g)


def _lin1_case(m, n, k, device):
    """Per-token input codes and scales, weights, and the GELU output they make (float64 sums,
    the kernels' GELU `gelu_fast`, so that only float32 rounding separates kernel and
    reference)."""
    g = torch.Generator(device=device).manual_seed(1)
    x, w = _codes(m, k, g, device), _codes(n, k, g, device)
    rows = torch.rand(m, device=device, generator=g) + 0.5
    ops = ge.Int8Operands(torch.zeros(n, device=device, dtype=torch.int32),
                          torch.ones(n, device=device), rows)  # fmt: skip
    bias = torch.randn(n, device=device, generator=g).bfloat16()
    scales = torch.tensor([2.0 / (73.0 * 73.0 * math.sqrt(k)), 1.0, 0.0], device=device)
    y = (x.double() @ w.double().t()) * float(scales[0]) * rows.double()[:, None]
    y = y + bias.double()
    return x, w, ops, bias, scales, ge.gelu_fast(y.float()).double()


def _lin2_case(m, n, k, block_k, device):
    """Codes with a scale per row and block_k-deep tile, and the float64 linear of them."""
    g = torch.Generator(device=device).manual_seed(2)
    x, w = _codes(m, k, g, device), _codes(n, k, g, device)
    tile_scales = (torch.rand(m, k // block_k, device=device, generator=g) + 0.5) * 1e-2
    ops = ge.Int8Operands(torch.zeros(n, device=device, dtype=torch.int32),
                          torch.rand(n, device=device, generator=g) * 1e-2 + 1e-3)  # fmt: skip
    bias = torch.randn(n, device=device, generator=g).bfloat16()
    scales = torch.tensor([1.0, 1.0, 0.0], device=device)
    xs = x.double() * tile_scales.double().repeat_interleave(block_k, dim=1)
    y = (xs @ w.double().t()) * ops.col_scale.double() + bias.double()
    return x, w, ops, bias, scales, tile_scales, y


def _descs(x, w, out, config):
    bm, bn, bk = config[:3]
    return [TensorDescriptor.from_tensor(t, blk) for t, blk in
            ((x, [bm, bk]), (w, [bn, bk]), (out, [bm, bn]))]  # fmt: skip


def _production(x, w, out, ops, bias, scales, activation, config, programs, gpu):
    bm, bn, bk, warps, stages = config
    return partial(ge._linear_act_kernel_tma[(programs,)], *_descs(x, w, out, config), bias,
                   scales, ops.col_zero, ops.col_scale, ops.row_scale, x.shape[0], w.shape[0],
                   x.shape[1], HAS_BIAS=True, ACTIVATION=activation, CODES="none", INT8=True,
                   HAS_ROW_SCALE=True, HW_APPROX=gpu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                   GROUP_M=8, NUM_SMS=programs, PER_SM=1, A_IN_REGISTERS=gpu and activation == "none",
                   num_warps=warps, num_stages=stages)  # fmt: skip


def _lin1_tiles(x, w, out, tile_scales, ops, bias, scales, config, programs, gpu, scales_t=False):
    bm, bn, bk, warps, stages = config
    return partial(_lin1_tile_codes[(programs,)], *_descs(x, w, out, config), tile_scales, bias,
                   scales, ops.col_zero, ops.col_scale, ops.row_scale, x.shape[0], w.shape[0],
                   x.shape[1], HW_APPROX=gpu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                   NUM_SMS=programs, SCALES_T=scales_t, num_warps=warps,
                   num_stages=stages)  # fmt: skip


def _lin2_tiles(x, w, out, tile_scales, ops, bias, scales, config, programs, gpu, magic,
                scales_t=False):  # fmt: skip
    bm, bn, bk, warps, stages = config
    return partial(_lin2_tile_scaled[(programs,)], *_descs(x, w, out, config), tile_scales, bias,
                   scales, ops.col_zero, ops.col_scale, x.shape[0], w.shape[0], x.shape[1],
                   MAGIC=magic, HW_APPROX=gpu, A_IN_REGISTERS=gpu, BLOCK_M=bm, BLOCK_N=bn,
                   BLOCK_K=bk, NUM_SMS=programs, SCALES_T=scales_t, num_warps=warps,
                   num_stages=stages)  # fmt: skip


def _lin2_wide(x, w, out, tile_scales_t, ops, bias, scales, config, programs, gpu, steps):
    bm, bn, bk, warps, stages = config
    return partial(_lin2_wide_groups[(programs,)], *_descs(x, w, out, config), tile_scales_t,
                   bias, scales, ops.col_zero, ops.col_scale, x.shape[0], w.shape[0],
                   x.shape[1], GROUP_STEPS=steps, HW_APPROX=gpu, A_IN_REGISTERS=gpu,
                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_SMS=programs, num_warps=warps,
                   num_stages=stages)  # fmt: skip


def _lin2_flat(x, w, out, tile_scales_t, ops, bias, scales, config, programs, gpu, steps,
               prefetch):  # fmt: skip
    bm, bn, bk, warps, stages = config
    return partial(_lin2_flat_groups[(programs,)], *_descs(x, w, out, config), tile_scales_t,
                   bias, scales, ops.col_zero, ops.col_scale, x.shape[0], w.shape[0],
                   x.shape[1], GROUP_STEPS=steps, PREFETCH=prefetch, HW_APPROX=gpu,
                   A_IN_REGISTERS=gpu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_SMS=programs,
                   num_warps=warps, num_stages=stages)  # fmt: skip


def _lin2_split(x, w, out, tile_scales_t, ops, bias, scales, config, programs, gpu, a_regs):
    bm, bn, bk, warps, stages = config
    descs = [TensorDescriptor.from_tensor(t, blk) for t, blk in
             ((x, [bm, bk]), (w, [bn // 2, bk]), (out, [bm, bn // 2]))]  # fmt: skip
    return partial(_lin2_halves[(programs,)], *descs, tile_scales_t, bias, scales, ops.col_zero,
                   ops.col_scale, x.shape[0], w.shape[0], x.shape[1], HW_APPROX=gpu,
                   A_IN_REGISTERS=a_regs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_SMS=programs,
                   num_warps=warps, num_stages=stages)  # fmt: skip


def _tile_reference(y: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of y (M, N) per row and `tile`-column block, in float64."""
    m, n = y.shape
    blocks = y.reshape(m, n // tile, tile)
    scale = (blocks.abs().amax(-1) / 127.0).clamp_min(1e-12)
    codes = torch.round(blocks / scale[..., None]).clamp(-127, 127)
    return codes.reshape(m, n), scale


def _granularity_error() -> dict:
    """lin2's output error (SQNR, dB, against float64) with its input quantized per token and
    per token and 128-column tile, on GELU outputs whose channels differ in scale as SAM's do
    (a few channels 20x the rest)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(512, 3072, generator=g, dtype=torch.float64) * 2
    h[:, torch.randperm(3072, generator=g)[:24]] *= 20
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    w = torch.randn(768, 3072, generator=g, dtype=torch.float64) / math.sqrt(3072)
    exact = h @ w.t()

    def sqnr(approx):
        return float(10 * torch.log10(exact.pow(2).mean() / (approx - exact).pow(2).mean()))

    token_scale = (h.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-12)
    per_token = torch.round(h / token_scale).clamp(-127, 127) * token_scale
    codes, tile_scale = _tile_reference(h, 128)
    per_tile = codes * tile_scale.repeat_interleave(128, dim=1)
    wide_codes, wide_scale = _tile_reference(h, 256)
    wide = wide_codes * wide_scale.repeat_interleave(256, dim=1)
    return {"per_token_db": sqnr(per_token @ w.t()), "per_tile_db": sqnr(per_tile @ w.t()),
            "per_256_db": sqnr(wide @ w.t())}  # fmt: skip


def check() -> int:
    """Every kernel under the interpreter: tile codes within one step of the exact ones and their
    scales to float32 rounding; the tile-scaled lin2 (both conversions) and the production
    kernels to float32 rounding."""
    failures = 0
    config = (16, 16, 32, 4, 1)
    x, w, ops, bias, scales, y = _lin1_case(40, 48, 96, "cpu")
    codes = torch.empty(40, 48, dtype=torch.int8)
    tile_scales = torch.empty(40, 3)
    _lin1_tiles(x, w, codes, tile_scales, ops, bias, scales, config, 3, False)()
    ref_codes, ref_scales = _tile_reference(y, 16)
    off = int((codes.double() - ref_codes).abs().max())
    rel = float(((tile_scales.double() - ref_scales) / ref_scales).abs().max())
    print(f"lin1, tile codes: codes at most {off} step(s) off, scales {rel:.1e} relative")
    failures += off > 1 or rel > 1e-6
    tile_scales_t = torch.empty(3, 40)
    _lin1_tiles(x, w, codes, tile_scales_t, ops, bias, scales, config, 3, False, True)()
    same = torch.equal(tile_scales_t.t(), tile_scales)
    print(f"lin1, tile codes, scales transposed: the same scales {same}")
    failures += not same
    out = torch.empty(40, 48)
    _production(x, w, out, ops, bias, scales, "gelu", config, 3, False)()
    err = float((out.double() - y).abs().max() / y.abs().max())
    print(f"lin1, bf16 out (production, float32 here): {err:.1e} relative")
    failures += err > 1e-5
    x, w, ops, bias, scales, tile_scales, y = _lin2_case(40, 24, 96, 32, "cpu")
    for magic in (False, True):
        out = torch.empty(40, 24)
        _lin2_tiles(x, w, out, tile_scales, ops, bias, scales, config, 3, False, magic)()
        err = float((out.double() - y).abs().max() / y.abs().max())
        print(f"lin2, tile scales, {'magic' if magic else 'i2f'}: {err:.1e} relative")
        failures += err > 1e-6
    wide = _lin2_case(40, 24, 128, 64, "cpu")  # groups of 64 = 2 steps of 32
    out = torch.empty(40, 24)
    x2, w2, ops2, bias2, scales2, groups2, y2 = wide
    _lin2_wide(x2, w2, out, groups2.t().contiguous(), ops2, bias2, scales2, config, 3, False, 2)()
    err = float((out.double() - y2).abs().max() / y2.abs().max())
    print(f"lin2, groups of two K steps: {err:.1e} relative")
    failures += err > 1e-6
    for steps, prefetch in ((1, True), (2, False), (2, True)):
        x2, w2, ops2, bias2, scales2, groups2, y2 = _lin2_case(40, 24, 128, 32 * steps, "cpu")
        out = torch.empty(40, 24)
        _lin2_flat(x2, w2, out, groups2.t().contiguous(), ops2, bias2, scales2, config, 3, False,
                   steps, prefetch)()  # fmt: skip
        err = float((out.double() - y2).abs().max() / y2.abs().max())
        print(f"lin2, flat groups of {steps} K step(s), prefetch {prefetch}: {err:.1e} relative")
        failures += err > 1e-6
    x2, w2, ops2, bias2, scales2, groups2, y2 = _lin2_case(40, 32, 256, 128, "cpu")
    out = torch.empty(40, 32)
    _lin2_split(x2, w2, out, groups2.t().contiguous(), ops2, bias2, scales2, (16, 32, 32, 4, 1),
                3, False, False)()  # fmt: skip
    err = float((out.double() - y2).abs().max() / y2.abs().max())
    print(f"lin2, 128 groups, tile in two column halves: {err:.1e} relative")
    failures += err > 1e-6
    out = torch.empty(40, 24)
    t = tile_scales.t().contiguous()
    _lin2_tiles(x, w, out, t, ops, bias, scales, config, 3, False, True, scales_t=True)()
    err = float((out.double() - y).abs().max() / y.abs().max())
    print(f"lin2, tile scales transposed, magic: {err:.1e} relative")
    failures += err > 1e-6
    print("granularity on GELU-like rows:", _granularity_error())
    return 1 if failures else 0


def _gpu_errors(runs, h, y1, codes1, tiles1, tiles1_t, out2, y2) -> dict:
    """The timed kernels' results on the GPU against float64: the same bounds as `--check`'s,
    loosened for bf16 outputs (2^-8 relative)."""
    errors = {}
    runs["lin1, bf16 out"]()
    errors["lin1, bf16 out"] = float((h.double() - y1).abs().max() / y1.abs().max())
    runs["lin1, tile codes"]()
    ref_codes, ref_scales = _tile_reference(y1, CONFIG[1])
    errors["lin1, tile codes (steps)"] = int((codes1.double() - ref_codes).abs().max())
    errors["lin1, tile scales"] = float(((tiles1.double() - ref_scales) / ref_scales).abs().max())
    runs["lin1, tile codes, T"]()
    errors["lin1, tile scales, T"] = float(
        ((tiles1_t.t().double() - ref_scales) / ref_scales).abs().max()
    )
    for name in [n for n in runs if n.startswith("lin2, tile")]:
        out2.zero_()
        runs[name]()
        errors[name] = float((out2.double() - y2).abs().max() / y2.abs().max())
    torch.cuda.synchronize()
    return errors


def _production_ptrs(x, w, out, ops, bias, scales, activation, codes, config, a_regs, programs,
                     **extra):  # fmt: skip
    """`gemm_epilogue`'s production entry (device-made descriptors) at one config: (BLOCK_M,
    BLOCK_N, BLOCK_K, warps, stages, programs an SM)."""
    bm, bn, bk, warps, stages, per_sm = config
    row = ops.row_scale if ops.row_scale is not None else scales
    return partial(ge._linear_act_kernel_tma_ptrs[(programs * per_sm,)], x, w, out, bias, scales,
                   ops.col_zero, ops.col_scale, row, x.shape[0], w.shape[0], x.shape[1],
                   HAS_BIAS=True, ACTIVATION=activation, CODES=codes, INT8=True,
                   HAS_ROW_SCALE=ops.row_scale is not None, HW_APPROX=x.is_cuda, BLOCK_M=bm,
                   BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_SMS=programs, PER_SM=per_sm,
                   A_IN_REGISTERS=a_regs, num_warps=warps, num_stages=stages,
                   **extra)  # fmt: skip


def _compile_and_time(runs: dict, rounds: int) -> tuple[dict, dict]:
    """Compile every run (a config that does not compile, past the shared memory, is listed and
    dropped), then time the rest alternately: (the runs kept, their rows)."""
    rows = {}
    for name, run in runs.items():
        try:
            compiled = run()
        except Exception as err:
            print(f"  {name}: {type(err).__name__}: {str(err)[:120]}")
            continue
        rows[name] = {"kernel": name, "regs": getattr(compiled, "n_regs", None),
                      "spills": getattr(compiled, "n_spills", None)}  # fmt: skip
    runs = {k: v for k, v in runs.items() if k in rows}
    time_alternating(runs, rows, rounds)
    return runs, rows


def _print_rows(rows: dict) -> None:
    for r in rows.values():
        print(f"  {r['kernel']:52s} {r['ms']:.4f} ms  {r['regs']} regs, {r['spills']} spills")


PRODUCTION_CONFIGS = ((128, 128, 128, 4, 3, 2), (128, 128, 128, 8, 3, 1), (64, 128, 128, 4, 4, 2))


def production(args) -> int:
    """The production kernels as `lower` runs them in SAM-B's MLP at batch 8 (lin1 with bf16
    out or group codes; lin2 with row or group scales, plus the residual), each at the
    configs its autotuner can pick, x's tile through registers or not."""
    ge._ensure_scratch_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m, n1, k1 = SAM_B_LIN1
    x, w, ops, bias, scales, _ = _lin1_case(m, n1, k1, "cuda")
    h = torch.empty(m, n1, dtype=torch.bfloat16, device="cuda")
    codes1 = torch.empty(m, n1, dtype=torch.int8, device="cuda")
    tiles1 = torch.empty(n1 // 128, m, device="cuda")
    _, n2, k2 = SAM_B_LIN2
    x2, w2, ops2, bias2, scales2, tiles2, _ = _lin2_case(m, n2, k2, 128, "cuda")
    tiles2 = tiles2.t().contiguous()
    rows2 = ge.Int8Operands(ops2.col_zero, ops2.col_scale, tiles2[0].contiguous())
    out2 = torch.empty(m, n2, dtype=torch.bfloat16, device="cuda")
    res = torch.randn(m, n2, device="cuda").bfloat16()
    residual = {"RESIDUAL": res, "HAS_RESIDUAL": True}
    kinds = {  # name -> (x, w, out, operands, bias, scales, activation, codes, extra keywords)
        "lin1 bf16 out": (x, w, h, ops, bias, scales, "gelu", "none", {}),
        "lin1 group codes": (x, w, codes1, ops, bias, scales, "gelu", "int8_tiles",
                             {"TILE_SCALES": tiles1}),
        "lin2 rows + residual": (x2, w2, out2, rows2, bias2, scales2, "none", "none", residual),
        "lin2 group + residual": (x2, w2, out2, ops2, bias2, scales2, "none", "none",
                                  {**residual, "X_TILE_SCALES": tiles2, "HAS_TILE_SCALES": True}),
    }  # fmt: skip
    runs = {}
    for config in PRODUCTION_CONFIGS:
        for a_regs in (False, True):
            tag = f"{config}{' a-regs' if a_regs else ''}"
            for kind, (*operands, extra) in kinds.items():
                runs[f"{kind} {tag}"] = _production_ptrs(*operands, config, a_regs, sms, **extra)
    per_token = torch.compile(ge.quantize_int8_per_token, fullgraph=True)
    runs["per-token pass"] = partial(per_token, h)
    runs, rows = _compile_and_time(runs, args.rounds)
    best = {kind: min((r for n, r in rows.items() if n.startswith(kind)), key=lambda r: r["ms"])
            for kind in ("lin1 bf16 out", "lin1 group codes", "lin2 rows", "lin2 group")}  # fmt: skip
    now = best["lin1 bf16 out"]["ms"] + rows["per-token pass"]["ms"] + best["lin2 rows"]["ms"]
    group = best["lin1 group codes"]["ms"] + best["lin2 group"]["ms"]
    _print_rows(rows)
    print(f"  best: per token {now:.4f} ms a block, per group {group:.4f} ms a block")
    if args.json:
        meta = {"mode": "production", "device": torch.cuda.get_device_name(),
                "torch": torch.__version__, "triton": triton.__version__,
                "per_token_ms": now, "per_group_ms": group,
                "best": {k: v["kernel"] for k, v in best.items()}}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": list(rows.values())}, indent=1) + "\n")
    return 0


def wide(args) -> int:
    """128- against 256-column groups (bench kernels, scales (groups, rows)): lin1 at a 128- or
    256-wide tile writing the codes, lin2 rescaling once a group; the 256-wide lin2 checked
    against float64 on the GPU."""
    ge._ensure_scratch_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m, n1, k1 = SAM_B_LIN1
    x, w, ops, bias, scales, _ = _lin1_case(m, n1, k1, "cuda")
    codes1 = torch.empty(m, n1, dtype=torch.int8, device="cuda")
    tiles128, tiles256 = (torch.empty(n1 // g, m, device="cuda") for g in (128, 256))
    _, n2, k2 = SAM_B_LIN2
    x2, w2, ops2, bias2, scales2, t256, y256 = _lin2_case(m, n2, k2, 256, "cuda")
    t256 = t256.t().contiguous()
    t128 = t256.repeat_interleave(2, dim=0).contiguous()  # the same scales, per 128 columns
    out2 = torch.empty(m, n2, dtype=torch.bfloat16, device="cuda")
    narrow, eight = (64, 128, 128, 4, 4), (128, 128, 128, 8, 3)
    runs = {
        "lin1, 128 groups, (128, 128, 128, 4, 3) x2": _lin1_tiles(
            x, w, codes1, tiles128, ops, bias, scales, CONFIG, 2 * sms, True, scales_t=True),
        "lin1, 256 groups, (128, 256, 128, 8, 3)": _lin1_tiles(
            x, w, codes1, tiles256, ops, bias, scales, (128, 256, 128, 8, 3), sms, True,
            scales_t=True),
        "lin2, 128 groups, (64, 128, 128, 4, 4) x2": _lin2_wide(
            x2, w2, out2, t128, ops2, bias2, scales2, narrow, 2 * sms, True, 1),
        "lin2, 256 groups, (64, 128, 128, 4, 4) x2": _lin2_wide(
            x2, w2, out2, t256, ops2, bias2, scales2, narrow, 2 * sms, True, 2),
        "lin2, 256 groups, (128, 128, 128, 8, 3)": _lin2_wide(
            x2, w2, out2, t256, ops2, bias2, scales2, eight, sms, True, 2),
    }  # fmt: skip
    rows = {}
    for name, run in runs.items():
        compiled = run()
        rows[name] = {"kernel": name, "regs": getattr(compiled, "n_regs", None),
                      "spills": getattr(compiled, "n_spills", None)}  # fmt: skip
    time_alternating(runs, rows, args.rounds)
    errors = {}
    for name in [n for n in runs if n.startswith("lin2")]:
        out2.zero_()
        runs[name]()
        errors[name] = float((out2.double() - y256).abs().max() / y256.abs().max())
    _print_rows(rows)
    print("  lin2 errors against float64 (GPU):", errors)
    if args.json:
        meta = {"mode": "wide", "device": torch.cuda.get_device_name(), "errors": errors,
                "torch": torch.__version__, "triton": triton.__version__,
                "granularity": _granularity_error()}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": list(rows.values())}, indent=1) + "\n")
    return 0


def flat(args) -> int:
    """What slows the group-scaled lin2 (0.21 ms against 0.15 on row scales): the scale load's
    latency or the rescale itself. Flat K loops (`_lin2_flat_groups`) with and without the
    scales loaded a group ahead, groups of 128 and 256 columns, beside the production kernel
    on row and on group scales (no residual); every lin2 checked against float64 on the GPU."""
    ge._ensure_scratch_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m, n2, k2 = SAM_B_LIN2
    x2, w2, ops2, bias2, scales2, t256, y256 = _lin2_case(m, n2, k2, 256, "cuda")
    t256 = t256.t().contiguous()
    t128 = t256.repeat_interleave(2, dim=0).contiguous()  # the same scales, per 128 columns
    rows2 = ge.Int8Operands(ops2.col_zero, ops2.col_scale, t128[0].contiguous())
    out2 = torch.empty(m, n2, dtype=torch.bfloat16, device="cuda")
    narrow, half_k = (64, 128, 128, 4, 4), (64, 128, 64, 4, 6)
    group = {"X_TILE_SCALES": t128, "HAS_TILE_SCALES": True}
    runs = {
        "production, row scales (floor)": _production_ptrs(
            x2, w2, out2, rows2, bias2, scales2, "none", "none", (*narrow, 2), True, sms),
        "production, 128 groups": _production_ptrs(
            x2, w2, out2, ops2, bias2, scales2, "none", "none", (*narrow, 2), True, sms, **group),
    }  # fmt: skip
    for label, scales_t, config, steps in (("128 groups", t128, narrow, 1),
                                           ("128 groups of 2 x 64", t128, half_k, 2),
                                           ("256 groups", t256, narrow, 2)):  # fmt: skip
        for prefetch in (False, True):
            runs[f"flat, {label}{', prefetch' if prefetch else ''}"] = _lin2_flat(
                x2, w2, out2, scales_t, ops2, bias2, scales2, config, 2 * sms, True, steps,
                prefetch)  # fmt: skip
    wide = (128, 128, 128, 4, 3)
    for a_regs in (False, True):
        runs[f"halves, 128 groups {wide} x2{' a-regs' if a_regs else ''}"] = _lin2_split(
            x2, w2, out2, t128, ops2, bias2, scales2, wide, 2 * sms, True, a_regs
        )
    runs["halves, 128 groups (128, 256, 128, 8, 3) a-regs"] = _lin2_split(
        x2, w2, out2, t128, ops2, bias2, scales2, (128, 256, 128, 8, 3), sms, True, True
    )
    runs[f"production, row scales {wide} x2 a-regs"] = _production_ptrs(
        x2, w2, out2, rows2, bias2, scales2, "none", "none", (*wide, 2), True, sms
    )
    # the projection (K = 768) on codes with a scale per token and head (64 columns), as the
    # attention kernels could write them, against its row-scaled production kernel
    xp, wp, opsp, biasp, scalesp, heads, yp = _lin2_case(m, 768, 768, 64, "cuda")
    heads = heads.t().contiguous()
    rowsp = ge.Int8Operands(opsp.col_zero, opsp.col_scale, heads[0].contiguous())
    outp = torch.empty(m, 768, dtype=torch.bfloat16, device="cuda")
    for config in ((64, 128, 128, 4, 4, 2), (128, 128, 128, 4, 3, 2)):
        runs[f"proj, production, row scales {config}"] = _production_ptrs(
            xp, wp, outp, rowsp, biasp, scalesp, "none", "none", config, True, sms
        )
    for config in ((64, 128, 64, 4, 6), (128, 128, 64, 4, 4)):
        for prefetch in (False, True):
            runs[f"proj, flat, 64 groups {config}{', prefetch' if prefetch else ''}"] = _lin2_flat(
                xp, wp, outp, heads, opsp, biasp, scalesp, config, 2 * sms, True, 1, prefetch
            )
    runs, rows = _compile_and_time(runs, args.rounds)
    errors = {}
    for name in [n for n in runs if "row scales" not in n]:
        out, ref = (outp, yp) if name.startswith("proj") else (out2, y256)
        out.zero_()
        runs[name]()
        errors[name] = float((out.double() - ref).abs().max() / ref.abs().max())
    _print_rows(rows)
    print("  errors against float64 (GPU):", errors)
    if args.json:
        meta = {"mode": "flat", "device": torch.cuda.get_device_name(), "errors": errors,
                "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": list(rows.values())}, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    def options(p):
        p.add_argument(
            "--production",
            action="store_true",
            help="time gemm_epilogue's production kernels at their candidate configs",
        )
        p.add_argument("--wide", action="store_true",
                       help="128- against 256-column groups (bench kernels)")  # fmt: skip
        p.add_argument("--flat", action="store_true",
                       help="lin2's scale loads a group ahead, flat K loops (bench kernels)")  # fmt: skip

    args = parse_args(__doc__, argv, rounds=5, extra=options)
    if args.check:
        return check()
    if args.production:
        return production(args)
    if args.wide:
        return wide(args)
    if args.flat:
        return flat(args)

    ge._ensure_scratch_allocator()
    programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    m, n1, k1 = SAM_B_LIN1
    x, w, ops, bias, scales, y1 = _lin1_case(m, n1, k1, "cuda")
    h = torch.empty(m, n1, dtype=torch.bfloat16, device="cuda")
    codes1 = torch.empty(m, n1, dtype=torch.int8, device="cuda")
    tiles1 = torch.empty(m, n1 // CONFIG[1], device="cuda")
    _, n2, k2 = SAM_B_LIN2
    x2, w2, ops2, bias2, scales2, tiles2, y2 = _lin2_case(m, n2, k2, CONFIG[2], "cuda")
    tiles1_t = torch.empty(n1 // CONFIG[1], m, device="cuda")
    tiles2_t = tiles2.t().contiguous()
    rows2 = ge.Int8Operands(ops2.col_zero, ops2.col_scale, tiles2[:, 0].contiguous())
    out2 = torch.empty(m, n2, dtype=torch.bfloat16, device="cuda")
    per_token = torch.compile(ge.quantize_int8_per_token, fullgraph=True)
    runs = {
        "lin1, bf16 out": _production(x, w, h, ops, bias, scales, "gelu", CONFIG, programs, True),
        "per-token pass": partial(per_token, h),
        "lin2, row scales": _production(
            x2, w2, out2, rows2, bias2, scales2, "none", CONFIG, programs, True
        ),  # fmt: skip
        "lin1, tile codes": _lin1_tiles(
            x, w, codes1, tiles1, ops, bias, scales, CONFIG, programs, True
        ),  # fmt: skip
        "lin2, tile, i2f": _lin2_tiles(
            x2, w2, out2, tiles2, ops2, bias2, scales2, CONFIG, programs, True, False
        ),  # fmt: skip
        "lin2, tile, magic": _lin2_tiles(
            x2, w2, out2, tiles2, ops2, bias2, scales2, CONFIG, programs, True, True
        ),  # fmt: skip
        "lin1, tile codes, T": _lin1_tiles(
            x, w, codes1, tiles1_t, ops, bias, scales, CONFIG, programs, True, scales_t=True
        ),  # fmt: skip
    }
    for config in LIN2_SWEEP:  # the register pressure of two accumulators, and the scales' layout
        for count in (programs // 2, programs):
            for magic in (False, True):
                name = f"lin2, tile, {'magic' if magic else 'i2f'}, T, {config}, {count}"
                runs[name] = _lin2_tiles(x2, w2, out2, tiles2_t, ops2, bias2, scales2, config,
                                         count, True, magic, scales_t=True)  # fmt: skip
    rows = {}
    for name, run in runs.items():
        compiled = run()
        regs = getattr(compiled, "n_regs", None)
        rows[name] = {"kernel": name, "regs": regs, "spills": getattr(compiled, "n_spills", None),
                      "ms": float("inf")}  # fmt: skip
    time_alternating(runs, rows, args.rounds)
    errors = _gpu_errors(runs, h, y1, codes1, tiles1, tiles1_t, out2, y2)
    now = sum(rows[k]["ms"] for k in ("lin1, bf16 out", "per-token pass", "lin2, row scales"))
    tiles = min(
        rows["lin1, tile codes"]["ms"]
        + min(rows[n]["ms"] for n in ("lin2, tile, i2f", "lin2, tile, magic")),
        rows["lin1, tile codes, T"]["ms"] + min(r["ms"] for n, r in rows.items() if ", T," in n),
    )
    print(f"SAM-B MLP at batch 8, {CONFIG}, {programs} programs, {torch.cuda.get_device_name()}")
    _print_rows(rows)
    print(f"  per token: {now:.4f} ms a block; per token and tile: {tiles:.4f} ms a block")
    print("  errors against float64 (GPU):", errors)
    if args.json:
        meta = {"config": CONFIG, "programs": programs, "device": torch.cuda.get_device_name(),
                "torch": torch.__version__, "triton": triton.__version__,
                "per_token_ms": now, "per_tile_ms": tiles, "errors": errors}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": list(rows.values())}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
