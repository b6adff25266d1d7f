"""fuse_linear_epilogue: lin1 -> activation -> lin2, both float8, as one GEMM that writes lin2's
float8 input.

After `lower_linears`, SAM's MLPs read

    call_module(samq_lowered.<lin1>)(x) -> aten.gelu -> call_module(samq_lowered.<lin2>)

and lin1's wide bf16 output makes a round trip through memory only to be activated and cast to
float8 for lin2. This pass rewrites the pair to

    call_module(samq_lowered.<lin1>)(x) -> call_module(samq_lowered.<lin2>)

where lin1 is now a `Float8LinearAct` (GEMM + scale + bias + activation + lin2's calibrated
input quantizer in the epilogue, `samq_fx/float8_epilogue.py`) emitting float8 codes, and lin2 a
`Float8LinearOnCodes` that takes them as they are. Both keep the calibrated scales of the
float8 linears they replace; the numeric changes are that the activation sees the float32
accumulator instead of its bf16 rounding, and the kernel's GELU (within 2.2e-7) and its
multiply by the output scale's reciprocal (`samq_fx/float8_epilogue.py`).

Reads: the backend's `float8_parts(module)` (codes, weight scale, input scale, bias of a lowered
float8 linear, or None), `ctx.config.dtype`. Writes: `findings["fuse_linear_epilogue"]` =
{"activation", "consumer"} on lin1's node. Invariant: a pair whose lin1 output has another user,
whose activation is not exact GELU or ReLU, or whose K the kernel cannot walk stays as it was,
listed in `rejected` with the reason.
"""

from __future__ import annotations

import torch
import torch.fx

from samq_fx.float8_epilogue import Float8LinearAct, Float8LinearOnCodes, unsupported
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
        parts1 = backend.float8_parts(gm.get_submodule(lin1.target))
        parts2 = backend.float8_parts(gm.get_submodule(lin2.target))
        problem = None
        if parts1 is None or parts2 is None:
            problem = "not two float8 linears with calibrated scales"
        elif len(lin1.users) != 1:
            problem = f"{site1}'s output has other users than the activation"
        elif act.kwargs.get("approximate", "none") != "none":
            problem = "tanh-approximate GELU (the epilogue computes the exact one)"
        else:
            problem = unsupported(parts1[0].shape[1], activation)
        if problem:
            result.rejected[f"{site1} -> {site2}"] = problem
            continue
        codes1, w_scale1, x_scale1, bias1 = parts1
        codes2, w_scale2, x_scale2, bias2 = parts2
        lowered = getattr(gm, LOWERED_ATTR)
        lowered[site1] = Float8LinearAct(codes1, w_scale1, x_scale1, bias1, x_scale2, activation)
        lowered[site2] = Float8LinearOnCodes(codes2, w_scale2, x_scale2, bias2, backend.dtype)
        act.replace_all_uses_with(lin1)
        gm.graph.erase_node(act)
        val = lin1.meta.get("val")
        if isinstance(val, torch.Tensor):
            lin1.meta["val"] = val.to(torch.float8_e4m3fn)
        add_finding(lin1, PASS_NAME, {"activation": activation, "consumer": site2})
        result.counts["fused"] += 1
    return result
