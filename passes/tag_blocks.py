"""tag_blocks: partition a captured SAM graph into block-reconstruction units.

Block reconstruction (papers.md §1.3) optimises one unit at a time, in forward order. This pass
decides the units once, on the graph; `samq_fx.recon` only reads the decision.

Reads: `NodeInfo` from annotate_roles (`role`, `attn_kind`, `attn_path`, `block`, `module_path`),
torch.export's `nn_module_stack`, and the unit mode: `ctx.config.recon.units` (a `QuantConfig`),
`ctx.config.units` (a `ReconConfig`), or "ptq4sam" when the config has none.
Writes: `NodeInfo.unit` (None for glue), `gm.samq_units` (unit names in forward order), and a
`PassResult` whose counts a test can assert. Quantizer sites that fall in no unit are listed in
`rejected` (they keep their calibrated qparams).

A unit is a set of owning modules; a node belongs to the unit whose module contains the node's
`module_path` (equal, or a dotted descendant: anchored, never a substring). Owning modules come
from roles: an attention's `attn_path` (from its softmax), an MLP's module (the parent of its
`mlp_fc1`), the neck (the parent of the `neck_conv`s). Quantizer nodes carry their consumer's
module path, so they land in their consumer's unit; get_attr nodes carry no record and go with
the extracted unit as shared attributes.

Modes, and the units of each (forward order = order of a unit's first node):
  "ptq4sam"      encoder: enc.{i}.attn, enc.{i}.mlp per block, then enc.neck;
                 decoder: dec.{i}.self_attn, dec.{i}.t2i, dec.{i}.mlp, dec.{i}.i2t per two-way
                 layer, then dec.final_t2i.                     (tiny: 9 + 9; SAM-B: 25 + 9 = 34)
  "joint-cross"  as ptq4sam, but a decoder layer's t2i, mlp and i2t, with the residual adds,
                 norms and pe adds between them, form one unit dec.{i}.cross (CAR-SAM JCAR).
  "stage-joint"  the encoder as saq-stage, the decoder as joint-cross (samq+jcar: PAR for
                 the encoder stages, CAR-SAM's JCAR units for the decoder).
  "saq-stage"    SAQ-SAM (papers.md §2.2): encoder stages enc.stage{k}, each the whole blocks
                 (norms, residual adds, window partition included) up to and including a
                 global-attention block (blocks after the last global block join the last
                 stage), then enc.neck; decoder: dec.{i}.layer, each two-way layer whole, then
                 dec.final_t2i.  SAM-B {0-2, 3-5, 6-8, 9-11}; tiny (global (1, 3)): {0-1, 2-3}.

Glue (residual adds, the LayerNorms between units, window partition, pe adds, the decoder's
token/embedding set-up) gets unit None: it is computed by the full model while inputs are
gathered and is never optimised.

    blocks.0.norm1 layer_norm         unit None
    blocks.0       view/permute        unit None      (window partition lives in Block)
    blocks.0.attn.qkv  q(input), q(weight), linear   unit enc.0.attn
    ...                                             unit enc.0.attn
    blocks.0.attn.proj linear          unit enc.0.attn
    blocks.0       add (residual)      unit None

Invariant: the graph is not changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from samq_fx.meta import get_info, module_stack, update_info
from samq_fx.pipeline import PassContext, PassResult

PASS_NAME = "tag_blocks"
UNIT_MODES = ("ptq4sam", "joint-cross", "saq-stage", "stage-joint")
UNITS_ATTR = "samq_units"

_DECODER_ATTN = {
    "dec_self": "self_attn",
    "token_to_image": "t2i",
    "image_to_token": "i2t",
}


class UnitError(ValueError):
    """A unit mode that does not exist, or a graph whose units do not match its architecture."""


@dataclass(frozen=True)
class UnitSpec:
    """One unit: its name, the modules it owns, and (joint units) the module whose glue nodes
    between the unit's first and last node join it."""

    name: str
    modules: tuple[str, ...]
    span: str | None = None


def units_mode(ctx: PassContext) -> str:
    cfg = ctx.config
    recon = getattr(cfg, "recon", cfg)
    mode = getattr(recon, "units", None) or "ptq4sam"
    if mode not in UNIT_MODES:
        raise UnitError(f"unknown reconstruction unit mode {mode!r}; modes: {list(UNIT_MODES)}")
    return mode


