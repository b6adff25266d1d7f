"""Where the int8 lin1 + GELU kernel's time goes: SAM-B's lin1 at batch 8 (32768 x 768 -> 3072,
int8 codes in and out) on the persistent TMA GEMM at the config `_pick` takes (128 x 128 x 128,
4 warps, 3 stages, two programs an SM), with six epilogues, each timed alone, and its codes
against the exact reference (float64 sums, erf GELU).

The question: int8's GELU kernel costs 0.07 ms more than the same GEMM with no activation, and
float8's only 0.02 (bench/RESULTS.md, session 18). Per element, int8's epilogue sends three
operations to the SM's special-function unit (16 results a clock an SM on sm_90, an eighth of
the FMA rate): the int32 -> float32 conversion, `_gelu_scaled`'s exp2 and its reciprocal.
float8's sends two. If that unit is the bound, fewer of its operations is time:

  production      `gemm_epilogue._linear_act_kernel_tma` itself: session 18's "i2f, exp2+rcp";
                  since session 19 "i2f, tanh" with Φ's argument scale and -ln2/2 folded
                  into the column multipliers and the fit's coefficients (`_gelu_tanh`)
  i2f, exp2+rcp   this script's copy of session 18's production epilogue
  i2f, tanh       Φ = (1 + tanh.approx(-t·ln2/2)) / 2 from the same fit t: one SFU op, not
                  two. tanh.approx's error near -1 spoils Φ's relative error in the negative
                  tail (float8's reason against it); int8 codes only see absolute error
  split, exp2+rcp the int32 sum to float32 without the SFU, exactly for any int32: its high and
                  low 16 bits through exponent magic, two integer and three FMA-pipe ops
  split, tanh     both
  i2f, none       the conversion and the codes, no activation: the epilogue's floor

Session 19, H100, production then exp2+rcp (bench/int8_epilogue_variants_h100_s19.json): tanh
0.2005 ms against 0.2200, its codes as close to the exact ones (0.159% one step off, against
0.158%); the split conversion slower (0.2406: its FMA-pipe work costs more than the SFU op it
saves); no activation 0.1431.

    PYTHONPATH=. python3 bench/int8_epilogue_variants.py [--json out.json]
    TRITON_INTERPRET=1 PYTHONPATH=. python3 bench/int8_epilogue_variants.py --check   # CPU
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
from samq_fx.gemm_epilogue import (  # noqa: E402
    _gelu_exponent,
    _gelu_scaled,
    _tanh,
    _tile,
    _tile_sums,
)
from samq_fx.triton_attention import int8_codes  # noqa: E402

VARIANTS = ("i2f, exp2+rcp", "i2f, tanh", "split, exp2+rcp", "split, tanh", "i2f, none")
SAM_B_LIN1 = (32768, 3072, 768)
CONFIG = (128, 128, 128, 4, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


@triton.jit
def _float_of_int32(acc):
    """acc as float32, rounded once, with no conversion instruction: 2^23 + the low 16 bits
    and 1.5·2^23 + the high 16 (signed) as float bit patterns, each exact, then hi·2^16 + lo."""
    lo = ((acc & 0xFFFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    hi = ((acc >> 16) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    return hi * 65536.0 + lo


@triton.jit
def _phi_times(y, x_per_y, TANH: tl.constexpr, FAST: tl.constexpr):
    """`gemm_epilogue._gelu_scaled` (y·Φ, Φ = 1 / (1 + 2^t) from the production fit's t) by
    exp2 and a reciprocal, or by one tanh, unfolded: 1 / (1 + 2^t) = (1 + tanh(-t·ln2/2)) / 2."""
    if TANH:
        th = _tanh(_gelu_exponent(y, x_per_y) * -0.34657359027997264, FAST)
        h = y * 0.5
        out = h + h * th
    else:
        out = _gelu_scaled(y, x_per_y, FAST)
    return out


@triton.jit
def _kernel(
    x_desc, w_desc, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, M, N, K,
    SPLIT: tl.constexpr, ACTIVATION: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr,
):  # fmt: skip
    """`gemm_epilogue._linear_act_kernel_tma` for int8 with codes out and no row scales, its
    epilogue written out here so that the variants differ in one place."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile(tile, num_m, num_n, 8)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = _tile_sums(x_desc, w_desc, off_m, off_n, tl.cdiv(K, BLOCK_K), BLOCK_M, BLOCK_N,
                         BLOCK_K, True, False)  # fmt: skip
        offs_n = off_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        inv_out = 1.0 / tl.load(SCALES + 1)
        mult = tl.load(COL_SCALE + offs_n, mask=n_ok, other=0.0) * (tl.load(SCALES) * inv_out)
        shift = tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32) * inv_out
        shift -= tl.load(COL_ZERO + offs_n, mask=n_ok, other=0).to(tl.float32) * mult
        if SPLIT:
            y = _float_of_int32(acc) * mult[None, :] + shift[None, :]
        else:
            y = acc.to(tl.float32) * mult[None, :] + shift[None, :]
        if ACTIVATION != "none":
            y = _phi_times(y, 0.7071067811865476 / inv_out, ACTIVATION == "gelu tanh", FAST)
        o_desc.store([off_m, off_n], int8_codes(y, tl.load(SCALES + 2)).to(tl.int8))


