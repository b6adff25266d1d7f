"""passes/fuse_attention_codes.py on a small graph, on the CPU (the ops' CPU path): the window
and the global attention (compute dtype and static float8 q, k, v) write the projection's int8
codes, the projection takes them, and the graph computes
exactly what it computed before (the CPU path quantizes the same float output the projection
quantized). What it leaves alone, and why. The compiled encoder on a GPU is in
tests/test_lower_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from samq_fx import gemm_epilogue, triton_attention, window_attention
from samq_fx.meta import NodeInfo, get_info, set_info
from samq_fx.passes.fuse_attention_codes import fuse_attention_codes
from samq_fx.pipeline import PassContext

B, HEADS, KH, KW, D = 2, 2, 4, 3, 8
C = HEADS * D


KERNELS = {
    "window": window_attention.window_rel_pos_attention,
    "global": triton_attention.global_rel_pos_attention,
    "global-float8": triton_attention.global_rel_pos_attention,
}


def _graph(proj: nn.Module, extra_user: bool = False, kernel: str = "window"):
    """placeholders -> attention -> reshape -> samq_lowered.proj -> output."""
    root = nn.Module()
    root.samq_lowered = nn.ModuleDict({"proj": proj})
    g = torch.fx.Graph()
    q, k, v, th, tw = (g.placeholder(n) for n in ("q", "k", "v", "th", "tw"))
    args = (q, k, v, th, tw, D**-0.5, KH, KW)
    if kernel.startswith("global"):  # static float8 scales of q·scale, k and v, or none
        root.register_buffer("scales", torch.tensor([0.01, 0.02, 0.015]))
        args = (*args, g.get_attr("scales") if kernel == "global-float8" else None)
    attn = g.call_function(KERNELS[kernel], args)
    attn.meta["val"] = torch.empty(B, KH * KW, C)
    set_info(attn, NodeInfo("image_encoder", "blocks.0.attn", "Attention", role="fused_attention"))
    flat = g.call_function(torch.ops.aten.reshape.default, (attn, [B, KH, KW, C]))
    out = g.call_module("samq_lowered.proj", (flat,))
    g.output((out, attn) if extra_user else out)
    return torch.fx.GraphModule(root, g)


def _inputs():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, B, HEADS, KH * KW, D).unbind(0)
    return q, k, v, torch.randn(2 * KH - 1, D), torch.randn(2 * KW - 1, D)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_int8_projection_takes_the_kernels_codes_and_nothing_changes(kernel, random_int8_linear):
    gm = _graph(random_int8_linear(C), kernel=kernel)
    inputs = _inputs()
    before = gm(*inputs)
    result = fuse_attention_codes(gm, PassContext("image_encoder", None))
    gm.recompile()
    assert result.counts == {"fused": 1} and result.rejected == {}
    assert type(gm.get_submodule("samq_lowered.proj")) is gemm_epilogue.Int8LinearOnCodes
    attn = next(n for n in gm.graph.nodes if n.target is KERNELS[kernel])
    assert attn.args[-1] == "int8" and attn.args[-2] == 5
    assert attn.meta["val"].dtype == torch.int8
    assert get_info(attn).findings["fuse_attention_codes"] == {"codes": "int8", "consumer": "proj"}
    assert torch.equal(gm(*inputs), before)
    again = fuse_attention_codes(gm, PassContext("image_encoder", None))
    assert again.counts == {"fused": 0}, "a second run must not stack codes twice"


def test_leaves_other_projections_and_shared_outputs_alone(random_int8_linear):
    plain = _graph(nn.Linear(C, C))
    result = fuse_attention_codes(plain, PassContext("image_encoder", None))
    assert result.counts == {"fused": 0}
    assert "not a static float8 / int8 linear" in next(iter(result.rejected.values()))
    shared = _graph(random_int8_linear(C), extra_user=True)
    result = fuse_attention_codes(shared, PassContext("image_encoder", None))
    assert result.counts == {"fused": 0}
    assert "not only reshaped" in next(iter(result.rejected.values()))
    assert type(shared.get_submodule("samq_lowered.proj")) is gemm_epilogue.Int8Linear