def _parent_path(node: torch.fx.Node, path: str) -> str:
    """The module path one level above `path` in the node's module stack."""
    paths = [p for p, _ in module_stack(node)]
    if path not in paths:
        raise UnitError(f"node {node.name!r}: module {path!r} is not on its module stack {paths}")
    i = paths.index(path)
    return paths[i - 1] if i > 0 else ""


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def encoder_stages(depth: int, global_blocks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """SAQ-SAM's encoder stages: consecutive blocks, each stage ending at a global block."""
    stages, start = [], 0
    for g in sorted(global_blocks):
        stages.append(tuple(range(start, g + 1)))
        start = g + 1
    if start < depth:
        if not stages:
            return [tuple(range(depth))]
        stages[-1] = stages[-1] + tuple(range(start, depth))
    return stages


def _stage_specs(gm: torch.fx.GraphModule, part: str, ctx: PassContext) -> list[UnitSpec]:
    """saq-stage units: block paths grouped by stage (encoder), whole two-way layers (decoder)."""
    paths: dict[int, str] = {}
    specs: dict[str, UnitSpec] = {}
    for node in gm.graph.nodes:
        info = get_info(node)
        if info is None or info.role not in ("attn_softmax", "neck_conv"):
            continue
        if info.role == "neck_conv":
            specs["enc.neck"] = UnitSpec("enc.neck", (_parent_path(node, info.module_path),))
        elif part == "image_encoder":
            paths[info.block] = _parent_path(node, info.attn_path)
        elif info.attn_kind == "final_token_to_image":
            specs["dec.final_t2i"] = UnitSpec("dec.final_t2i", (info.attn_path,))
        else:
            name = f"dec.{info.block}.layer"
            specs[name] = UnitSpec(name, (_parent_path(node, info.attn_path),))
    if part == "image_encoder":
        arch = ctx.arch
        for k, blocks in enumerate(
            encoder_stages(arch.encoder_depth, arch.encoder_global_attn_indexes)
        ):
            missing = [b for b in blocks if b not in paths]
            if missing:
                raise UnitError(f"encoder blocks {missing} of stage {k} not found in the graph")
            specs[f"enc.stage{k}"] = UnitSpec(f"enc.stage{k}", tuple(paths[b] for b in blocks))
    return list(specs.values())


def _specs(gm: torch.fx.GraphModule, part: str, mode: str) -> list[UnitSpec]:
    """Unit specs from roles, in no particular order."""
    specs: dict[str, UnitSpec] = {}
    cross: dict[int, dict[str, str]] = {}  # joint-cross: block -> {t2i, mlp, i2t, layer}
    enc = part == "image_encoder"
    for node in gm.graph.nodes:
        info = get_info(node)
        if info is None or info.role not in ("attn_softmax", "mlp_fc1", "neck_conv"):
            continue
        if info.role == "neck_conv":
            neck = _parent_path(node, info.module_path)
            specs.setdefault("enc.neck", UnitSpec("enc.neck", (neck,)))
            continue
        if info.role == "mlp_fc1":
            kind, path = "mlp", _parent_path(node, info.module_path)
            name = f"{'enc' if enc else 'dec'}.{info.block}.mlp"
        elif enc:
            kind, path, name = "attn", info.attn_path, f"enc.{info.block}.attn"
        elif info.attn_kind == "final_token_to_image":
            kind, path, name = "final", info.attn_path, "dec.final_t2i"
        else:
            kind, path = _DECODER_ATTN[info.attn_kind], info.attn_path
            name = f"dec.{info.block}.{kind}"
        if mode == "joint-cross" and not enc and kind in ("t2i", "mlp", "i2t"):
            layer = cross.setdefault(info.block, {})
            layer[kind] = path
            layer["layer"] = _parent_path(node, path)
            continue
        if name in specs:
            raise UnitError(f"two modules map to unit {name!r}: {specs[name].modules[0]}, {path}")
        specs[name] = UnitSpec(name, (path,))
    for block, layer in sorted(cross.items()):
        missing = [k for k in ("t2i", "mlp", "i2t") if k not in layer]
        if missing:
            raise UnitError(f"decoder layer {block} lacks {missing} for a joint-cross unit")
        name = f"dec.{block}.cross"
        specs[name] = UnitSpec(name, (layer["t2i"], layer["mlp"], layer["i2t"]), layer["layer"])
    return list(specs.values())


def _part_mode(mode: str, part: str) -> str:
    """The plain mode that partitions `part`: "stage-joint" is saq-stage in the encoder and
    joint-cross in the decoder."""
    if mode == "stage-joint":
        return "saq-stage" if part == "image_encoder" else "joint-cross"
    return mode


def expected_unit_count(ctx: PassContext, mode: str) -> int:
    a = ctx.arch
    mode = _part_mode(mode, ctx.part)
    if mode == "saq-stage":
        if ctx.part == "image_encoder":
            return len(encoder_stages(a.encoder_depth, a.encoder_global_attn_indexes)) + 1
        return a.decoder_depth + 1
    if ctx.part == "image_encoder":
        return 2 * a.encoder_depth + 1
    per_layer = 4 if mode == "ptq4sam" else 2
    return per_layer * a.decoder_depth + 1


def assign_units(gm: torch.fx.GraphModule, specs: list[UnitSpec]) -> dict[torch.fx.Node, str]:
    """node -> unit name for every node inside a unit (glue nodes are absent)."""
    owner = {m: s.name for s in specs for m in s.modules}
    assigned: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        info = get_info(node)
        path = info.module_path if info is not None else ""
        while path:
            if path in owner:
                assigned[node] = owner[path]
                break
            path = path.rpartition(".")[0]
    for spec in specs:
        if spec.span is not None:
            _absorb_glue(gm, spec, assigned)
    return assigned


def _absorb_glue(gm: torch.fx.GraphModule, spec: UnitSpec, assigned: dict) -> None:
    """Joint units: glue of `spec.span` between the unit's first and last node joins it."""
    nodes = list(gm.graph.nodes)
    pos = [i for i, n in enumerate(nodes) if assigned.get(n) == spec.name]
    for node in nodes[pos[0] : pos[-1]]:
        info = get_info(node)
        if node not in assigned and info is not None and _under(info.module_path, spec.span):
            assigned[node] = spec.name


def unit_order(gm: torch.fx.GraphModule) -> list[str]:
    """Unit names in forward order, read back from `NodeInfo.unit` (survives deepcopy)."""
    order: dict[str, None] = {}
    for node in gm.graph.nodes:
        info = get_info(node)
        if info is not None and info.unit is not None:
            order.setdefault(info.unit, None)
    return list(order)


def unit_members(gm: torch.fx.GraphModule, name: str) -> list[torch.fx.Node]:
    """The nodes of unit `name`, in graph order; KeyError listing the units if there are none."""
    members = [n for n in gm.graph.nodes if get_info(n) is not None and get_info(n).unit == name]
    if not members:
        raise KeyError(f"no unit {name!r} in this graph; units: {unit_order(gm)}")
    return members


def _is_quantizer(node: torch.fx.Node) -> bool:
    info = get_info(node)
    return node.op == "call_module" and info is not None and "site" in info.quant


def tag_blocks(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    mode = units_mode(ctx)
    if _part_mode(mode, ctx.part) == "saq-stage":
        specs = _stage_specs(gm, ctx.part, ctx)
    else:
        specs = _specs(gm, ctx.part, _part_mode(mode, ctx.part))
    want = expected_unit_count(ctx, mode)
    if len(specs) != want:
        raise UnitError(
            f"{ctx.part} ({ctx.arch.name}, mode {mode!r}): expected {want} units, found "
            f"{len(specs)}: {sorted(s.name for s in specs)}"
        )
    assigned = assign_units(gm, specs)
    for node in gm.graph.nodes:
        info = get_info(node)
        if info is None:
            continue
        unit = assigned.get(node)
        if unit is not None or info.unit is not None:
            update_info(node, PASS_NAME, unit=unit)
    order = unit_order(gm)
    setattr(gm, UNITS_ATTR, order)
    quantizers = [n for n in gm.graph.nodes if _is_quantizer(n)]
    outside = {
        get_info(n).quant["site"]: "its module is in no unit (keeps calibrated qparams)"
        for n in quantizers
        if n not in assigned
    }
    return PassResult(
        counts={
            "units": len(order),
            "nodes": len(assigned),
            "quantizers": len(quantizers) - len(outside),
            "quantizers_outside": len(outside),
        },
        rejected=outside,
        notes=[f"mode {mode}: " + ", ".join(order)],
    )
