"""SAM's encoder attention as one Triton kernel, in bf16/fp16 or with 8-bit (float8 e4m3) matmuls.

softmax(q·kᵀ·s + rel_h[:, row(key)] + rel_w[:, col(key)]) · v, flash-style (online softmax, no
L x L tensor), with the decomposed relative-position bias added inside the kernel instead of
being folded into the dot product (`kernels.augment_rel_pos` widens SAM-B's global head dim
from 64 to 192 for that). The key grid is walked row by row: with BLOCK_N a multiple of the
(padded) key-grid width, the rel_w tile is the same for every key tile, so it is loaded once
per query block and kept in registers, and rel_h is one column per key-grid row of the tile.

float8 (`q.dtype == torch.float8_e4m3fn`): q, k and v arrive as e4m3 with per-tensor scales
(`quantize_float8`), q·kᵀ and P·v run on the fp8 tensor cores, the probabilities are cast to
e4m3 after scaling by `P_SCALE` = 256 (they lie in [0, 1] relative to the running row max;
x256 moves their tail out of e4m3's subnormal range) and the softmax itself stays in float32.

`attention_reference` computes the same function in float32 PyTorch (with the same float8
rounding of P), the op's CPU implementation and what the tests compare the kernel with.

`global_attention_op` is the same kernel as `passes/fuse_attention.py` wires SAM's global
attentions (mode `QKV_VIEWS`): q, k, v are read where the qkv linear wrote them (bf16: strided
views, v's transpose included; float8: the static codes of q·scale, k and vᵀ), rel_h and rel_w
come from `_rel_pos_terms_kernel` (two small dots a grid row and column, no gather), and the
output is written token-major, as the output projection reads it, or as that projection's
8-bit codes (`CODES`). It replaces SAM's head split copies, q permute, two einsums, their
layout passes and the head merge: about 0.3 ms a global block at batch 8 on SAM-B.

Registers decide this kernel's speed: two 8-warp programs an SM need at most 128 a thread.
The 128 x 64 tile's configs with `maxnreg=128` get there without spilling where ptxas left to
itself takes 155-166 (bf16, or float8 writing codes): SAM-B's bf16 kernel 1.64 -> 1.05 ms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from samq_fx.tuned_launch import CACHE_AUTOTUNING, TunedLauncher

P_SCALE = 256.0
FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448

CODES = ("none", "float8", "int8")
"""What the attention kernels wired to the projection write: the attention's output in the
compute dtype ("none"), or the output projection's input codes, float8 e4m3 or int8 with a zero
point, with that linear's calibrated scale (`passes/fuse_attention_codes.py`): the quantize
pass between them goes."""

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with PyTorch's Linux wheels
    triton = None


def key_grid_pad(width: int) -> int:
    """The key-grid row width the kernel walks: the next power of two (14 -> 16, 64 -> 64)."""
    return 1 << max(width - 1, 0).bit_length()


def _codes(x: Tensor, scale: Tensor, qmax: float, dtype: torch.dtype) -> Tensor:
    """(x / scale) clamped to ±qmax in `dtype` (rounded first for an integer dtype). Plain ops,
    so that inductor fuses them into the kernel that produces x."""
    scaled = x.float() / scale
    if not dtype.is_floating_point:
        scaled = scaled.round()
    return scaled.clamp(-qmax, qmax).to(dtype)


def _quantize_per_tensor(x: Tensor, qmax: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(`_codes`, s) with the dynamic per-tensor scale s = amax(|x|) / qmax (float32, 0-dim, on
    the device: no host sync)."""
    scale = (x.detach().abs().amax().float() / qmax).clamp(min=1e-12)
    return _codes(x, scale, qmax, dtype), scale


