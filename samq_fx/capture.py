"""Capture SAM as FX graphs with torch.export, wrapped so it is still a `Sam`.

`capture(sam)` exports the image encoder (dynamic batch) and the mask decoder (dynamic number
of prompts and of prompt tokens) and returns a `CapturedSam`: a `Sam` whose `image_encoder` and
`mask_decoder` are `torch.fx.GraphModule`s. The prompt encoder and the pre/post-processing stay
the eager modules they were, so `SamPredictor(captured)` and `SamAutomaticMaskGenerator` work
unchanged. The user's model is deep-copied first and never modified.

`torch.fx.symbolic_trace` fails on SAM (data-dependent shapes in window partition and the
decoder's `repeat_interleave`); torch.export traces it at ATen level (`aten.linear`,
`aten.matmul`, `aten.softmax`), which is the level the passes match.

The exported decoder computes all four masks (`MaskDecoder.predict_masks`); the captured
graph takes `multimask_output` as a fifth input and ends in `select_mask_outputs`, so one graph
serves both settings, as the eager `MaskDecoder.forward` does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx
from segment_anything.modeling import MaskDecoder, Sam
from torch.export import Dim

from samq_fx.models import SamArch, arch_of
from samq_fx.pipeline import PassContext, capture_passes, run_passes


@dataclass(frozen=True)
class CaptureConfig:
    """Ranges the exported graphs accept for their dynamic dimensions."""

    max_image_batch: int = 256
    max_prompts: int = 8192
    max_prompt_tokens: int = 256


class CapturedSam(Sam):
    """A `Sam` whose image encoder and mask decoder are captured `torch.fx.GraphModule`s."""

    samq_arch: SamArch


class SamGraphModule(torch.fx.GraphModule):
    """A GraphModule that keeps SAM's plain attributes (`img_size`, the pass log) on deepcopy.

    `torch.fx.GraphModule.__deepcopy__` rebuilds a bare GraphModule and drops attributes the
    graph does not reference, so `copy.deepcopy(captured)` would lose `image_encoder.img_size`,
    which `Sam.preprocess` and `SamPredictor` read.
    """

    PRESERVED = ("img_size", "samq_pass_log", "samq_units")
    PRESERVED_MODULES = (
        "samq_quantizers",
        "samq_lowered",
    )  # a ModuleDict; a bare copy makes it a Module

    def __deepcopy__(self, memo):
        bare = torch.fx.GraphModule.__deepcopy__(self, memo)
        copied = SamGraphModule(bare, bare.graph, class_name=self.__class__.__name__)
        copied.meta = bare.meta
        for name in self.PRESERVED + self.PRESERVED_MODULES:
            if hasattr(self, name):  # memo: the same quantizer objects the graph calls
                setattr(copied, name, copy.deepcopy(getattr(self, name), memo))
        return copied


def select_mask_outputs(
    masks: torch.Tensor, iou_pred: torch.Tensor, multimask_output: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.forward`'s choice: the three ambiguity masks, or the single-mask token."""
    if multimask_output:
        return masks[:, 1:, :, :], iou_pred[:, 1:]
    return masks[:, 0:1, :, :], iou_pred[:, 0:1]


class _AllMasks(MaskDecoder):
    """A view of a `MaskDecoder` whose forward returns all mask tokens (exported, not run)."""

    def forward(
        self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
    ):
        return self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )


def _as_plain_graph_module(exported: torch.fx.GraphModule, name: str) -> torch.fx.GraphModule:
    """Drop export's pytree calling convention: plain positional/keyword placeholders."""
    graph = exported.graph
    graph._codegen = torch.fx.graph.CodeGen()
    (output,) = [n for n in graph.nodes if n.op == "output"]
    outs = output.args[0]
    if isinstance(outs, (list, tuple)) and len(outs) == 1:
        output.args = (outs[0],)
    else:
        output.args = (tuple(outs) if isinstance(outs, list) else outs,)
    gm = SamGraphModule(exported, graph, class_name=name)
    gm.meta = {}
    return gm


