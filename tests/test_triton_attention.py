"""The Triton rel-pos attention kernel on the CPU: run by Triton's interpreter against the float32
reference, the reference against exact attention, the k-smoothing identity, and the lowering's
wiring (the pass inserts the kernel; devices without it are refused). The GPU run of the same
kernel is in tests/test_lower_gpu.py."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import samq_fx
from samq_fx.config import QuantConfig
from samq_fx.demo import calibration_samples
from samq_fx.kernels import rel_pos_bias
from samq_fx.lower import LowerConfig, LoweringError, lower
from samq_fx.passes.fuse_attention import fuse_attention
from samq_fx.pipeline import PassContext
from samq_fx.triton_attention import (
    attention_reference,
    key_grid_pad,
    op_inputs,
    rel_pos_attention_triton,
)

triton = pytest.importorskip("triton")

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from samq_fx import triton_attention as ta
    torch.manual_seed(0)
    worst = {}
    # (key-grid rows, key-grid cols, head dim): one key-grid row per key tile (cols 64), several
    # (cols 8, 14 padded to 16), a query count that is not a multiple of the block, and a head
    # dim that is not a power of two (SAM-H's is 80)
    for kh, kw, d in ((2, 64, 16), (5, 7, 16), (3, 14, 32), (4, 8, 16), (2, 64, 20)):
        bh, L = 3, kh * kw
        q = torch.randn(bh, L, d) * 0.3
        k, v = torch.randn(bh, L, d) + 1.0, torch.randn(bh, L, d)
        rh, rw = torch.randn(bh, L, kh), torch.randn(bh, L, kw)
        cases = {"float16": ta.op_inputs(*(t.half() for t in (q, k, v, rh, rw)), "bf16")}
        cases |= {m: ta.op_inputs(q, k, v, rh, rw, m) for m in ("float8", "int8-qk")}
        for mode, args in cases.items():
            ref = ta.attention_reference(*args).float()
            out = ta.launch(*args, block_m=16).float()
            err = float((out - ref).norm() / ref.norm())
            worst[mode] = max(worst.get(mode, 0.0), err)
            assert torch.isfinite(out).all(), (mode, kh, kw)
    print(worst)
    """
)


def test_kernel_matches_reference_in_triton_interpreter(triton_interpreter):
    worst = eval(triton_interpreter(_INTERPRETER_SCRIPT))  # noqa: S307 - our own dict literal
    # the kernel walks the keys tile by tile (online softmax), the reference all at once: float
    # rounding differs, and P is rounded to e4m3 relative to the running row max, not the final
    # one (measured: float16 1.2e-4, float8 / int8-qk 8e-3)
    assert worst["float16"] < 2e-3, worst
    assert worst["float8"] < 2e-2 and worst["int8-qk"] < 2e-2, worst


def _exact(q, k, v, rel_h, rel_w):
    bh, qh, qw, kh = rel_h.shape
    logits = q.double() @ k.double().transpose(1, 2) + rel_pos_bias(rel_h, rel_w).double()
    return logits.softmax(-1) @ v.double()


@pytest.mark.parametrize(("mode", "bound"), [("bf16", 0.02), ("float8", 0.12), ("int8-qk", 0.06)])
def test_modes_close_to_exact_attention(mode, bound):
    g = torch.Generator().manual_seed(0)
    bh, qh, qw, d = 4, 8, 8, 32
    L = qh * qw
    q = torch.randn(bh, L, d, generator=g) * 0.2
    k = torch.randn(bh, L, d, generator=g) + 2.0  # a shared key bias, as ViT keys have
    v = torch.randn(bh, L, d, generator=g)
    rel_h = torch.randn(bh, qh, qw, qh, generator=g)
    rel_w = torch.randn(bh, qh, qw, qw, generator=g)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    args = [t.to(dtype) for t in (q, k, v, rel_h, rel_w)]
    out = rel_pos_attention_triton(*args, mode=mode)  # CPU: the float32 reference
    ref = _exact(q, k, v, rel_h, rel_w)
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < bound, f"{mode}: relative error {err:.4f}"
    assert out.dtype == dtype