def quantize_float8_static(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale clamped to ±448 in float8 e4m3, `scale` known before the call (calibrated)."""
    return _codes(x, scale, FLOAT8_MAX, torch.float8_e4m3fn)


def quantize_float8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x as float8 e4m3 with a dynamic per-tensor scale amax(|x|) / 448."""
    return _quantize_per_tensor(x, FLOAT8_MAX, torch.float8_e4m3fn)


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x rounded to int8 with a dynamic symmetric per-tensor scale amax(|x|) / 127."""
    return _quantize_per_tensor(x, 127.0, torch.int8)


def attention_reference(
    q: Tensor,
    k: Tensor,
    vt: Tensor,
    qk_scale: Tensor,
    v_scale: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
) -> Tensor:
    """The kernel's function in float32 PyTorch (float64 for float64 inputs). Shapes as
    `rel_pos_attention_op`; the output dtype is rel_h's."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    bh, length, _ = q.shape
    logits = (q.to(work) @ k.to(work).transpose(1, 2)) * qk_scale.to(work)
    bias = (rel_h.to(work)[..., :, None] + rel_w.to(work)[..., None, :]).reshape(bh, length, -1)
    logits = logits + bias
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    denom = p.sum(-1, keepdim=True)
    if vt.dtype == torch.float8_e4m3fn:
        p = (p * P_SCALE).to(torch.float8_e4m3fn).to(work) / P_SCALE
    else:
        p = p.to(vt.dtype).to(work)  # P enters the P·v dot in v's dtype
    out = (p @ vt.to(work).transpose(1, 2)) * v_scale.to(work) / denom
    return out.to(rel_h.dtype)


if triton is not None:

    @triton.jit
    def _round_to_e4m3(x):
        """Round x >= 0 to the nearest e4m3 value (ties to even in the normal range); only for
        Triton's CPU interpreter, whose float8 cast mis-rounds when the mantissa carries."""
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        normal = bits.to(tl.float32, bitcast=True)
        subnormal = tl.floor(x * 512.0 + 0.5) / 512.0
        return tl.where(x < 0.015625, subnormal, normal)

    @triton.jit
    def int8_codes(y, zero):
        """round(y) + zero clamped to [-128, 127], as int32, for y in float32 and an
        integer-valued zero point. Clamping first (to [-128 - zero, 127 - zero]: integer bounds,
        so it commutes with rounding) bounds y, then adding 1.5·2^23 rounds it half to even
        (float addition's own rounding) and leaves the integer in the low mantissa bits: a
        bitcast and an integer add give the code. No float-to-int conversion, which runs at a
        sixteenth of the FMA rate, and no cvt.rni: two such conversions an element made int8's
        GELU epilogue slower than float8's."""
        y = tl.minimum(tl.maximum(y, -128.0 - zero), 127.0 - zero) + 12582912.0
        return y.to(tl.int32, bitcast=True) + (tl.cast(zero, tl.int32) - 0x4B400000)

    @triton.jit
    def to_codes(y, zero, CODES: tl.constexpr):
        """y as the next linear's input codes (`CODES`): clamped to ±448 for float8 (the
        store's cast to e4m3 rounds), `int8_codes` for int8, y itself for "none". The attention
        kernels' and the GEMM epilogue's last step. (One return: Triton refuses returns of
        different types, even under constexpr branches.)"""
        if CODES == "float8":
            out = tl.minimum(tl.maximum(y, -448.0), 448.0)
        elif CODES == "int8":
            out = int8_codes(y, zero)
        else:
            out = y
        return out

    @triton.jit
    def program_batch_head(HEADS):
        """(batch·head, batch, head) of this program: grid axis 1 runs over batch·heads."""
        bh = tl.program_id(1)
        return bh.to(tl.int64), (bh // HEADS).to(tl.int64), (bh % HEADS).to(tl.int64)

    @triton.jit
    def _rel_pos_attention_kernel(
        Q, K, VT, OUT, RH, RW, QK_SCALE, V_SCALE, STATIC_SCALES, OUT_SCALE,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vd, stride_vn, stride_ob, stride_om,
        stride_hb, stride_hm, stride_hr, stride_wb, stride_wm,
        softmax_scale, out_zero, HEADS, L, KH, KW,
        D: tl.constexpr,
        DP: tl.constexpr,
        KWP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FLOAT8: tl.constexpr,
        EVEN: tl.constexpr,
        EMULATE_ROUNDING: tl.constexpr,
        QKV_VIEWS: tl.constexpr,
        CODES: tl.constexpr,
    ):  # fmt: skip
        ROWS: tl.constexpr = BLOCK_N // KWP  # key-grid rows per key tile
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_m = tl.program_id(0)
        bh, b, h = program_batch_head(HEADS)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)  # head dim padded to a power of two (SAM-H: 80 -> 128)
        d_ok = offs_d < D
        m_ok = offs_m < L
        j = tl.arange(0, BLOCK_N)
        col = j % KWP
        row_in_tile = j // KWP
        col_ok = col < KW
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        if EVEN:  # no query past L, no padded key-grid column or row, no padded channel
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        rh_base = RH + bh * stride_hb + offs_m * stride_hm
        rw_ptrs = RW + bh * stride_wb + offs_m[:, None] * stride_wm + col[None, :]
        if EVEN:
            rw = tl.load(rw_ptrs).to(tl.float32) * LOG2E
        else:
            rw_ok = m_ok[:, None] & col_ok[None, :]
            rw = tl.load(rw_ptrs, mask=rw_ok, other=0.0).to(tl.float32) * LOG2E
        if QKV_VIEWS and FLOAT8:  # q·scale's, k's and v's static float8 scales (sq, sk, sv)
            qk_scale = tl.load(STATIC_SCALES) * tl.load(STATIC_SCALES + 1) * LOG2E
        elif QKV_VIEWS:  # the unscaled q of the qkv output
            qk_scale = softmax_scale * LOG2E
        else:
            qk_scale = tl.load(QK_SCALE).to(tl.float32) * LOG2E
        # rel_w[m, col(key)] is the same for every key tile: kept in registers, in log2 units
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DP], tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = VT + b * stride_vb + h * stride_vh
        # float8: P is exp2(s - max + 8) = 256 x the probability relative to the row max, so
        # its small values stay out of e4m3's subnormals; l_i carries the same factor
        p_shift = 8.0 if FLOAT8 else 0.0
        for row0 in range(0, KH, ROWS):
            key_row = row0 + row_in_tile
            key_ok = col_ok & (key_row < KH)
            key = key_row * KW + col
            k_ptrs = k_base + key[None, :] * stride_kn + offs_d[:, None]
            v_ptrs = v_base + offs_d[:, None] * stride_vd + key[None, :] * stride_vn
            if EVEN:
                kt = tl.load(k_ptrs)
            else:
                kt = tl.load(k_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt).to(tl.float32) * qk_scale + rw
            if ROWS == 1:
                # one key-grid row per tile: rel_h is one number per query, so it goes into the
                # row max and the exponent's offset instead of onto every logit of the tile
                rh = tl.load(rh_base + row0 * stride_hr, mask=m_ok, other=0.0)
                rh = rh.to(tl.float32) * LOG2E
            else:
                rh = tl.zeros([BLOCK_M], tl.float32)
                for r in tl.static_range(ROWS):
                    rh_r = tl.load(
                        rh_base + (row0 + r) * stride_hr, mask=m_ok & (row0 + r < KH), other=0.0
                    )
                    rh_r = rh_r.to(tl.float32) * LOG2E
                    s += tl.where(row_in_tile[None, :] == r, rh_r[:, None], 0.0)
            if not EVEN:
                s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) + rh)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - (m_new - rh - p_shift)[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if EVEN:
                vt = tl.load(v_ptrs)
            else:
                vt = tl.load(v_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            if EMULATE_ROUNDING and FLOAT8:
                p = _round_to_e4m3(p)
            acc = tl.dot(p.to(vt.dtype), tl.trans(vt), acc)
            m_i = m_new
        # v's scale, loaded after the loop: one register less across it (128 a thread, two
        # 8-warp programs an SM; 160 with it)
        if QKV_VIEWS:
            v_scale = tl.load(STATIC_SCALES + 2) if FLOAT8 else 1.0
        else:
            v_scale = tl.load(V_SCALE).to(tl.float32)
        # codes: the softmax's 1 / denominator, v's scale and 1 / the projection's input scale
        out_mul = v_scale if CODES == "none" else v_scale / tl.load(OUT_SCALE)
        out = to_codes(acc * (out_mul / l_i)[:, None], out_zero, CODES)
        o_ptrs = OUT + b * stride_ob + offs_m[:, None] * stride_om + h * D + offs_d[None, :]
        if EVEN:
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _rel_pos_terms_kernel(
        Q, TH, TW, RH, RW,
        stride_qb, stride_qh, stride_qm, stride_th, stride_tw,
        stride_hb, stride_hm, stride_hr, stride_wb, stride_wm, HEADS, KH, KW,
        D: tl.constexpr,
        DP: tl.constexpr,
        KHP: tl.constexpr,
        KWP: tl.constexpr,
    ):  # fmt: skip
        """SAM's rel_h and rel_w as two small dots a program, with no gather: the queries of
        grid row g share the table rows their rel_h reads (rel_h[(g, j), r] = q · table_h[g - r
        + KH - 1], the same for every j), so rel_h of row g is q(row g) · table_h[g + KH - 1
        - r]ᵀ over r; likewise rel_w of grid column g is q(column g) · table_w[g + KW - 1 -
        c]ᵀ. Program g takes grid row g and grid column g. (The window kernel's q·table for
        every offset and a gather, tried here first, took 0.158 ms for SAM-B's global
        attention at batch 8: the gather runs on warp shuffles.)"""
        g = tl.program_id(0)
        bh, b, h = program_batch_head(HEADS)
        offs_d = tl.arange(0, DP)
        q_base = Q + b * stride_qb + h * stride_qh
        if g < KH:  # rel_h of grid row g: queries g·KW + j, key-grid rows r
            j = tl.arange(0, KWP)
            r = tl.arange(0, KHP)
            m = g * KW + j
            rel_h = _line_dot(q_base, stride_qm, m, j < KW, TH, stride_th, g, KH, r, offs_d, D)
            h_ptrs = RH + bh * stride_hb + m[:, None] * stride_hm + r[None, :] * stride_hr
            h_ok = (j < KW)[:, None] & (r < KH)[None, :]
            tl.store(h_ptrs, rel_h.to(RH.dtype.element_ty), mask=h_ok)
        if g < KW:  # rel_w of grid column g: queries i·KW + g, key-grid columns c
            i = tl.arange(0, KHP)
            c = tl.arange(0, KWP)
            m = i * KW + g
            rel_w = _line_dot(q_base, stride_qm, m, i < KH, TW, stride_tw, g, KW, c, offs_d, D)
            w_ptrs = RW + bh * stride_wb + m[:, None] * stride_wm + c[None, :]
            w_ok = (i < KH)[:, None] & (c < KW)[None, :]
            tl.store(w_ptrs, rel_w.to(RW.dtype.element_ty), mask=w_ok)

    @triton.jit
    def _line_dot(q_base, stride_qm, m, m_ok, TABLE, stride_t, g, size, t, offs_d, D):
        """q[m] · TABLE[g - t + size - 1] for t < size: the rel-pos terms of queries m that
        share grid line g, as one (len(m) x len(t)) dot."""
        d_ok = offs_d < D
        q = tl.load(
            q_base + m[:, None] * stride_qm + offs_d[None, :],
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        table = tl.load(
            TABLE + (g - t + size - 1)[None, :] * stride_t + offs_d[:, None],
            mask=(t < size)[None, :] & d_ok[:, None],
            other=0.0,
        )
        return tl.dot(q, table)

    def _even(args) -> bool:
        rows = args["BLOCK_N"] // args["KWP"]
        return bool(
            args["L"] % args["BLOCK_M"] == 0
            and args["KW"] == args["KWP"]
            and args["KH"] % rows == 0
            and args["D"] == args["DP"]
        )

    def _prune(configs, named_args, **kwargs):
        kwp = kwargs.get("KWP", named_args.get("KWP"))
        return [c for c in configs if c.kwargs["BLOCK_N"] >= kwp]

    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=regs)
        for bm, bn, w, s, regs in (
            (128, 64, 8, 2, None), (128, 64, 8, 3, None), (128, 64, 4, 2, None),
            (64, 64, 4, 2, None), (128, 128, 8, 2, None), (128, 128, 8, 3, None),
            (64, 128, 4, 2, None), (128, 64, 8, 2, 128), (128, 64, 8, 3, 128),
        )
    ]  # fmt: skip
    """Tile configs. maxnreg 128: two 8-warp programs an SM. Left to itself ptxas gives the
    128 x 64 tile 155-166 registers a thread (one program an SM) where 128 suffice with no
    spill (Triton 3.6, sm_90a: the bf16 kernel, and the float8 one writing codes); the float8
    kernel without codes lands on 128 by itself."""
    _tuned_kernel = triton.autotune(
        _CONFIGS,
        key=["L", "KH", "KW", "D", "FLOAT8", "QKV_VIEWS", "CODES"],
        prune_configs_by={"early_config_prune": _prune},
        cache_results=CACHE_AUTOTUNING,
    )(triton.heuristics({"EVEN": _even})(_rel_pos_attention_kernel))
    _launch = TunedLauncher(_tuned_kernel)


def kernel_arguments(
    q: Tensor,
    k: Tensor,
    vt: Tensor,
    qk_scale: Tensor,
    v_scale: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
) -> tuple[Tensor, tuple, dict]:
    """Check the shapes and build one kernel call: (the output to fill, the kernel's positional
    arguments, its shape and dtype constexprs). `launch` adds the tile config;
    `bench/kernel_configs.py` passes its own. Shapes as `rel_pos_attention_op`."""
    if triton is None:
        raise RuntimeError("the rel-pos attention kernel needs Triton, which is not installed")
    bh, length, d = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    _check_head_dim(d)
    q, k, vt, rel_h, rel_w = [t.contiguous() for t in (q, k, vt, rel_h, rel_w)]
    out = torch.empty(bh, length, d, dtype=rel_h.dtype, device=q.device)
    unused = out  # pointers the kernel never reads in this mode (static scales, codes)
    args = (q, k, vt, out, rel_h, rel_w, qk_scale, v_scale, unused, unused,
            q.stride(0), 0, q.stride(1), k.stride(0), 0, k.stride(1),
            vt.stride(0), 0, vt.stride(1), vt.stride(2), out.stride(0), out.stride(1),
            rel_h.stride(0), rel_h.stride(1), rel_h.stride(2), rel_w.stride(0), rel_w.stride(1),
            1.0, 0.0, 1, length, kh, kw)  # fmt: skip
    return out, args, _constexprs(q, d, kw, vt.dtype, qkv_views=False, codes="none")


def check_codes(out_scale: Tensor | None, codes: str) -> None:
    if codes not in CODES:
        raise ValueError(f"attention codes {codes!r}; codes: {CODES}")
    if (codes == "none") != (out_scale is None):
        raise ValueError(
            f"codes {codes!r} with out_scale {'None' if out_scale is None else 'given'}: "
            "8-bit codes need the projection's input scale, and only they take one"
        )


def output_dtype(codes: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The kernel's output dtype for `codes` (one of `CODES`)."""
    return {"none": compute_dtype, "float8": torch.float8_e4m3fn, "int8": torch.int8}[codes]


def _check_head_dim(d: int) -> None:
    if d > 256:
        raise ValueError(
            f"head dim {d} > 256: the kernel keeps a query block's output in registers"
        )


def _constexprs(q: Tensor, d: int, kw: int, v_dtype, qkv_views: bool, codes: str) -> dict:
    return {
        "D": d,
        "DP": max(32 if q.dtype.itemsize == 1 else 16, key_grid_pad(d)),  # 8-bit dots: K >= 32
        "KWP": key_grid_pad(kw),
        "FLOAT8": v_dtype == torch.float8_e4m3fn,  # P·v in float8
        "EMULATE_ROUNDING": q.device.type == "cpu",  # the interpreter
        "QKV_VIEWS": qkv_views,
        "CODES": codes,
    }


def rel_pos_terms_triton(
    q: Tensor, table_h: Tensor, table_w: Tensor, kh: int, kw: int
) -> tuple[Tensor, Tensor]:
    """SAM's rel_h and rel_w (`window_attention.rel_pos_terms`) of q (B, heads, L, D), any
    strides with a unit last one, in one Triton kernel: rel_h as (B·heads, KH, L) (the layout
    whose key-grid row the attention kernel reads in one contiguous load), rel_w as
    (B·heads, L, KW), both in q's dtype."""
    b, heads, length, d = q.shape
    table_h, table_w = table_h.to(q.dtype).contiguous(), table_w.to(q.dtype).contiguous()
    rel_h = torch.empty(b * heads, kh, length, dtype=q.dtype, device=q.device)
    rel_w = torch.empty(b * heads, length, kw, dtype=q.dtype, device=q.device)
    _rel_pos_terms_kernel[(max(kh, kw), b * heads)](
        q, table_h, table_w, rel_h, rel_w, *q.stride()[:3], table_h.stride(0), table_w.stride(0),
        rel_h.stride(0), rel_h.stride(2), rel_h.stride(1), rel_w.stride(0), rel_w.stride(1),
        heads, kh, kw, D=d, DP=max(16, key_grid_pad(d)), KHP=max(16, key_grid_pad(kh)),
        KWP=max(16, key_grid_pad(kw)), num_warps=4,
    )  # fmt: skip
    return rel_h, rel_w


def global_kernel_arguments(
    q: Tensor,
    k: Tensor,
    vt: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
    scale: float,
    scales: Tensor | None = None,
    out_scale: Tensor | None = None,
    out_zero: int = 0,
    codes: str = "none",
) -> tuple[Tensor, tuple, dict]:
    """`kernel_arguments` for `global_attention_op`: q is what the dot reads (the unscaled q, or
    q_codes), rel_h and rel_w as `rel_pos_terms_triton` returns them. The kernel reads q, k, v
    where they lie and writes the output token-major (or the projection's codes)."""
    b, heads, length, d = q.shape
    kh, kw = rel_h.shape[1], rel_w.shape[2]
    q, k = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k)]
    if vt.stride(-1) != 1 and vt.stride(-2) != 1:
        vt = vt.contiguous()
    compute_dtype = rel_h.dtype  # q's (q may be its float8 codes here)
    out = torch.empty(
        b, length, heads * d, dtype=output_dtype(codes, compute_dtype), device=q.device
    )
    unused = out  # pointers the kernel never reads in this mode (the dynamic scales)
    args = (q, k, vt, out, rel_h, rel_w, unused, unused,
            scales if scales is not None else unused, out_scale if out_scale is not None else unused,
            *q.stride()[:3], *k.stride()[:3], *vt.stride(), out.stride(0), out.stride(1),
            rel_h.stride(0), rel_h.stride(2), rel_h.stride(1), rel_w.stride(0), rel_w.stride(1),
            float(scale), float(out_zero), heads, length, kh, kw)  # fmt: skip
    return out, args, _constexprs(q, d, kw, vt.dtype, qkv_views=True, codes=codes)


