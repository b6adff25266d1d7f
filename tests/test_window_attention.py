"""The window attention kernel on the CPU: Triton's interpreter against the float32 reference on
strided views of a qkv output, the reference (and the global op's) against SAM's eager
attention (a hypothesis property), and the shapes it refuses. The GPU run is in tests/test_lower_gpu.py; the pass's
wiring in tests/test_triton_attention.py."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samq_fx.window_attention import fits_one_tile, launch, window_attention_reference

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from samq_fx import window_attention as wa
    torch.manual_seed(0)
    worst = 0.0
    # (grid rows, grid cols, head dim, heads): SAM-H's 14 x 14 windows with head dim 80 (padded
    # to 128 in the kernel), the tiny model's 8 x 8, a ragged grid; query blocks that cover the
    # window in one program (64 x 4) or several; the keys in one tile or in two chunks (online
    # softmax, `_window_key_chunks`)
    for kh, kw, d, heads in ((14, 14, 80, 2), (8, 8, 32, 4), (5, 7, 16, 3)):
        b, L = 2, kh * kw
        qkv = torch.randn(b, L, 3, heads, d)
        qkv[:, :, 1] += 1.0
        q, k, v = qkv.half().permute(2, 0, 3, 1, 4).unbind(0)
        th, tw = torch.randn(2 * kh - 1, d).half(), torch.randn(2 * kw - 1, d).half()
        ref = wa.window_attention_reference(
            *(t.float() for t in (q, k, v, th, tw)), d**-0.5, kh, kw
        )
        for block_m, steps, chunks in ((16, 1, 1), (32, 2, 1), (64, 4, 1), (32, 2, 2)):
            out = wa.launch(q, k, v, th, tw, d**-0.5, kh, kw, block_m=block_m, m_steps=steps,
                            key_chunks=chunks)
            assert out.shape == (b, L, heads * d) and torch.isfinite(out).all()
            worst = max(worst, float((out.float() - ref).norm() / ref.norm()))
    # the output projection's int8 codes (an odd zero point, a scale that saturates some codes):
    # round(ref / s) + zero, except where float rounding lands next to a rounding boundary
    s = torch.tensor(float(ref.amax()) / 100.0)
    codes = wa.launch(q, k, v, th, tw, d**-0.5, kh, kw, s, 37, "int8", block_m=32)
    want = (torch.round(ref / s) + 37).clamp(-128, 127)
    assert codes.dtype == torch.int8 and bool(want.eq(127).any()) and bool(want.lt(0).any())
    off = (codes.float() - want).abs()
    print(worst, float(off.max()), float(off.gt(0).float().mean()))
    """
)


def test_kernel_matches_reference_in_triton_interpreter(triton_interpreter):
    """float16 operands and output against float32 math (measured 2.5e-4), the keys in one
    tile or two chunks; the int8 codes for the output projection at most one step off, and
    rarely (fp16 operands, float32 sums)."""
    worst, off_max, off_share = map(float, triton_interpreter(_INTERPRETER_SCRIPT).split())
    assert worst < 2e-3, worst
    assert off_max <= 1 and off_share < 0.01, (off_max, off_share)


def test_op_on_the_cpu_writes_the_projections_codes():
    """The op's CPU path with codes: the reference's output through the same quantizers the
    output projection applies (float8 e4m3 / int8 with zero point), and refusals of codes
    without a scale or a scale without codes."""
    from samq_fx.gemm_epilogue import quantize_int8_static
    from samq_fx.triton_attention import quantize_float8_static
    from samq_fx.window_attention import window_attention_op

    torch.manual_seed(0)
    kh, kw, d, heads = 4, 3, 8, 2
    q, k, v = torch.randn(3, 1, heads, kh * kw, d).unbind(0)
    th, tw = torch.randn(2 * kh - 1, d), torch.randn(2 * kw - 1, d)
    out = window_attention_op(q, k, v, th, tw, d**-0.5, kh, kw)
    s = torch.tensor(0.01)
    f8 = window_attention_op(q, k, v, th, tw, d**-0.5, kh, kw, s, 0, "float8")
    i8 = window_attention_op(q, k, v, th, tw, d**-0.5, kh, kw, s, -5, "int8")
    assert f8.dtype == torch.float8_e4m3fn and i8.dtype == torch.int8
    assert torch.equal(f8.float(), quantize_float8_static(out, s).float())
    assert torch.equal(i8, quantize_int8_static(out, s, -5))
    with pytest.raises(ValueError, match="need the projection's input scale"):
        window_attention_op(q, k, v, th, tw, d**-0.5, kh, kw, None, 0, "int8")
    with pytest.raises(ValueError, match="codes"):
        window_attention_op(q, k, v, th, tw, d**-0.5, kh, kw, s, 0, "int4")