@settings(max_examples=20, deadline=None)
@given(bh=st.integers(1, 3), kh=st.integers(1, 6), kw=st.integers(1, 6), shift=st.floats(-50, 50))
def test_key_smoothing_leaves_attention_unchanged(bh, kh, kw, shift):
    """int8-qk subtracts k's mean over the keys: q·(k - m) = q·k - q·m, a per-query constant
    that softmax removes."""
    g = torch.Generator().manual_seed(kh * 7 + kw)
    L, d = kh * kw, 8
    q, v = torch.randn(bh, L, d, generator=g), torch.randn(bh, L, d, generator=g)
    k = torch.randn(bh, L, d, generator=g) + shift
    rel_h, rel_w = torch.randn(bh, L, kh, generator=g), torch.randn(bh, L, kw, generator=g)
    one = torch.ones((), dtype=torch.float64)
    f64 = [t.double() for t in (q, k, v)]
    vt = f64[2].transpose(1, 2)
    smooth = f64[1] - f64[1].mean(1, keepdim=True)
    a = attention_reference(f64[0], f64[1], vt, one, one, rel_h.double(), rel_w.double())
    b = attention_reference(f64[0], smooth, vt, one, one, rel_h.double(), rel_w.double())
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(amax=st.floats(0.05, 50.0), seed=st.integers(0, 2**16))
def test_static_scales_quantize_inside_the_range_and_clip_outside(amax, seed):
    """Static float8 scales s = amax / 448: values within ±amax keep e4m3's relative precision
    (2^-4, or one subnormal step), values beyond are clipped to ±amax; the kernel's scales are
    the products it multiplies by."""
    g = torch.Generator().manual_seed(seed)
    bh, kh, kw, d = 2, 3, 4, 16
    q, k, v = (torch.randn(bh, kh * kw, d, generator=g) * amax for _ in range(3))
    rel_h, rel_w = torch.zeros(bh, kh * kw, kh), torch.zeros(bh, kh * kw, kw)
    scales = torch.full((3,), amax / 448.0)
    q8, k8, vt8, qk_scale, v_scale, _, _ = op_inputs(q, k, v, rel_h, rel_w, "float8", scales)
    assert q8.dtype == k8.dtype == vt8.dtype == torch.float8_e4m3fn
    assert torch.equal(qk_scale, scales[0] * scales[1]) and torch.equal(v_scale, scales[2])
    back = q8.float() * scales[0]
    inside = q.abs() <= amax
    step = torch.maximum(q.abs() * 2.0**-4, torch.tensor(scales[0].item() * 2.0**-9))
    assert ((back - q).abs()[inside] <= step[inside] * 1.0001).all()
    assert torch.allclose(back[~inside].abs(), torch.tensor(amax), rtol=1e-6)
    assert torch.equal(vt8.float() * scales[2], (v.transpose(1, 2).clamp(-amax, amax) / scales[2])
                       .to(torch.float8_e4m3fn).float() * scales[2])  # fmt: skip
    with pytest.raises(ValueError, match="static scales are float8"):
        op_inputs(q, k, v, rel_h, rel_w, "int8-qk", scales)


def test_key_grid_pad():
    assert [key_grid_pad(w) for w in (1, 7, 8, 14, 32, 64)] == [1, 8, 8, 16, 32, 64]


def test_unknown_mode():
    x = torch.zeros(1, 4, 16)
    with pytest.raises(ValueError, match="attention mode 'int4'"):
        rel_pos_attention_triton(x, x, x, torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), "int4")