def _check_global(q, k, vt, table_h, table_w, kh, kw, q_codes, scales):
    """(B, heads, L, D) of `global_attention_op`'s arguments, or a ValueError naming the one
    that does not fit."""
    if q.dim() != 4 or k.shape != q.shape or vt.shape != (*q.shape[:2], q.shape[3], q.shape[2]):
        raise ValueError(
            f"q, k of shape (B, heads, L, D) and vt of shape (B, heads, D, L); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(vt.shape)}"
        )
    b, heads, length, d = q.shape
    if length != kh * kw:
        raise ValueError(f"L={length} queries on a {kh} x {kw} key grid: L must be kh·kw")
    if table_h.shape != (2 * kh - 1, d) or table_w.shape != (2 * kw - 1, d):
        raise ValueError(
            f"rel-pos tables of shape {tuple(table_h.shape)} and {tuple(table_w.shape)}; a "
            f"{kh} x {kw} grid with head dim {d} needs ({2 * kh - 1}, {d}) and ({2 * kw - 1}, {d})"
        )
    given = [t is not None and t.dtype == torch.float8_e4m3fn for t in (q_codes, k, vt)]
    if len(set(given + [scales is not None])) != 1:
        raise ValueError(
            "float8 attention takes q_codes, k and vt as e4m3 codes with their static scales "
            f"(sq, sk, sv); got q_codes {None if q_codes is None else q_codes.dtype}, k {k.dtype}, "
            f"vt {vt.dtype}, scales {'given' if scales is not None else 'None'}"
        )
    if q_codes is not None and q_codes.shape != q.shape:
        raise ValueError(f"q_codes of shape {tuple(q_codes.shape)}; q's is {tuple(q.shape)}")
    if scales is not None and scales.shape != (3,):
        raise ValueError(f"static scales of shape {tuple(scales.shape)}; (sq, sk, sv) is (3,)")
    return b, heads, length, d


