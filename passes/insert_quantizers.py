"""insert_quantizers: turn the quantization plan into fake-quant `call_module` nodes.

Reads: `NodeInfo.quant` written by `plan_quantization`.
Writes: one quantizer module per planned tensor under `gm.samq_quantizers` (a ModuleDict whose
keys name the site: `blocks_3_attn_qkv__weight`, `transformer_layers_0_self_attn__qk_matmul__k`),
and a `call_module` node on that one input edge of the consumer. Each new node carries a
`NodeInfo` whose `quant` says which site it serves.

    before:  linear(x, get_attr(w), b)
    after:   linear(samq_quantizers.<site>__input(x), samq_quantizers.<site>__weight(get_attr(w)), b)

Quantizers start observing (identity). Invariant: until calibration freezes them the graph
computes exactly what it computed before. Quantizers sit on edges, not on producers, so two
consumers of one tensor (the decoder's self-attention q and k projections) get their own ranges,
as each layer's input quantizer does in the reference code.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx
from torch import nn

from samq_fx.meta import NodeInfo, get_info, set_info
from samq_fx.pipeline import PassContext, PassResult
from samq_fx.quantizers import Log2Quantizer, Quantizer, QuantSpec, UniformQuantizer

QUANTIZERS_ATTR = "samq_quantizers"
SLOT_ARG = {"weight": 1, "input": 0, "q": 0, "k": 1, "attn": 0, "v": 1}


def make_quantizer(decision: dict) -> Quantizer:
    """Build the module a plan decision describes."""
    kind = decision["kind"]
    if kind == "uniform":
        return UniformQuantizer(QuantSpec.from_dict(decision["spec"]))
    if kind == "log2":
        return Log2Quantizer(bits=decision["bits"], tau=decision.get("tau", 1))
    raise ValueError(f"unknown quantizer kind {kind!r} in plan decision {decision}")


def site_key(info: NodeInfo, slot: str) -> str:
    path = info.module_path.replace(".", "_") or info.role  # top level: x + pos_embed
    if slot in ("weight", "input"):
        return f"{path}__{slot}"
    return f"{path}__{info.role}__{slot}"


def quantizer_modules(gm: torch.fx.GraphModule) -> nn.ModuleDict:
    if not hasattr(gm, QUANTIZERS_ATTR):
        gm.add_module(QUANTIZERS_ATTR, nn.ModuleDict())
    return getattr(gm, QUANTIZERS_ATTR)


def insert_quantizers(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    modules = quantizer_modules(gm)
    inserted = {"weight": 0, "activation": 0}
    for node in list(gm.graph.nodes):
        info = get_info(node)
        if info is None or not info.quant or info.module_type.endswith("Quantizer"):
            continue
        for slot, decision in info.quant.items():
            if decision is None:
                continue
            key = site_key(info, slot)
            if key in modules:
                raise ValueError(f"two quantizer sites map to the key {key!r}")
            modules[key] = make_quantizer(decision).to(_device_of(gm))
            arg = node.args[SLOT_ARG[slot]]
            with gm.graph.inserting_before(node):
                q_node = gm.graph.call_module(f"{QUANTIZERS_ATTR}.{key}", (arg,))
            q_node.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val")}
            if slot == "weight":
                q_node.meta["val"] = arg.meta.get("val")
            set_info(
                q_node,
                dataclasses.replace(
                    info,
                    role=None,
                    module_type=type(modules[key]).__name__,
                    touched_by=("insert_quantizers",),
                    quant={"site": key, "slot": slot, "consumer": node.name, "decision": decision},
                ),
            )
            args = list(node.args)
            args[SLOT_ARG[slot]] = q_node
            node.args = tuple(args)
            inserted["weight" if slot == "weight" else "activation"] += 1
    return PassResult(counts=inserted)


def _device_of(gm: torch.fx.GraphModule) -> torch.device:
    p = next(gm.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def weight_quantizer_inputs(gm: torch.fx.GraphModule):
    """(quantizer module, weight tensor) for every weight quantizer in the graph."""
    for node in gm.graph.nodes:
        info = get_info(node)
        if node.op == "call_module" and info is not None and info.quant.get("slot") == "weight":
            (w_node,) = node.args
            yield gm.get_submodule(node.target), fetch_attr(gm, w_node.target)


def fetch_attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