def _global_op(q, k, v, table_h, table_w, scale, kh, kw):
    from samq_fx.triton_attention import global_attention_op

    return global_attention_op(q, k, v.transpose(-1, -2), table_h, table_w, scale, kh, kw)


@pytest.mark.parametrize("op", [window_attention_reference, _global_op], ids=["window", "global"])
@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    heads=st.integers(1, 3),
    kh=st.integers(1, 9),
    kw=st.integers(1, 9),
    d=st.sampled_from([4, 8, 12]),
)
def test_reference_is_sams_attention(op, b, heads, kh, kw, d):
    """The window kernel's reference and the global op (its CPU path), on q, k, v as views of
    the qkv output and with their token-major output, equal segment_anything's own Attention
    (rel-pos tables, head split and merge included)."""
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(b * 1000 + kh * 10 + kw)
    attn = Attention(heads * d, heads, use_rel_pos=True, input_size=(kh, kw)).double()
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
        x = torch.randn(b, kh, kw, heads * d, dtype=torch.float64)
        want = attn(x)
        q, k, v = attn.qkv(x).reshape(b, kh * kw, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = op(q, k, v, attn.rel_pos_h, attn.rel_pos_w, attn.scale, kh, kw)
        got = attn.proj(out.view(b, kh, kw, heads * d))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_key_tile_limits():
    assert fits_one_tile(14, 14) and fits_one_tile(8, 8) and fits_one_tile(16, 16)
    assert not fits_one_tile(17, 16) and not fits_one_tile(64, 64)
    x = torch.zeros(1, 1, 64 * 64, 16)
    table = torch.zeros(127, 16)
    with pytest.raises(ValueError, match="grid 64 x 64"):
        launch(x, x, x, table, table, 1.0, 64, 64)
    with pytest.raises(ValueError, match="L=4096, grid 14 x 14"):
        launch(x, x, x, table, table, 1.0, 14, 14)
    x = torch.zeros(1, 1, 14 * 14, 16)
    with pytest.raises(ValueError, match=r"needs \(27, 16\) and \(27, 16\)"):
        launch(x, x, x, table, table, 1.0, 14, 14)
    small = torch.zeros(1, 1, 4, 16)  # 2 x 2 keys in a 16-slot tile: a chunk would be empty
    with pytest.raises(ValueError, match="key_chunks 2 on a 2 x 2 grid"):
        launch(small, small, small, table[:3], table[:3], 1.0, 2, 2, block_m=16, key_chunks=2)


def test_autotuner_tries_two_key_chunks_only_where_they_fit():
    """The autotuner's two-chunk configs survive pruning on SAM's 14 x 14 windows and the tiny
    model's 8 x 8 ones, and are dropped on a 2 x 2 grid, where a chunk would hold no key."""
    pytest.importorskip("triton")
    from samq_fx import window_attention as wa

    def chunks_kept(kh, kw):
        kept = wa._prune_chunks(wa._CONFIGS, {"KH": kh, "KW": kw})
        return {c.kwargs["KEY_CHUNKS"] for c in kept}

    assert chunks_kept(14, 14) == {1, 2}
    assert chunks_kept(8, 8) == {1, 2}
    assert chunks_kept(2, 2) == {1}
