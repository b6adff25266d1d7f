"""Quantized GEMMs whose epilogue rescales, activates and quantizes for the next linear.

SAM's MLP is `lin2(act(lin1(x)))`. Lowered as two 8-bit linears, lin1 writes its output in
bf16 (4x the width of the block: SAM-H 32 layers x 32768 x 5120 at batch 8) and a separate
pass reads it back, applies GELU and writes lin2's 8-bit input: on the H100 that pass was
10.2 ms of SAM-H's 105 ms (`bench/profile_vit_h_h100_float8_i8attn.json`). Here the GEMM's
accumulator goes straight through scale, bias, activation and lin2's calibrated quantizer, and
only the codes reach memory:

    float8: out = fp8( clamp( act(x8·w8ᵀ · s_x·s_w + b) / s_out, ±448 ) )
    int8:   out = clamp( round( act((x8·w8ᵀ - z_x·Σ_k w8) · s_x·s_w[n] + b) / s_out ) + z_out )

The same kernel is the int8 backend's every linear (`Int8Linear`, codes="none": the bf16
output): cuBLAS's int8 GEMM, which torchao calls, runs sm80 kernels on the H100 and keeps only
the sums, so the zero point, scales and bias were separate passes over the output.

`linear_act_reference` / `int8_linear_reference` are the same functions in PyTorch with the
exact (erf) GELU: the ops' CPU implementations and what the tests compare the kernel with. The
unfused pair rounds lin1's output to bf16 before the activation (a relative error up to 2^-9 in
y, which the GELU's tail multiplies); the kernel does not, and computes GELU to
`GELU_RELATIVE_ERROR` of its value everywhere (`gelu_fast`, the same formula in PyTorch). The
GPU test holds the kernel's error against the exact function to no more than the unfused pair's.
The epilogue's instructions are GEMM time: on SAM-H's lin1 the same kernel takes 0.39-0.44 ms
with ReLU, 0.54-0.59 with the first version's Abramowitz & Stegun erf and 0.50 with `gelu_fast`
(bench/gelu_epilogue_variants.py, bench/mlp_epilogue.py; bench/RESULTS.md, session 7).

Two kernels: one program a tile with pointer loads (any sm_89+ GPU; int8 from sm_80), and a
persistent one with TMA loads and stores (sm_90); `launch` times both on a shape's first call
and keeps the faster.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from samq_fx.quantizers import UniformQuantizer
from samq_fx.triton_attention import FLOAT8_MAX, quantize_float8_static
from samq_fx.tuned_launch import CACHE_AUTOTUNING, TunedLauncher

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with PyTorch's Linux wheels
    triton = None

ACTIVATIONS = ("gelu", "relu")
"""Epilogue activations: aten.gelu (erf form, computed by `gelu_fast`) and aten.relu."""

GELU_RELATIVE_ERROR = 1.7e-3
"""Largest |gelu_fast(y) - gelu(y)| / |gelu(y)| over all y (0.162% measured in float32 over
y in [-12, 12]): below the 2^-9 of bf16 rounding that the unfused lowering applies to y, and
1/37 of an e4m3 step."""

_GELU_T = (-3.246238946914673, -0.3126406967639923, 0.008954372256994247,
           -0.0002384943945799023, 2.989293534483295e-06)  # fmt: skip
"""Coefficients of t(x) = x·(c0 + c1·x² + ... + c4·x⁸) in Φ(y) ≈ 1 / (1 + 2^t(x)), x = y/√2
clamped to ±4: a logistic fit of the normal CDF (erf(x) ≈ tanh(x·P(x²)), times -2·log2 e) for
the least worst relative error of Φ on the negative side, which by the logistic's symmetry
bounds the positive side too."""

K_MULTIPLE = 32
"""The kernel walks K in blocks of 32..128 without masks; other K are refused."""

TILE_COLUMNS = 128
"""Width of the column groups that codes="int8_tiles" scales one by one: each row of the output
gets a scale per TILE_COLUMNS columns (1 x 128 groups, the granularity of DeepSeek-V3's
float8 activations). A GEMM tile of that width holds a whole group, so the epilogue quantizes
for the next linear what a per-token scale could not (it needs the whole row); the next
linear's K loop applies the scales a group (a K step of at most that depth) at a time."""


def unsupported(in_features: int, activation: str = "none") -> str | None:
    """Why this layer cannot take the kernel (with `activation` in its epilogue; "none": no
    activation), or None."""
    if activation != "none" and activation not in ACTIVATIONS:
        return f"activation {activation!r} has no fused epilogue (only {ACTIVATIONS})"
    if in_features % K_MULTIPLE:
        return f"in_features {in_features} is not a multiple of {K_MULTIPLE}"
    return None


def gelu_fast(y: Tensor) -> Tensor:
    """GELU as the kernel computes it, in PyTorch: y·Φ(y) with Φ(y) = 1 / (1 + 2^t(y/√2))
    (`_GELU_T`): one exp2 and one reciprocal, no erf (see `GELU_RELATIVE_ERROR`)."""
    x = (y * 0.7071067811865476).clamp(-4.0, 4.0)
    x2 = x * x
    c0, c1, c2, c3, c4 = _GELU_T
    t = x * (c0 + x2 * (c1 + x2 * (c2 + x2 * (c3 + x2 * c4))))
    return y / (1.0 + torch.exp2(t))


