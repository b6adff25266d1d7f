"""Tables a person reads: the role table of a captured model (and, later, quantization summaries).

`roles(captured)` returns a `RoleTable`: one row per annotated node, printable as a table,
convertible to JSON-ready dicts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx

from samq_fx.meta import get_info

PARTS = ("image_encoder", "mask_decoder")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned text table with a rule under the header."""
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


@dataclass(frozen=True)
class RoleRow:
    part: str
    node: str
    role: str
    attn_kind: str | None
    block: int | None
    module_path: str
    op: str
    shape: str


class RoleTable:
    """The annotated nodes of a captured SAM, one row each."""

    HEADERS = ("part", "block", "attn_kind", "role", "module_path", "op", "shape", "node")

    def __init__(self, rows: list[RoleRow]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def counts(self, part: str | None = None) -> Counter:
        return Counter(r.role for r in self.rows if part is None or r.part == part)

    def to_dicts(self) -> list[dict]:
        return [r.__dict__.copy() for r in self.rows]

    def __str__(self) -> str:
        body = format_table(
            self.HEADERS,
            (
                (r.part, r.block, r.attn_kind, r.role, r.module_path, r.op, r.shape, r.node)
                for r in self.rows
            ),
        )
        totals = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))
        return f"{body}\n{len(self.rows)} annotated nodes: {totals}"


def _shape(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "x".join(str(s) for s in val.shape)
    return ""


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)).replace(".default", "")


def graph_parts(model: torch.nn.Module) -> list[tuple[str, torch.fx.GraphModule]]:
    parts = [(p, getattr(model, p, None)) for p in PARTS]
    parts = [(p, gm) for p, gm in parts if isinstance(gm, torch.fx.GraphModule)]
    if not parts:
        raise TypeError(
            f"{type(model).__name__} has no captured graphs; call samq_fx.capture(sam) first"
        )
    return parts


def roles(model: torch.nn.Module) -> RoleTable:
    """The role table of a captured SAM (`samq_fx.capture`).

    Example:
        >>> print(samq_fx.roles(samq_fx.capture(samq_fx.build_sam("tiny"))))
    """
    rows = []
    for part, gm in graph_parts(model):
        for node in gm.graph.nodes:
            info = get_info(node)
            if info is None or info.role is None:
                continue
            rows.append(
                RoleRow(
                    part=part,
                    node=node.name,
                    role=info.role,
                    attn_kind=info.attn_kind,
                    block=info.block,
                    module_path=info.module_path,
                    op=_op_name(node),
                    shape=_shape(node),
                )
            )
    return RoleTable(rows)