def _case(m: int, n: int, k: int, device: str):
    """Random int8 codes with SAM-like statistics (lin1's input grid has a zero point), scales
    that put y ~ N(0, 2²) before the GELU, and the exact codes of the result."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(-128, 128, (m, k), device=device, dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8, generator=g)
    zero = 9
    ops = ge.Int8Operands(zero * w.sum(1, dtype=torch.int32), torch.ones(n, device=device))
    bias = torch.randn(n, device=device, generator=g).bfloat16()
    s_x = 2.0 / (73.0 * 73.0 * math.sqrt(k))  # codes' std about 73
    s_out, z_out = 10.0 / 255, -110.0
    scales = torch.tensor([s_x, s_out, z_out], device=device)
    acc = x.double() @ w.double().t() - ops.col_zero.double()
    y = acc * s_x + bias.double()
    y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
    ref = (torch.round(y / s_out) + z_out).clamp(-128, 127)
    return x, w, ops, bias, scales, ref


def _launch(variant, x, w, ops, bias, scales, out, config, programs, fast):
    bm, bn, bk, warps, stages = config
    m, k = x.shape
    n = w.shape[0]
    descs = [TensorDescriptor.from_tensor(t, blk) for t, blk in
             ((x, [bm, bk]), (w, [bn, bk]), (out, [bm, bn]))]  # fmt: skip
    if variant == "production":
        return partial(ge._linear_act_kernel_tma[(programs,)], *descs, bias, scales,
                       ops.col_zero, ops.col_scale, scales, m, n, k, HAS_BIAS=True,
                       ACTIVATION="gelu", CODES="int8", INT8=True, HAS_ROW_SCALE=False,
                       HW_APPROX=fast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                       NUM_SMS=programs, PER_SM=1, num_warps=warps, num_stages=stages)  # fmt: skip
    conversion, activation = variant.split(", ")
    activation = {"exp2+rcp": "gelu", "tanh": "gelu tanh", "none": "none"}[activation]
    return partial(_kernel[(programs,)], *descs, bias, scales, ops.col_zero, ops.col_scale,
                   m, n, k, SPLIT=conversion == "split", ACTIVATION=activation, FAST=fast,
                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_SMS=programs, num_warps=warps,
                   num_stages=stages)  # fmt: skip


def _codes_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    off = (out.double() - ref).abs()
    return float(off.gt(0).double().mean()), int(off.max())


def check() -> int:
    """Every variant under Triton's interpreter on a small case (CPU): codes at most one step
    from the exact ones, and the split conversion exact on int32 sums past 2^24."""
    x, w, ops, bias, scales, ref = _case(40, 48, 96, "cpu")  # ragged rows; 16-byte strides
    failures = 0
    for variant in ("production", *VARIANTS):
        out = torch.empty(ref.shape, dtype=torch.int8)
        _launch(variant, x, w, ops, bias, scales, out, (16, 16, 32, 4, 1), 3, False)()
        if variant.endswith("none"):
            continue
        share, worst = _codes_error(out, ref)
        print(f"{variant:16s} codes off {100 * share:.2f}%, at most {worst} step(s)")
        failures += worst > 1
    big = torch.tensor(
        [2**24 + 3, -(2**30) - 7, 2**31 - 1, -(2**31), 123456789, -5], dtype=torch.int32
    )

    @triton.jit
    def convert(src, dst, n: tl.constexpr):
        offs = tl.arange(0, n)
        tl.store(dst + offs, _float_of_int32(tl.load(src + offs)))

    got = torch.empty(8, dtype=torch.float32)
    convert[(1,)](torch.cat([big, big[:2]]), got, 8)
    failures += int(got[:6].ne(big.float()).sum())
    print(
        "split conversion:", got[:6].tolist(), "exact" if got[:6].eq(big.float()).all() else "WRONG"
    )
    return 1 if failures else 0


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, rounds=3)
    if args.check:
        return check()

    m, n, k = SAM_B_LIN1
    x, w, ops, bias, scales, ref = _case(m, n, k, "cuda")
    programs = min(2 * torch.cuda.get_device_properties(0).multi_processor_count,
                   triton.cdiv(m, CONFIG[0]) * triton.cdiv(n, CONFIG[1]))  # fmt: skip
    runs, rows = {}, {}
    for variant in ("production", *VARIANTS):
        out = torch.empty(m, n, dtype=torch.int8, device="cuda")
        runs[variant] = _launch(variant, x, w, ops, bias, scales, out, CONFIG, programs, True)
        compiled = runs[variant]()
        share, worst = _codes_error(out, ref)
        rows[variant] = {"variant": variant, "regs": compiled.n_regs, "spills": compiled.n_spills,
                         "codes_off": None if variant.endswith("none") else share,
                         "max_steps_off": None if variant.endswith("none") else worst,
                         "ms": float("inf")}  # fmt: skip
    time_alternating(runs, rows, args.rounds)
    print(f"SAM-B lin1 at batch 8, {CONFIG}, {programs} programs, {torch.cuda.get_device_name()}")
    for r in rows.values():
        off = (
            "-"
            if r["codes_off"] is None
            else f"{100 * r['codes_off']:.3f}% (max {r['max_steps_off']})"
        )
        print(f"  {r['variant']:16s} {r['ms']:.4f} ms  {r['regs']} regs, {r['spills']} spills, "
              f"codes off the exact ones {off}")  # fmt: skip
    if args.json:
        meta = {"shape": SAM_B_LIN1, "config": CONFIG, "programs": programs,
                "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": list(rows.values())}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
