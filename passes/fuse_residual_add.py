"""fuse_residual_add: a block's `x + linear(...)` as the int8 GEMM's epilogue.

Every encoder block ends its MLP (and a global block its attention) with

    call_module(samq_lowered.<lin>)(codes) -> aten.add(x, ·)

The linear writes its bf16 output, and inductor leaves the sum unmaterialized: each later
consumer (the next LayerNorm's statistics, its normalize-and-quantize, the next residual
add) reads x and every branch output again, up to four bf16 tensors a row. This pass hands x to
the GEMM instead (`Int8LinearOnCodes.forward(x8, residual=x)`, by keyword: int8-dynamic's
lin2 also takes its input's per-group scales, `Int8LinearOnGroupCodes`): its epilogue adds the residual
tile in float32 and writes the sum, rounded once, so the residual stream is one tensor that the
next kernels read once. Windowed blocks' projections are left alone: their output is in window
order and goes through the un-partition (a slice) before the add.

Reads: the lowered modules' types (int8 linears that write their output, not codes).
Writes: `findings["fuse_residual_add"]` = {"residual": the residual's node name} on the linear.
Invariant: an add whose linear has another user stays as it was (not a candidate); one whose
operands differ in shape or dtype (broadcasting, promotion), whose residual comes after the
linear, or that carries `alpha`, stays too, with the reason in `rejected` (and the lowering
report's `unfused_residuals`).
"""

from __future__ import annotations

import torch
import torch.fx

from samq_fx.gemm_epilogue import (
    Int8Linear,
    Int8LinearDynamic,
    Int8LinearOnCodes,
    Int8LinearOnGroupCodes,
)
from samq_fx.meta import add_finding
from samq_fx.passes.lower_linears import LOWERED_ATTR
from samq_fx.pipeline import PassContext, PassResult

PASS_NAME = "fuse_residual_add"
LOWERED_PREFIX = f"{LOWERED_ATTR}."
TAKES_RESIDUAL = (Int8LinearOnCodes, Int8Linear, Int8LinearDynamic, Int8LinearOnGroupCodes)
"""Lowered modules whose forward takes `residual` (exact types: `Int8LinearAct` writes codes)."""


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _linear_operand(gm: torch.fx.GraphModule, add: torch.fx.Node):
    """(linear node, residual node) of `add` if one operand is a lowered linear that takes a
    residual and feeds only this add, else None. (A linear with more users is the residual
    stream itself, after an earlier fusion, or a branch shared with another consumer.)"""
    for lin, other in ((add.args[1], add.args[0]), (add.args[0], add.args[1])):
        is_lowered = isinstance(lin, torch.fx.Node) and lin.op == "call_module"
        if not (is_lowered and lin.target.startswith(LOWERED_PREFIX)):
            continue
        takes_residual = type(gm.get_submodule(lin.target)) in TAKES_RESIDUAL
        if takes_residual and len(lin.users) == 1 and isinstance(other, torch.fx.Node):
            return lin, other
    return None


def fuse_residual_add(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(counts={"fused": 0})
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for add in list(gm.graph.nodes):
        if add.op != "call_function" or add.target != torch.ops.aten.add.Tensor:
            continue
        found = _linear_operand(gm, add)
        if found is None:
            continue
        lin, residual = found
        site = lin.target.removeprefix(LOWERED_PREFIX)
        out, res = _val(lin), _val(residual)
        if add.kwargs.get("alpha", 1) != 1:
            problem = "the add scales its operand (alpha)"
        elif "residual" in lin.kwargs:
            problem = "the linear already takes a residual"
        elif out is None or res is None:
            problem = "no shapes recorded on the nodes"
        elif order[residual] > order[lin]:
            problem = "the residual is computed after the linear"
        elif out.shape != res.shape or out.dtype != res.dtype:
            problem = (
                f"residual {tuple(res.shape)} {res.dtype} vs output {tuple(out.shape)} {out.dtype}"
            )
        else:
            problem = None
        if problem:
            result.rejected[site] = problem
            continue
        lin.kwargs = {**lin.kwargs, "residual": residual}
        add.replace_all_uses_with(lin)
        gm.graph.erase_node(add)
        add_finding(lin, PASS_NAME, {"residual": residual.name})
        result.counts["fused"] += 1
    return result
