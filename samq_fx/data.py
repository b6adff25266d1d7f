"""Synthetic COCO scenes, and loaders for COCO-format datasets and detections.

The scene generator paints photographs-in-miniature: a textured, lit, noisy background, then
1-8 objects of seven shape kinds (the COCO categories), each with its own texture and shading,
placed so that later objects occlude earlier ones and some touch. The stored masks are the
VISIBLE parts, so the masks of one image never overlap. A scene depends only on (seed, index),
so any image of a dataset can be regenerated alone, in any process and in any order.

    scene = generate_scene(seed=0, index=7, cfg=SceneConfig())
    ann = make_dataset("data/shapes", num_images=500, seed=0)   # images/*.png + annotations.json
    ds = CocoDataset("data/shapes/images", ann)
    sample = ds[0]                                            # image, boxes (xyxy), masks, ...

pycocotools is imported where it is used: the trainer (`bench/train_tiny_sam.py`) imports this
module on machines that have no pycocotools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES: tuple[str, ...] = ("ellipse", "rectangle", "polygon", "star", "blob", "stroke", "ring")
"""Shape kinds; category id = position + 1."""


class DataError(ValueError):
    """A dataset or detections file that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the scene generator. Ranges are (low, high), inclusive."""

    long_side: tuple[int, int] = (192, 320)
    aspect: tuple[float, float] = (0.55, 1.0)  # short side / long side
    num_objects: tuple[int, int] = (1, 8)
    object_radius: tuple[float, float] = (0.08, 0.4)  # of the short side, log-uniform
    shapes: tuple[str, ...] = CATEGORIES
    touch_prob: float = 0.3  # place an object against the previous one
    clutter: tuple[int, int] = (0, 5)  # unannotated faint shapes painted into the background
    min_visible_px: int = 100  # drop objects whose visible part is smaller...
    min_visible_frac: float = 0.35  # ...or is this small a part of the whole shape
    shadow_prob: float = 0.3
    shading_prob: float = 0.5
    blur_prob: float = 0.3
    noise_prob: float = 0.5
    jpeg_prob: float = 0.25

    def __post_init__(self) -> None:
        unknown = set(self.shapes) - set(CATEGORIES)
        if unknown or not self.shapes:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {list(CATEGORIES)}")
        for name in ("long_side", "aspect", "num_objects", "object_radius", "clutter"):
            lo, hi = getattr(self, name)
            if lo > hi or lo < 0:
                raise ValueError(f"SceneConfig.{name} must be (low, high) with 0 <= low <= high")


@dataclass
class Scene:
    """One generated image and its visible-part instance masks."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool, disjoint
    category_ids: list[int] = field(default_factory=list)

    def boxes(self) -> np.ndarray:
        """(N, 4) float32 xyxy: tight pixel-edge bounds of each mask, as COCO's bbox."""
        return np.array([mask_box(m) for m in self.masks], np.float32).reshape(-1, 4)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) with x2, y2 one past the last pixel, like COCO's x + w."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("empty mask has no box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --- textures: (h, w) -> (h, w, 3) float32 in 0..255 -------------------------------------------


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates, (h, 1) and (1, w): they broadcast, cheaper than mgrid."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _gauss(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _colour(rng: np.random.Generator, near: np.ndarray | None = None) -> np.ndarray:
    if near is not None and rng.random() < 0.6:
        return np.clip(near + rng.normal(0, 50, 3), 0, 255).astype(np.float32)
    return rng.uniform(0, 255, 3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Value noise in 0..1: random cells upsampled bicubically, one or two octaves."""
    out = np.zeros((h, w), np.float32)
    for octave in range(rng.integers(1, 3)):
        cells = int(rng.integers(2, 10)) * (2**octave)
        small = rng.random((cells, max(2, round(cells * w / h))), dtype=np.float32)
        up = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
        out += up / (2**octave)
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray | None = None):
    c1 = _colour(rng, base)
    c2 = _colour(rng, c1)
    kind = rng.choice(["flat", "gradient", "noise", "stripes", "checker", "grain"])
    if kind == "flat":
        return np.broadcast_to(c1, (h, w, 3)).copy()
    yy, xx = _grid(h, w)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif kind == "noise":
        t = _smooth_noise(rng, h, w)
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.sin(u * (2 * math.pi / rng.uniform(4, 30)) + rng.uniform(0, 6.3))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    elif kind == "checker":
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        period = rng.uniform(6, 40)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    else:  # grain
        t = np.clip(0.5 + rng.uniform(0.05, 0.25) * _gauss(rng, (h, w)), 0, 1)
    return c1 + (c2 - c1) * t[..., None]


def _shade(rng: np.random.Generator, tex: np.ndarray, cx: float, cy: float, r: float) -> None:
    """Light the texture in place: a soft highlight and falloff, as on a curved surface."""
    yy, xx = _grid(*tex.shape[:2])
    lx, ly = cx + rng.uniform(-0.6, 0.6) * r, cy + rng.uniform(-0.6, 0.6) * r
    d2 = ((xx - lx) ** 2 + (yy - ly) ** 2) / max(r * r, 1.0)
    gain = np.clip(1.25 - rng.uniform(0.2, 0.6) * d2, 0.35, 1.3)
    tex *= gain[..., None]


# --- shapes: polygons (and strokes) drawn on an L image ----------------------------------------


def _ring_points(cx, cy, radii, angles, rot):
    x = cx + radii * np.cos(angles + rot)
    y = cy + radii * np.sin(angles + rot)
    return list(zip(x.tolist(), y.tolist()))


def _draw_shape(rng, kind: str, draw: ImageDraw.ImageDraw, cx, cy, r, fill=255) -> None:
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "ellipse" or kind == "ring":
        a = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        squash = rng.uniform(0.45, 1.0)
        rad = r / np.sqrt((np.cos(a)) ** 2 + (np.sin(a) / squash) ** 2)
        draw.polygon(_ring_points(cx, cy, rad, a, rot), fill=fill)
        if kind == "ring":
            inner = rad * rng.uniform(0.35, 0.7)
            draw.polygon(_ring_points(cx, cy, inner, a, rot), fill=0)
    elif kind == "rectangle":
        aspect = rng.uniform(0.35, 1.0)
        hw, hh = r, r * aspect
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        c, s = math.cos(rot), math.sin(rot)
        pts = corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    elif kind == "polygon":
        n = int(rng.integers(3, 9))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        draw.polygon(_ring_points(cx, cy, r * rng.uniform(0.55, 1.0, n), a, rot), fill=fill)
    elif kind == "star":
        n = int(rng.integers(4, 9))
        a = np.linspace(0, 2 * math.pi, 2 * n, endpoint=False)
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.35, 0.65))
        draw.polygon(_ring_points(cx, cy, rad, a, rot), fill=fill)
    elif kind == "blob":
        a = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        rad = np.ones_like(a)
        for k in range(1, 6):
            rad += rng.uniform(0, 0.35 / k) * np.cos(k * a + rng.uniform(0, 2 * math.pi))
        draw.polygon(_ring_points(cx, cy, r * np.clip(rad, 0.25, None), a, rot), fill=fill)
    elif kind == "stroke":  # thin and elongated: a bar or a bent band
        width = max(6, int(r * rng.uniform(0.15, 0.35)))
        t = np.linspace(-1, 1, 12)
        bend = rng.uniform(-0.6, 0.6) if rng.random() < 0.6 else 0.0
        x, y = t * r * 1.3, bend * r * (1 - t**2)
        c, s = math.cos(rot), math.sin(rot)
        pts = np.stack([cx + x * c - y * s, cy + x * s + y * c], 1)
        draw.line([tuple(p) for p in pts.tolist()], fill=fill, width=width, joint="curve")
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {list(CATEGORIES)}")


def _shape_mask(rng, kind, h, w, cx, cy, r) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    _draw_shape(rng, kind, ImageDraw.Draw(canvas), cx, cy, r)
    return np.asarray(canvas) > 127


def _paint(img: np.ndarray, mask: np.ndarray, tex_of, alpha: float = 1.0, soft: float = 0.0):
    """Blend a texture into `img` where `mask` is set (soft edges if `soft` > 0), in its box."""
    x1, y1, x2, y2 = mask_box(mask)
    pad = int(math.ceil(2 * soft))
    x1, y1 = max(0, x1 - pad), max(0, y1 - pad)
    x2, y2 = min(img.shape[1], x2 + pad), min(img.shape[0], y2 + pad)
    m = mask[y1:y2, x1:x2].astype(np.float32)
    if soft > 0:  # PIL blurs 8-bit images only
        blurred = Image.fromarray(mask[y1:y2, x1:x2].astype(np.uint8) * 255)
        m = np.asarray(blurred.filter(ImageFilter.GaussianBlur(float(soft))), np.float32) / 255
    a = (alpha * m)[..., None]
    crop = img[y1:y2, x1:x2]
    crop += a * (tex_of(y2 - y1, x2 - x1, x1, y1) - crop)


# --- the scene ---------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int, cfg: SceneConfig) -> np.ndarray:
    img = _texture(rng, h, w)
    if rng.random() < 0.5:  # a second surface, blended through smooth noise or a hard edge
        other = _texture(rng, h, w)
        t = _smooth_noise(rng, h, w)
        t = (t > rng.uniform(0.3, 0.7)).astype(np.float32) if rng.random() < 0.5 else t
        img += (other - img) * t[..., None]
    for _ in range(int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))):
        kind = str(rng.choice(CATEGORIES))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        mask = _shape_mask(rng, kind, h, w, cx, cy, rng.uniform(0.05, 0.3) * min(h, w))
        if mask.any():
            _paint(img, mask, lambda hh, ww, *_: _texture(rng, hh, ww), rng.uniform(0.15, 0.45))
    return img


def _photometric(rng: np.random.Generator, img: np.ndarray, cfg: SceneConfig) -> np.ndarray:
    # contrast about the mean, brightness and a colour cast, as one affine map
    mean, contrast = float(img.mean()), rng.uniform(0.6, 1.3)
    cast = rng.uniform(0.85, 1.15, 3)
    offset = (mean * (1 - contrast) + rng.uniform(-30, 30)) * cast
    img = img * (contrast * cast).astype(np.float32) + offset.astype(np.float32)
    if rng.random() < 0.2:  # vignette
        h, w = img.shape[:2]
        yy, xx = _grid(h, w)
        d2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2
        img *= (1 - rng.uniform(0.2, 0.6) * d2)[..., None]
    if rng.random() < cfg.noise_prob:
        img += rng.uniform(1, 10) * _gauss(rng, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < cfg.blur_prob:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    if rng.random() < cfg.jpeg_prob:
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=int(rng.integers(25, 85)))
        out = Image.open(buf).convert("RGB")
    return np.asarray(out).copy()


def generate_scene(seed: int, index: int, cfg: SceneConfig = SceneConfig()) -> Scene:
    """Paint scene `index` of the stream `seed`; the same arguments give the same bytes.

    Args:
        seed: the dataset's seed. index: the image's position; each (seed, index) pair has its own
            random generator, so scenes can be made in any order or in parallel.
        cfg: the generator's knobs.

    Returns:
        A `Scene` whose masks are the visible parts of the annotated objects (disjoint), in
        painting order, with category ids 1..7 (see `CATEGORIES`).
    """
    rng = np.random.default_rng([seed, index])
    long_side = int(rng.integers(cfg.long_side[0], cfg.long_side[1] + 1))
    short = int(round(long_side * rng.uniform(*cfg.aspect)))
    h, w = (long_side, short) if rng.random() < 0.35 else (short, long_side)
    img = _background(rng, h, w, cfg)

    masks: list[np.ndarray] = []
    whole_areas: list[int] = []
    cats: list[int] = []
    prev: tuple[float, float, float] | None = None
    log_lo, log_hi = (math.log(v) for v in cfg.object_radius)
    for _ in range(int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))):
        kind = str(rng.choice(cfg.shapes))
        r = math.exp(rng.uniform(log_lo, log_hi)) * min(h, w)
        if prev is not None and rng.random() < cfg.touch_prob:
            a = rng.uniform(0, 2 * math.pi)
            dist = (prev[2] + r) * rng.uniform(0.75, 1.0)
            cx, cy = prev[0] + dist * math.cos(a), prev[1] + dist * math.sin(a)
        else:
            cx, cy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
        mask = _shape_mask(rng, kind, h, w, cx, cy, r)
        if mask.sum() < cfg.min_visible_px:
            continue
        if rng.random() < cfg.shadow_prob:
            off = rng.normal(0, 0.12 * r, 2)
            shadow = _shape_mask(rng, kind, h, w, cx + off[0], cy + off[1], r)
            if shadow.any():
                dark = rng.uniform(0.25, 0.6)
                _paint(img, shadow, lambda hh, ww, x0, y0: 0.0, dark, soft=max(1.0, 0.1 * r))
        base = img[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))]
        lit = rng.random() < cfg.shading_prob

        def object_texture(hh, ww, x0, y0, base=base, lit=lit, cx=cx, cy=cy, r=r):
            tex = _texture(rng, hh, ww, base=None if rng.random() < 0.7 else base)
            if lit:
                _shade(rng, tex, cx - x0, cy - y0, r)
            return tex

        _paint(img, mask, object_texture, soft=float(rng.choice([0.0, 0.0, 0.5, 1.0])))
        for m in masks:
            m &= ~mask
        masks.append(mask)
        whole_areas.append(int(mask.sum()))
        cats.append(CATEGORIES.index(kind) + 1)
        prev = (cx, cy, r)

    keep = [
        i
        for i, m in enumerate(masks)
        if (area := int(m.sum())) >= cfg.min_visible_px
        and area >= cfg.min_visible_frac * whole_areas[i]
    ]
    return Scene(
        image=_photometric(rng, img, cfg),
        masks=[masks[i] for i in keep],
        category_ids=[cats[i] for i in keep],
    )


# --- writing a COCO dataset ---------------------------------------------------------------------


def _coco_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "area": float(mask_utils.area(rle)),
        "bbox": bbox,
        "iscrowd": 0,
    }


def make_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    cfg: SceneConfig = SceneConfig(),
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `num_images` scenes as a COCO dataset: `out_dir/images/*.png`, `annotations.json`.

    Image `id` k+1 is `generate_scene(seed, k, cfg)`. The annotations are written last, so an
    interrupted run leaves no annotations file behind and can simply be started again.

    Args:
        out_dir: the dataset folder (created if needed).
        num_images: how many scenes (at least 1). seed: the stream of scenes.
        cfg: the generator's knobs, recorded in the JSON's "info".
        overwrite: replace an existing non-empty annotations file instead of refusing.
        progress: print a progress line to stderr every 10%.

    Returns:
        The path of `annotations.json`; the images are in the `images` folder beside it.

    Example:
        >>> ann = make_dataset("data/val", num_images=200, seed=1)
        >>> ds = CocoDataset(ann.parent / "images", ann)
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    out = Path(out_dir)
    ann_path = out / "annotations.json"
    if ann_path.is_file() and ann_path.stat().st_size > 0 and not overwrite:
        raise FileExistsError(
            f"{ann_path} already exists; pass overwrite=True (--force) to replace it"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    start = time.perf_counter()
    for k in range(num_images):
        scene = generate_scene(seed, k, cfg)
        image_id, name = k + 1, f"{k:06d}.png"
        Image.fromarray(scene.image).save(out / "images" / name, compress_level=1)
        h, w = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for mask, cat in zip(scene.masks, scene.category_ids):
            annotations.append(_coco_annotation(mask, len(annotations) + 1, image_id, cat))
        if progress and ((k + 1) % max(1, num_images // 10) == 0 or k + 1 == num_images):
            rate = (k + 1) / (time.perf_counter() - start)
            print(f"make-data: {k + 1}/{num_images} images ({rate:.0f}/s)", file=sys.stderr)
    data = {
        "info": {"generator": "samq_fx.data", "seed": seed, "config": dataclasses.asdict(cfg)},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)
        ],
    }
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(ann_path)
    return ann_path


# --- reading COCO datasets and detections -------------------------------------------------------


@dataclass
class Sample:
    """One image of a `CocoDataset` with its (non-crowd) instances."""

    image_id: int
    file_name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy, pixels
    masks: np.ndarray  # (N, H, W) bool
    category_ids: np.ndarray  # (N,) int64
    ann_ids: np.ndarray  # (N,) int64


class CocoDataset:
    """A COCO instances dataset: `ds[i]` is a `Sample`; crowd regions are left out.

    Example:
        >>> ds = CocoDataset("data/val/images", "data/val/annotations.json")
        >>> s = ds[ds.index_of(ds.image_ids[0])]
    """

    def __init__(self, images_dir: str | os.PathLike, annotations_json: str | os.PathLike):
        from pycocotools.coco import COCO

        self.images_dir = Path(images_dir)
        path = Path(annotations_json)
        if not self.images_dir.is_dir():
            raise DataError(f"images folder {str(self.images_dir)!r} does not exist")
        if not path.is_file():
            raise DataError(f"annotations file {str(path)!r} does not exist")
        data = _read_json(path, "annotations")
        if not isinstance(data, dict):
            raise DataError(f"{str(path)!r} is not a COCO instances file (a JSON object)")
        if not data.get("images"):
            raise DataError(f"dataset has no images: {str(path)!r} lists none")
        if not data.get("annotations"):
            raise DataError(f"dataset has no annotations: {str(path)!r} lists none")
        data.setdefault("categories", [])
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
            self.coco.createIndex()
        self.image_ids: list[int] = sorted(self.coco.getImgIds())
        self._position = {image_id: i for i, image_id in enumerate(self.image_ids)}

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> CocoDataset:
        """The layout `make_dataset` writes: `root/images/` and `root/annotations.json`."""
        return cls(Path(root) / "images", Path(root) / "annotations.json")

    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id: int) -> int:
        """Position of `image_id` in `image_ids`."""
        if image_id not in self._position:
            raise DataError(f"image id {image_id} is not in the dataset ({len(self)} images)")
        return self._position[image_id]

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        info = self.coco.imgs[self.image_ids[i]]
        image = self._load_image(info)
        anns = [a for a in self.coco.imgToAnns.get(info["id"], []) if not a.get("iscrowd", 0)]
        h, w = image.shape[:2]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.zeros((len(anns), h, w), bool)
        for k, a in enumerate(anns):
            masks[k] = self.coco.annToMask(a).astype(bool)
        return Sample(
            image_id=int(info["id"]),
            file_name=info["file_name"],
            image=image,
            boxes=boxes,
            masks=masks,
            category_ids=np.array([a["category_id"] for a in anns], np.int64),
            ann_ids=np.array([a["id"] for a in anns], np.int64),
        )

    def _load_image(self, info: dict) -> np.ndarray:
        path = self.images_dir / info["file_name"]
        if not path.is_file():
            raise DataError(f"image {info['file_name']!r} (id {info['id']}) is missing: {path}")
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise DataError(
                f"image {info['file_name']!r} (id {info['id']}) cannot be loaded: {err}"
            ) from err
        if (image.shape[1], image.shape[0]) != (info.get("width"), info.get("height")):
            raise DataError(
                f"image {info['file_name']!r} is {image.shape[1]}x{image.shape[0]} but the "
                f"annotations say {info.get('width')}x{info.get('height')}"
            )
        return image


@dataclass
class Detections:
    """One image's detections, highest score first."""

    boxes: np.ndarray  # (N, 4) float32 xyxy, pixels
    scores: np.ndarray  # (N,) float32
    category_ids: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.scores)


