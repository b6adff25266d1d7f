"""SAM's windowed attention as one Triton kernel that reads q, k, v where the qkv linear wrote them.

A window is 14 x 14 tokens in SAM (8 x 8 in the tiny model): all of its keys fit one tile, so
the kernel needs no online softmax. One program takes a (window, head) and a block of queries:

    s = q·kᵀ·scale + rel_h[:, row(key)] + rel_w[:, col(key)],   out = softmax(s)·v

The key grid is laid out as KH rows of KWP (the row width padded to a power of two) slots, so a
key's grid row and column are shifts of its slot. SAM's rel-pos terms are computed in the kernel
from the attention's two tables, side by side: q·tableᵀ for every relative offset (one
tensor-core dot), then each query's KH + KW offsets picked with one `tl.gather`. The bias is
then one small tensor-core dot, [rel_h, rel_w]·[E_row; E_col], with one-hot E built from the
slot indices: exact (one nonzero term per sum), and on units the softmax leaves idle. That dot
starts the q·kᵀ accumulator (the bias divided by the softmax scale), so the kernel holds one
(queries x keys) float32 tile, not two: SAM-B's 14 x 14 windows spilled registers with two.
The flex path instead runs two einsums for rel_h / rel_w and concatenates [q, rel_h, rel_w] and
[k, one-hots] in memory before every call (`kernels.augment_rel_pos`).

What the graph saves (`passes/fuse_attention.py` wires it): q, k and v are strided views of the
qkv linear's output, (B, heads, L, D) with the token stride 3·C, so the head split is not copied;
the output is written token-major, (B, L, heads·D), which is the layout the output projection
reads, so the head merge is not copied either.

With `codes` "float8" / "int8" the kernel also quantizes its output for the output projection
(that linear's calibrated scale, and zero point for int8), so the projection reads 8-bit codes
and no pass between the two reads and writes the output again.

`window_attention_reference` is the same function in float32 PyTorch: the op's CPU
implementation and what the tests compare the kernel with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from samq_fx.triton_attention import (
    CODES,
    check_codes,
    key_grid_pad,
    output_codes,
    output_dtype,
)
from samq_fx.tuned_launch import CACHE_AUTOTUNING, TunedLauncher

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with PyTorch's Linux wheels
    triton = None

MAX_KEYS = 256
"""The padded key grid (rows x padded row width) one tile holds: SAM's 14 x 14 windows are 14 x 16."""


def fits_one_tile(kh: int, kw: int) -> bool:
    """Whether a kh x kw key grid fits the kernel's single key tile."""
    return key_grid_pad(kh) * key_grid_pad(kw) <= MAX_KEYS


def rel_pos_terms(q: Tensor, table: Tensor, kh: int, kw: int, axis: int) -> Tensor:
    """SAM's rel_h (axis 0) or rel_w (axis 1) for q of shape (B, heads, L, D) on a kh x kw grid
    of queries and keys: (B·heads, L, kh or kw); term r of query (i, j) is
    q · table[i - r + kh - 1] (axis 0) or q · table[j - r + kw - 1] (axis 1). That is
    `get_rel_pos` followed by `add_decomposed_rel_pos`'s einsum, for equal query and key grids."""
    b, heads, length, d = q.shape
    size = (kh, kw)[axis]
    coords = torch.arange(size, device=q.device)
    gathered = table[coords[:, None] - coords[None, :] + size - 1].to(q.dtype)  # (size, size, D)
    eq = "bhwc,hkc->bhwk" if axis == 0 else "bhwc,wkc->bhwk"
    terms = torch.einsum(eq, q.reshape(b * heads, kh, kw, d), gathered)
    return terms.reshape(b * heads, length, size)


