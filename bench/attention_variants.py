"""Which fused attention carries SAM's decomposed relative-position bias fastest (CUDA, bf16).

Shapes of SAM-B's encoder at batch 8: global blocks (96 = 8 x 12 heads, 64 x 64 tokens, head
dim 64) and window blocks (2400 = 8 x 25 windows x 12 heads, 14 x 14 tokens). Variants:

  chain        the eager chain under torch.compile (logits materialised, bias added, softmax)
  flex-mod     flex_attention with a score_mod that gathers rel_h / rel_w per score
  sdpa-bias    SDPA with the (BH, L, L) bias materialised as the additive mask
  aug-pad      the bias folded into the dot product: q' = [q, rel_h, rel_w], k' = [k, onehot(row),
               onehot(col)], so q'·k' = q·k + rel_h[row] + rel_w[col]; v zero-padded to q''s
               width; plain flash SDPA
  aug-flex     the same q', k' with the unpadded v, flex_attention without score_mod
  triton-bf16  samq_fx.triton_attention: flash kernel with the bias added in the kernel (rel_w
               tile kept in registers, rel_h a column per key-grid row), head dim 64, bf16
  triton-float8   the same with q, k, v and P in float8 e4m3 (dynamic per-tensor scales)
  triton-int8qk   the same with int8 q·kᵀ (k smoothed) and float8 P·v
  triton-window   samq_fx.window_attention: one key tile a window, rel_h / rel_w computed in
               the kernel from the tables (the others get them precomputed, untimed) and added
               as two one-hot tensor-core dots (window shapes only; q, k, v contiguous here, in
               the encoder strided views of the qkv output)

The triton-* timings include the quantization of q, k, v (compiled with the call).

    PYTHONPATH=. python3 bench/attention_variants.py [--only aug-flex triton-float8 ...]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samq_fx.kernels import augment_rel_pos  # noqa: E402
from samq_fx.triton_attention import attention_flops, rel_pos_attention_triton  # noqa: E402
from samq_fx.window_attention import (  # noqa: E402
    fits_one_tile,
    rel_pos_terms,
    window_rel_pos_attention,
)

# Measured 2026-11-26, H100 80GB HBM3, torch 2.11, bf16 (ms a call, compiled):
#   global 96x64x64:    chain 7.45, flex-mod 21.45, sdpa-bias 16.07, aug-pad 33.00, aug-flex 2.85
#   window 2400x14x14:  chain 1.64, flex-mod 7.76,  sdpa-bias 2.43,  aug-pad 2.21,  aug-flex 0.44


def chain(q, k, v, rh, rw):
    bh, qh, qw, kh = rh.shape
    kw = rw.shape[-1]
    s = (q @ k.transpose(-2, -1)).view(bh, qh, qw, kh, kw)
    s = s + rh[..., :, None] + rw[..., None, :]
    return s.view(bh, qh * qw, kh * kw).softmax(-1) @ v


def flex_mod(q, k, v, rh, rw):
    from torch.nn.attention.flex_attention import flex_attention

    bh, qh, qw, kh = rh.shape
    kw = rw.shape[-1]
    rh, rw = rh.reshape(bh, qh * qw, kh), rw.reshape(bh, qh * qw, kw)

    def add_rel_pos(score, b, h, q_idx, kv_idx):
        return score + rh[b, q_idx, kv_idx // kw] + rw[b, q_idx, kv_idx % kw]

    return flex_attention(q[:, None], k[:, None], v[:, None], score_mod=add_rel_pos, scale=1.0)[
        :, 0
    ]


def sdpa_bias(q, k, v, rh, rw):
    bh, qh, qw, kh = rh.shape
    bias = (rh[..., :, None] + rw[..., None, :]).reshape(bh, qh * qw, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def aug_pad(q, k, v, rh, rw):
    qa, ka = augment_rel_pos(q, k, rh, rw)
    vp = F.pad(v, (0, qa.shape[-1] - v.shape[-1]))
    return F.scaled_dot_product_attention(qa, ka, vp, scale=1.0)[..., : v.shape[-1]]


def aug_flex(q, k, v, rh, rw):
    from torch.nn.attention.flex_attention import flex_attention

    qa, ka = augment_rel_pos(q, k, rh, rw)
    return flex_attention(qa[:, None], ka[:, None], v[:, None], scale=1.0)[:, 0]


def _triton(mode):
    return lambda q, k, v, rh, rw: rel_pos_attention_triton(q, k, v, rh, rw, mode)


def triton_window(q, k, v, table_h, table_w):
    """Takes the rel-pos tables (it computes the terms inside), not rel_h / rel_w."""
    kh, kw = (table_h.shape[0] + 1) // 2, (table_w.shape[0] + 1) // 2
    if not fits_one_tile(kh, kw):
        raise ValueError("not a window shape")
    return window_rel_pos_attention(
        q[:, None], k[:, None], v[:, None], table_h, table_w, 1.0, kh, kw
    )


VARIANTS = {"chain": chain, "flex-mod": flex_mod, "sdpa-bias": sdpa_bias, "aug-pad": aug_pad,
            "aug-flex": aug_flex, "triton-bf16": _triton("bf16"),
            "triton-float8": _triton("float8"), "triton-int8qk": _triton("int8-qk"),
            "triton-window": triton_window}  # fmt: skip


def bench(fn, args, reps=20):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args_ = p.parse_args(argv)
    torch.manual_seed(0)
    dev = "cuda"
    shapes = {"global 96x64x64": (96, 64, 64, 64), "window 2400x14x14": (2400, 14, 14, 64),
              "SAM-H window 3200x14x14 d80": (3200, 14, 14, 80)}  # fmt: skip
    for name, (bh, h, w, d) in shapes.items():
        L = h * w
        q = torch.randn(bh, L, d, device=dev, dtype=torch.bfloat16) * 0.125
        k = torch.randn(bh, L, d, device=dev, dtype=torch.bfloat16) + 1.0  # keys share a bias
        v = torch.randn(bh, L, d, device=dev, dtype=torch.bfloat16)
        th = torch.randn(2 * h - 1, d, device=dev, dtype=torch.bfloat16)
        tw = torch.randn(2 * w - 1, d, device=dev, dtype=torch.bfloat16)
        rh = rel_pos_terms(q[:, None], th, h, w, 0).reshape(bh, h, w, h)
        rw = rel_pos_terms(q[:, None], tw, h, w, 1).reshape(bh, h, w, w)
        args = (q, k, v, rh, rw)
        ref = chain(*(t.float() for t in args))
        flops = attention_flops(bh, L, d)
        for vname in args_.only:
            fn = VARIANTS[vname]
            fn_args = (q, k, v, th, tw) if vname == "triton-window" else args
            try:
                compiled = torch.compile(fn, fullgraph=True)
                out = compiled(*fn_args).reshape(ref.shape)  # triton-window: (BH, L, D) already
                err = float((out.float() - ref).norm() / ref.norm())
                ms = bench(compiled, fn_args)
                tflops = flops / ms / 1e9
                print(f"{name:28s} {vname:14s} {ms:8.3f} ms  {tflops:6.1f} TFLOP/s  "
                      f"rel err {err:.4f}", flush=True)  # fmt: skip
            except Exception as e:  # report and go on: this is a survey
                print(f"{name:20s} {vname:10s} FAILED {type(e).__name__}: {str(e)[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
