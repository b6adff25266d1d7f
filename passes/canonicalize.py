"""canonicalize: make an exported SAM graph portable across devices and dtypes.

torch.export records two things that tie a graph to the device and dtype it was traced on:
`aten._assert_tensor_metadata` checks (inserted before `.to(dtype)` calls) and factory calls
with a baked-in `device=` (`aten.arange(32, device=cpu)` in the encoder's relative-position
index). Both break `captured.to("cuda")` or `.to(torch.bfloat16)`.

This pass
  * removes the metadata asserts (they only check; nothing reads their result), and
  * folds every subgraph that depends on no input and no parameter (the relative-position
    index arithmetic) into a buffer, which then moves with the module like any other.

Invariant: the graph computes the same values; only constant subgraphs become `get_attr`.

    before:  arange(32, device=cpu) -> unsqueeze -> sub -> add -> to(int64) -> index(rel_pos_h, .)
    after:   get_attr(_samq_const_0)                                       -> index(rel_pos_h, .)
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from samq_fx.pipeline import PassContext, PassResult

_ASSERT_OPS = {torch.ops.aten._assert_tensor_metadata.default}


def _is_constant(node: torch.fx.Node, constant: set[torch.fx.Node]) -> bool:
    if node.op != "call_function" or node.target in _ASSERT_OPS:
        return False
    if node.target is operator.getitem:
        return False
    inputs = node.all_input_nodes
    return all(n in constant for n in inputs)


def _fold(gm: torch.fx.GraphModule, node: torch.fx.Node, index: int) -> torch.fx.Node:
    env = {}
    for dep in _ancestors(node):
        env[dep] = dep.target(*_load(dep.args, env), **_load(dep.kwargs, env))
    value = env[node]
    name = f"_samq_const_{index}"
    gm.register_buffer(name, value.detach().clone())
    with gm.graph.inserting_before(node):
        new = gm.graph.get_attr(name)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    return new


def _ancestors(node: torch.fx.Node) -> list[torch.fx.Node]:
    seen: dict[torch.fx.Node, None] = {}

    def visit(n: torch.fx.Node) -> None:
        for dep in n.all_input_nodes:
            if dep not in seen:
                visit(dep)
        seen[n] = None

    visit(node)
    return list(seen)


def _load(arg, env):
    return torch.fx.node.map_arg(arg, lambda n: env[n])


def canonicalize(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERT_OPS:
            gm.graph.erase_node(node)
            removed += 1

    constant: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if _is_constant(node, constant):
            constant.add(node)
    # Fold only the frontier: constant nodes with a non-constant user.
    frontier = [
        n
        for n in gm.graph.nodes
        if n in constant
        and isinstance(n.meta.get("val"), torch.Tensor)
        and any(u not in constant for u in n.users)
    ]
    for i, node in enumerate(frontier):
        _fold(gm, node, i)
    gm.graph.eliminate_dead_code()
    return PassResult(counts={"asserts_removed": removed, "constants_folded": len(frontier)})