def _run(out, args, common, length, batch_heads, key, block_m, block_n, num_warps) -> Tensor:
    """Launch the kernel on (query blocks, batch·heads): autotuned under `key`, or at the tile
    config given (`block_m`, as the interpreter tests do)."""
    if block_m is None:
        grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch_heads)  # noqa: E731
        _launch(key, grid, *args, **common)
        return out
    kh, kw = args[-2], args[-1]
    block_n = block_n or max(64, common["KWP"])
    meta = {"L": length, "KH": kh, "KW": kw, "BLOCK_M": block_m, "BLOCK_N": block_n, **common}
    _rel_pos_attention_kernel[(triton.cdiv(length, block_m), batch_heads)](
        *args, **common, BLOCK_M=block_m, BLOCK_N=block_n, EVEN=_even(meta), num_warps=num_warps
    )
    return out


def launch(
    q: Tensor,
    k: Tensor,
    vt: Tensor,
    qk_scale: Tensor,
    v_scale: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """Run the Triton kernel (autotuned unless `block_m` is given, as the interpreter tests do;
    `block_n` a multiple of the padded key-grid width). Shapes as `rel_pos_attention_op`."""
    out, args, common = kernel_arguments(q, k, vt, qk_scale, v_scale, rel_h, rel_w)
    bh, length, d = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    key = (length, kh, kw, d, common["FLOAT8"], False, "none", q.dtype, k.dtype, rel_h.dtype)
    return _run(out, args, common, length, bh, key, block_m, block_n, num_warps)


def launch_global(
    q: Tensor,
    k: Tensor,
    vt: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
    q_codes: Tensor | None = None,
    scales: Tensor | None = None,
    out_scale: Tensor | None = None,
    out_zero: int = 0,
    codes: str = "none",
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """`launch` for `global_attention_op` (its arguments): the rel-pos terms kernel, then the
    attention kernel."""
    if triton is None:
        raise RuntimeError("the rel-pos attention kernel needs Triton, which is not installed")
    b, heads, length, d = _check_global(q, k, vt, table_h, table_w, kh, kw, q_codes, scales)
    check_codes(out_scale, codes)
    _check_head_dim(d)
    rel_h, rel_w = rel_pos_terms_triton(q, table_h, table_w, kh, kw)
    q_dot = q if q_codes is None else q_codes
    out, args, common = global_kernel_arguments(
        q_dot, k, vt, rel_h, rel_w, scale, scales, out_scale, out_zero, codes
    )
    key = (length, kh, kw, d, common["FLOAT8"], True, codes, q.dtype, k.dtype, vt.stride(-1))
    return _run(out, args, common, length, b * heads, key, block_m, block_n, num_warps)


@torch.library.custom_op("samq::rel_pos_attention", mutates_args=())
def rel_pos_attention_op(
    q: Tensor,
    k: Tensor,
    vt: Tensor,
    qk_scale: Tensor,
    v_scale: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
) -> Tensor:
    """softmax(q·kᵀ·qk_scale + rel_h + rel_w)·(v·v_scale), one query/key grid per batch·head.

    Args:
        q, k: (BH, L, D), float8 e4m3, int8 or the compute dtype; D <= 256.
        vt: v transposed, (BH, D, L), float8 e4m3 or the compute dtype.
        qk_scale, v_scale: 0-dim float32 (the float8 scales; q's softmax scale is already in q).
        rel_h, rel_w: (BH, L, KH) and (BH, L, KW) with KH·KW = L, the compute dtype.

    Returns:
        (BH, L, D) in rel_h's dtype. CUDA runs the Triton kernel, the CPU `attention_reference`.
    """
    if q.device.type == "cuda":
        return launch(q, k, vt, qk_scale, v_scale, rel_h, rel_w)
    return attention_reference(q, k, vt, qk_scale, v_scale, rel_h, rel_w)


@rel_pos_attention_op.register_fake
def _(q, k, vt, qk_scale, v_scale, rel_h, rel_w):
    return q.new_empty(q.shape, dtype=rel_h.dtype)


def global_attention_reference(
    q: Tensor,
    k: Tensor,
    vt: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
    q_codes: Tensor | None = None,
    scales: Tensor | None = None,
) -> Tensor:
    """`global_attention_op`'s function (before any codes) in float32 PyTorch, through
    `attention_reference`: (B, L, heads·D) in q's dtype."""
    from samq_fx.window_attention import rel_pos_terms  # that module imports this one

    b, heads, length, d = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    rel_h = rel_pos_terms(q.to(work), table_h.to(work), kh, kw, 0)
    rel_w = rel_pos_terms(q.to(work), table_w.to(work), kh, kw, 1)
    if scales is None:
        q_dot, qk_scale, v_scale = q, torch.tensor(scale, dtype=work), torch.ones((), dtype=work)
    else:
        sq, sk, v_scale = scales.float().unbind()
        q_dot, qk_scale = q_codes, sq * sk
    flat = [t.reshape(b * heads, *t.shape[2:]) for t in (q_dot, k, vt)]
    out = attention_reference(*flat, qk_scale, v_scale, rel_h, rel_w)
    out = out.reshape(b, heads, length, d).transpose(1, 2).reshape(b, length, heads * d)
    return out.to(q.dtype)


@torch.library.custom_op("samq::global_attention", mutates_args=())
def global_attention_op(
    q: Tensor,
    k: Tensor,
    vt: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
    q_codes: Tensor | None = None,
    scales: Tensor | None = None,
    out_scale: Tensor | None = None,
    out_zero: int = 0,
    codes: str = "none",
) -> Tensor:
    """SAM's global attention with its decomposed rel-pos bias computed from q and the tables:
    softmax(q·kᵀ·scale + rel_h[row(key)] + rel_w[col(key)])·v.

    Args:
        q: (B, heads, L, D), the unscaled q in the compute dtype, any strides with a unit last
            stride (the head split of the qkv linear's output, not copied).
        k: (B, heads, L, D), the compute dtype (strided as q) or float8 e4m3 codes.
        vt: v transposed, (B, heads, D, L): the compute dtype (a transposed view of v) or
            float8 codes with the keys contiguous.
        table_h, table_w: the attention's rel_pos_h (2·kh - 1, D) and rel_pos_w (2·kw - 1, D).
        scale: the softmax scale (head_dim ** -0.5).
        q_codes, scales: float8 only: q·scale's codes, and the (3,) float32 static scales of
            q·scale, k and v their codes were made with.
        out_scale, out_zero, codes: as `window_attention.window_attention_op`: the output
            projection's input codes instead of the output.

    Returns:
        (B, L, heads·D), token-major (the projection's layout); the compute dtype or the codes'.
        CUDA runs the rel-pos terms kernel and the attention kernel, the CPU
        `global_attention_reference` and the linear's quantizer.
    """
    if q.device.type == "cuda":
        return launch_global(
            q, k, vt, table_h, table_w, scale, kh, kw, q_codes, scales, out_scale, out_zero, codes
        )
    check_codes(out_scale, codes)
    _check_global(q, k, vt, table_h, table_w, kh, kw, q_codes, scales)
    out = global_attention_reference(q, k, vt, table_h, table_w, scale, kh, kw, q_codes, scales)
    return output_codes(out, out_scale, out_zero, codes)


@global_attention_op.register_fake
def _(q, k, vt, table_h, table_w, scale, kh, kw, q_codes=None, scales=None, out_scale=None,
      out_zero=0, codes="none"):  # fmt: skip
    b, heads, length, d = q.shape
    return q.new_empty((b, length, heads * d), dtype=output_dtype(codes, q.dtype))


def output_codes(out: Tensor, out_scale: Tensor | None, out_zero: int, codes: str) -> Tensor:
    """`out` as the projection's input codes (`codes`), as its calibrated quantizer makes them;
    the attention ops' CPU path."""
    from samq_fx.gemm_epilogue import quantize_int8_static  # that module imports this one

    if codes == "float8":
        return quantize_float8_static(out, out_scale)
    if codes == "int8":
        return quantize_int8_static(out, out_scale, out_zero)
    return out


def global_rel_pos_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
    scales: Tensor | None = None,
    out_scale: Tensor | None = None,
    out_zero: int = 0,
    codes: str = "none",
) -> Tensor:
    """The call `fuse_attention` inserts for a global attention: q, k, v are (B, heads, L, D)
    views of the qkv linear's output. With static float8 `scales` (sq, sk, sv), the codes of
    q·scale, k and v (v's transposed) are made here by plain ops that inductor fuses into the
    passes that read the qkv output; the rel-pos terms are computed from the unscaled q."""
    if scales is None:
        vt = v.transpose(-1, -2)  # a view: the kernel reads v where the qkv linear wrote it
        return global_attention_op(
            q, k, vt, table_h, table_w, scale, kh, kw, None, None, out_scale, out_zero, codes
        )
    sq, sk, sv = scales.float().unbind()
    q8 = quantize_float8_static(q * scale, sq)
    k8 = quantize_float8_static(k, sk)
    vt8 = quantize_float8_static(v, sv).transpose(-1, -2).contiguous()
    return global_attention_op(
        q, k8, vt8, table_h, table_w, scale, kh, kw, q8, scales, out_scale, out_zero, codes
    )


ATTENTION_MODES = ("bf16", "float8", "int8-qk")
"""What `rel_pos_attention_triton` feeds the tensor cores: the compute dtype throughout;
float8 e4m3 q, k, v and P; or int8 q·kᵀ (k smoothed) with float8 P·v."""


def rel_pos_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, mode: str = "bf16"
) -> Tensor:
    """`kernels.rel_pos_attention`'s signature on the Triton kernel: q (already scaled), k, v of
    shape (BH, L, D) and rel_h, rel_w of shape (BH, qh, qw, kh / kw).

    mode "float8" casts q, k and v to e4m3 with dynamic per-tensor scales; "int8-qk" rounds q
    and k to int8 (k minus its mean over the keys first: softmax is unchanged by a per-query
    constant, and the mean is most of k's range) and v to e4m3. "bf16" keeps the compute dtype.
    """
    return rel_pos_attention_op(*op_inputs(q, k, v, rel_h, rel_w, mode))


