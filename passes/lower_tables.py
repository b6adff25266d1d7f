"""lower_tables: a fake-quantized table (the position embedding) as its codes, one byte each.

A calibrated graph adds the quantized position embedding as

    add(x, q_w(get_attr pos_embed))                    q_w: a per-channel weight quantizer

This pass keeps the quantizer's codes (`int_repr`, 8 bits or fewer) in a `QuantizedTable` and
rewrites the edge to

    add(x, call_module(samq_lowered.<site>)())        (codes - zero) · scale, in the compute dtype

so the lowered model stores a byte a value where it stored two, and computes what the fake-quant
model computes. Under torch.compile the dequantize fuses into the add. Any backend takes it: it
is a weight-only table, not a kernel.

Reads: `NodeInfo.quant` of weight quantizer nodes whose consumer has a role in `TABLE_ROLES`.
Writes: on the new node a record with no quantizer site (`quant` empty: it is a lowered table,
not a quantizer) and `findings["lower_tables"]` = {"kernel"}; `gm.samq_lowered`; deletes the
float parameter and the quantizer. Invariant: every other node is untouched.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from samq_fx.config import TABLE_ROLES
from samq_fx.meta import add_finding, get_info, set_info, update_info
from samq_fx.passes.insert_quantizers import fetch_attr
from samq_fx.passes.lower_linears import LOWERED_ATTR, _delete_attr
from samq_fx.pipeline import PassContext, PassResult

PASS_NAME = "lower_tables"
TABLE_KERNEL = "{bits}-bit codes per channel, dequantized per call"


class QuantizedTable(nn.Module):
    """A parameter kept as its calibrated integer codes (uint8 or int8) with one float32 scale
    and zero point per channel; `forward()` returns (codes - zero) · scale in `dtype`."""

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, ch_axis: int, dtype):
        super().__init__()
        lo, hi = int(codes.min()), int(codes.max())
        if lo >= 0 and hi <= 255:
            stored = codes.to(torch.uint8)
        elif lo >= -128 and hi <= 127:
            stored = codes.to(torch.int8)
        else:
            raise ValueError(f"table codes in [{lo}, {hi}] do not fit one byte")
        shape = [1] * codes.dim()
        shape[ch_axis] = -1
        self.register_buffer("codes", stored)
        self.register_buffer("scale", scale.float().reshape(shape))
        self.register_buffer("zero", zero.float().reshape(shape))
        self.dtype = dtype

    def forward(self) -> Tensor:
        return ((self.codes.float() - self.zero) * self.scale).to(self.dtype)


def _table_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """The quantizer module if `node` quantizes a table's weight slot, else None."""
    info = get_info(node)
    if node.op != "call_module" or info is None or info.quant.get("slot") != "weight":
        return None
    consumers = [get_info(u) for u in node.users]
    if not consumers or any(c is None or c.role not in TABLE_ROLES for c in consumers):
        return None
    return gm.get_submodule(node.target)


def lower_tables(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    if not hasattr(gm, LOWERED_ATTR):
        gm.add_module(LOWERED_ATTR, nn.ModuleDict())
    lowered: nn.ModuleDict = getattr(gm, LOWERED_ATTR)
    dtype = ctx.state["dtype"]
    result = PassResult(counts={"lowered": 0, "kept_fake_quant": 0})
    for node in list(gm.graph.nodes):
        quantizer = _table_quantizer(gm, node)
        if quantizer is None:
            continue
        site = get_info(node).quant["site"].removesuffix("__weight")
        spec = getattr(quantizer, "spec", None)
        if spec is None or spec.granularity != "channel":
            result.rejected[site] = "tables are lowered from per-channel uniform codes only"
            result.counts["kept_fake_quant"] += 1
            continue
        (w_node,) = node.args
        weight = fetch_attr(gm, w_node.target)
        qp = quantizer.qparams()
        ch_axis = spec.ch_axis % weight.dim()
        lowered[site] = QuantizedTable(
            quantizer.int_repr(weight), qp.scale, qp.zero_point, ch_axis, dtype
        )
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(f"{LOWERED_ATTR}.{site}", ())
        new.meta = dict(node.meta)
        set_info(new, get_info(node))
        update_info(new, PASS_NAME, module_type=QuantizedTable.__name__, quant={})
        add_finding(new, PASS_NAME, {"kernel": TABLE_KERNEL.format(bits=spec.bits)})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not w_node.users:
            gm.graph.erase_node(w_node)
            _delete_attr(gm, w_node.target)
        result.counts["lowered"] += 1
    gm.delete_all_unused_submodules()
    return result
