"""detect_bimodal: PTQ4SAM's bimodality test on attention keys (BIG, papers.md §1.1). Analysis only.

Some key projections of SAM put every output channel on one of two symmetric peaks (about +-c):
a per-tensor quantizer then spends its levels on the empty valley. This pass finds those keys
and the per-channel signs that move every channel onto the positive peak; `fold_bimodal_signs`
then folds the signs into the q and k projections.

Reads: `ctx.config.bimodal` (a `BimodalConfig`), `ctx.state["model"]` (the captured `Sam`, with
`getattr(model, ctx.part) is gm`) and `ctx.state["calib_items"]` (`CalibItem`s); roles from
`annotate_roles`: the key is the output of `k_proj` (decoder) or the `k` slice of the fused qkv
(encoder), for attentions whose `attn_kind` is in `bimodal.attn_kinds`.
Writes: `findings["detect_bimodal"]` on each candidate key node: peak count and positions, the
verdict, the signs (a list of +-1 ints, never 0: papers.md §5.4), how many are -1, and which
image and prompt were tested.
Invariant: the graph is unchanged (taps are removed after the forwards).

Test, as the reference code runs it: on calibration image `detect_image`, prompt `detect_prompt`,
flatten that prompt's K (tokens x channels), fit a Gaussian KDE (Scott bandwidth) on `kde_points`
grid points over [min, max], keep peaks of height >= `peak_height` * sum(density) that are at
least `peak_distance` grid points apart; bimodal iff exactly two. The encoder sees no prompt, so
there the whole image's K (every window and head) is tested.
Signs: gamma_c = +1 if the mean of channel c over all prompts and tokens of all calibration items
is >= 0, else -1. A decoder key has `internal_dim` channels. An encoder key is the (B*heads,
tokens, head_dim) slice, so its channels are the head_dim indices shared by all heads, which is
also the only granularity the encoder's shared rel-pos tables allow the fold to be exact for.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
from scipy.signal import find_peaks
from scipy.stats import gaussian_kde

from samq_fx.calib import forward_item
from samq_fx.config import BimodalConfig
from samq_fx.meta import add_finding, get_info, nodes_with_role
from samq_fx.pipeline import PassContext, PassResult
from samq_fx.taps import tap

PASS = "detect_bimodal"


def bimodal_test(values: np.ndarray, cfg: BimodalConfig) -> tuple[bool, np.ndarray]:
    """PTQ4SAM's test on one flattened key tensor.

    Args:
        values: the key values (any shape; flattened).
        cfg: `kde_points`, `peak_height`, `peak_distance`.

    Returns:
        (bimodal, peak positions in value units, ascending). A constant tensor has one peak.

    Example:
        >>> x = np.concatenate([np.random.randn(4096) - 8, np.random.randn(4096) + 8])
        >>> bimodal_test(x, BimodalConfig())[0]
        True
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0 or not np.isfinite(data).all():
        raise ValueError(f"bimodal_test needs finite values, got {data.size} values with NaN/inf")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:  # the KDE's covariance is singular; a point mass is one peak
        return False, np.array([lo])
    grid = np.linspace(lo, hi, cfg.kde_points)
    density = gaussian_kde(data, bw_method="scott")(grid)
    peaks, _ = find_peaks(
        density, height=cfg.peak_height * density.sum(), distance=cfg.peak_distance
    )
    return len(peaks) == 2, grid[peaks]


def channel_signs(channel_mean: torch.Tensor) -> torch.Tensor:
    """gamma_c = +1 where the mean is >= 0, else -1 (int8; never 0, unlike torch.sign)."""
    return torch.where(channel_mean >= 0, 1, -1).to(torch.int8)


def key_nodes(gm: torch.fx.GraphModule, kinds: tuple[str, ...]) -> list[torch.fx.Node]:
    """The key-producing node of every attention of `gm` whose kind is in `kinds`."""
    return [n for n in nodes_with_role(gm, "k_proj", "k") if get_info(n).attn_kind in kinds]


class _Reduce:
    """Tap transform: one forward's K -> (per-channel sums, rows, the tested slice or None).

    The tap keeps only this small record per forward, never the key tensor itself, except the
    one slice the test looks at (from item `detect_image`).
    """

    def __init__(self, encoder: bool, cfg: BimodalConfig) -> None:
        self.encoder, self.cfg = encoder, cfg
        self.item = -1  # index of the calibration item being run, set by the caller

    def __call__(self, k: torch.Tensor) -> tuple[torch.Tensor, int, np.ndarray | None, int]:
        k = k.detach()
        flat = k.reshape(-1, k.shape[-1])
        sums = flat.sum(0, dtype=torch.float64).cpu()
        sample = None
        if self.item == self.cfg.detect_image:
            if self.encoder:
                sample = k.float().cpu().numpy().ravel()
            elif self.cfg.detect_prompt < k.shape[0]:
                sample = k[self.cfg.detect_prompt].float().cpu().numpy().ravel()
        return sums, flat.shape[0], sample, int(k.shape[0])