def op_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
    mode: str,
    static_scales: Tensor | None = None,
) -> tuple:
    """The arguments of `rel_pos_attention_op` for `mode`: q, k, v quantized (or not), v
    transposed, the scales, rel_h / rel_w as (BH, L, KH / KW). `static_scales` (float8 only):
    q's, k's and v's float8 scales, known before the call (calibrated), instead of dynamic ones:
    no amax pass over q, k and v."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r}; modes: {ATTENTION_MODES}")
    if static_scales is not None and mode != "float8":
        raise ValueError(f"static scales are float8 scales; mode {mode!r} takes none")
    bh, length, _ = q.shape
    rel_h = rel_h.reshape(bh, length, rel_h.shape[-1])
    rel_w = rel_w.reshape(bh, length, rel_w.shape[-1])
    if mode == "bf16":
        one = torch.ones((), dtype=torch.float32, device=q.device)
        return q, k, v.transpose(1, 2).contiguous(), one, one, rel_h, rel_w
    if static_scales is not None:
        sq, sk, sv = static_scales.float().unbind()
        q8, k8, v8 = (quantize_float8_static(t, s) for t, s in ((q, sq), (k, sk), (v, sv)))
        return q8, k8, v8.transpose(1, 2).contiguous(), sq * sk, sv, rel_h, rel_w
    # v's amax is read in the (BH, L, D) order of q's and k's; only its codes are written
    # transposed (inductor still runs three reductions: bench/RESULTS.md, session 8)
    if mode == "float8":
        (q8, sq), (k8, sk) = quantize_float8(q), quantize_float8(k)
    else:
        k = k - k.mean(dim=1, keepdim=True)
        (q8, sq), (k8, sk) = quantize_int8(q), quantize_int8(k)
    v8, sv = quantize_float8(v)
    return q8, k8, v8.transpose(1, 2).contiguous(), sq * sk, sv, rel_h, rel_w


def rel_pos_attention_float8(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor):
    """`rel_pos_attention_triton` with float8 q·kᵀ and P·v."""
    return rel_pos_attention_triton(q, k, v, rel_h, rel_w, "float8")


def rel_pos_attention_float8_static(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scales: Tensor
) -> Tensor:
    """`rel_pos_attention_float8` with q's, k's and v's float8 scales given: (3,) float32, from
    the ranges calibration recorded for them (`fuse_attention` reads their quantizers)."""
    return rel_pos_attention_op(*op_inputs(q, k, v, rel_h, rel_w, "float8", scales))


def rel_pos_attention_int8_qk(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor):
    """`rel_pos_attention_triton` with int8 q·kᵀ and float8 P·v."""
    return rel_pos_attention_triton(q, k, v, rel_h, rel_w, "int8-qk")


def rel_pos_attention_bf16(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor):
    """`rel_pos_attention_triton` in the compute dtype (the float baseline of the same kernel)."""
    return rel_pos_attention_triton(q, k, v, rel_h, rel_w, "bf16")


def attention_flops(batch_heads: int, length: int, head_dim: int) -> float:
    """Multiply-adds x 2 of q·kᵀ and P·v (the bias and softmax not counted)."""
    return 4.0 * batch_heads * length * length * head_dim


__all__ = [
    "CODES",
    "P_SCALE",
    "check_codes",
    "global_attention_op",
    "global_attention_reference",
    "global_kernel_arguments",
    "global_rel_pos_attention",
    "launch_global",
    "output_codes",
    "output_dtype",
    "attention_flops",
    "attention_reference",
    "kernel_arguments",
    "key_grid_pad",
    "launch",
    "op_inputs",
    "quantize_float8",
    "quantize_float8_static",
    "ATTENTION_MODES",
    "quantize_int8",
    "rel_pos_attention_bf16",
    "rel_pos_attention_float8",
    "rel_pos_attention_float8_static",
    "rel_pos_attention_int8_qk",
    "rel_pos_attention_op",
    "rel_pos_attention_triton",
]
