"""passes/fuse_residual_add.py on a small graph, on the CPU (the int8 op's CPU path): the add
after an int8 linear becomes the linear's residual input and the graph computes what it computed
before; what it leaves alone, each with its reason. The whole encoder is in tests/test_lower.py,
the kernels in tests/test_gemm_epilogue.py and tests/test_lower_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from samq_fx import gemm_epilogue
from samq_fx.meta import NodeInfo, get_info, set_info
from samq_fx.passes.fuse_residual_add import fuse_residual_add
from samq_fx.pipeline import PassContext

B, T, C = 2, 5, 32


def _graph(linear: nn.Module, *, residual_first=True, alpha=1, extra_user=False, shape=None):
    """x -> samq_lowered.lin -> add(x, ·) -> output, with the variations the pass must refuse."""
    root = nn.Module()
    root.samq_lowered = nn.ModuleDict({"lin": linear})
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(B, T, C)
    other = x
    if shape is not None:  # a residual of another shape, broadcast by the add
        other = g.call_function(torch.ops.aten.slice.Tensor, (x, 1, 0, 1))
        other.meta["val"] = torch.empty(shape)
    lin = g.call_module("samq_lowered.lin", (x,))
    lin.meta["val"] = torch.empty(B, T, C)
    set_info(lin, NodeInfo("image_encoder", "blocks.0.mlp.lin2", "Linear", role="linear"))
    args = (other, lin) if residual_first else (lin, other)
    kwargs = {"alpha": alpha} if alpha != 1 else {}
    add = g.call_function(torch.ops.aten.add.Tensor, args, kwargs)
    g.output((add, lin) if extra_user else add)
    return torch.fx.GraphModule(root, g)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), residual_first=st.booleans())
def test_the_add_becomes_the_linears_residual_and_nothing_changes(
    random_int8_linear, seed, residual_first
):
    gm = _graph(random_int8_linear(C, seed % 1000), residual_first=residual_first)
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))
    before = gm(x)
    result = fuse_residual_add(gm, PassContext("image_encoder", None))
    gm.recompile()
    assert result.counts == {"fused": 1} and result.rejected == {}
    assert not any(n.target == torch.ops.aten.add.Tensor for n in gm.graph.nodes)
    lin = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert [a.name for a in lin.args] == ["x"] and lin.kwargs["residual"].name == "x"
    assert get_info(lin).findings["fuse_residual_add"] == {"residual": "x"}
    torch.testing.assert_close(gm(x), before, rtol=1e-6, atol=1e-6)
    again = fuse_residual_add(gm, PassContext("image_encoder", None))
    assert again.counts == {"fused": 0}, "a second run must not add the residual twice"


@pytest.mark.parametrize(
    "variation,reason",
    [({"alpha": 2}, "alpha"), ({"shape": (B, 1, C)}, "residual (2, 1, 32)")],
    ids=["alpha", "broadcast"],
)  # fmt: skip
def test_refuses_what_it_cannot_fuse_and_says_why(variation, reason, random_int8_linear):
    gm = _graph(random_int8_linear(C), **variation)
    result = fuse_residual_add(gm, PassContext("image_encoder", None))
    assert result.counts == {"fused": 0}
    assert list(result.rejected) == ["lin"] and reason in result.rejected["lin"]
    assert any(n.target == torch.ops.aten.add.Tensor for n in gm.graph.nodes)


def test_leaves_shared_outputs_and_linears_that_are_not_int8_or_write_codes_alone(
    random_int8_linear,
):
    """Not candidates at all: a linear whose output has another user (the residual stream
    itself after an earlier fusion, or a shared branch), a float linear, and `Int8LinearAct`,
    which writes the next linear's codes."""
    lin = random_int8_linear(C)
    act = gemm_epilogue.Int8LinearAct(lin.weight, lin.w_scale, 0.02, 5, lin.bias, 0.05, 0, "gelu")
    for gm in (
        _graph(random_int8_linear(C), extra_user=True),
        _graph(nn.Linear(C, C)),
        _graph(act),
    ):
        result = fuse_residual_add(gm, PassContext("image_encoder", None))
        assert result.counts == {"fused": 0} and result.rejected == {}
        assert any(n.target == torch.ops.aten.add.Tensor for n in gm.graph.nodes)