def window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
) -> Tensor:
    """The kernel's function in float32 PyTorch. Shapes as `window_attention_op`."""
    b, heads, length, d = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(work) for t in (q, k, v))
    rel_h = rel_pos_terms(qf, table_h.to(work), kh, kw, 0)
    rel_w = rel_pos_terms(qf, table_w.to(work), kh, kw, 1)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b * heads, length, kh * kw)
    qf, kf, vf = (t.reshape(b * heads, length, d) for t in (qf, kf, vf))
    out = (qf @ kf.transpose(1, 2) * scale + bias).softmax(-1) @ vf
    out = out.reshape(b, heads, length, d).transpose(1, 2).reshape(b, length, heads * d)
    return out.to(q.dtype)


if triton is not None:
    from samq_fx.triton_attention import program_batch_head, to_codes

    @triton.jit
    def _window_attention_kernel(
        Q, K, V, TH, TW, OUT, OUT_SCALE,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_th, stride_tw, stride_ob, stride_om,
        scale, out_zero, HEADS, L, KH, KW,
        CODES: tl.constexpr,
        D: tl.constexpr,
        DP: tl.constexpr,
        KWP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        RP: tl.constexpr,
        TP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        M_STEPS: tl.constexpr,
        KEY_CHUNKS: tl.constexpr = 1,
    ):  # fmt: skip
        LOG2E: tl.constexpr = 1.4426950408889634
        _, b, h = program_batch_head(HEADS)
        offs_d = tl.arange(0, DP)  # head dim padded to a power of two (SAM-H: 80 -> 128)
        d_ok = offs_d < D
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        # the one-hot expander's rows: offsets r < RP of rel_h, then of rel_w
        r = tl.arange(0, 2 * RP)
        r_is_w = r >= RP
        r_off = tl.where(r_is_w, r - RP, r)
        if KEY_CHUNKS == 1:  # the whole window's keys and values, once for M_STEPS query blocks
            kt, e, key, key_ok = _window_keys(
                k_base, stride_kn, tl.arange(0, BLOCK_N), offs_d, d_ok, r_off, r_is_w, KH, KW, KWP
            )
            v = _window_values(v_base, stride_vn, key, key_ok, offs_d, d_ok)
        # both rel-pos tables as one transposed table: column t < TP is table_h's relative offset
        # t - (KH - 1), column TP + t table_w's offset t - (KW - 1)
        t = tl.arange(0, 2 * TP)
        t_is_w = t >= TP
        t_row = tl.where(t_is_w, t - TP, t)
        tab_h = tl.load(
            TH + t_row[None, :] * stride_th + offs_d[:, None],
            mask=(~t_is_w & (t_row < 2 * KH - 1))[None, :] & d_ok[:, None],
            other=0.0,
        )
        tab_w = tl.load(
            TW + t_row[None, :] * stride_tw + offs_d[:, None],
            mask=(t_is_w & (t_row < 2 * KW - 1))[None, :] & d_ok[:, None],
            other=0.0,
        )
        tab = tl.where(t_is_w[None, :], tab_w, tab_h)
        scale_log2 = scale * LOG2E
        inv_scale = 1.0 / scale
        # codes: the softmax's 1 / denominator and 1 / the projection's input scale, one multiply
        inv_out = 1.0 if CODES == "none" else 1.0 / tl.load(OUT_SCALE)
        for step in tl.static_range(M_STEPS):
            offs_m = (tl.program_id(0) * M_STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < L
            q = tl.load(
                Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            # SAM's decomposed rel-pos terms: rel_h[m, r] = q[m] · table_h[row(m) - r + KH - 1],
            # rel_w likewise: q·table for every offset on the tensor cores, then each query's
            # KH + KW of them in one gather
            q_row = tl.minimum(offs_m // KW, KH - 1)
            q_col = offs_m % KW
            idx_h = tl.where(r_off[None, :] < KH, q_row[:, None] - r_off[None, :] + KH - 1, 0)
            idx_w = tl.where(r_off[None, :] < KW, q_col[:, None] - r_off[None, :] + KW - 1, 0)
            idx = tl.where(r_is_w[None, :], idx_w + TP, idx_h)
            rel = (tl.gather(tl.dot(q, tab), idx, axis=1) * inv_scale).to(K.dtype.element_ty)
            if KEY_CHUNKS == 1:
                # one accumulator: the bias (divided by the softmax scale) starts q·kᵀ's sum
                s = tl.dot(rel, e)
                s = tl.dot(q, kt, s) * scale_log2
                s = tl.where(key_ok[None, :], s, float("-inf"))
                p = tl.exp2(s - tl.max(s, 1)[:, None])
                denom = tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v)
            else:
                acc, denom = _window_key_chunks(
                    q, rel, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok, r_off, r_is_w,
                    scale_log2, KH, KW, KWP, BLOCK_N // KEY_CHUNKS, KEY_CHUNKS,
                )  # fmt: skip
            out = to_codes(acc * (inv_out / denom)[:, None], out_zero, CODES)
            o_ptrs = OUT + b * stride_ob + offs_m[:, None] * stride_om + h * D + offs_d[None, :]
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _window_keys(
        k_base, stride_kn, slot, offs_d, d_ok, r_off, r_is_w, KH, KW, KWP: tl.constexpr
    ):
        """kᵀ and the one-hot expander of the key slots `slot` (row-major on the key grid
        padded to KWP columns), each slot's key index and whether it is a key: (rel · e)[m,
        slot] = rel_h[m, row(slot)] + rel_w[m, col(slot)], exact (one nonzero term a sum)."""
        key_row = slot // KWP
        key_col = slot % KWP
        key_ok = (key_row < KH) & (key_col < KW)
        key = key_row * KW + key_col
        kt = tl.load(
            k_base + key[None, :] * stride_kn + offs_d[:, None],
            mask=key_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        e = tl.where(
            r_is_w[:, None], key_col[None, :] == r_off[:, None], key_row[None, :] == r_off[:, None]
        ).to(kt.dtype)
        return kt, e, key, key_ok

    @triton.jit
    def _window_values(v_base, stride_vn, key, key_ok, offs_d, d_ok):
        """v's rows of the keys `_window_keys` gave."""
        return tl.load(
            v_base + key[:, None] * stride_vn + offs_d[None, :],
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )

    @triton.jit
    def _window_key_chunks(
        q, rel, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok, r_off, r_is_w, scale_log2,
        KH, KW, KWP: tl.constexpr, CHUNK: tl.constexpr, KEY_CHUNKS: tl.constexpr,
    ):  # fmt: skip
        """The window's keys in KEY_CHUNKS chunks of whole key-grid rows, online softmax: K, V
        and the one-hot expander of one chunk in shared memory at a time (SAM-B, 2 chunks: 40
        KB instead of 80), for more programs an SM. Returns (unnormalized P·v, denominator).
        Every chunk holds a valid key-grid row (KH > half the padded rows)."""
        for c in tl.static_range(KEY_CHUNKS):
            slot = c * CHUNK + tl.arange(0, CHUNK)
            kt, e, key, key_ok = _window_keys(
                k_base, stride_kn, slot, offs_d, d_ok, r_off, r_is_w, KH, KW, KWP
            )
            s = tl.dot(q, kt, tl.dot(rel, e)) * scale_log2
            s = tl.where(key_ok[None, :], s, float("-inf"))
            v = _window_values(v_base, stride_vn, key, key_ok, offs_d, d_ok)
            if c == 0:
                m_i = tl.max(s, 1)
                p = tl.exp2(s - m_i[:, None])
                denom = tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                denom = denom * alpha + tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new
        return acc, denom

    _CONFIGS = [
        triton.Config(
            {"BLOCK_M": bm, "M_STEPS": steps, "KEY_CHUNKS": chunks},
            num_warps=w, num_stages=1, maxnreg=regs,
        )
        for bm, steps, w, chunks, regs in (
            (64, 1, 4, 1, None), (64, 1, 8, 1, None), (64, 2, 4, 1, None), (64, 2, 8, 1, None),
            (64, 4, 8, 1, None), (128, 1, 8, 1, None), (128, 2, 8, 1, None),
            # two key chunks, 37 KB of shared memory: capped at 168 registers, three programs an
            # SM (H100, SAM-B's windows: 0.242 ms against the one-tile kernel's 0.264)
            (64, 1, 4, 2, 168), (64, 1, 4, 2, 160),
        )
    ]  # fmt: skip

    def _two_chunks_fit(kh: int, kw: int) -> bool:
        """Whether `_window_key_chunks` can split a kh x kw grid in two: each half of the
        padded key slots must hold 16 or more and start inside the grid (KH > half the padded
        rows), and the padded rows must fill the tile."""
        rows, kwp = key_grid_pad(kh), key_grid_pad(kw)
        block_n = max(16, rows * kwp)
        return block_n == rows * kwp and block_n >= 32 and kh > rows // 2

    def _prune_chunks(configs, named_args, **kwargs):
        fit = _two_chunks_fit(named_args["KH"], named_args["KW"])
        return [c for c in configs if c.kwargs["KEY_CHUNKS"] == 1 or fit]

    _tuned_kernel = triton.autotune(
        _CONFIGS,
        key=["L", "KH", "KW", "D", "HEADS"],
        prune_configs_by={"early_config_prune": _prune_chunks},
        cache_results=CACHE_AUTOTUNING,
    )(_window_attention_kernel)
    _launch = TunedLauncher(_tuned_kernel)


def kernel_arguments(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
    out_scale: Tensor | None = None,
    out_zero: int = 0,
    codes: str = "none",
) -> tuple[Tensor, tuple, dict]:
    """Check the shapes and build one kernel call: (the output to fill, the kernel's positional
    arguments, its shape constexprs). `launch` adds the tile config; `bench/kernel_configs.py`
    passes its own. Arguments as `window_attention_op`."""
    if triton is None:
        raise RuntimeError("the window attention kernel needs Triton, which is not installed")
    check_codes(out_scale, codes)
    b, heads, length, d = q.shape
    if length != kh * kw or not fits_one_tile(kh, kw):
        raise ValueError(
            f"window attention takes a key grid of at most {MAX_KEYS} padded slots with L = kh·kw; "
            f"got L={length}, grid {kh} x {kw}"
        )
    if d > 256:
        raise ValueError(f"head dim {d} > 256: the kernel keeps a window's values in registers")
    if table_h.shape != (2 * kh - 1, d) or table_w.shape != (2 * kw - 1, d):
        raise ValueError(
            f"rel-pos tables of shape {tuple(table_h.shape)} and {tuple(table_w.shape)}; a "
            f"{kh} x {kw} grid with head dim {d} needs ({2 * kh - 1}, {d}) and ({2 * kw - 1}, {d})"
        )
    q, k, v = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]
    table_h, table_w = table_h.to(q.dtype).contiguous(), table_w.to(q.dtype).contiguous()
    out = torch.empty(b, length, heads * d, dtype=output_dtype(codes, q.dtype), device=q.device)
    kwp = key_grid_pad(kw)
    scale_arg = out_scale if out_scale is not None else out  # a pointer the kernel never reads
    args = (q, k, v, table_h, table_w, out, scale_arg, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], table_h.stride(0), table_w.stride(0), out.stride(0), out.stride(1),
            float(scale), float(out_zero), heads, length, kh, kw)  # fmt: skip
    shape_meta = {
        "CODES": codes,
        "D": d,
        "DP": max(16, key_grid_pad(d)),
        "KWP": kwp,
        "BLOCK_N": max(16, key_grid_pad(kh) * kwp),
        "RP": max(16, key_grid_pad(max(kh, kw))),
        "TP": max(16, key_grid_pad(2 * max(kh, kw) - 1)),
    }
    return out, args, shape_meta


def launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
    out_scale: Tensor | None = None,
    out_zero: int = 0,
    codes: str = "none",
    *,
    block_m: int | None = None,
    m_steps: int = 1,
    num_warps: int = 4,
    key_chunks: int = 1,
) -> Tensor:
    """Run the kernel (autotuned unless `block_m` is given, as the interpreter tests do; there
    `key_chunks` 2 walks the keys in two chunks, `_window_key_chunks`). Arguments as
    `window_attention_op`; q, k, v may be any strided views with a unit last stride."""
    out, args, shape_meta = kernel_arguments(
        q, k, v, table_h, table_w, scale, kh, kw, out_scale, out_zero, codes
    )
    b, heads, length, d = q.shape
    if block_m is None:
        grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"] * meta["M_STEPS"]), b * heads)  # noqa: E731
        _launch((length, kh, kw, d, heads, q.dtype, codes), grid, *args, **shape_meta)
    else:
        grid = (triton.cdiv(length, block_m * m_steps), b * heads)
        if key_chunks != 1 and (key_chunks != 2 or not _two_chunks_fit(kh, kw)):
            raise ValueError(
                f"key_chunks {key_chunks} on a {kh} x {kw} grid: 1, or 2 where each chunk "
                "holds 16 slots or more and a valid key-grid row"
            )
        _window_attention_kernel[grid](
            *args, **shape_meta, BLOCK_M=block_m, M_STEPS=m_steps, num_warps=num_warps,
            KEY_CHUNKS=key_chunks,
        )  # fmt: skip
    return out