def _export_encoder(sam: Sam, cfg: CaptureConfig) -> torch.fx.GraphModule:
    enc = sam.image_encoder
    p = next(enc.parameters())
    x = torch.zeros(2, 3, enc.img_size, enc.img_size, device=p.device, dtype=p.dtype)
    batch = Dim("image_batch", min=1, max=cfg.max_image_batch)
    ep = torch.export.export(enc, (x,), dynamic_shapes=({0: batch},), strict=False)
    gm = _as_plain_graph_module(ep.module(check_guards=False), "CapturedImageEncoder")
    gm.img_size = enc.img_size
    return gm


def _export_decoder(sam: Sam, cfg: CaptureConfig) -> torch.fx.GraphModule:
    dec = copy.copy(sam.mask_decoder)
    dec.__class__ = _AllMasks
    pe = sam.prompt_encoder.get_dense_pe()
    c, h, w = pe.shape[1:]
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 16.0, 12.0], [1.0, 2.0, 3.0, 4.0]])
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes.to(pe.device), masks=None)
    emb = torch.zeros(1, c, h, w, device=pe.device, dtype=pe.dtype)
    prompts = Dim("prompts", min=1, max=cfg.max_prompts)
    tokens = Dim("prompt_tokens", min=1, max=cfg.max_prompt_tokens)
    ep = torch.export.export(
        dec,
        (emb, pe, sparse, dense),
        dynamic_shapes=(None, None, {0: prompts, 1: tokens}, {0: prompts}),
        strict=False,
    )
    gm = _as_plain_graph_module(ep.module(check_guards=False), "CapturedMaskDecoder")
    _add_multimask_input(gm)
    return gm


def _add_multimask_input(gm: torch.fx.GraphModule) -> None:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        flag = graph.placeholder("multimask_output")
    (output,) = [n for n in graph.nodes if n.op == "output"]
    masks, iou = output.args[0]
    with graph.inserting_before(output):
        selected = graph.call_function(select_mask_outputs, (masks, iou, flag))
    output.args = (selected,)
    graph.lint()
    gm.recompile()


def capture(sam: Sam, config: CaptureConfig | None = None) -> CapturedSam:
    """Capture `sam`'s image encoder and mask decoder as FX graphs with roles annotated.

    Args:
        sam: any `segment_anything` `Sam` (official configuration, tiny, or custom). Not modified.
        config: ranges of the dynamic dimensions.

    Returns:
        A `CapturedSam`: drop-in for `Sam` (SamPredictor, SamAutomaticMaskGenerator,
        torch.compile); `image_encoder` and `mask_decoder` are `torch.fx.GraphModule`s whose
        nodes carry `node.meta["samq"]` records (see `samq_fx.roles`).

    Example:
        >>> captured = capture(build_sam("tiny"))
        >>> SamPredictor(captured).set_image(image)
    """
    if not isinstance(sam, Sam):
        raise TypeError(f"capture expects a segment_anything Sam, got {type(sam).__name__}")
    if isinstance(sam.image_encoder, torch.fx.GraphModule):
        raise ValueError("this model is already captured; capture the original Sam instead")
    cfg = config or CaptureConfig()
    arch = arch_of(sam)
    eager = copy.deepcopy(sam).eval()
    with torch.no_grad():
        encoder = _export_encoder(eager, cfg)
        decoder = _export_decoder(eager, cfg)
    for part, gm in (("image_encoder", encoder), ("mask_decoder", decoder)):
        run_passes(gm, PassContext(part=part, arch=arch), capture_passes())
    captured = CapturedSam(
        image_encoder=encoder,
        prompt_encoder=eager.prompt_encoder,
        mask_decoder=decoder,
        pixel_mean=eager.pixel_mean.flatten().tolist(),
        pixel_std=eager.pixel_std.flatten().tolist(),
    )
    captured.samq_arch = arch
    device = next(eager.parameters()).device
    if device.type != "meta":  # folded constants were computed on the CPU
        captured.to(device)
    return captured.eval()
