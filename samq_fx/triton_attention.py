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
"""

from __future__ import annotations

import torch
from torch import Tensor

from samq_fx.tuned_launch import TunedLauncher

P_SCALE = 256.0
FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448

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
    def _rel_pos_attention_kernel(
        Q, K, VT, OUT, RH, RW, QK_SCALE, V_SCALE,
        stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vd,
        stride_ob, stride_om, stride_hb, stride_hm, stride_wb, stride_wm,
        L, KH, KW,
        D: tl.constexpr,
        DP: tl.constexpr,
        KWP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FLOAT8: tl.constexpr,
        EVEN: tl.constexpr,
        EMULATE_ROUNDING: tl.constexpr,
    ):  # fmt: skip
        ROWS: tl.constexpr = BLOCK_N // KWP  # key-grid rows per key tile
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)  # head dim padded to a power of two (SAM-H: 80 -> 128)
        d_ok = offs_d < D
        m_ok = offs_m < L
        j = tl.arange(0, BLOCK_N)
        col = j % KWP
        row_in_tile = j // KWP
        col_ok = col < KW
        q_ptrs = Q + bh * stride_qb + offs_m[:, None] * stride_qm + offs_d[None, :]
        rw_ptrs = RW + bh * stride_wb + offs_m[:, None] * stride_wm + col[None, :]
        if EVEN:  # no query past L, no padded key-grid column or row, no padded channel
            q = tl.load(q_ptrs)
            rw = tl.load(rw_ptrs).to(tl.float32) * LOG2E
        else:
            q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            rw_ok = m_ok[:, None] & col_ok[None, :]
            rw = tl.load(rw_ptrs, mask=rw_ok, other=0.0).to(tl.float32) * LOG2E
        # rel_w[m, col(key)] is the same for every key tile: kept in registers, in log2 units
        qk_scale = tl.load(QK_SCALE).to(tl.float32) * LOG2E
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DP], tl.float32)
        rh_base = RH + bh * stride_hb + offs_m * stride_hm
        # float8: P is exp2(s - max + 8) = 256 x the probability relative to the row max, so
        # its small values stay out of e4m3's subnormals; l_i carries the same factor
        p_shift = 8.0 if FLOAT8 else 0.0
        for row0 in range(0, KH, ROWS):
            key_row = row0 + row_in_tile
            key_ok = col_ok & (key_row < KH)
            key = key_row * KW + col
            k_ptrs = K + bh * stride_kb + key[None, :] * stride_kn + offs_d[:, None]
            v_ptrs = VT + bh * stride_vb + offs_d[:, None] * stride_vd + key[None, :]
            if EVEN:
                kt = tl.load(k_ptrs)
            else:
                kt = tl.load(k_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt).to(tl.float32) * qk_scale + rw
            if ROWS == 1:
                # one key-grid row per tile: rel_h is one number per query, so it goes into the
                # row max and the exponent's offset instead of onto every logit of the tile
                rh = tl.load(rh_base + row0, mask=m_ok, other=0.0).to(tl.float32) * LOG2E
            else:
                rh = tl.zeros([BLOCK_M], tl.float32)
                for r in tl.static_range(ROWS):
                    rh_r = tl.load(rh_base + row0 + r, mask=m_ok & (row0 + r < KH), other=0.0)
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
        v_scale = tl.load(V_SCALE).to(tl.float32)
        out = acc * (v_scale / l_i)[:, None]
        o_ptrs = OUT + bh * stride_ob + offs_m[:, None] * stride_om + offs_d[None, :]
        if EVEN:
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

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
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 2),
            (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 2),
        )
    ]  # fmt: skip
    _tuned_kernel = triton.autotune(
        _CONFIGS,
        key=["L", "KH", "KW", "D", "FLOAT8"],
        prune_configs_by={"early_config_prune": _prune},
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
    if d > 256:
        raise ValueError(
            f"head dim {d} > 256: the kernel keeps a query block's output in registers"
        )
    q, k, vt, rel_h, rel_w = [t.contiguous() for t in (q, k, vt, rel_h, rel_w)]
    out = torch.empty(bh, length, d, dtype=rel_h.dtype, device=q.device)
    args = (q, k, vt, out, rel_h, rel_w, qk_scale, v_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), vt.stride(0), vt.stride(1),
            out.stride(0), out.stride(1), rel_h.stride(0), rel_h.stride(1),
            rel_w.stride(0), rel_w.stride(1), length, kh, kw)  # fmt: skip
    common = {
        "D": d,
        "DP": max(16, key_grid_pad(d)),
        "KWP": key_grid_pad(kw),
        "FLOAT8": vt.dtype == torch.float8_e4m3fn,  # P·v in float8
        "EMULATE_ROUNDING": q.device.type == "cpu",  # the interpreter
    }
    return out, args, common


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
    kwp, dp, float8 = common["KWP"], common["DP"], common["FLOAT8"]
    if block_m is None:
        grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), bh)  # noqa: E731
        key = (length, kh, kw, d, float8, q.dtype, k.dtype, rel_h.dtype)
        _launch(key, grid, *args, **common)
    else:
        block_n = block_n or max(64, kwp)
        meta = {"L": length, "KH": kh, "KW": kw, "KWP": kwp, "D": d, "DP": dp,
                "BLOCK_M": block_m, "BLOCK_N": block_n}  # fmt: skip
        grid = (triton.cdiv(length, block_m), bh)
        _rel_pos_attention_kernel[grid](
            *args, **common, BLOCK_M=block_m, BLOCK_N=block_n, EVEN=_even(meta),
            num_warps=num_warps,
        )  # fmt: skip
    return out


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
    "P_SCALE",
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
