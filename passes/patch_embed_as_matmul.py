"""patch_embed_as_matmul: SAM's patch embedding convolution as one matrix product (lowering).

The patch embedding is a convolution whose kernel equals its stride (16 x 16, no padding): each
output pixel reads one disjoint patch. cuDNN runs it as an implicit-GEMM kernel that took 2.1 ms
of SAM-B's 31-34 ms encoder call at batch 8 on the H100 (bench/speed.py profile), while the same
work as a dense (B·h·w, 3·p·p) x (3·p·p, C) product is a few hundredths of that. The rewrite:

    before:  conv2d(x, W, b, stride=[p, p])                               (B, C, h, w)
    after:   permute(linear(patches(x), W.reshape(C, 3·p·p), b), [0, 3, 1, 2])
             patches(x) = x.reshape(B, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h, w, 3·p·p)

Exact up to float summation order. Reads: NodeInfo role "patch_embed". Writes: the linear node
inherits the conv's record, with `findings["patch_embed_as_matmul"]`.
"""

from __future__ import annotations

import torch
import torch.fx

from samq_fx.meta import add_finding, get_info, set_info
from samq_fx.pipeline import PassContext, PassResult

PASS_NAME = "patch_embed_as_matmul"
aten = torch.ops.aten


def _conv_geometry(node: torch.fx.Node):
    """(kernel, stride) if `node` is conv2d with kernel == stride, no padding, no dilation."""
    args = list(node.args) + [None] * (7 - len(node.args))
    x, weight, bias, stride, padding, dilation, groups = args
    w_val = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if w_val is None or w_val.dim() != 4:
        return None
    kernel = tuple(w_val.shape[-2:])
    stride = tuple(stride or (1, 1))
    if kernel != stride or any(padding or ()) or any(d != 1 for d in (dilation or ())):
        return None
    if groups not in (None, 1):
        return None
    return kernel


def patch_embed_as_matmul(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(counts={"rewritten": 0})
    for node in list(gm.graph.nodes):
        info = get_info(node)
        if node.target is not aten.conv2d.default or info is None or info.role != "patch_embed":
            continue
        kernel = _conv_geometry(node)
        x_val = node.args[0].meta.get("val")
        if kernel is None or x_val is None:
            result.rejected[node.name] = "not a kernel == stride convolution"
            continue
        (ph, pw), c_in = kernel, x_val.shape[1]
        h, w = x_val.shape[2] // ph, x_val.shape[3] // pw
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        c_out = weight.meta["val"].shape[0]
        g = gm.graph
        with g.inserting_before(node):
            patches = g.call_function(aten.reshape.default, (x, [-1, c_in, h, ph, w, pw]))
            patches = g.call_function(aten.permute.default, (patches, [0, 2, 4, 1, 3, 5]))
            patches = g.call_function(aten.reshape.default, (patches, [-1, h, w, c_in * ph * pw]))
            w2d = g.call_function(aten.reshape.default, (weight, [c_out, c_in * ph * pw]))
            out = g.call_function(aten.linear.default, (patches, w2d, bias))
            nchw = g.call_function(aten.permute.default, (out, [0, 3, 1, 2]))
        set_info(out, info)
        add_finding(out, PASS_NAME, {"kernel": list(kernel), "in": c_in * ph * pw, "out": c_out})
        nchw.meta = dict(node.meta)
        node.replace_all_uses_with(nchw)
        g.erase_node(node)
        result.counts["rewritten"] += 1
    return result
