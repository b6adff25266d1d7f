"""fuse_attention_codes: the attention kernels write the output projection's 8-bit input.

After `fuse_attention` wired an attention to the Triton window kernel or the global kernel
(`window_rel_pos_attention`, `global_rel_pos_attention`: both write the (B, L, C) layout the
projection reads) and `lower_linears` lowered the projection, the encoder reads

    <kernel>(q, k, v, tables, ...) -> aten.reshape -> call_module(samq_lowered.<proj>)

where the projection (`Float8Linear` / `Int8Linear`) first quantizes its input with its
calibrated scale (and zero point): one more pass that reads the attention's output and writes it
again as codes, about 30 µs a windowed block and 40 µs a global one on SAM-B at batch 8. This
pass gives the kernel that scale, so it writes the codes itself (the ops' `codes`), and swaps the
projection for its `...OnCodes` twin, which takes them as they are. The numeric change: the
codes are computed from the kernel's float32 output instead of its bf16 rounding, with a
multiply by the scale's reciprocal (as `fuse_linear_epilogue`'s epilogue does).

Reads: `samq_lowered` (which projection modules are float8-static / int8-static).
Writes: `findings["fuse_attention_codes"]` = {"codes", "consumer"} on the attention's node.
Invariant: an attention whose output has another user, or whose projection is not a plain
`Float8Linear` / `Int8Linear` (torchao's, dynamic, or kept fake-quantized), stays as it was,
listed in `rejected` with the reason.
"""

from __future__ import annotations

import torch
import torch.fx

from samq_fx import gemm_epilogue, triton_attention, window_attention
from samq_fx.meta import add_finding
from samq_fx.passes.lower_linears import LOWERED_ATTR
from samq_fx.pipeline import PassContext, PassResult

PASS_NAME = "fuse_attention_codes"
KERNEL_ARGS = {
    window_attention.window_rel_pos_attention: 8,
    triton_attention.global_rel_pos_attention: 9,
}
"""The attention calls that can write codes -> how many arguments they take before the codes'."""


def _on_codes(proj: torch.nn.Module) -> tuple[str, torch.nn.Module, int] | str:
    """(codes, the projection taking them, zero point) or why the projection cannot."""
    if type(proj) is gemm_epilogue.Float8Linear:
        twin = gemm_epilogue.Float8LinearOnCodes(
            proj.weight, proj.w_scale, proj.x_scale, proj.bias, proj.out_dtype
        )
        return "float8", twin, 0
    if type(proj) is gemm_epilogue.Int8Linear:
        twin = gemm_epilogue.Int8LinearOnCodes(
            proj.weight, proj.w_scale, proj.x_scale, proj.x_zero, proj.bias, proj.out_dtype
        )
        return "int8", twin, proj.x_zero
    return f"the projection is a {type(proj).__name__}, not a static float8 / int8 linear"


def _projection(attn: torch.fx.Node):
    """(the reshape, the projection's call_module node) after `attn`, or why not."""
    users = list(attn.users)
    if len(users) != 1 or users[0].target is not torch.ops.aten.reshape.default:
        return "the attention's output is not only reshaped for the projection"
    reshape = users[0]
    consumers = list(reshape.users)
    is_lowered = len(consumers) == 1 and consumers[0].op == "call_module"
    if not is_lowered or not consumers[0].target.startswith(f"{LOWERED_ATTR}."):
        return "the reshaped output feeds something other than one lowered linear"
    return reshape, consumers[0]


def fuse_attention_codes(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(counts={"fused": 0})
    for attn in list(gm.graph.nodes):
        if attn.op != "call_function" or attn.target not in KERNEL_ARGS:
            continue
        if len(attn.args) > KERNEL_ARGS[attn.target] or attn.kwargs:
            continue  # already writes codes
        found = _projection(attn)
        if isinstance(found, str):
            result.rejected[attn.name] = found
            continue
        reshape, proj = found
        swapped = _on_codes(gm.get_submodule(proj.target))
        if isinstance(swapped, str):
            result.rejected[attn.name] = swapped
            continue
        codes, twin, zero = swapped
        parent, _, name = proj.target.rpartition(".")
        setattr(gm.get_submodule(parent), name, twin)
        with gm.graph.inserting_before(attn):
            scale = gm.graph.get_attr(f"{proj.target}.x_scale")
        attn.args = (*attn.args, scale, zero, codes)
        for node in (attn, reshape):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                node.meta["val"] = val.to(triton_attention.output_dtype(codes, val.dtype))
        consumer = proj.target.removeprefix(f"{LOWERED_ATTR}.")
        add_finding(attn, PASS_NAME, {"codes": codes, "consumer": consumer})
        result.counts["fused"] += 1
    return result