def load_detections(path: str | os.PathLike, dataset: CocoDataset) -> dict[int, Detections]:
    """Read a COCO results file (a list of {image_id, bbox xywh, score, category_id}).

    Returns:
        `Detections` for every image id of `dataset` (empty where the file has none).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"detections file {str(path)!r} does not exist")
    entries = _read_json(path, "detections")
    if not isinstance(entries, list):
        raise DataError(
            f"detections file {str(path)!r} must be a JSON list of "
            "{image_id, bbox, score, category_id} objects"
        )
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in dataset.image_ids}
    unknown: set = set()
    for k, d in enumerate(entries):
        missing = [key for key in ("image_id", "bbox", "score", "category_id") if key not in d]
        if missing:
            raise DataError(f"detection {k} in {str(path)!r} lacks {missing}")
        x, y, w, h = (float(v) for v in d["bbox"])
        if not all(math.isfinite(v) for v in (x, y, w, h, float(d["score"]))):
            raise DataError(f"detection {k} (image {d['image_id']}) has a non-finite value")
        if w <= 0 or h <= 0:
            raise DataError(
                f"detection {k} (image {d['image_id']}) has a degenerate box, width {w} and "
                f"height {h} (bbox is [x, y, width, height]; both must be > 0)"
            )
        if d["image_id"] not in per_image:
            unknown.add(d["image_id"])
        else:
            per_image[d["image_id"]].append(d)
    if unknown:
        raise DataError(
            f"detections file {str(path)!r} names {len(unknown)} image ids not in the dataset, "
            f"e.g. {sorted(unknown, key=str)[:5]}"
        )
    out = {}
    for image_id, dets in per_image.items():
        dets.sort(key=lambda d: -float(d["score"]))
        boxes = np.array([d["bbox"] for d in dets], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        out[image_id] = Detections(
            boxes=boxes,
            scores=np.array([d["score"] for d in dets], np.float32),
            category_ids=np.array([d["category_id"] for d in dets], np.int64),
        )
    return out


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} file {str(path)!r} is not valid JSON: {err}") from err