def _collect(gm, model, items, nodes, cfg, encoder: bool):
    """{node name: (channel means, rows averaged, tested slice or None, prompts in that item)}."""
    reduce = _Reduce(encoder, cfg)
    with torch.no_grad(), tap(gm, nodes, transform=reduce) as seen:
        for i, item in enumerate(items):
            reduce.item = i
            forward_item(model, item)
    out = {}
    for node in nodes:
        records = seen.pop(node.name)
        if len(records) != len(items):
            raise RuntimeError(
                f"{node.name} ran {len(records)} times for {len(items)} calibration items"
            )
        rows = sum(r[1] for r in records)
        mean = sum(r[0] for r in records) / rows
        _, _, sample, prompts = records[cfg.detect_image]
        out[node.name] = (mean, rows, sample, prompts)
        del records
    return out


def _check_inputs(gm: torch.fx.GraphModule, ctx: PassContext, cfg: BimodalConfig):
    model, items = ctx.state.get("model"), ctx.state.get("calib_items")
    if model is None or items is None:
        raise ValueError(
            f"{PASS} needs ctx.state['model'] (the captured Sam) and ctx.state['calib_items'] "
            f"(CalibItems); ctx.state has {sorted(ctx.state)}"
        )
    if getattr(model, ctx.part, None) is not gm:
        raise ValueError(f"ctx.state['model'].{ctx.part} is not the graph module being analysed")
    if not 0 <= cfg.detect_image < len(items):
        raise ValueError(
            f"BimodalConfig.detect_image={cfg.detect_image} but there are {len(items)} "
            "calibration items"
        )
    return model, items


def _plural(n: int) -> str:
    return f"{n} peak" if n == 1 else f"{n} peaks"


def detect_bimodal(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Test every candidate key for bimodality and record the verdict and signs on it.

    Returns counts `candidates` and `bimodal`, and `rejected` {attn_path: "<n> peak(s)"}.
    """
    cfg: BimodalConfig | None = getattr(ctx.config, "bimodal", None)
    if cfg is None:
        return PassResult(counts={"candidates": 0, "bimodal": 0}, notes=["bimodal is off"])
    nodes = key_nodes(gm, cfg.attn_kinds)
    if not nodes:
        seen = sorted({get_info(n).attn_kind for n in nodes_with_role(gm, "k_proj", "k")})
        return PassResult(
            counts={"candidates": 0, "bimodal": 0},
            notes=[f"no attention of kinds {list(cfg.attn_kinds)} in {ctx.part} (kinds: {seen})"],
        )
    model, items = _check_inputs(gm, ctx, cfg)
    encoder = ctx.part == "image_encoder"
    stats = _collect(gm, model, items, nodes, cfg, encoder)

    bimodal, rejected, peak_counts = 0, {}, {}
    for node in nodes:
        mean, rows, sample, prompts = stats.pop(node.name)
        info = get_info(node)
        if sample is None:
            raise ValueError(
                f"BimodalConfig.detect_prompt={cfg.detect_prompt} but calibration item "
                f"{cfg.detect_image} gives {prompts} prompts"
            )
        verdict, peaks = bimodal_test(sample, cfg)
        signs = channel_signs(mean)
        item = items[cfg.detect_image]
        add_finding(
            node,
            PASS,
            {
                "peaks": len(peaks),
                "peak_positions": [round(float(p), 6) for p in peaks],
                "bimodal": verdict,
                "signs": [int(s) for s in signs],
                "flipped": int((signs < 0).sum()),
                "sign_scope": "head_dim index, shared by all heads" if encoder else "channel",
                "tested": {
                    "image": cfg.detect_image,
                    "image_id": item.image_id,
                    "prompt": None if encoder else cfg.detect_prompt,
                    "values": int(sample.size),
                },
                "mean_over": {"items": len(items), "rows": rows},
            },
        )
        del sample  # drop the tapped slice
        peak_counts[info.attn_path] = len(peaks)
        if verdict:
            bimodal += 1
        else:
            rejected[info.attn_path] = _plural(len(peaks))
    notes = []
    if bimodal == 0:
        seen = ", ".join(f"{p}: {_plural(n)}" for p, n in peak_counts.items())
        notes.append(f"no bimodal key among {len(nodes)} candidates in {ctx.part} ({seen})")
    return PassResult(
        counts={"candidates": len(nodes), "bimodal": bimodal}, rejected=rejected, notes=notes
    )
