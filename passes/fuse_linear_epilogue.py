"""fuse_linear_epilogue: lin1 -> activation -> lin2, both float8 or both int8, as one GEMM that
writes lin2's 8-bit input (int8-dynamic: that applies the activation).

After `lower_linears`, SAM's MLPs read

    call_module(samq_lowered.<lin1>)(x) -> aten.gelu -> call_module(samq_lowered.<lin2>)

and lin1's wide bf16 output makes a round trip through memory only to be activated and quantized
for lin2. This pass rewrites the pair to

    call_module(samq_lowered.<lin1>)(x) -> call_module(samq_lowered.<lin2>)

where lin1 is now a `Float8LinearAct` / `Int8LinearAct` (GEMM + scale + bias + activation +
lin2's calibrated input quantizer in the epilogue, `samq_fx/gemm_epilogue.py`) emitting codes,
and lin2 a `Float8LinearOnCodes` / `Int8LinearOnCodes` that takes them as they are. Both keep
the calibrated scales of the linears they replace; the numeric changes are that the activation
sees the float32 accumulator instead of its bf16 rounding, and the kernel's GELU (within
`GELU_RELATIVE_ERROR`) and its multiply by the output scale's reciprocal.

int8-dynamic has no calibrated scale for lin2's input, and a per-token scale needs a whole row
of lin1's output, more than one output tile. With `ctx.config.dynamic_scales` "group" (CUDA's default)
lin1 becomes an `Int8LinearDynamicGroupCodes`: its epilogue quantizes each row's 128-column
group, which one tile holds, and returns (codes, scales); lin2, an `Int8LinearOnGroupCodes`,
applies the scales in its K loop. The rewrite is

    lin1(x) -> getitem 0 (codes), getitem 1 (scales) -> lin2(codes, scales)

With "token", lin1 becomes an `Int8LinearDynamicAct` (the activation in its epilogue, the
compute dtype out) and lin2 stays as it was, so inductor's pass that quantizes lin2's input per
token reads the activated output instead of computing the GELU itself.

Reads: `gemm_epilogue.fuse_pair` (which lowered linears have a fused form), `ctx.config.dtype`
and `ctx.config.dynamic_scales`.
Writes: `findings["fuse_linear_epilogue"]` = {"activation", "consumer", "input", "codes"} on
lin1's node ("input": lin1's operands, "int8" / "float8"; "codes": what it writes, "int8",
"float8", "int8-group" (codes and per-group scales) or "none" for the compute dtype).
Invariant: a pair whose lin1 output has another user, whose activation is not exact GELU or
ReLU, or whose K the kernel cannot walk stays as it was, listed in `rejected` with the reason.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from samq_fx.gemm_epilogue import TILE_COLUMNS, Int8LinearOnGroupCodes, fuse_pair, unsupported
from samq_fx.meta import add_finding
from samq_fx.passes.lower_linears import LOWERED_ATTR
from samq_fx.pipeline import PassContext, PassResult

PASS_NAME = "fuse_linear_epilogue"
LOWERED_PREFIX = f"{LOWERED_ATTR}."
_ACTIVATIONS = {torch.ops.aten.gelu.default: "gelu", torch.ops.aten.relu.default: "relu"}


def _lowered_site(node) -> str | None:
    is_lowered = isinstance(node, torch.fx.Node) and node.op == "call_module"
    if is_lowered and node.target.startswith(LOWERED_PREFIX):
        return node.target.removeprefix(LOWERED_PREFIX)
    return None


def _pair(act: torch.fx.Node):
    """(lin1 node, lin2 node, activation) around `act`, or None if `act` sits elsewhere."""
    lin1 = act.args[0]
    if _lowered_site(lin1) is None or len(act.users) != 1:
        return None
    lin2 = next(iter(act.users))
    if _lowered_site(lin2) is None or lin2.args[0] is not act:
        return None
    return lin1, lin2, _ACTIVATIONS[act.target]


def _split_codes_and_scales(gm, lin1: torch.fx.Node, lin2: torch.fx.Node, act) -> None:
    """lin2(act) -> lin2(lin1[0], lin1[1]): lin1 returns (codes, per-group scales). The
    getitems' example values are lin1's output as int8 and the scales' (groups, rows)."""
    val = lin1.meta.get("val")
    with gm.graph.inserting_after(lin1):
        scales = gm.graph.call_function(operator.getitem, (lin1, 1))
    with gm.graph.inserting_after(lin1):
        codes = gm.graph.call_function(operator.getitem, (lin1, 0))
    lin2.args = (codes, scales, *lin2.args[1:])
    if isinstance(val, torch.Tensor):
        rows, width = val.shape[:-1].numel(), val.shape[-1]
        groups = (width + TILE_COLUMNS - 1) // TILE_COLUMNS
        codes.meta["val"] = val.to(torch.int8)
        scales.meta["val"] = val.new_empty((groups, rows), dtype=torch.float32)
        lin1.meta["val"] = (codes.meta["val"], scales.meta["val"])
    assert not act.users, "the activation fed only lin2"


def fuse_linear_epilogue(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    backend = ctx.config
    result = PassResult(counts={"fused": 0})
    for act in list(gm.graph.nodes):
        if act.op != "call_function" or act.target not in _ACTIVATIONS:
            continue
        pair = _pair(act)
        if pair is None:
            continue
        lin1, lin2, activation = pair
        site1, site2 = _lowered_site(lin1), _lowered_site(lin2)
        module1, module2 = gm.get_submodule(lin1.target), gm.get_submodule(lin2.target)
        fused = fuse_pair(module1, module2, activation, backend.dtype, backend.dynamic_scales)
        if isinstance(fused, str):
            problem = fused
        elif len(lin1.users) != 1:
            problem = f"{site1}'s output has other users than the activation"
        elif act.kwargs.get("approximate", "none") != "none":
            problem = "tanh-approximate GELU (the epilogue computes the exact one)"
        else:
            problem = unsupported(module1.weight.shape[1], activation)
        if problem:
            result.rejected[f"{site1} -> {site2}"] = problem
            continue
        lowered = getattr(gm, LOWERED_ATTR)
        lowered[site1], lowered[site2] = fused
        operands = "int8" if fused[1].weight.dtype == torch.int8 else "float8"
        codes = "none" if fused[1] is module2 else operands  # int8-dynamic "token": lin2 as is
        val = lin1.meta.get("val")
        if isinstance(fused[1], Int8LinearOnGroupCodes):
            codes = "int8-group"
            _split_codes_and_scales(gm, lin1, lin2, act)
        else:
            act.replace_all_uses_with(lin1)
            if isinstance(val, torch.Tensor) and codes != "none":
                lin1.meta["val"] = val.to(torch.int8 if codes == "int8" else torch.float8_e4m3fn)
        gm.graph.erase_node(act)
        finding = {"activation": activation, "consumer": site2, "input": operands, "codes": codes}
        add_finding(lin1, PASS_NAME, finding)
        result.counts["fused"] += 1
    return result