@torch.library.custom_op("samq::window_attention", mutates_args=())
def window_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
    out_scale: Tensor | None = None,
    out_zero: int = 0,
    codes: str = "none",
) -> Tensor:
    """softmax(q·kᵀ·scale + rel_h[row(key)] + rel_w[col(key)])·v over each window's kh x kw keys,
    with rel_h, rel_w SAM's decomposed rel-pos terms of the unscaled q (`rel_pos_terms`).

    Args:
        q, k, v: (B, heads, L, D) with L = kh·kw, any strides with a unit last stride (the head
            split of the qkv linear's output, not copied); the compute dtype.
        table_h, table_w: the attention's rel_pos_h (2·kh - 1, D) and rel_pos_w (2·kw - 1, D).
        scale: the softmax scale (head_dim ** -0.5); q arrives unscaled.
        out_scale, out_zero, codes: with `codes` "float8" or "int8", the output is the output
            projection's input codes: out / out_scale (float8, clamped to ±448), or
            round(out / out_scale) + out_zero clamped to [-128, 127] (int8, half to even), as
            that linear's calibrated quantizer computes them. out_scale: 0-dim float32.

    Returns:
        (B, L, heads·D), token-major: the layout the output projection reads; the compute dtype
        or the codes' dtype. CUDA runs the Triton kernel, the CPU `window_attention_reference`
        and the linear's quantizer.
    """
    if q.device.type == "cuda":
        return launch(q, k, v, table_h, table_w, scale, kh, kw, out_scale, out_zero, codes)
    check_codes(out_scale, codes)
    out = window_attention_reference(q, k, v, table_h, table_w, scale, kh, kw)
    return output_codes(out, out_scale, out_zero, codes)


@window_attention_op.register_fake
def _(q, k, v, table_h, table_w, scale, kh, kw, out_scale=None, out_zero=0, codes="none"):
    b, heads, length, d = q.shape
    return q.new_empty((b, length, heads * d), dtype=output_dtype(codes, q.dtype))


def window_rel_pos_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table_h: Tensor,
    table_w: Tensor,
    scale: float,
    kh: int,
    kw: int,
    out_scale: Tensor | None = None,
    out_zero: int = 0,
    codes: str = "none",
) -> Tensor:
    """`window_attention_op` under a plain function's name, the call `fuse_attention` inserts
    (and `fuse_attention_codes` extends with the projection's codes)."""
    return window_attention_op(q, k, v, table_h, table_w, scale, kh, kw, out_scale, out_zero, codes)


__all__ = [
    "CODES",
    "MAX_KEYS",
    "fits_one_tile",
    "kernel_arguments",
    "launch",
    "output_dtype",
    "rel_pos_terms",
    "window_attention_op",
    "window_attention_reference",
    "window_rel_pos_attention",
]