@pytest.mark.parametrize("kernel", ["float8", "int8-qk", "triton"])
def test_fuse_attention_inserts_the_kernel(tiny_trained_captured, kernel):
    """On the CPU the op runs its float32 reference: the pass's wiring (q scaled, k, v, rel_h,
    rel_w in the right order) is checked against the unfused graph."""
    import copy

    gm = copy.deepcopy(tiny_trained_captured.image_encoder)
    state = {"attention": kernel, "window_attention": kernel}
    ctx = PassContext("image_encoder", tiny_trained_captured.samq_arch, state=state)
    result = fuse_attention(gm, ctx)
    gm.recompile()
    assert result.counts == {"fused": 4, "with_rel_pos": 4}
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "rel_pos_attention" in
             getattr(n.target, "__name__", "")]  # fmt: skip
    assert len(calls) == 4  # 2 global, 2 windowed
    kinds = [n.meta["samq"].findings["fuse_attention"]["kernel"] for n in calls]
    # "triton" is the window kernel on a window and the global kernel with the rel-pos tables on
    # a global attention, both wired to the qkv output and the projection
    window, glob = ("triton-window", "triton-global") if kernel == "triton" else (kernel, kernel)
    assert kinds == [window, glob, window, glob]  # blocks 0 and 2 are windowed
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_trained_captured.image_encoder(x)
        out = gm(x)
    sqnr = float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))
    assert sqnr > (60 if kernel == "triton" else 25), f"{kernel}: {sqnr:.1f} dB"


def test_triton_attention_needs_cuda(tiny_trained_captured):
    q = samq_fx.quantize(
        tiny_trained_captured, calibration_samples(1), QuantConfig.preset("W8A8-int8"),
        progress=False,
    )  # fmt: skip
    for kernel in ("float8", "int8-qk", "triton"):
        with pytest.raises(LoweringError, match="Triton CUDA kernel"):
            lower(q, "int8-static", attention=kernel, verbose=False)
        with pytest.raises(LoweringError, match="Triton CUDA kernel"):
            lower(q, "int8-static", window_attention=kernel, verbose=False)
    with pytest.raises(LoweringError, match="unknown attention kernel 'sdpa'"):
        LowerConfig(attention="sdpa")
    with pytest.raises(ValueError, match="'flex' or 'triton'"):
        samq_fx.optimize_float(tiny_trained_captured, "float32", attention="float8")


def test_optimize_float_passes_both_attention_kernels(tiny_trained_captured, monkeypatch):
    """optimize_float hands the window kernel to the pass too (it once dropped it, so
    `bf16-triton-all` ran flex on the windows). The device check is lifted: the graph is only
    inspected, not run."""
    lowering = sys.modules["samq_fx.lower"]  # the module (samq_fx.lower is the function)
    monkeypatch.setattr(lowering, "_check_attention_kernel", lambda kernel, device: None)
    model = samq_fx.optimize_float(
        tiny_trained_captured, "float32", attention="triton", window_attention="triton"
    )
    kernels = [
        n.meta["samq"].findings["fuse_attention"]["kernel"]
        for n in model.image_encoder.graph.nodes
        if n.op == "call_function" and "rel_pos_attention" in getattr(n.target, "__name__", "")
    ]
    assert kernels == ["triton-window", "triton-global", "triton-window", "triton-global"]


