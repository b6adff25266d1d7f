"""Taps: record what chosen graph nodes compute while the model runs normally.

Analysis passes (BIG's key statistics, AGQ's (A, V) pairs, PCC's attention maps) and the
reconstruction driver (cached unit inputs and targets) need intermediate values of a captured
graph while the whole `Sam` runs as usual (encoder, prompt encoder, decoder). A tap inserts one
`call_module` recorder after each chosen node for the duration of a `with` block, then removes
it and recompiles: outside the block the graph is exactly what it was.

    with tap(captured.mask_decoder, [k_node]) as seen:
        for item in items:
            forward_item(captured, item)
    keys = seen[k_node.name]          # one tensor per forward
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx
from torch import nn

_TAPS_ATTR = "_samq_taps"


class _Recorder(nn.Module):
    def __init__(self, sink: list, transform) -> None:
        super().__init__()
        self.sink, self.transform = sink, transform

    def forward(self, x: Any) -> Any:
        self.sink.append(self.transform(x))
        return x


def _default_transform(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


@contextmanager
def tap(
    gm: torch.fx.GraphModule,
    nodes: Sequence[torch.fx.Node],
    transform=_default_transform,
) -> Iterator[dict[str, list[Any]]]:
    """Record `transform(value)` of each node at every forward of `gm` inside the block.

    Args:
        gm: a captured graph (e.g. `captured.mask_decoder`).
        nodes: nodes of `gm.graph` to record.
        transform: applied to each value before it is kept (default: detach; pass e.g.
            `lambda t: t.detach().cpu()` to keep GPU memory free).

    Yields:
        {node.name: [value of the first forward, value of the second, ...]}
    """
    seen: dict[str, list[Any]] = {n.name: [] for n in nodes}
    holder = nn.ModuleDict()
    gm.add_module(_TAPS_ATTR, holder)
    inserted = []
    try:
        for i, node in enumerate(nodes):
            holder[str(i)] = _Recorder(seen[node.name], transform)
            with gm.graph.inserting_after(node):
                inserted.append(gm.graph.call_module(f"{_TAPS_ATTR}.{i}", (node,)))
        gm.recompile()
        yield seen
    finally:
        for rec in inserted:
            gm.graph.erase_node(rec)
        delattr(gm, _TAPS_ATTR)
        gm.recompile()
