"""SAQ-SAM's Prompt-Aware Reconstruction (PAR): the loss and targets plugged into the driver.

For an encoder stage unit (`tag_blocks` mode "saq-stage"), the target is what the full-precision
mask decoder makes of the FP stage output, prompted by the image's own boxes (papers.md §2.2):

    T_k = TwoWay_FP(Neck_FP(Stage_k_FP(x)) + dense, image_pe, [iou; mask tokens; sparse]).keys
    loss = mean over prompts and image tokens of sum over channels (T^_k - T_k)^2

where T^_k runs the *quantized* stage output through the same FP neck and two-way transformer
(gradients flow through them into the stage's rounding and step sizes). `.keys` is the image
tokens after the two two-way layers (the value input of the final token-to-image attention).

Layer skipping (`ParConfig.layer_skip`, the paper's choice): stage k's output goes straight to
the neck, skipping the deeper encoder blocks, so every stage's loss costs one neck plus the
decoder's two-way layers. With `layer_skip=False` the stage output runs through the remaining FP
encoder blocks first (for comparing time and accuracy).

The FP neck and decoder are `recon.extract_span`s of `fp_model`'s graphs (copies of its nodes
sharing its parameters; nothing is re-implemented). Prompt tensors (sparse corners, the dense
no-mask embedding, image_pe) come from the FP prompt encoder and are cached with the target, one
per calibration item, at most `ParConfig.max_prompts` prompts (the driver's seeded subset).
Other units (neck, decoder layers, final t2i) get the driver's default: FP outputs, channel-summed
squared error. The paper's decoder loss (CLM) adds terms on the final token output; we use the
plain MSE for the decoder units, as the issue states.

`PromptAwareLoss` is a context manager: it switches off gradients of the FP parameters it runs
through and drops its spans on exit (nothing is attached to the models' graphs outside the taps
that `record` removes itself).

    with PromptAwareLoss(qmodel, fp_model, ParConfig()) as par:
        reconstruct(qmodel, fp_model, items, cfg, loss_fn=par.loss, target_fn=par.targets)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from samq_fx.calib import CalibItem
from samq_fx.config import ParConfig
from samq_fx.meta import get_info, nodes_with_role
from samq_fx.passes.tag_blocks import unit_order
from samq_fx.recon import ModelFeed, Span, extract_span, extract_unit, record

STAGE_PREFIX = "enc.stage"
_DECODER_INPUTS = ("image_embeddings", "image_pe", "sparse_prompt_embeddings",
                   "dense_prompt_embeddings")  # fmt: skip


def keys_node_name(decoder: torch.fx.GraphModule) -> str:
    """The two-way transformer's image-token output: what the final t2i attention's v_proj reads."""
    for node in nodes_with_role(decoder, "v_proj"):
        if get_info(node).attn_kind == "final_token_to_image":
            arg = node.args[0]
            return (arg.args[0] if arg.op == "call_module" else arg).name
    raise ValueError("no final token-to-image v_proj in the decoder graph: is it a SAM decoder?")


class PromptAwareLoss:
    """PAR's `target_fn` and `loss_fn` for `samq_fx.recon.reconstruct` (module docstring)."""

    def __init__(self, qmodel: torch.nn.Module, fp_model: torch.nn.Module, cfg: ParConfig):
        self.qmodel, self.fp_model, self.cfg = qmodel, fp_model, cfg
        self.feed = ModelFeed(fp_model)
        self.heads: dict[str, Span] = {}
        self.stage_out: dict[str, str] = {}
        self.decoder: Span | None = None
        self._grad_flags: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> PromptAwareLoss:
        self._grad_flags = [(p, p.requires_grad) for p in self.fp_model.parameters()]
        for p, _ in self._grad_flags:
            p.requires_grad_(False)
        dec = self.fp_model.mask_decoder
        self.decoder = extract_span(dec, list(_DECODER_INPUTS), [keys_node_name(dec)])
        if self.decoder.extras:
            raise ValueError(f"decoder span needs values it cannot compute: {self.decoder.extras}")
        return self

    def __exit__(self, *exc) -> None:
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self.heads.clear()
        self.decoder = None

    # -- spans ----------------------------------------------------------------------------

    def _head(self, unit: str) -> Span:
        """The FP path from stage `unit`'s output to the image embedding (neck only with layer
        skipping, else the remaining blocks and the neck)."""
        if unit not in self.heads:
            enc = self.qmodel.image_encoder
            stages = [u for u in unit_order(enc) if u.startswith(STAGE_PREFIX)]
            for name in stages:
                if name not in self.stage_out:
                    self.stage_out[name] = extract_unit(enc, name, "image_encoder").outputs[0]
            start = self.stage_out[stages[-1] if self.cfg.layer_skip else unit]
            fp_enc = self.fp_model.image_encoder
            (out,) = fp_enc.graph.output_node().args
            out = out[0] if isinstance(out, (tuple, list)) else out
            self.heads[unit] = extract_span(fp_enc, [start], [out.name])
        return self.heads[unit]

    # -- plug-ins -------------------------------------------------------------------------

    @torch.no_grad()
    def targets(self, unit: str, item: CalibItem) -> list[Tensor] | None:
        """[T_k, image_pe, sparse, dense, *head extras] for a stage unit; None otherwise."""
        if not unit.startswith(STAGE_PREFIX):
            return None
        head = self._head(unit)
        item = _first_prompts(item, self.cfg.max_prompts)
        names = [self.stage_out[unit], *head.extras]
        (values,) = record(self.feed, "image_encoder", names, [item])
        (emb,) = head.module(*values)
        pe, sparse, dense = self._prompts(item)
        (keys,) = self.decoder.module(emb, pe, sparse, dense)
        return [keys, pe, sparse, dense, *values[1:]]

    def loss(self, preds: list[Tensor], targets: list[Tensor], unit: str) -> Tensor | None:
        """Channel-summed squared error of the decoder's image tokens; None for other units."""
        if not unit.startswith(STAGE_PREFIX):
            return None
        keys_t, pe, sparse, dense, *extras = targets
        (emb,) = self._head(unit).module(preds[0], *extras)
        (keys,) = self.decoder.module(emb, pe, sparse, dense)
        return (keys.float() - keys_t.float()).pow(2).sum(-1).mean()

    def _prompts(self, item: CalibItem) -> tuple[Tensor, Tensor, Tensor]:
        pe_enc = self.fp_model.prompt_encoder
        pts = None if item.points is None else (item.points, item.point_labels)
        sparse, dense = pe_enc(points=pts, boxes=item.boxes, masks=None)
        return pe_enc.get_dense_pe(), sparse, dense


def _first_prompts(item: CalibItem, k: int) -> CalibItem:
    if item.num_prompts <= k:
        return item

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[:k]

    return dataclasses.replace(
        item, boxes=cut(item.boxes), points=cut(item.points), point_labels=cut(item.point_labels)
    )
