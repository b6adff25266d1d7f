"""Quantization configs: frozen dataclasses, named presets, strict `from_dict`.

`QuantConfig` says what to quantize and how; every default follows the papers' shared setting
(papers.md §0): weights per output channel, asymmetric; activations per tensor, asymmetric; the
inputs of every linear and convolution and both operands of both attention matmuls quantized;
patch embedding, output upscaling, hypernetwork MLPs, IoU head and the final mask product kept in
floating point (so are LayerNorms, GELU, residual adds and the prompt encoder, which have no
quantizer site at all).

A one-line override changes any group of layers, selected by role, attention kind, part or an
anchored module-path pattern:

    QuantConfig(w_bits=4, a_bits=4,
                overrides=(Override(role="upscale_conv", quantize=True, w_bits=8, a_bits=8),))
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from samq_fx.meta import ATTN_KINDS, ROLES
from samq_fx.serial import DictConfig, strict_from_dict

BASE_METHODS = ("minmax", "percentile", "mse")
METHODS = BASE_METHODS + ("ptq4sam", "saq-sam", "car-sam", "samq")

# Roles whose weight is quantized, and their activation input slot(s).
WEIGHT_ROLES = (
    "qkv_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "mlp_fc1",
    "mlp_fc2",
    "neck_conv",
    "patch_embed",
    "upscale_conv",
    "hypernet_fc",
    "iou_head_fc",
)
# The two attention matmuls: which operand slot is which.
MATMUL_SLOTS = {"qk_matmul": ("q", "k"), "av_matmul": ("attn", "v")}
SLOTS = ("weight", "input", "q", "k", "attn", "v")
DEFAULT_FP_ROLES = ("patch_embed", "upscale_conv", "hypernet_fc", "iou_head_fc", "mask_matmul")
# Parameters added to activations rather than multiplied with them: one weight slot, no input.
# They stay in floating point unless an `Override` selects them (the papers keep them in float;
# SAM-B's position embedding is 6 MiB of bf16, more than a tenth of its int4 encoder).
TABLE_ROLES = ("pos_embed",)


def _check_bits(name: str, bits: int | None, allow_none: bool = False) -> None:
    if bits is None and allow_none:
        return
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"{name}={bits!r} is out of range: bit widths must be integers 2..8")


@dataclass(frozen=True)
class Override:
    """Change the quantization of every site that matches all the given selectors.

    Selectors: `role` (see `samq_fx.meta.ROLES`), `attn_kind`, `part` ("image_encoder" or
    "mask_decoder"), `module` (a regular expression that must match the whole module path),
    `slot` (which tensor of the site: "weight", "input", "q", "k", "attn" (the softmax output),
    "v").
    Effects: `quantize` (False keeps the layer in floating point; True quantizes a layer that
    is floating point by default), `w_bits`, `a_bits`.
    """

    role: str | None = None
    attn_kind: str | None = None
    part: str | None = None
    module: str | None = None
    slot: str | None = None
    quantize: bool | None = None
    w_bits: int | None = None
    a_bits: int | None = None

    def __post_init__(self) -> None:
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; roles: {sorted(ROLES)}")
        if self.attn_kind is not None and self.attn_kind not in ATTN_KINDS:
            raise ValueError(f"unknown attn_kind {self.attn_kind!r}; kinds: {list(ATTN_KINDS)}")
        if self.part not in (None, "image_encoder", "mask_decoder"):
            raise ValueError(f"part must be image_encoder or mask_decoder, not {self.part!r}")
        if self.module is not None:
            re.compile(self.module)
        if self.slot is not None and self.slot not in SLOTS:
            raise ValueError(f"unknown slot {self.slot!r}; slots: {list(SLOTS)}")
        if all(getattr(self, k) is None for k in ("role", "attn_kind", "part", "module", "slot")):
            raise ValueError(
                "an Override needs at least one selector (role, attn_kind, part, module, slot)"
            )
        _check_bits("Override.w_bits", self.w_bits, allow_none=True)
        _check_bits("Override.a_bits", self.a_bits, allow_none=True)

    def matches(
        self, part: str, role: str | None, attn_kind: str | None, module_path: str, slot: str
    ) -> bool:
        return (
            (self.slot is None or self.slot == slot)
            and (self.role is None or self.role == role)
            and (self.attn_kind is None or self.attn_kind == attn_kind)
            and (self.part is None or self.part == part)
            and (self.module is None or re.fullmatch(self.module, module_path) is not None)
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> Override:
        return strict_from_dict(cls, d)


@dataclass(frozen=True)
class CalibConfig(DictConfig):
    """Calibration data handling.

    Args:
        num_images: how many images of the loader to use (the papers use 32).
        max_prompts_per_image: boxes kept per image (seeded choice when there are more).
        points_per_side: grid used to sample boxes the way SAM's automatic mask generator
            does when a sample has no prompts (each grid point's full-precision mask gives a box).
        seed: seeds every random choice; calibration is deterministic for a seed.
    """

    num_images: int = 32
    max_prompts_per_image: int = 16
    points_per_side: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.max_prompts_per_image < 1 or self.points_per_side < 1:
            raise ValueError(f"CalibConfig values must be positive: {self}")


@dataclass(frozen=True)
class BimodalConfig(DictConfig):
    """PTQ4SAM's Bimodal Integration (BIG), papers.md §1.1.

    Args:
        attn_kinds: attentions whose key projection is tested and folded (the reference folds
            the decoder's token->image attentions only).
        kde_points: grid points of the Gaussian KDE (Scott bandwidth) over [min, max].
        peak_height: a peak counts if its density is at least this fraction of the density sum.
        peak_distance: minimum distance between peaks, in grid points.
        detect_image, detect_prompt: which calibration image and prompt the test looks at (the
            reference uses image 0, box 0).
    """

    attn_kinds: tuple[str, ...] = ("token_to_image", "final_token_to_image")
    kde_points: int = 128
    peak_height: float = 0.01
    peak_distance: int = 32
    detect_image: int = 0
    detect_prompt: int = 0


@dataclass(frozen=True)
class AgqConfig(DictConfig):
    """PTQ4SAM's Adaptive Granularity Quantization (AGQ) of post-softmax probabilities, §1.2.

    Args:
        taus: candidate bases 2^(1/tau).
        search_images: calibration images the search looks at.
        p: exponent of the error mean|A_hat V - A V|^p (the reference code uses 2.4, the paper 2).
        scale_candidates: candidates of s tried (log-spaced in [min(0.1, 0.01 max A), max A],
            coarse then fine around the best).
    """

    taus: tuple[int, ...] = (1, 2, 4)
    search_images: int = 32
    p: float = 2.0
    scale_candidates: int = 12


@dataclass(frozen=True)
class ReconConfig(DictConfig):
    """Block reconstruction (BRECQ / QDrop style), papers.md §1.3; defaults are PTQ4SAM-L's.

    Args:
        units: how the graph is partitioned: "ptq4sam" (each encoder attention and MLP, the
            neck; each decoder attention and MLP), "joint-cross" (a decoder layer's t2i, MLP
            and i2t as one unit), "stage-joint" (encoder as saq-stage, decoder as joint-cross:
            samq+jcar) or "saq-stage" (SAQ-SAM: encoder stages ending at a global
            block, the neck; each decoder two-way layer whole, the final t2i).
        iters: optimisation steps per unit (PTQ4SAM: 20,000).
        lr_round: Adam learning rate of the AdaRound variables.
        lr_scale: Adam learning rate of the activation step sizes (cosine to 0).
        drop_prob: QDrop's probability of quantizing an activation element while optimising;
            forced back to 1.0 (always quantize) when a unit is done.
        round_weight, beta, warmup: the rounding regulariser weight * sum(1 - |2h - 1|^beta),
            beta annealed from beta[0] to beta[1], off during the first `warmup` fraction.
        max_prompts: prompts per image in each step (memory bound for large decoders).
        seed: seeds batch order and QDrop masks.
    """

    units: str = "ptq4sam"
    iters: int = 20_000
    lr_round: float = 1e-3
    lr_scale: float = 4e-5
    drop_prob: float = 0.5
    round_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    max_prompts: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 1 or not 0.0 < self.drop_prob <= 1.0 or not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"invalid ReconConfig: {self}")


# SAQ-SAM's 29 percentile candidates (papers.md §2.1); "no clip" is not one of them.
PCC_PERCENTILES = (
    (0.85,)
    + tuple(round(0.87 + 0.01 * i, 2) for i in range(9))
    + (0.96, 0.965, 0.97, 0.975, 0.98, 0.983, 0.985, 0.987, 0.989, 0.99, 0.993, 0.995, 0.997)
    + (0.999, 0.9993, 0.9995, 0.9997, 0.9999, 0.99999)
)


@dataclass(frozen=True)
class PccConfig(DictConfig):
    """SAQ-SAM's Perceptual-Consistency Clipping (PCC), papers.md §2.1. Stacks on any method.

    Args:
        percentiles: candidate p; the clip of a tensor x is (quantile(x, 1-p), quantile(x, p)).
        theta: the focus of an attention row is where softmax > theta * the row's maximum.
        sweeps: greedy passes over the sites (the second with every site already quantized).
        attn_kinds: decoder attentions whose q_proj / k_proj inputs and outputs are searched.
        search_image: the calibration image (all its prompts) the search runs on.
    """

    percentiles: tuple[float, ...] = PCC_PERCENTILES
    theta: float = 0.5
    sweeps: int = 2
    attn_kinds: tuple[str, ...] = (
        "dec_self",
        "token_to_image",
        "image_to_token",
        "final_token_to_image",
    )
    search_image: int = 0

    def __post_init__(self) -> None:
        bad = [p for p in self.percentiles if not 0.5 < p < 1.0]
        if not self.percentiles or bad or not 0 < self.theta < 1 or self.sweeps < 1:
            raise ValueError(f"invalid PccConfig: {self}")


@dataclass(frozen=True)
class ParConfig(DictConfig):
    """SAQ-SAM's Prompt-Aware Reconstruction (PAR) of encoder stages, papers.md §2.2.

    Args:
        layer_skip: stage k's output goes straight to the FP neck and decoder (the paper's
            layer skipping); False runs it through the remaining FP encoder blocks first.
        max_prompts: prompts per image in the PAR target and loss (the paper: at most 16).
    """

    layer_skip: bool = True
    max_prompts: int = 16

    def __post_init__(self) -> None:
        if self.max_prompts < 1:
            raise ValueError(f"invalid ParConfig: {self}")


def saq_recon_config(iters: int | None = None) -> ReconConfig:
    """SAQ-SAM's reconstruction schedule: stage / layer units, 2,000 steps a unit, activation
    step lr 2e-3. The rounding regulariser stays on (0.01), since every rounding is hardened at
    the end here (the reference leaves all but the first layer of a unit soft, §5.2)."""
    return ReconConfig(units="saq-stage", iters=2_000 if iters is None else iters, lr_scale=2e-3)


@dataclass(frozen=True)
class MacConfig(DictConfig):
    """CAR-SAM's MatMul-Aware Compensation (MAC), papers.md §3.1; `passes/compensate_matmul.py`.

    Moves each attention matmul operand's activation-quantization error into the FP weights of
    the projection that feeds the other operand (q <- k's error, k <- q's error: a per-head
    Sylvester / Kronecker least squares; v <- the softmax's error: a per-head ridge fit).

    Args:
        attn_kinds: decoder attentions compensated (the paper calls MAC decoder-specific; the
            encoder's fused qkv and rel-pos terms are not supported). "dec_self" is allowed.
        lam: ridge weight, relative: lambda = lam * mean diagonal of each system's matrix
            (0.1: best of {0.01, 0.1, 1} by W4A4 mask AP on 12 tiny validation images).
        qk, v: compensate the q/k projections (Sylvester) and the v projection (ridge).
        bias: fold a correction into the biases too (an appended ones column of X).
        images: calibration images whose statistics are summed (at most all of them).
    """

    attn_kinds: tuple[str, ...] = ("token_to_image", "image_to_token", "final_token_to_image")
    lam: float = 0.1
    qk: bool = True
    v: bool = True
    bias: bool = True
    images: int = 32

    def __post_init__(self) -> None:
        allowed = ("dec_self", "token_to_image", "image_to_token", "final_token_to_image")
        bad = [k for k in self.attn_kinds if k not in allowed]
        if bad or not self.attn_kinds:
            raise ValueError(f"MacConfig.attn_kinds {bad or '()'}: MAC runs on {list(allowed)}")
        if not self.lam > 0 or self.images < 1 or not (self.qk or self.v):
            raise ValueError(f"invalid MacConfig: {self}")


# CAR-SAM's post-softmax quantizer. The paper leaves it open: papers.md §3 gives its activations
# as "per tensor, asymmetric" and names no softmax quantizer, while the paper reports large gains
# over PTQ4SAM, whose AGQ log2 grid it does not say it drops. A uniform 4-bit grid on the softmax
# flattens SAM's attentions (W4A4, tiny SAM: MSE ranges without AGQ 64.7 mIoU, with AGQ 82.8),
# which no reported CAR-SAM number could survive, so we read CAR-SAM as keeping PTQ4SAM's AGQ on
# the softmax ([ours]). `for_method("car-sam", ..., agq=False)` is the strict reading, a uniform
# per-tensor asymmetric grid, named "car-sam-noagq" (bench/RESULTS.md, "CAR-SAM's softmax
# quantizer": 65.2 vs 81.4 mIoU on 100 validation scenes).
CAR_SAM_AGQ = True

# samq, this project's recipe: the parts the W4A4 ablation on the tiny SAM's validation scenes
# kept (bench/RESULTS.md, "samq: the recipe from a 4-seed ablation"; 1,000 steps a unit, seeds
# 0-3): PTQ4SAM's BIG + AGQ, SAQ-SAM's PCC and PAR on its stage units and schedule, and
# CAR-SAM's MAC: 83.80 mean mIoU against saq-sam's 83.41, +0.39 paired. The decoder is
# reconstructed a whole two-way layer at a time: its t2i and i2t are optimised jointly under
# one loss, as JCAR asks, with the self-attention in the same unit; CAR-SAM's narrower
# t2i + MLP + i2t unit (`jcar=True`, "+jcar") scored 0.5-1.0 lower. Every part is a switch.
SAMQ_RECIPE = ("bimodal", "agq", "pcc", "mac", "recon", "par")


_SUBCONFIGS = {
    "bimodal": BimodalConfig,
    "agq": AgqConfig,
    "recon": ReconConfig,
    "pcc": PccConfig,
    "par": ParConfig,
    "mac": MacConfig,
}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Args:
        method: how ranges are chosen: "minmax", "percentile" or "mse" (Lp-optimal clip,
            p = 2.4 as in PTQ4SAM).
        w_bits, a_bits: 2..8. `a_bits=None` quantizes weights only (W4A16-style).
        w_granularity: "channel" (per output channel) or "group" (with `w_group_size`).
        w_symmetric, a_symmetric: symmetric grids (the papers use asymmetric for both).
        percentile: kept quantile of the "percentile" method.
        fp_roles: roles kept in floating point (see `DEFAULT_FP_ROLES`).
        overrides: `Override`s applied in order; each must match at least one site.
        calib: `CalibConfig`.
        bimodal, agq, recon: PTQ4SAM's parts (`BimodalConfig`, `AgqConfig`, `ReconConfig`);
            None switches a part off. `method="ptq4sam"` with none of them is PTQ4SAM's
            statistics with MSE ranges; the "ptq4sam" presets switch all three on.
        pcc: SAQ-SAM's clipping (`PccConfig`); stacks on any method (e.g. mse + PCC).
        par: SAQ-SAM's prompt-aware encoder loss (`ParConfig`); needs `recon`.
            `method="saq-sam"` is PTQ4SAM's BIG + AGQ (as the reference fork keeps them) plus
            PCC and PAR reconstruction over SAQ-SAM's units.
        mac: CAR-SAM's MatMul-Aware Compensation (`MacConfig`), None for off. It stacks on any
            method; `method="car-sam"` is MSE ranges + MAC + JCAR (`recon` with
            `units="joint-cross"`) + AGQ on the post-softmax probabilities (`CAR_SAM_AGQ`
            says why; `agq=None` is the strict uniform reading).

    Example:
        >>> cfg = QuantConfig.preset("W4A4")
        >>> cfg.w_bits, cfg.a_bits, cfg.method
        (4, 4, 'mse')
    """

    method: str = "mse"
    w_bits: int = 8
    a_bits: int | None = 8
    w_granularity: str = "channel"
    w_group_size: int | None = None
    w_symmetric: bool = False
    a_symmetric: bool = False
    percentile: float = 0.9999
    fp_roles: tuple[str, ...] = DEFAULT_FP_ROLES
    overrides: tuple[Override, ...] = ()
    calib: CalibConfig = field(default_factory=CalibConfig)
    bimodal: BimodalConfig | None = None
    agq: AgqConfig | None = None
    recon: ReconConfig | None = None
    pcc: PccConfig | None = None
    par: ParConfig | None = None
    mac: MacConfig | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; methods: {list(METHODS)}")
        if self.par is not None and self.recon is None:
            raise ValueError("par (prompt-aware reconstruction) needs recon; set both or neither")
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits, allow_none=True)
        if self.w_granularity not in ("channel", "group"):
            raise ValueError(
                f"w_granularity must be 'channel' or 'group', not {self.w_granularity!r}"
            )
        unknown = [r for r in self.fp_roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown fp_roles {unknown}; roles: {sorted(ROLES)}")
        # tuples even when built from lists, so the config stays hashable and frozen
        object.__setattr__(self, "fp_roles", tuple(self.fp_roles))
        object.__setattr__(self, "overrides", tuple(self.overrides))

    @property
    def name(self) -> str:
        a = "16" if self.a_bits is None else str(self.a_bits)
        name = f"W{self.w_bits}A{a}-{self.method}"
        if self.method in ("ptq4sam", "saq-sam"):
            parts = (("bimodal", "big"), ("agq", "agq"), ("recon", "recon"))
            if self.method == "saq-sam":  # no PAR is implied by no reconstruction
                parts += (("pcc", "pcc"),) + ((("par", "par"),) if self.recon else ())
            name += "".join(f"-no{label}" for key, label in parts if getattr(self, key) is None)
        elif self.method == "car-sam":
            name += "" if self.mac else "-nomac"
            if self.recon is None:
                name += "-norecon"
            elif self.recon.units != "joint-cross":
                name += "-nojcar"
            if (self.agq is not None) != CAR_SAM_AGQ:  # the softmax grid that is not the default
                name += "+agq" if self.agq is not None else "-noagq"
            name += "+bimodal" if self.bimodal is not None else ""
        elif self.method == "samq":
            parts = ("bimodal", "agq", "pcc", "mac", "recon")
            name += "".join(f"-no{k}" for k in parts if getattr(self, k) is None)
            if self.recon is not None:
                name += "" if self.par is not None else "-nopar"
                units = self.recon.units
                name += {"saq-stage": "", "stage-joint": "+jcar"}.get(units, f"+{units}-units")
        elif self.mac is not None:
            name += "+mac"
        if self.pcc is not None and self.method not in ("saq-sam", "samq"):
            name += "+pcc"
        return name

    @classmethod
    def for_method(
        cls,
        method: str,
        w_bits: int,
        a_bits: int | None,
        *,
        bimodal: bool = True,
        agq: bool | None = None,
        recon: bool | None = None,
        recon_iters: int | None = None,
        pcc: bool | None = None,
        par: bool | None = None,
        mac: bool | None = None,
        jcar: bool | None = None,
        **changes: Any,
    ) -> QuantConfig:
        """A method with its parts switched on or off one by one (the papers' ablations).

        The switches apply to the methods that have those parts ("ptq4sam": BIG, AGQ,
        reconstruction; "saq-sam": those plus PCC and PAR; "car-sam": MAC, JCAR,
        reconstruction, where jcar=False keeps the reconstruction with PTQ4SAM's per-branch units
        and recon=False drops it, and AGQ, its post-softmax quantizer: on by default, see
        `CAR_SAM_AGQ`; agq=False is the uniform per-tensor grid of the strict reading, named
        "car-sam-noagq"; "samq": this project's recipe, see `SAMQ_RECIPE`); for "minmax",
        "percentile" and "mse" they are ignored, except `pcc=True`, which stacks PCC on any
        method. None means the method's own choice. saq-sam and samq with `par=False`
        reconstruct their units with plain MSE.
        """
        mac = True if mac is None else mac
        recon = True if recon is None else recon
        agq = (CAR_SAM_AGQ if method == "car-sam" else True) if agq is None else agq
        parts: dict[str, Any] = {}
        iters = {} if recon_iters is None else {"iters": recon_iters}
        if method in ("ptq4sam", "saq-sam", "samq"):
            saq = method != "ptq4sam"  # SAQ-SAM's units, schedule and PAR loss
            recon_cfg = saq_recon_config(recon_iters) if saq else ReconConfig(**iters)
            if method == "samq" and jcar:  # CAR-SAM's narrower decoder units
                recon_cfg = dataclasses.replace(recon_cfg, units="stage-joint")
            parts = {
                "bimodal": BimodalConfig() if bimodal else None,
                "agq": AgqConfig() if agq else None,
                "recon": recon_cfg if recon else None,
                "par": ParConfig() if saq and par is not False and recon else None,
            }
            if method == "samq":
                parts["mac"] = MacConfig() if mac else None
        elif method == "car-sam":
            units = "joint-cross" if jcar is not False else "ptq4sam"
            parts = {
                "mac": MacConfig() if mac else None,
                "recon": ReconConfig(units=units, **iters) if recon else None,
                "agq": AgqConfig() if agq else None,
            }
        if pcc or (pcc is None and method in ("saq-sam", "samq")):
            parts["pcc"] = PccConfig()
        return cls(method=method, w_bits=w_bits, a_bits=a_bits, **parts, **changes)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> QuantConfig:
        """A named preset ("W8A8", "W6A6", "W4A4", "W4A16", optionally "-minmax" etc.)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["fp_roles"] = list(self.fp_roles)
        d["overrides"] = [o.to_dict() for o in self.overrides]
        d["calib"] = self.calib.to_dict()
        for key in _SUBCONFIGS:
            d[key] = None if getattr(self, key) is None else getattr(self, key).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        d = dict(d)
        if "overrides" in d:
            d["overrides"] = tuple(Override.from_dict(o) for o in d["overrides"])
        if "calib" in d:
            d["calib"] = CalibConfig.from_dict(d["calib"])
        if "fp_roles" in d:
            d["fp_roles"] = tuple(d["fp_roles"])
        for key, sub in _SUBCONFIGS.items():
            if d.get(key) is not None:
                d[key] = sub.from_dict(d[key])
        return strict_from_dict(cls, d)


def _presets() -> dict[str, QuantConfig]:
    out = {}
    for w, a in ((8, 8), (6, 6), (4, 4), (4, 8)):
        for method in BASE_METHODS:
            out[f"W{w}A{a}-{method}"] = QuantConfig(method=method, w_bits=w, a_bits=a)
        out[f"W{w}A{a}"] = out[f"W{w}A{a}-mse"]
        full = {"bimodal": BimodalConfig(), "agq": AgqConfig(), "recon": ReconConfig()}
        out[f"W{w}A{a}-ptq4sam"] = QuantConfig(method="ptq4sam", w_bits=w, a_bits=a, **full)
        out[f"W{w}A{a}-ptq4sam-s"] = QuantConfig(
            method="ptq4sam", w_bits=w, a_bits=a, bimodal=BimodalConfig(), agq=AgqConfig()
        )
        out[f"W{w}A{a}-saq-sam"] = QuantConfig.for_method("saq-sam", w, a)
        out[f"W{w}A{a}-car-sam"] = QuantConfig.for_method("car-sam", w, a)
        out[f"W{w}A{a}-samq"] = QuantConfig.for_method("samq", w, a)
    out["W8A16"] = QuantConfig(method="minmax", w_bits=8, a_bits=None)
    out["W4A16"] = QuantConfig(method="mse", w_bits=4, a_bits=None)
    # Deployment presets: the grids `samq_fx.lower` has kernels for, on the linears (the
    # neck's two convolutions, 0.5% of SAM-B's work, stay in floating point). int8: symmetric
    # per-channel weights, per-tensor activations, attention matmuls in floating point (fused).
    linears_only = DEFAULT_FP_ROLES + ("neck_conv",)
    out["W8A8-int8"] = QuantConfig(
        method="mse",
        w_bits=8,
        a_bits=8,
        w_symmetric=True,
        fp_roles=linears_only,
        overrides=FLOAT_ATTENTION,
    )
    # The same linears, plus 8-bit per-tensor ranges for the global attentions' q, k and v,
    # which `lower(..., attention="float8")` turns into static float8 scales (no amax pass at
    # run time); the probabilities and every other attention stay in floating point.
    out["W8A8-int8-attn"] = dataclasses.replace(
        out["W8A8-int8"],
        overrides=FLOAT_ATTENTION + GLOBAL_ATTENTION_INPUTS,
    )
    # int4 tinygemm: asymmetric weights in groups of 64 along the input dim (every SAM linear
    # and the tiny model's 64-wide decoder projections divide by 64), float activations. The
    # position embedding as 8-bit codes per channel (`lower` keeps them as one byte each): the
    # largest tensor outside the linears, it kept SAM-B's int4 encoder at 0.313x its fp16 bytes.
    out["W4A16-int4"] = QuantConfig(
        method="mse",
        w_bits=4,
        a_bits=None,
        w_granularity="group",
        w_group_size=64,
        fp_roles=linears_only,
        overrides=(Override(role="pos_embed", quantize=True, w_bits=8),),
    )
    return out


# Attention matmul operands left in floating point (no 8-bit attention kernel in `lower`).
FLOAT_ATTENTION = (
    Override(role="qk_matmul", quantize=False),
    Override(role="av_matmul", quantize=False),
)


# q, k (q·kᵀ) and v (P·v) of the encoder's global attentions quantized, the probabilities not.
GLOBAL_ATTENTION_INPUTS = (
    Override(role="qk_matmul", attn_kind="enc_global", quantize=True),
    Override(role="av_matmul", attn_kind="enc_global", slot="v", quantize=True),
)


PRESETS = _presets()