_GLOBAL_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from samq_fx import triton_attention as ta
    torch.manual_seed(0)
    worst, off_max, off_share = {}, 0.0, {}
    # the global kernel computing the rel-pos terms from q and the tables: one key-grid row a
    # key tile (cols 64) or several, ragged grids, a head dim that is not a power of two; q, k,
    # v strided views of a qkv output (compute dtype) or k, v as float8 codes
    for kh, kw, d in ((2, 64, 16), (5, 7, 16), (3, 14, 32), (4, 8, 16), (2, 64, 20)):
        b, heads, L = 2, 3, kh * kw
        qkv = torch.randn(b, L, 3, heads, d)
        qkv[:, :, 1] += 1.0
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        th, tw = torch.randn(2 * kh - 1, d) * 0.5, torch.randn(2 * kw - 1, d) * 0.5
        scale = d**-0.5
        sq, sk, sv = (float(t.abs().amax()) / 448 for t in (q * scale, k, v))
        scales = torch.tensor([sq, sk * 0.8, sv])  # k's range clips its largest values
        q8 = ta.quantize_float8_static(q * scale, scales[0])
        k8 = ta.quantize_float8_static(k, scales[1])
        vt8 = ta.quantize_float8_static(v, scales[2]).transpose(-1, -2).contiguous()
        cases = {
            "float16": (q.half(), k.half(), v.half().transpose(-1, -2), th.half(), tw.half(),
                        scale, kh, kw, None, None),
            "float8": (q, k8, vt8, th, tw, scale, kh, kw, q8, scales),
        }
        for mode, args in cases.items():
            ref = ta.global_attention_reference(*args).float()
            out = ta.launch_global(*args, block_m=16)
            assert out.shape == (b, L, heads * d) and torch.isfinite(out.float()).all()
            err = float((out.float() - ref).norm() / ref.norm())
            worst[mode] = max(worst.get(mode, 0.0), err)
            # the projection's int8 codes: round(ref / s) + zero, one step off at most (float
            # rounding next to a rounding boundary)
            s = torch.tensor(float(ref.amax()) / 100.0)
            codes = ta.launch_global(*args, s, 37, "int8", block_m=16)
            want = (torch.round(ref / s) + 37).clamp(-128, 127)
            assert codes.dtype == torch.int8 and bool(want.eq(127).any())
            off = (codes.float() - want).abs()
            off_max = max(off_max, float(off.max()))
            off_share[mode] = max(off_share.get(mode, 0.0), float(off.gt(0).float().mean()))
    print(worst["float16"], worst["float8"], off_max, off_share["float16"], off_share["float8"])
    """
)


def test_global_kernel_with_tables_matches_reference_in_triton_interpreter(triton_interpreter):
    """The kernel's rel-pos-from-tables mode against `global_attention_reference` (measured:
    float16 1e-4, float8 4e-3: online softmax and e4m3 P rounded against the running max), and
    the projection's int8 codes it writes: one step off at most, rarely in float16; in float8 as
    often as its 4e-3 error reaches a rounding boundary of a 1% step."""
    out = triton_interpreter(_GLOBAL_INTERPRETER_SCRIPT)
    f16, f8, off_max, off_f16, off_f8 = map(float, out.split())
    assert f16 < 2e-3 and f8 < 2e-2, (f16, f8)
    assert off_max <= 1 and off_f16 < 0.01 and off_f8 < 0.1, out


def test_global_op_refuses_inconsistent_inputs():
    from samq_fx.triton_attention import global_attention_op

    q = torch.zeros(1, 2, 12, 8)
    th, tw = torch.zeros(5, 8), torch.zeros(7, 8)
    vt = q.transpose(-1, -2)
    with pytest.raises(ValueError, match="L must be kh·kw"):
        global_attention_op(q, q, vt, th, tw, 1.0, 3, 3)
    with pytest.raises(ValueError, match=r"needs \(5, 8\) and \(7, 8\)"):
        global_attention_op(q, q, vt, tw, th, 1.0, 3, 4)
    with pytest.raises(ValueError, match="vt of shape"):
        global_attention_op(q, q, q, th, tw, 1.0, 3, 4)
    q8, k8, vt8 = (t.to(torch.float8_e4m3fn) for t in (q, q, vt))
    with pytest.raises(ValueError, match="static scales"):
        global_attention_op(q, k8, vt8, th, tw, 1.0, 3, 4, q8)
    with pytest.raises(ValueError, match="q_codes None"):
        global_attention_op(q, k8, vt8, th, tw, 1.0, 3, 4, None, torch.ones(3))
    with pytest.raises(ValueError, match="need the projection's input scale"):
        global_attention_op(q, q, vt, th, tw, 1.0, 3, 4, None, None, None, 0, "int8")
