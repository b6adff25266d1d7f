"""fuse_attention_quant: the window attention kernel writes its output projection's float8 input.

After `fuse_attention`, each window attention reads

    samq_fx.window_attention.window_rel_pos_attention(q, k, v, ...) -> reshape
        -> call_module(samq_lowered.<proj>)

and when the projection is a lowered float8 linear, its calibrated input quantizer is a pass of
its own: the attention's bf16 output goes to memory, is read back, divided by the scale and cast.
This pass hands that scale to the kernel (its `out_scale`), which stores float8 codes, and swaps
the projection for `Float8LinearOnCodes`, which takes them as they are. The numeric change: the
codes are rounded from the kernel's float32 output instead of its bf16 rounding, scaled by the
reciprocal of the scale.

Reads: the backend's `float8_parts(module)`, `ctx.config.dtype`. Writes: the projection's
module, the attention call's `out_scale` argument, `findings["fuse_attention_quant"]` =
{"consumer": site} on the attention node. Invariant: an attention whose output has other users,
or whose projection is not a float8 linear with a calibrated scale, stays as it was, listed in
`rejected`.
"""

from __future__ import annotations

import torch
import torch.fx

from samq_fx.float8_epilogue import Float8LinearOnCodes
from samq_fx.meta import add_finding
from samq_fx.passes.fuse_linear_epilogue import _lowered_site
from samq_fx.passes.lower_linears import LOWERED_ATTR
from samq_fx.pipeline import PassContext, PassResult
from samq_fx.window_attention import window_rel_pos_attention

PASS_NAME = "fuse_attention_quant"
_VIEWS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default)


def _projection(attention: torch.fx.Node):
    """The node of the module that reads the attention's output through one reshape, or None."""
    if len(attention.users) != 1:
        return None
    reshape = next(iter(attention.users))
    if reshape.op != "call_function" or reshape.target not in _VIEWS or len(reshape.users) != 1:
        return None
    proj = next(iter(reshape.users))
    return proj if proj.args and proj.args[0] is reshape else None


def fuse_attention_quant(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    backend = ctx.config
    result = PassResult(counts={"fused": 0})
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not window_rel_pos_attention:
            continue
        proj = _projection(node)
        site = _lowered_site(proj) if proj is not None else None
        parts = backend.float8_parts(gm.get_submodule(proj.target)) if site else None
        if parts is None:
            result.rejected[node.name] = (
                "the output does not go (through a reshape) only to a float8 linear with a "
                "calibrated input scale"
            )
            continue
        codes, w_scale, x_scale, bias = parts
        lowered = getattr(gm, LOWERED_ATTR)
        lowered[site] = Float8LinearOnCodes(codes, w_scale, x_scale, bias, backend.dtype)
        with gm.graph.inserting_before(node):
            scale = gm.graph.get_attr(f"{LOWERED_ATTR}.{site}.x_scale")
        node.args = (*node.args[:8], scale)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            node.meta["val"] = val.to(torch.float8_e4m3fn)
        add_finding(node, PASS_NAME, {"consumer": site})
        result.counts["fused"] += 1
    return result
