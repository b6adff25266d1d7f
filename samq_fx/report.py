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


@dataclass(frozen=True)
class QuantRow:
    part: str
    module_path: str
    role: str
    attn_kind: str | None
    slot: str
    kind: str  # "uniform", "log2" or "fp"
    bits: int | None
    granularity: str | None
    lo: float | None  # smallest representable value (over channels)
    hi: float | None  # largest representable value (over channels)
    detail: str = ""


class QuantSummary:
    """Per-site quantization of a `QuantizedSam`: bits, granularity, representable range."""

    HEADERS = (
        "part",
        "module_path",
        "role",
        "attn_kind",
        "slot",
        "kind",
        "bits",
        "gran",
        "range",
        "detail",
    )

    def __init__(self, rows: list[QuantRow], title: str = ""):
        self.rows, self.title = rows, title

    def fp_sites(self) -> list[QuantRow]:
        return [r for r in self.rows if r.kind == "fp"]

    def to_dicts(self) -> list[dict]:
        return [r.__dict__.copy() for r in self.rows]

    def __str__(self) -> str:
        def rng(r: QuantRow) -> str:
            return "" if r.lo is None else f"[{r.lo:.4g}, {r.hi:.4g}]"

        body = format_table(
            self.HEADERS,
            (
                (
                    r.part,
                    r.module_path,
                    r.role,
                    r.attn_kind,
                    r.slot,
                    r.kind,
                    r.bits,
                    r.granularity,
                    rng(r),
                    r.detail,
                )
                for r in self.rows
            ),
        )
        n_q = sum(r.kind != "fp" for r in self.rows)
        fp = sorted({f"{r.role}" for r in self.fp_sites()})
        tail = f"{n_q} quantized tensors, {len(self.fp_sites())} kept in floating point"
        tail += f" ({', '.join(fp)})" if fp else ""
        tail += "; not listed and always FP: LayerNorms, GELU/ReLU, residual adds, rel-pos, prompt encoder"
        return "\n".join(x for x in (self.title, body, tail) if x)


def _quant_row(info, slot: str, module) -> QuantRow:
    base = dict(
        part=info.part,
        module_path=info.module_path,
        role=info.role,
        attn_kind=info.attn_kind,
        slot=slot,
    )
    if module is None:
        return QuantRow(**base, kind="fp", bits=None, granularity=None, lo=None, hi=None)
    from samq_fx.quantizers import Log2Quantizer

    qp = module.qparams()
    scale, zp = qp.scale.float(), qp.zero_point.float()
    if isinstance(module, Log2Quantizer):
        return QuantRow(
            **base,
            kind="log2",
            bits=module.bits,
            granularity="tensor",
            lo=0.0,
            hi=float(scale),
            detail=f"tau={module.tau}",
        )
    lo = ((qp.qmin - zp) * scale).min().item()
    hi = ((qp.qmax - zp) * scale).max().item()
    spec = module.spec
    detail = [] if module.enabled else ["disabled"]
    folded = info.findings.get("fold_bimodal_signs")
    if folded and slot == "weight":
        detail.append(f"BIG: {folded['flipped']} channels sign-flipped")
    if getattr(module, "rounding", "nearest") != "nearest":
        detail.append(f"rounding={module.rounding}")
    pcc = info.findings.get("install_pcc_clips", {}).get(slot)
    if pcc:
        was = pcc["before"]
        detail.append(
            f"PCC p={pcc['p']:g} clip [{pcc['lo']:.3g}, {pcc['hi']:.3g}] "
            f"(1-IoU {pcc['distance']:.3f}; calibrated [{was[0]:.3g}, {was[1]:.3g}])"
        )
    return QuantRow(
        **base,
        kind="uniform",
        bits=spec.bits,
        granularity=spec.granularity,
        lo=lo,
        hi=hi,
        detail=", ".join(detail),
    )


def summary(model: torch.nn.Module) -> QuantSummary:
    """Per-layer bits, ranges and the layers left in full precision of a quantized SAM.

    Example:
        >>> print(samq_fx.summary(q))
    """
    from samq_fx.passes.insert_quantizers import QUANTIZERS_ATTR, site_key

    rows = []
    for _part, gm in graph_parts(model):
        modules = getattr(gm, QUANTIZERS_ATTR, {})
        for node in gm.graph.nodes:
            info = get_info(node)
            if info is None or info.role is None or not info.quant:
                continue
            for slot, decision in info.quant.items():
                module = modules[site_key(info, slot)] if decision is not None else None
                rows.append(_quant_row(info, slot, module))
    cfg = getattr(model, "samq_config", None)
    title = f"quantization summary: {cfg.name}" if cfg is not None else ""
    return QuantSummary(rows, title)