def _activation(y: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    return torch.relu(y)


def linear_act_reference(
    x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    """The kernel's function in float32 PyTorch: x (M, K) and w (N, K) float8 (or any float),
    scales = [s_x·s_w, s_out] float32; returns (M, N) float8 e4m3."""
    y = (x.float() @ w.float().t()) * scales[0]
    if bias is not None:
        y = y + bias.float()
    y = _activation(y, activation) / scales[1]
    return y.clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)


if triton is not None:
    from samq_fx.triton_attention import int8_codes, to_codes

    @triton.jit
    def _rcp(d, HW_APPROX: tl.constexpr):
        """1 / d: the GPU's approximate reciprocal (PTX `rcp.approx.ftz`), an exact divide
        under the interpreter."""
        if HW_APPROX:
            r = tl.inline_asm_elementwise(
                "rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            r = 1.0 / d
        return r

    @triton.jit
    def _tanh(u, HW_APPROX: tl.constexpr):
        """tanh(u): the GPU's `tanh.approx` (one special-function op, absolute error), exact
        under the interpreter."""
        if HW_APPROX:
            th = tl.inline_asm_elementwise(
                "tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            th = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))
        return th

    @triton.jit
    def _gelu_exponent(y, x_per_y):
        """t of `gelu_fast`'s fit Φ = 1 / (1 + 2^t) at x = y·x_per_y clamped to ±4: five FMAs,
        `_GELU_T` by Horner in x²."""
        x = tl.minimum(tl.maximum(y * x_per_y, -4.0), 4.0)
        x2 = x * x
        p = -0.0002384943945799023 + x2 * 2.989293534483295e-06
        p = 0.008954372256994247 + x2 * p
        p = -0.3126406967639923 + x2 * p
        return x * (-3.246238946914673 + x2 * p)

    @triton.jit
    def _gelu_scaled(y, x_per_y, HW_APPROX: tl.constexpr):
        """`gelu_fast`(y / c) · c for y = c·v already scaled by the output's c > 0 (GELU(v)·c =
        y·Φ(v)): Φ's argument is y·x_per_y, x_per_y = 1/(√2·c). A clamp, five FMAs, one exp2
        and one reciprocal (the hardware's approximate one on a GPU, an exact divide under
        the interpreter)."""
        return y * _rcp(1.0 + tl.exp2(_gelu_exponent(y, x_per_y)), HW_APPROX)

    @triton.jit
    def _gelu_tanh(x, out_per_x, HW_APPROX: tl.constexpr):
        """`gelu_fast`(v)·c from x = v/√2 (c = out_per_x·√2 > 0, the output's scale): the same
        fit, read as erf(x) ≈ tanh(x·P(x²)) (`_GELU_T` times -ln2/2, folded into the
        coefficients), so GELU(v)·c = h + h·tanh(x·P) with h = x·out_per_x. One special-function
        op an element where `_gelu_scaled` takes two (exp2, rcp), and two multiplies fewer:
        int8's GELU kernel on SAM-B's lin1 0.220 -> 0.192 ms (bench/int8_epilogue_variants.py).
        tanh.approx's error is absolute, so only int8 codes take this form: near Φ = 0 it would
        spoil the relative error that float8 codes and bf16 outputs keep. `HW_APPROX`: the
        GPU's tanh.approx (PTX); the interpreter computes tanh exactly."""
        xc = tl.minimum(tl.maximum(x, -4.0), 4.0)
        x2 = xc * xc
        p = 8.265585859120519e-05 + x2 * -1.0360101926465847e-06
        p = -0.003103348941809878 + x2 * p
        p = 0.10835300874512904 + x2 * p
        th = _tanh(xc * (1.1250606867388957 + x2 * p), HW_APPROX)
        h = x * out_per_x
        return h + h * th

    @triton.jit
    def _in_registers(a):
        """a, moved through registers (a 32-bit mov of each packed 8-bit quad): the tensor-core
        dot then takes it from registers and reads only the other operand from shared memory.
        That also frees x's operand buffer, so a 128 x 128 x 128 int8 tile with 3 stages fits
        twice in an SM's shared memory: the autotuned configs with `A_IN_REGISTERS` run two
        programs an SM, one's epilogue under the other's tensor-core loop (H100, SAM-B: qkv
        0.139 -> 0.125 ms, lin2 0.143 -> 0.132; bench/RESULTS.md, session 12). GPU only (PTX).
        a is 8-bit codes or (the bf16 baseline's MLP in bench/mlp_epilogue.py) 16-bit values."""
        return tl.inline_asm_elementwise(  # a 32-bit register holds four 8-bit or two 16-bit
            "mov.b32 $0, $1;",
            "=r,r",
            [a],
            dtype=a.dtype,
            is_pure=True,
            pack=32 // a.dtype.primitive_bitwidth,
        )

    @triton.jit
    def _epilogue(
        acc, BIAS, SCALES, COL_ZERO, COL_SCALE, ROW_SCALE, offs_m, offs_n, M, N,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, CODES: tl.constexpr,
        INT8: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HW_APPROX: tl.constexpr,
    ):  # fmt: skip
        """Rescale, zero-point correction, bias, activation, and the next linear's quantizer.

        float8: y = acc·scales[0]. int8: y = (acc - col_zero[n])·col_scale[n]·scales[0]. Then
        ·row_scale[m] (per-token dynamic inputs), + bias, the activation, and for `CODES`
        "float8" / "int8" the division by the output scale scales[1] (int8: rounded half to
        even, + the zero point scales[2]) and the clamp to the code range.

        The epilogue runs on the same warps as the tensor-core loop, so its instruction count
        is GEMM time (the GELU kernel issues more instructions than its tile's tensor-core
        work takes). Each element gets one FMA, acc·mult[n] + shift[n], before the activation:
        the output scale's reciprocal, the bias and (without row scales) the zero point's
        correction -col_zero[n]·mult[n] are per-column constants, and GELU is
        `_gelu_scaled` (no erf). int32 sums and col_zero convert to float32 exactly while
        below 2^24 (K <= 1024: |x·w| <= 2^14); longer rows (SAM's lin2, K = 3072) round the
        sum by 2^-24 of itself, far under the bf16 output's or the codes' rounding. With row
        scales the zero point is removed from the int32 sums, before any rounding."""
        n_ok = offs_n < N
        if CODES == "none" or CODES == "int8_tiles":  # int8_tiles: y, quantized after
            inv_out = 1.0
        else:
            inv_out = 1.0 / tl.load(SCALES + 1)
        # inv_out > 0 commutes with ReLU and rescales GELU (`_gelu_scaled`), so it joins the
        # per-column multiplier and shift: y = acc·mult[n] + shift[n] is one FMA an element.
        # int8 codes' GELU (`_gelu_tanh`) takes Φ's argument v/√2 instead: pre = 1/√2. Its
        # absolute error (|y|·2^-11 at most) is under a sixteenth of a code step for codes on
        # any grid whose range holds y, group scales' included
        GELU_TANH: tl.constexpr = ACTIVATION == "gelu" and (
            CODES == "int8" or CODES == "int8_tiles"
        )
        if GELU_TANH:
            pre = 0.7071067811865476
        else:
            pre = inv_out
        if HAS_BIAS:
            shift = tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32) * pre
        else:
            shift = tl.zeros_like(offs_n).to(tl.float32)
        if INT8:
            mult = tl.load(COL_SCALE + offs_n, mask=n_ok, other=0.0) * (tl.load(SCALES) * pre)
            col_zero = tl.load(COL_ZERO + offs_n, mask=n_ok, other=0)
            if HAS_ROW_SCALE:
                y = (acc - col_zero[None, :]).to(tl.float32) * mult[None, :]
                y = y * tl.load(ROW_SCALE + offs_m, mask=offs_m < M, other=0.0)[:, None]
            else:  # |acc|, |col_zero| < 2^24 for K <= 1024: exact in float32 (see docstring)
                y = acc.to(tl.float32) * mult[None, :]
                shift -= col_zero.to(tl.float32) * mult
        else:
            y = acc * (tl.load(SCALES) * pre)
        y += shift[None, :]
        if GELU_TANH:
            y = _gelu_tanh(y, 0.7071067811865476 * inv_out, HW_APPROX)
        elif ACTIVATION == "gelu":
            y = _gelu_scaled(y, 0.7071067811865476 / inv_out, HW_APPROX)
        elif ACTIVATION == "relu":
            y = tl.maximum(y, 0.0)
        zero = tl.load(SCALES + 2) if CODES == "int8" else 0.0
        return to_codes(y, zero, "none" if CODES == "int8_tiles" else CODES)

    @triton.jit
    def _tile_codes(y, offs_n, N):
        """(codes, scales) of y (BLOCK_M, TILE_COLUMNS) per row: s = amax|row| / 127 over the
        columns inside N, codes round(y·(1/s)) (the per-token quantizer on a 128-column group,
        one division a row instead of one an element; an all-zero row gets a tiny scale and
        zero codes)."""
        amax = tl.max(tl.where((offs_n < N)[None, :], tl.abs(y), 0.0), axis=1)
        scale = tl.maximum(amax / 127.0, 1e-12)
        return int8_codes(y * (1.0 / scale)[:, None], 0.0), scale

    @triton.jit
    def _store_tile_scales(TILE_SCALES, scale, pid_n, offs_m, M):
        """A tile's row scales into TILE_SCALES (cdiv(N, TILE_COLUMNS), M): each K step of the
        next linear then reads its rows' scales contiguously."""
        tl.store(TILE_SCALES + pid_n * M + offs_m, scale, mask=offs_m < M)  # < 2^31: `launch`

    @triton.jit
    def _group_scales(X_TILE_SCALES, k_start, offs_m, M):
        """The input rows' scales of the column group that holds K index k_start
        (`TILE_COLUMNS`; X_TILE_SCALES (cdiv(K, TILE_COLUMNS), M))."""
        return tl.load(X_TILE_SCALES + (k_start // 128) * M + offs_m, mask=offs_m < M, other=0.0)

    @triton.jit
    def _tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """(row block, column block) of a tile, in groups of GROUP_M row blocks so that
        consecutive tiles reuse the same weight columns from L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows

    @triton.jit
    def _tile_sums(
        x_desc, w_desc, off_m, off_n, k_tiles,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        INT8: tl.constexpr, A_IN_REGISTERS: tl.constexpr,
    ):  # fmt: skip
        """x[off_m : off_m + BLOCK_M] · w[off_n : off_n + BLOCK_N]ᵀ over k_tiles BLOCK_K-steps
        from TMA descriptors: int32 sums for int8 codes, float32 for float8 (the persistent
        kernel's tile, and the bench variants' in bench/*_epilogue_variants.py)."""
        if INT8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            if A_IN_REGISTERS:
                a = _in_registers(a)
            b = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def _tile_sums_group_scaled(
        x_desc, w_desc, off_m, off_n, k_tiles, X_TILE_SCALES, offs_m, M,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        A_IN_REGISTERS: tl.constexpr,
    ):  # fmt: skip
        """`_tile_sums` on int8 codes with a scale per row and `TILE_COLUMNS` group of K: each
        K step's int32 sums (exact: |sum| < 2^21 for a 128-deep step), to float32, times its
        rows' scales, summed in float32. BLOCK_K divides 128, so a step lies in one group."""
        tl.static_assert(128 % BLOCK_K == 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            if A_IN_REGISTERS:
                a = _in_registers(a)
            part = tl.dot(a, w_desc.load([off_n, ki * BLOCK_K]).T, out_dtype=tl.int32)
            scale = _group_scales(X_TILE_SCALES, ki * BLOCK_K, offs_m, M)
            acc += part.to(tl.float32) * scale[:, None]
        return acc

    @triton.jit
    def _linear_act_kernel_tma(
        x_desc, w_desc, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE, ROW_SCALE,
        M, N, K,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        CODES: tl.constexpr,
        INT8: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        HW_APPROX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr,
        PER_SM: tl.constexpr,
        A_IN_REGISTERS: tl.constexpr = False,
        r_desc=None,
        HAS_RESIDUAL: tl.constexpr = False,
        TILE_SCALES=None,
        X_TILE_SCALES=None,
        HAS_TILE_SCALES: tl.constexpr = False,
    ):  # fmt: skip
        """Persistent Hopper variant: PER_SM programs per SM walk the tiles; TMA moves the tiles
        (zero-filled past the edges, stores clipped) and the tile loop is flattened with the K
        loop, so the next tile's loads overlap this tile's epilogue. With two programs an SM,
        one's epilogue (GELU's, mostly) also overlaps the other's tensor-core loop. `r_desc`:
        the residual stream, added to the output (`HAS_RESIDUAL`, codes "none") a half tile
        at a time (`r_desc` and `o_desc` blocks BLOCK_M x BLOCK_N/2): the residual's and the
        output's shared-memory buffers then take what the output's alone took, so a tile at
        3 stages still fits twice in an SM. `TILE_SCALES`: codes "int8_tiles"'s scales out;
        `X_TILE_SCALES`: the input's (`HAS_TILE_SCALES`), see `TILE_COLUMNS`."""
        tl.static_assert(CODES != "int8_tiles" or BLOCK_N == 128)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS * PER_SM, flatten=True):
            pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
            off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
            offs_m = off_m + tl.arange(0, BLOCK_M)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            if HAS_TILE_SCALES:
                acc = _tile_sums_group_scaled(x_desc, w_desc, off_m, off_n, k_tiles, X_TILE_SCALES,
                                              offs_m, M, BLOCK_M, BLOCK_N, BLOCK_K,
                                              A_IN_REGISTERS)  # fmt: skip
            else:
                acc = _tile_sums(x_desc, w_desc, off_m, off_n, k_tiles, BLOCK_M, BLOCK_N, BLOCK_K,
                                 INT8, A_IN_REGISTERS)  # fmt: skip
            y = _epilogue(acc, BIAS, SCALES, COL_ZERO, COL_SCALE, ROW_SCALE, offs_m, offs_n, M, N,
                          HAS_BIAS, ACTIVATION, CODES, INT8, HAS_ROW_SCALE, HW_APPROX)  # fmt: skip
            if CODES == "int8_tiles":
                y, scale = _tile_codes(y, offs_n, N)
                _store_tile_scales(TILE_SCALES, scale, pid_n, offs_m, M)
                o_desc.store([off_m, off_n], y.to(o_desc.dtype))
            elif HAS_RESIDUAL:  # CODES "none": y is the output; in two column halves (below)
                y0, y1 = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                half = off_n + BLOCK_N // 2
                y0 += r_desc.load([off_m, off_n]).to(tl.float32)
                o_desc.store([off_m, off_n], y0.to(o_desc.dtype))
                y1 += r_desc.load([off_m, half]).to(tl.float32)
                o_desc.store([off_m, half], y1.to(o_desc.dtype))
            else:
                o_desc.store([off_m, off_n], y.to(o_desc.dtype))

    @triton.jit
    def _linear_act_kernel_tma_ptrs(
        X, W, OUT, BIAS, SCALES, COL_ZERO, COL_SCALE, ROW_SCALE,
        M, N, K,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        CODES: tl.constexpr,
        INT8: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        HW_APPROX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr,
        PER_SM: tl.constexpr,
        A_IN_REGISTERS: tl.constexpr = False,
        RESIDUAL=None,
        HAS_RESIDUAL: tl.constexpr = False,
        TILE_SCALES=None,
        X_TILE_SCALES=None,
        HAS_TILE_SCALES: tl.constexpr = False,
    ):  # fmt: skip
        """`_linear_act_kernel_tma` on contiguous x (M, K), w (N, K), out and residual (M, N),
        its TMA descriptors made on the device, once a program, at the config's block shapes.
        Host-made descriptors cost the CPU about 40 µs a launch (Triton encodes each on every
        call, plus the config's pre-hook that sets their block shapes: bench/RESULTS.md,
        session 17), and int8's 48 GEMMs a forward are launch-bound without CUDA graphs."""
        x_desc = tl.make_tensor_descriptor(X, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(W, [N, K], [K, 1], [BLOCK_N, BLOCK_K])
        if HAS_RESIDUAL:  # the residual's epilogue works in column halves
            o_desc = tl.make_tensor_descriptor(OUT, [M, N], [N, 1], [BLOCK_M, BLOCK_N // 2])
            r_desc = tl.make_tensor_descriptor(RESIDUAL, [M, N], [N, 1], [BLOCK_M, BLOCK_N // 2])
        else:
            o_desc = tl.make_tensor_descriptor(OUT, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
            r_desc = None
        _linear_act_kernel_tma(x_desc, w_desc, o_desc, BIAS, SCALES, COL_ZERO, COL_SCALE,
                               ROW_SCALE, M, N, K, HAS_BIAS, ACTIVATION, CODES, INT8,
                               HAS_ROW_SCALE, HW_APPROX, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                               NUM_SMS, PER_SM, A_IN_REGISTERS, r_desc, HAS_RESIDUAL, TILE_SCALES,
                               X_TILE_SCALES, HAS_TILE_SCALES)  # fmt: skip

    @triton.jit
    def _linear_act_kernel(
        X, W, BIAS, OUT, SCALES, COL_ZERO, COL_SCALE, ROW_SCALE,
        M, N, K,
        stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        CODES: tl.constexpr,
        INT8: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        HW_APPROX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        A_IN_REGISTERS: tl.constexpr = False,
        RESIDUAL=None,
        HAS_RESIDUAL: tl.constexpr = False,
        TILE_SCALES=None,
        X_TILE_SCALES=None,
        HAS_TILE_SCALES: tl.constexpr = False,
    ):  # fmt: skip
        tl.static_assert(CODES != "int8_tiles" or BLOCK_N == 128)
        tl.static_assert(not HAS_TILE_SCALES or 128 % BLOCK_K == 0)
        pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # rows / columns past the edge read row 0 (always valid) and are masked at the store,
        # so the K loop runs without masks
        rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
        x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None]  # wᵀ tile, K-contiguous
        if INT8 and not HAS_TILE_SCALES:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            a = tl.load(x_ptrs)
            if A_IN_REGISTERS:
                a = _in_registers(a)
            if HAS_TILE_SCALES:  # see `_tile_sums_group_scaled`
                part = tl.dot(a, tl.load(w_ptrs), out_dtype=tl.int32)
                scale = _group_scales(X_TILE_SCALES, k_start, offs_m, M)
                acc += part.to(tl.float32) * scale[:, None]
            else:
                acc = tl.dot(a, tl.load(w_ptrs), acc, out_dtype=acc.dtype)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = _epilogue(acc, BIAS, SCALES, COL_ZERO, COL_SCALE, ROW_SCALE, offs_m, offs_n, M, N,
                      HAS_BIAS, ACTIVATION, CODES, INT8, HAS_ROW_SCALE, HW_APPROX)  # fmt: skip
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if CODES == "int8_tiles":
            y, scale = _tile_codes(y, offs_n, N)
            _store_tile_scales(TILE_SCALES, scale, pid_n, offs_m, M)
        if HAS_RESIDUAL:  # contiguous (M, N), like OUT when `launch` made it
            r_ptrs = RESIDUAL + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            y += tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32)
        o_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(o_ptrs, y.to(OUT.dtype.element_ty), mask=ok)

    def _tile_codes_prune(configs, named_args, **kwargs):
        """codes "int8_tiles" quantize one `TILE_COLUMNS` group a tile: BLOCK_N = 128 only."""
        if kwargs.get("CODES", named_args.get("CODES")) != "int8_tiles":
            return configs
        return [c for c in configs if c.kwargs["BLOCK_N"] == TILE_COLUMNS]

    def _prune(configs, named_args, **kwargs):
        k = named_args["K"]
        kept = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]
        kept = _tile_codes_prune(kept, named_args, **kwargs)
        return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": TILE_COLUMNS, "BLOCK_K": 32,
                                       "GROUP_M": 8})]  # fmt: skip

    _KEY = ["M", "N", "K", "HAS_BIAS", "ACTIVATION", "CODES", "INT8", "HAS_ROW_SCALE",
            "HAS_RESIDUAL", "HAS_TILE_SCALES"]  # fmt: skip
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
            (128, 128, 128, 4, 4), (128, 256, 64, 8, 4), (64, 128, 128, 4, 4),
            (128, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 128, 64, 4, 4),
            (64, 64, 128, 4, 4),
        )
    ]  # fmt: skip
    _tuned_kernel = triton.autotune(
        _CONFIGS,
        key=_KEY,
        prune_configs_by={"early_config_prune": _prune},
        cache_results=CACHE_AUTOTUNING,
    )(_linear_act_kernel)

    _TMA_CONFIGS = [  # block shapes reach the descriptors as constexprs: no pre-hook
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PER_SM": p},
                      num_warps=w, num_stages=s)
        for bm, bn, bk, w, s, p in (
            (128, 256, 128, 8, 3, 1), (128, 256, 64, 8, 4, 1), (128, 128, 128, 8, 4, 1),
            (128, 128, 128, 4, 4, 1), (256, 128, 128, 8, 3, 1), (128, 128, 64, 4, 5, 1),
            (64, 128, 128, 4, 4, 1),
            # two programs an SM (shared memory for two): H100, SAM-B's lin1 + GELU 7% faster
            (128, 128, 128, 4, 3, 2), (128, 128, 128, 4, 2, 2), (128, 128, 64, 4, 3, 2),
        )
    ] + [  # x's tile through registers (`_in_registers`): shared memory for two programs an SM
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PER_SM": 2,
                       "A_IN_REGISTERS": True}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (128, 128, 128, 4, 3), (128, 128, 128, 4, 2), (128, 128, 64, 4, 4),
            (128, 128, 128, 8, 3), (64, 256, 64, 4, 3),
            # group-scaled K loops hold two accumulators: 64 rows keep them in registers
            # (H100, SAM-B's lin2: 0.217 ms against 0.254 at 128 x 128 x 8 warps and 0.375 at
            # 4 warps, which spill; bench/int8_token_tile_scales_h100.json)
            (64, 128, 128, 4, 4),
        )
    ]  # fmt: skip
    _tuned_kernel_tma = triton.autotune(  # TMA zero-fills past K: any K % 32 == 0 runs
        _TMA_CONFIGS,
        key=_KEY,
        prune_configs_by={"early_config_prune": _tile_codes_prune},
        cache_results=CACHE_AUTOTUNING,
    )(_linear_act_kernel_tma_ptrs)

    _launch_pointer = TunedLauncher(_tuned_kernel)
    _launch_tma = TunedLauncher(_tuned_kernel_tma)

KERNELS = ("pointer", "tma")
"""`pointer`: one program a tile, loads through pointers (any sm_89+ GPU); `tma`: persistent,
TMA loads and stores (Hopper, sm_90+). `launch` times both on a shape's first call and keeps
the faster (`chosen_kernels`)."""
CODES = {
    "float8": torch.float8_e4m3fn,
    "int8": torch.int8,
    "int8_tiles": torch.int8,
    "none": None,
}
"""What the epilogue writes: the next linear's float8 or int8 codes at its calibrated scale,
int8 codes with a scale per row and `TILE_COLUMNS` columns ("int8_tiles": dynamic, for a
next linear with no calibrated scale), or ("none") the linear's output itself, in the dtype the
caller asks for."""
_CHOSEN: dict[tuple, str] = {}


@dataclass(frozen=True)
class Int8Operands:
    """What an int8 GEMM's epilogue reads besides the scales: col_zero (N,) int32, the input's
    zero point times each weight row's code sum (so (acc - col_zero) is the product of the
    centred input); col_scale (N,) float32, the weight's per-channel scale; row_scale (M,)
    float32 or None, per-token input scales of a dynamic quantizer."""

    col_zero: Tensor
    col_scale: Tensor
    row_scale: Tensor | None = None


def chosen_kernels() -> dict[tuple, str]:
    """The tuning key (`_tuning_key`) -> the kernel `launch` picked for that shape, and its tile
    config: "tma (BLOCK_M, BLOCK_N, BLOCK_K) w=warps s=stages x programs an SM"."""
    picked = {}
    for key, kernel in _CHOSEN.items():
        config = (_launch_tma if kernel == "tma" else _launch_pointer).chosen.get(key)
        if config is None:
            picked[key] = kernel
            continue
        meta = config.kwargs
        tile = (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"])
        per_sm = f" x{meta['PER_SM']}" if "PER_SM" in meta else ""
        regs = " a-regs" if meta.get("A_IN_REGISTERS") else ""
        picked[key] = f"{kernel} {tile} w={config.num_warps} s={config.num_stages}{per_sm}{regs}"
    return picked


def _tma_ok(x: Tensor) -> bool:
    if triton is None or not hasattr(tl, "make_tensor_descriptor"):
        return False
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)


def _tma_aligned(*tensors: Tensor | None) -> bool:
    """Whether TMA can address each 2-D tensor: not empty, contiguous, its base and its row
    pitch on 16-byte boundaries (what Triton's host-made descriptors asserted; one made on the
    device is not checked there)."""
    return all(
        t is None
        or (
            t.numel() > 0
            and t.is_contiguous()
            and t.data_ptr() % 16 == 0
            and t.shape[1] * t.element_size() % 16 == 0
        )
        for t in tensors
    )


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """Global memory for the descriptors a TMA kernel makes on the device (Triton's allocator
    protocol; PyTorch's caching allocator serves it)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Install `_scratch` as Triton's allocator unless one is set. Triton keeps the allocator
    in a context variable, which a new thread does not inherit, so each launch checks. A
    Triton whose internals name the unset allocator otherwise gets `_scratch` every time."""
    try:
        from triton.runtime import _allocation

        unset = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    except (ImportError, AttributeError):
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def row_bucket(m: int) -> int:
    """The row count a tuning decision is made for: the next power of two from 16. The mask
    decoder's linears see 7 or 4,096 rows a prompt and any number of prompts; tuning each count
    afresh (seconds of benchmarking each) would stall `SamAutomaticMaskGenerator`'s last, smaller
    batch and every new prompt count in `SamPredictor`. Every config is correct for any M."""
    return max(16, 1 << (max(m, 1) - 1).bit_length())


def _run(
    kernel: str, x, w, out, scales, bias, activation, block=None,
    *, codes: str = "float8", int8: Int8Operands | None = None, key: tuple | None = None,
    residual: Tensor | None = None, tile_scales: Tensor | None = None,
    x_tile_scales: Tensor | None = None,
) -> None:  # fmt: skip
    """Launch `kernel` autotuned, or the pointer kernel at a fixed `block` (see `launch`).
    `key`: this call's `_tuning_key`, if the caller has it already. `tile_scales`: where codes
    "int8_tiles" writes its scales."""
    m, k = x.shape
    n = w.shape[0]
    unused = scales  # a pointer the kernel never reads when its flag is off
    bias_arg = bias if bias is not None else unused
    extra = (unused, unused, unused)
    if int8 is not None:
        row = int8.row_scale if int8.row_scale is not None else unused
        extra = (int8.col_zero, int8.col_scale, row)
    # the interpreter (CPU tensors) has no PTX: exact math where a GPU takes rcp/tanh.approx
    common = {
        "HAS_BIAS": bias is not None, "ACTIVATION": activation, "CODES": codes,
        "INT8": int8 is not None,
        "HAS_ROW_SCALE": int8 is not None and int8.row_scale is not None,
        "HW_APPROX": x.is_cuda, "HAS_RESIDUAL": residual is not None,
        "HAS_TILE_SCALES": x_tile_scales is not None,
    }  # fmt: skip
    if block is None and key is None:
        key = _tuning_key(x, w, out, bias, activation, codes, int8, residual, x_tile_scales)
    common.update(RESIDUAL=residual, TILE_SCALES=tile_scales, X_TILE_SCALES=x_tile_scales)
    if kernel == "pointer":
        args = (x, w, bias_arg, out, scales, *extra, m, n, k,
                x.stride(0), w.stride(0), out.stride(0))  # fmt: skip
        if block is not None:
            bm, bn, bk = block
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            _linear_act_kernel[grid](*args, **common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                     GROUP_M=4, num_warps=4)  # fmt: skip
            return
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
        )
        _launch_pointer(key, grid, *args, **common)
        return
    _ensure_scratch_allocator()  # operands TMA can address: `launch` checks (`_tma_aligned`)
    sms = _multiprocessors(x.device)
    grid = lambda meta: (  # noqa: E731
        min(
            sms * meta["PER_SM"], triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        ),
    )
    _launch_tma(key, grid, x, w, out, bias_arg, scales, *extra, m, n, k,
                **common, NUM_SMS=sms)  # fmt: skip


def _tuning_key(
    x, w, out, bias, activation, codes="float8", int8=None, residual=None, x_tile_scales=None
) -> tuple:
    """What the autotuners' keys and pruning read, with the row count bucketed (`row_bucket`):
    the shape, bias, activation, output codes, int8 operands, residual, the input's scales and
    the dtypes."""
    bias_dtype = None if bias is None else bias.dtype
    row_scaled = int8 is not None and int8.row_scale is not None
    residual_dtype = None if residual is None else residual.dtype
    return (row_bucket(x.shape[0]), w.shape[0], x.shape[1], activation, codes, row_scaled,
            x.dtype, out.dtype, bias_dtype, residual_dtype,
            x_tile_scales is not None)  # fmt: skip


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(
    x: Tensor,
    w: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    activation: str,
    *,
    codes: str = "float8",
    int8: Int8Operands | None = None,
    out_dtype: torch.dtype | None = None,
    block: tuple[int, int, int] | None = None,
    kernel: str | None = None,
    residual: Tensor | None = None,
    x_tile_scales: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run a Triton kernel: `kernel` from `KERNELS`, or None for the faster on this shape
    (timed once per `_tuning_key`). x (M, K) and w (N, K) are float8 codes, or int8 codes with
    `int8` set; `codes` picks the output (`CODES`), stored as `out_dtype` (default: the codes'
    dtype; required for "none"). `block` = (BLOCK_M, BLOCK_N, BLOCK_K) runs the pointer kernel
    untuned, as the interpreter tests do; they also store float32 to see the values before the
    float8 rounding. `residual` (M, N), with codes "none": added to the output in float32
    before its one rounding (a block's `x + linear(...)`, `passes/fuse_residual_add.py`).

    codes "int8_tiles" returns (codes (M, N) int8, scales (cdiv(N, 128), M) float32), a scale
    per row and `TILE_COLUMNS` group; `x_tile_scales` is such an input's scales (int8 x,
    symmetric: col_zero zero, no row scales)."""
    if triton is None:
        raise RuntimeError("the fused quantized linear needs Triton, which is not installed")
    m, k = x.shape
    n = w.shape[0]
    problem = unsupported(k, activation)
    if problem:
        raise ValueError(problem)
    if codes not in CODES:
        raise ValueError(f"codes {codes!r}; the epilogue writes one of {list(CODES)}")
    if (int8 is not None) != (x.dtype == torch.int8):
        raise ValueError("int8 codes need their Int8Operands (and only int8 codes take them)")
    out_dtype = out_dtype or CODES[codes]
    if out_dtype is None:
        raise ValueError("codes='none' writes the linear's output: name its out_dtype")
    if residual is not None:
        if codes != "none":
            raise ValueError("a residual adds to the linear's output: codes must be 'none'")
        if tuple(residual.shape) != (m, n):
            raise ValueError(f"residual of shape {tuple(residual.shape)}; the output is {(m, n)}")
        residual = residual.contiguous()
    if x_tile_scales is not None:
        x_tile_scales = _checked_tile_scales(x_tile_scales, m, k, int8)
    x, w = x.contiguous(), w.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    tile_scales = None
    if (codes == "int8_tiles" or x_tile_scales is not None) and -(
        -max(n, k) // TILE_COLUMNS
    ) * m >= 2**31:
        raise ValueError(f"per-group scales of {m} rows index past 2^31: split the batch")
    if codes == "int8_tiles":
        tile_scales = torch.empty(triton.cdiv(n, TILE_COLUMNS), m, device=x.device)
    spec = {"codes": codes, "int8": int8, "residual": residual, "tile_scales": tile_scales,
            "x_tile_scales": x_tile_scales}  # fmt: skip
    result = out if tile_scales is None else (out, tile_scales)
    if block is not None:
        _run("pointer", x, w, out, scales, bias, activation, block=block, **spec)
        return result
    key = spec["key"] = _tuning_key(x, w, out, bias, activation, codes, int8, residual,
                                    x_tile_scales)  # fmt: skip
    # the device's TMA support is asked once per key (at the pick), the operands' alignment
    # once per TMA call: a key's later calls may come with operands TMA cannot address
    aligned = functools.partial(_tma_aligned, x, w, out, residual)
    if kernel is None:
        kernel = _CHOSEN.get(key)
        if kernel is None:
            addressable = _tma_ok(x) and aligned()
            kernel = (
                _pick(x, w, out, scales, bias, activation, **spec) if addressable else "pointer"
            )
            _CHOSEN[key] = kernel
        elif kernel == "tma" and not aligned():  # the pointer kernel computes the same
            kernel = "pointer"
    elif kernel not in KERNELS or (kernel == "tma" and not _tma_ok(x)):
        raise ValueError(f"kernel {kernel!r} cannot run here; kernels: {KERNELS} (tma: sm_90+)")
    elif kernel == "tma" and not aligned():
        raise ValueError(
            "the TMA kernel needs contiguous operands on 16-byte boundaries, rows included "
            f"(x {tuple(x.shape)} {x.dtype}, out {tuple(out.shape)} {out.dtype})"
        )
    _run(kernel, x, w, out, scales, bias, activation, **spec)
    return result


def _checked_tile_scales(x_tile_scales: Tensor, m: int, k: int, int8: Int8Operands | None):
    """x_tile_scales, contiguous, or the reason `launch` cannot apply it."""
    groups = -(-k // TILE_COLUMNS)
    if int8 is None or int8.row_scale is not None:
        raise ValueError("group scales apply to int8 codes without row scales")
    if tuple(x_tile_scales.shape) != (groups, m):
        raise ValueError(
            f"x_tile_scales of shape {tuple(x_tile_scales.shape)}; an input of {m} rows and "
            f"{k} columns has ({groups}, {m}): one per {TILE_COLUMNS}-column group and row"
        )
    return x_tile_scales.float().contiguous()


PICK_ROUNDS = 3
"""`_pick` times each kernel this many times, alternately, and keeps each one's best."""


def _pick(x, w, out, scales, bias, activation, **spec) -> str:
    """The faster kernel on this shape, each at its autotuned config. Both are tuned before
    either is timed, then timed in alternation (`PICK_ROUNDS`, best of each), so that neither
    is timed straight after its own tuning's load (the H100 lowers its clock under its power
    cap: bench/tensor_core_peak_h100.json) and one noisy timing does not decide."""
    from triton.testing import do_bench

    built = []
    for kernel in KERNELS:
        try:
            _run(kernel, x, w, out, scales, bias, activation, **spec)  # autotunes
        except Exception as err:  # a Triton without this kernel's features: use the other one
            warnings.warn(
                f"quantized GEMM kernel {kernel!r} failed to build ({err!r:.300})", stacklevel=3
            )
            continue
        built.append(kernel)
    if not built:
        raise RuntimeError(f"no quantized GEMM kernel builds here ({KERNELS}): see the warnings")
    times = dict.fromkeys(built, float("inf"))
    for _ in range(PICK_ROUNDS):
        for kernel in built:
            ms = do_bench(lambda k=kernel: _run(k, x, w, out, scales, bias, activation, **spec))
            times[kernel] = min(times[kernel], ms)
    return min(times, key=times.get)


@torch.library.custom_op("samq::float8_linear_act", mutates_args=())
def float8_linear_act_op(
    x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    """act(x·wᵀ·scales[0] + bias) quantized to float8 e4m3 with scale scales[1].

    Args:
        x: (M, K) float8 e4m3, the input's codes (scale s_x).
        w: (N, K) float8 e4m3, the weight's codes (scale s_w).
        scales: (2,) float32 [s_x·s_w, s_out], s_out the next linear's input scale.
        bias: (N,) or None.
        activation: "gelu" (`gelu_fast` on CUDA, exact erf on the CPU) or "relu".

    Returns:
        (M, N) float8 e4m3. CUDA runs the Triton kernel, the CPU `linear_act_reference`.
    """
    if x.device.type == "cuda":
        return launch(x, w, scales, bias, activation)
    return linear_act_reference(x, w, scales, bias, activation)


@float8_linear_act_op.register_fake
def _(x, w, scales, bias, activation):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float8_e4m3fn)


def quantize_static(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale clamped to ±448 in float8 e4m3: torchao's static float8 activation quantizer,
    as plain ops so that inductor fuses it into the kernel that produces x."""
    return quantize_float8_static(x, scale)


def static_scale(quantizer: UniformQuantizer) -> Tensor:
    """The float8 scale of a calibrated per-tensor range [lo, hi]: max(|lo|, |hi|) / 448, so
    that the range's end maps to e4m3's largest value."""
    qp = quantizer.qparams()
    lo = (qp.qmin - qp.zero_point.float()) * qp.scale
    hi = (qp.qmax - qp.zero_point.float()) * qp.scale
    return torch.maximum(lo.abs(), hi.abs()).float() / FLOAT8_MAX


class Float8LinearAct(nn.Module):
    """lin1 + activation + lin2's input quantizer: float8 in, float8 codes for lin2 out."""

    def __init__(self, weight, w_scale, x_scale, bias, out_scale, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.register_buffer("weight", weight.contiguous())  # (N, K) e4m3 codes
        self.register_buffer("x_scale", x_scale.float().reshape(()))
        scales = torch.stack([x_scale.float().reshape(()) * w_scale.float().reshape(()),
                              out_scale.float().reshape(())])  # fmt: skip
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        x8 = quantize_static(x, self.x_scale).reshape(-1, x.shape[-1])
        y = float8_linear_act_op(x8, self.weight, self.scales, self.bias, self.activation)
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


class Float8LinearOnCodes(nn.Module):
    """lin2 of a fused pair: takes the float8 codes `Float8LinearAct` wrote (scale `x_scale`)
    and runs the same `torch._scaled_mm` as torchao's float8 linear."""

    def __init__(self, weight, w_scale, x_scale, bias, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("w_scale", w_scale.float().reshape(1, 1))
        self.register_buffer("x_scale", x_scale.float().reshape(1, 1))
        self.register_buffer("bias", bias)

    def forward(self, x8: Tensor) -> Tensor:
        y = torch._scaled_mm(
            x8.reshape(-1, x8.shape[-1]).contiguous(),  # cuBLASLt: row-major A (eager)
            self.weight.t(),
            scale_a=self.x_scale,
            scale_b=self.w_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
            use_fast_accum=True,
        )
        return y.reshape(*x8.shape[:-1], self.weight.shape[0])


class Float8Linear(Float8LinearOnCodes):
    """A float8-static linear on plain tensors: x quantized with its calibrated scale, then the
    same `torch._scaled_mm` as torchao's float8 linear. torchao's module keeps its weight as a
    tensor subclass, which the compiled model's runtime wrapper unwraps (and dynamo's guards
    inspect) on every call; on plain buffers that per-call Python work is gone."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(quantize_static(x, self.x_scale))


# -- int8 -------------------------------------------------------------------------------------


def quantize_int8_static(x: Tensor, scale: Tensor, zero_point: int) -> Tensor:
    """round(x / scale) + zero_point clamped to [-128, 127], in int8: the calibrated quantizer's
    codes (its [0, 255] grid shifted by -128), as plain ops so that inductor fuses them into the
    kernel that produces x. Rounds half to even, as the fake quantizer does."""
    q = torch.round(x.float() / scale) + zero_point
    return q.clamp(-128, 127).to(torch.int8)


def quantize_int8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes (M, K) int8, scales (M,) float32) of x's rows, symmetric: s = amax|row| / 127. An
    all-zero row (window padding) gets a tiny scale and zero codes, not a division by zero."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = (rows.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
    codes = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def quantize_int8_per_group(y: Tensor) -> tuple[Tensor, Tensor]:
    """(codes (M, N) int8, scales (cdiv(N, 128), M) float32) of y (M, N): `quantize_int8_per_token`
    on each row's `TILE_COLUMNS`-column groups (a short last group has its own scale), the
    layout codes "int8_tiles" writes."""
    m, n = y.shape
    groups = -(-n // TILE_COLUMNS)
    padded = torch.nn.functional.pad(y.float(), (0, groups * TILE_COLUMNS - n))
    codes, scale = quantize_int8_per_token(padded.reshape(m, groups, TILE_COLUMNS))
    return codes.reshape(m, -1)[:, :n], scale.reshape(m, groups).t().contiguous()


def _group_scaled_sums(x: Tensor, w: Tensor, x_tile_scales: Tensor) -> Tensor:
    """Σ over K's `TILE_COLUMNS` groups of (exact int32 sums of the group) x its rows' scales, in
    float32 and in the kernel's order: x (M, K) int8 codes with x_tile_scales (groups, M)."""
    acc = torch.zeros(x.shape[0], w.shape[0], device=x.device)
    for g, start in enumerate(range(0, x.shape[1], TILE_COLUMNS)):
        part = torch._int_mm(
            x[:, start : start + TILE_COLUMNS], w[:, start : start + TILE_COLUMNS].t()
        )
        acc += part.float() * x_tile_scales[g][:, None]
    return acc


def int8_linear_reference(
    x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None, activation: str, codes: str,
    int8: Int8Operands, out_dtype: torch.dtype, residual: Tensor | None = None,
    x_tile_scales: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
    """The int8 kernel's function in PyTorch (`_epilogue`): torch._int_mm's exact int32 sums,
    then float32 elementwise with the exact (erf) GELU. The CPU runs this (inductor fuses the
    elementwise part into the GEMM's consumer). K must be a multiple of 32 here too
    (`unsupported`): torch._int_mm's CPU kernel returns wrong sums for K = 1 (torch 2.14).
    `x_tile_scales`: x's scales per `TILE_COLUMNS` group (`_group_scaled_sums`); codes
    "int8_tiles": (codes, scales) of `quantize_int8_per_group`."""
    if x_tile_scales is not None:
        acc = _group_scaled_sums(x, w, x_tile_scales) - int8.col_zero
    else:
        acc = torch._int_mm(x, w.t()) - int8.col_zero
    y = acc.float() * (int8.col_scale * scales[0])
    if int8.row_scale is not None:
        y = y * int8.row_scale[:, None]
    if bias is not None:
        y = y + bias.float()
    if activation != "none":
        y = _activation(y, activation)
    if residual is not None:
        y = y + residual.float()
    if codes == "int8_tiles":
        return quantize_int8_per_group(y)
    if codes == "int8":
        return (torch.round(y / scales[1]) + scales[2]).clamp(-128, 127).to(torch.int8)
    if codes == "float8":
        return (y / scales[1]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
    return y.to(out_dtype)


@torch.library.custom_op("samq::int8_linear", mutates_args=())
def int8_linear_op(
    x: Tensor, w: Tensor, col_zero: Tensor, col_scale: Tensor, scales: Tensor,
    row_scale: Tensor | None, bias: Tensor | None, activation: str, codes: str,
    out_dtype: torch.dtype, residual: Tensor | None = None, x_tile_scales: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """An int8 x int8 linear with everything after the int32 sums in the GEMM's epilogue.

    Args:
        x: (M, K) int8, the input's codes; w: (N, K) int8, the weight's codes.
        col_zero, col_scale, row_scale: see `Int8Operands`.
        scales: (3,) float32 [s_x, s_out, z_out]: the input's scale (1 with row scales), and
            for codes="int8" the next linear's input scale and zero point.
        bias: (N,) or None. activation: "none", "gelu" or "relu".
        codes: "none" (the output in `out_dtype`) or "int8" (the next linear's codes).
        residual: (M, N) or None, added to the output (codes "none"): `x + linear(...)`.
        x_tile_scales: (cdiv(K, 128), M) or None: x's scales per row and 128-column group
            (what `int8_linear_group_codes_op` writes; then row_scale is None).

    Returns:
        (M, N). CUDA runs the Triton kernel, the CPU `int8_linear_reference`.
    """
    operands = Int8Operands(col_zero, col_scale, row_scale)
    if x.device.type == "cuda":
        return launch(x, w, scales, bias, activation, codes=codes, int8=operands,
                      out_dtype=out_dtype, residual=residual,
                      x_tile_scales=x_tile_scales)  # fmt: skip
    return int8_linear_reference(x, w, scales, bias, activation, codes, operands, out_dtype,
                                 residual, x_tile_scales)  # fmt: skip


@int8_linear_op.register_fake
def _(x, w, col_zero, col_scale, scales, row_scale, bias, activation, codes, out_dtype,
      residual=None, x_tile_scales=None):  # fmt: skip
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("samq::int8_linear_group_codes", mutates_args=())
def int8_linear_group_codes_op(
    x: Tensor, w: Tensor, col_zero: Tensor, col_scale: Tensor, scales: Tensor,
    row_scale: Tensor | None, bias: Tensor | None, activation: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`int8_linear_op` whose epilogue quantizes its output for the next linear with a scale
    per row and 128-column group (codes "int8_tiles"): int8-dynamic's lin1, whose lin2 has no
    calibrated input scale. Returns (codes (M, N) int8, scales (cdiv(N, 128), M) float32)."""
    operands = Int8Operands(col_zero, col_scale, row_scale)
    if x.device.type == "cuda":
        return launch(x, w, scales, bias, activation, codes="int8_tiles", int8=operands)
    return int8_linear_reference(x, w, scales, bias, activation, "int8_tiles", operands,
                                 torch.int8)  # fmt: skip


@int8_linear_group_codes_op.register_fake
def _(x, w, col_zero, col_scale, scales, row_scale, bias, activation):
    m, n = x.shape[0], w.shape[0]
    groups = (n + TILE_COLUMNS - 1) // TILE_COLUMNS
    return x.new_empty((m, n), dtype=torch.int8), x.new_empty((groups, m), dtype=torch.float32)


class Int8LinearOnCodes(nn.Module):
    """A W8A8 int8 linear on plain buffers that takes its input's int8 codes: the weight's codes
    (N, K) with a scale per output channel, the input's calibrated scale and zero point, and
    col_zero = zero point x each weight row's code sum, precomputed, so that the epilogue
    removes the zero point's share of the int32 sums exactly (`_epilogue`).

    CUDA runs `int8_linear_op` (the Triton GEMM at int8 tensor-core rate, any row count);
    the CPU runs `int8_linear_reference` as plain ops, which inductor compiles around
    torch._int_mm. torchao's `Int8Tensor` path (`INT8_KERNELS["torchao"]` in samq_fx.lower)
    runs cuBLAS's sm80 kernels on the H100, recomputes the weight's row sums on every call for
    an asymmetric input, needs more than 16 rows, and is a tensor subclass that the compiled
    model unwraps on every call."""

    def __init__(self, codes, w_scale, x_scale, x_zero: int, bias, out_dtype: torch.dtype):
        super().__init__()
        out_f = codes.shape[0]
        self.out_dtype = out_dtype
        self.x_zero = int(x_zero)
        self.register_buffer("weight", codes.to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.float().reshape(-1).expand(out_f).contiguous())
        self.register_buffer("col_zero", self.x_zero * codes.sum(dim=1, dtype=torch.int32))
        x_scale = torch.as_tensor(x_scale, device=codes.device).float().reshape(())
        self.register_buffer("x_scale", x_scale.clone())
        self.register_buffer("scales", torch.stack([self.x_scale, self.x_scale.new_ones(()),
                                                    self.x_scale.new_zeros(())]))  # fmt: skip
        self.register_buffer("bias", bias)

    def _matmul(
        self, x8: Tensor, row_scale=None, activation="none", codes="none", residual=None,
        x_tile_scales=None,
    ) -> Tensor:  # fmt: skip
        x2 = x8.reshape(-1, x8.shape[-1])
        out_dtype = torch.int8 if codes == "int8" else self.out_dtype
        if residual is not None:  # `passes/fuse_residual_add.py`: x + this linear, one rounding
            residual = residual.reshape(x2.shape[0], self.weight.shape[0])
        args = (x2, self.weight, self.col_zero, self.w_scale, self.scales, row_scale, self.bias,
                activation, codes, out_dtype, residual, x_tile_scales)  # fmt: skip
        if x2.is_cuda:
            y = int8_linear_op(*args)
        else:
            operands = Int8Operands(self.col_zero, self.w_scale, row_scale)
            y = int8_linear_reference(x2, self.weight, self.scales, self.bias, activation, codes,
                                      operands, out_dtype, residual, x_tile_scales)  # fmt: skip
        return y.reshape(*x8.shape[:-1], self.weight.shape[0])

    def forward(self, x8: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._matmul(x8, residual=residual)


class Int8Linear(Int8LinearOnCodes):
    """int8-static: x quantized with its calibrated scale and zero point (fused by inductor
    into x's producer), then the int8 GEMM."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._matmul(quantize_int8_static(x, self.x_scale, self.x_zero), residual=residual)


class Int8LinearDynamic(Int8LinearOnCodes):
    """int8-dynamic: x quantized per token at run time (symmetric); the epilogue multiplies by
    the row scales (and applies `activation`: `Int8LinearDynamicAct`)."""

    activation = "none"

    def __init__(self, codes, w_scale, bias, out_dtype: torch.dtype) -> None:
        super().__init__(codes, w_scale, 1.0, 0, bias, out_dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x8, row_scale = quantize_int8_per_token(x)
        return self._matmul(x8.reshape(x.shape), row_scale, self.activation, residual=residual)


class Int8LinearDynamicAct(Int8LinearDynamic):
    """int8-dynamic's lin1 + activation: x quantized per token, the GEMM's epilogue applies the
    activation and writes the compute dtype. lin2's per-token scales need the whole row of
    this output, which no output tile holds, so lin2 stays an `Int8LinearDynamic` and inductor
    quantizes its input in one pass (a row reduction) over what this writes (`fuse_pair`'s
    dynamic_scales="token")."""

    def __init__(self, codes, w_scale, bias, out_dtype: torch.dtype, activation: str) -> None:
        super().__init__(codes, w_scale, bias, out_dtype)
        self.activation = activation


class Int8LinearDynamicGroupCodes(Int8LinearDynamicAct):
    """int8-dynamic's lin1 + activation + lin2's input quantizer: x quantized per token; the
    epilogue applies the activation and quantizes the result with a scale per row and 128-column
    group (`TILE_COLUMNS`), which one output tile holds. Returns (codes, scales (groups, rows))
    for an `Int8LinearOnGroupCodes`: no compute-dtype round trip and no per-token pass between
    the two GEMMs (H100, SAM-B's MLP at batch 8: 0.468 ms a block against 0.573,
    bench/int8_group_production_h100.json), and a finer quantization than per token."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x8, row_scale = quantize_int8_per_token(x)
        args = (x8, self.weight, self.col_zero, self.w_scale, self.scales, row_scale, self.bias,
                self.activation)  # fmt: skip
        if x8.is_cuda:
            codes, scales = int8_linear_group_codes_op(*args)
        else:
            operands = Int8Operands(self.col_zero, self.w_scale, row_scale)
            codes, scales = int8_linear_reference(
                x8, self.weight, self.scales, self.bias, self.activation, "int8_tiles", operands,
                torch.int8,
            )  # fmt: skip
        return codes.reshape(*x.shape[:-1], self.weight.shape[0]), scales


class Int8LinearOnGroupCodes(Int8LinearDynamic):
    """int8-dynamic's lin2 of a fused pair: takes the codes and per-group scales an
    `Int8LinearDynamicGroupCodes` wrote; its K loop applies each group's scales to that group's
    int32 sums."""

    def forward(self, x8: Tensor, x_tile_scales: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._matmul(x8, residual=residual, x_tile_scales=x_tile_scales)


class Int8LinearAct(Int8LinearOnCodes):
    """lin1 + activation + lin2's input quantizer: int8 in, int8 codes for lin2 out (the int8
    twin of `Float8LinearAct`)."""

    def __init__(self, codes, w_scale, x_scale, x_zero, bias, out_scale, out_zero, activation):
        super().__init__(codes, w_scale, x_scale, x_zero, bias, torch.int8)
        self.activation = activation
        self.scales[1] = torch.as_tensor(out_scale).float().reshape(())
        self.scales[2] = float(out_zero)

    def forward(self, x: Tensor) -> Tensor:
        x8 = quantize_int8_static(x, self.x_scale, self.x_zero)
        return self._matmul(x8, activation=self.activation, codes="int8")


DYNAMIC_HIDDEN_SCALES = {
    "group": "lin1's epilogue quantizes lin2's input with a scale per token and 128 hidden "
    "channels, and lin2 applies them in its K loop (no round trip between the GEMMs)",
    "token": "lin1 writes the compute dtype with the activation applied, and lin2 quantizes it "
    "per token, as its other linears do (a pass over the hidden activation)",
}
"""How `fuse_pair` scales an int8-dynamic MLP's hidden activation (lin2's input)."""


def fuse_pair(
    lin1: nn.Module, lin2: nn.Module, activation: str, out_dtype: torch.dtype,
    dynamic_scales: str = "group",
):  # fmt: skip
    """(lin1 with the activation and lin2's input quantizer in its epilogue, lin2 taking the
    codes it writes) for two float8-static or two int8-static linears, and for two int8-dynamic
    ones with `dynamic_scales` "group"; (lin1 with the activation in its epilogue, lin2 as it
    was) for two int8-dynamic ones with "token" (`DYNAMIC_HIDDEN_SCALES`); or the reason not."""
    if type(lin1) is Float8Linear and type(lin2) is Float8Linear:
        first = Float8LinearAct(lin1.weight, lin1.w_scale, lin1.x_scale, lin1.bias,
                                lin2.x_scale, activation)  # fmt: skip
        second = Float8LinearOnCodes(lin2.weight, lin2.w_scale, lin2.x_scale, lin2.bias,
                                     out_dtype)  # fmt: skip
        return first, second
    if type(lin1) is Int8Linear and type(lin2) is Int8Linear:
        first = Int8LinearAct(lin1.weight, lin1.w_scale, lin1.x_scale, lin1.x_zero, lin1.bias,
                              lin2.x_scale, lin2.x_zero, activation)  # fmt: skip
        second = Int8LinearOnCodes(lin2.weight, lin2.w_scale, lin2.x_scale, lin2.x_zero,
                                   lin2.bias, out_dtype)  # fmt: skip
        return first, second
    if type(lin1) is Int8LinearDynamic and type(lin2) is Int8LinearDynamic:
        if dynamic_scales not in DYNAMIC_HIDDEN_SCALES:
            raise ValueError(
                f"dynamic_scales {dynamic_scales!r}; one of {list(DYNAMIC_HIDDEN_SCALES)}"
            )
        if dynamic_scales == "token":
            first = Int8LinearDynamicAct(lin1.weight, lin1.w_scale, lin1.bias, lin1.out_dtype,
                                         activation)  # fmt: skip
            return first, lin2
        first = Int8LinearDynamicGroupCodes(lin1.weight, lin1.w_scale, lin1.bias, lin1.out_dtype,
                                            activation)  # fmt: skip
        second = Int8LinearOnGroupCodes(lin2.weight, lin2.w_scale, lin2.bias, out_dtype)
        return first, second
    names = f"{type(lin1).__name__} and {type(lin2).__name__}"
    return f"not two float8-static, two int8-static or two int8-dynamic linears ({names})"
