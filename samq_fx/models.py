"""Build SAM models: the three official configurations and the project's tiny one.

`build_sam("vit_b")` gives Meta's ViT-B SAM (random weights unless a checkpoint is given);
`build_sam("tiny")` gives a small SAM built from the same `segment_anything` classes, with the
weights this project trains and ships (see `bench/train_tiny_sam.py`), cheap enough for a CPU.

Every model is described by a `SamArch`, a frozen record of the hyper-parameters that fix the
module tree. `arch_of(sam)` reads it back from any `Sam`, so a saved quantized model can be
rebuilt (module tree, then captured graph, then passes) without pickling code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from samq_fx.serial import DictConfig, load_tensors

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArch(DictConfig):
    """The hyper-parameters that fix a SAM module tree."""

    name: str
    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16

    @property
    def image_embedding_size(self) -> int:
        return self.img_size // self.patch_size


ARCHS: dict[str, SamArch] = {
    "vit_b": SamArch("vit_b"),
    "vit_l": SamArch(
        "vit_l",
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamArch(
        "vit_h",
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # Small enough for 2 CPU cores, yet every structural feature of SAM is there: windowed and
    # global attention with relative positions, the neck, the full two-way decoder (depth 2,
    # 8 heads, downsampled cross-attention), hypernetwork MLPs and the IoU head.
    "tiny": SamArch(
        "tiny",
        img_size=256,
        patch_size=8,
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        window_size=8,
        prompt_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=8,
        decoder_mlp_dim=512,
        iou_head_hidden_dim=128,
    ),
}

OFFICIAL_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}

TINY_WEIGHTS = Path(__file__).parent / "assets" / "tiny_sam.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or made for another architecture."""


def sam_from_arch(arch: SamArch) -> Sam:
    """A randomly initialised `Sam` in eval mode with the module tree `arch` describes."""
    e = arch.image_embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.img_size,
            mlp_ratio=arch.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(e, e),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def arch_of(sam: Sam) -> SamArch:
    """Read the `SamArch` back from a `Sam` (eager or captured by `samq_fx.capture`)."""
    recorded = getattr(sam, "samq_arch", None)
    if isinstance(recorded, SamArch):
        return recorded
    enc, dec = sam.image_encoder, sam.mask_decoder
    blocks = list(enc.blocks)
    kernel = enc.patch_embed.proj.kernel_size[0]
    arch = SamArch(
        name="custom",
        img_size=enc.img_size,
        patch_size=kernel,
        encoder_embed_dim=enc.patch_embed.proj.out_channels,
        encoder_depth=len(blocks),
        encoder_num_heads=blocks[0].attn.num_heads,
        encoder_global_attn_indexes=tuple(i for i, b in enumerate(blocks) if b.window_size == 0),
        window_size=max(b.window_size for b in blocks),
        mlp_ratio=blocks[0].mlp.lin1.out_features / blocks[0].mlp.lin1.in_features,
        prompt_embed_dim=dec.transformer_dim,
        decoder_depth=dec.transformer.depth,
        decoder_num_heads=dec.transformer.num_heads,
        decoder_mlp_dim=dec.transformer.mlp_dim,
        iou_head_hidden_dim=dec.iou_prediction_head.layers[0].out_features,
        mask_in_chans=sam.prompt_encoder.mask_downscaling[3].out_channels,
    )
    for known in ARCHS.values():
        if dataclasses.replace(known, name="custom") == arch:
            return known
    return dataclasses.replace(arch, name="custom")


def build_sam(
    model_type: str = "tiny",
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
) -> Sam:
    """Build a SAM in eval mode.

    Args:
        model_type: "vit_b", "vit_l", "vit_h" (Meta's configurations) or "tiny".
        checkpoint: a state-dict file such as `sam_vit_b_01ec64.pth`; loaded with
            `weights_only=True` and checked against the architecture.
        pretrained: for "tiny" without a checkpoint, load the weights shipped with the package
            (True) or keep the random initialisation (False). The official models have no
            bundled weights: without a checkpoint they are randomly initialised.

    Returns:
        A `segment_anything.modeling.Sam`.

    Example:
        >>> sam = build_sam("tiny")                   # trained tiny SAM, CPU friendly
        >>> sam = build_sam("vit_b", "sam_vit_b_01ec64.pth")
    """
    if model_type not in ARCHS:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(ARCHS)}")
    arch = ARCHS[model_type]
    sam = sam_from_arch(arch)
    if checkpoint is None and model_type == "tiny" and pretrained:
        if not TINY_WEIGHTS.is_file():
            raise CheckpointError(
                f"the bundled tiny SAM weights are missing at {TINY_WEIGHTS}; reinstall "
                "samq-fx or pass pretrained=False for random weights"
            )
        checkpoint = TINY_WEIGHTS
    if checkpoint is not None:
        load_checkpoint(sam, checkpoint, arch)
    sam.samq_arch = arch
    return sam


def load_checkpoint(sam: Sam, checkpoint: str | os.PathLike, arch: SamArch) -> None:
    """Load a state dict into `sam`, or raise a `CheckpointError` that names what is wrong."""
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (expected {arch.name})")
    state = load_tensors(path, CheckpointError, f"a PyTorch state dict (expected {arch.name})")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict of tensors")
    expected = sam.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs {arch.name} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        guess = _guess_arch(state)
        problems = []
        if wrong_shape:
            problems.append(f"shape mismatches (first 3): {wrong_shape[:3]}")
        if missing:
            problems.append(f"missing keys (first 3): {missing[:3]}")
        if unexpected:
            problems.append(f"unexpected keys (first 3): {unexpected[:3]}")
        hint = f"; it looks like a {guess} checkpoint" if guess and guess != arch.name else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the expected architecture {arch.name!r}"
            f"{hint}: " + "; ".join(problems)
        )
    sam.load_state_dict(state)


def _guess_arch(state: dict) -> str | None:
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return None
    depth = 1 + max(
        (int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")), default=-1
    )
    for name, arch in ARCHS.items():
        if arch.encoder_embed_dim == w.shape[0] and arch.encoder_depth == depth:
            return name
    return None
