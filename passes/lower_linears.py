"""lower_linears: replace fake-quantized linears by modules that run integer / float8 kernels.

A calibrated graph computes each quantized linear as

    linear(q_in(x), q_w(get_attr W), get_attr b)        q_in, q_w: fake quantizers

This pass asks the backend (`ctx.config.make_linear`, built in `samq_fx/lower.py`, the one file
that imports torchao) for a module that computes the same thing with real kernels, from the
calibrated quantizers' integer grids, and rewrites the node to

    call_module(samq_lowered.<site>)(x)                 torchao weight or packed int4 inside

A site the backend has no kernel for (4-bit activations, asymmetric weights for a symmetric
kernel, ...) keeps its fake quantizers and is listed in `rejected` with the reason: lowering
never substitutes a different numeric behaviour silently.

Reads: `NodeInfo.quant` of the quantizer nodes (site, slot). Writes: `findings["lower_linears"]`
= {"backend", "kernel"} on the new node; `gm.samq_lowered` (a ModuleDict); deletes the FP
weight and bias attributes a lowered linear no longer reads, and the quantizer modules.
Invariant: every other node is untouched.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from samq_fx.meta import add_finding, get_info, set_info
from samq_fx.passes.insert_quantizers import fetch_attr
from samq_fx.pipeline import PassContext, PassResult

PASS_NAME = "lower_linears"
LOWERED_ATTR = "samq_lowered"


def _quantizer_of(gm: torch.fx.GraphModule, node, slot: str):
    """The quantizer module if `node` is a quantizer call for `slot`, else None."""
    info = get_info(node) if isinstance(node, torch.fx.Node) else None
    if node is None or node.op != "call_module" or info is None:
        return None
    if info.quant.get("slot") != slot:
        return None
    return gm.get_submodule(node.target)


def _delete_attr(gm: torch.fx.GraphModule, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, name)


def lower_linears(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    backend = ctx.config
    if not hasattr(gm, LOWERED_ATTR):
        gm.add_module(LOWERED_ATTR, nn.ModuleDict())
    lowered: nn.ModuleDict = getattr(gm, LOWERED_ATTR)
    result = PassResult(counts={"lowered": 0, "kept_fake_quant": 0})
    freed: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x_node, w_node = node.args[0], node.args[1]
        b_node = node.args[2] if len(node.args) > 2 else None
        w_q = _quantizer_of(gm, w_node, "weight")
        if w_q is None:
            continue  # a linear kept in floating point by the plan: nothing to lower
        site = get_info(w_node).quant["site"].removesuffix("__weight")
        in_q = _quantizer_of(gm, x_node, "input")
        weight = fetch_attr(gm, w_node.args[0].target)
        bias = None if b_node is None else fetch_attr(gm, b_node.target)
        module, what = backend.make_linear(site, w_q, weight, in_q, bias, x_node.meta.get("val"))
        if module is None:
            result.rejected[site] = what
            result.counts["kept_fake_quant"] += 1
            continue
        lowered[site] = module
        x = x_node.args[0] if in_q is not None else x_node
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(f"{LOWERED_ATTR}.{site}", (x,))
        new.meta = dict(node.meta)
        if get_info(node) is not None:
            set_info(new, get_info(node))
            add_finding(new, PASS_NAME, {"backend": backend.name, "kernel": what})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        freed.update(n.target for n in (w_node.args[0], b_node) if n is not None)
        result.counts["lowered"] += 1
    for node in gm.graph.nodes:  # quantized sites that are not linears (convolutions)
        info = get_info(node)
        weight_site = info is not None and info.quant.get("slot") == "weight"
        if node.op == "call_module" and weight_site and node.users:
            site = info.quant["site"].removesuffix("__weight")
            if site not in result.rejected:
                consumer = next(iter(node.users)).target
                result.rejected[site] = f"{consumer}: no kernel in this backend (linears only)"
                result.counts["kept_fake_quant"] += 1
    gm.graph.eliminate_dead_code()
    live = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in sorted(freed - live):
        _delete_attr(gm, target)
    gm.delete_all_unused_submodules()
    return result
