"""Tests of samq_fx.data: the scene generator, the COCO writer and readers, `make-data`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samq_fx import cli
from samq_fx.data import (
    CATEGORIES,
    CocoDataset,
    DataError,
    SceneConfig,
    generate_scene,
    load_detections,
    make_dataset,
    mask_box,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    make_dataset(out, num_images=6, seed=3, progress=False)
    return out


# --- generator ------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seeds_differ():
    a, b = generate_scene(5, 2), generate_scene(5, 2)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.category_ids == b.category_ids
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    assert generate_scene(6, 2).image.tobytes() != a.image.tobytes()
    assert generate_scene(5, 3).image.tobytes() != a.image.tobytes()


def test_scene_shapes_and_dtypes():
    for index in range(8):
        s = generate_scene(0, index)
        h, w, c = s.image.shape
        assert c == 3 and s.image.dtype == np.uint8
        assert 192 <= max(h, w) <= 320
        assert len(s.masks) == len(s.category_ids)
        assert all(m.shape == (h, w) and m.dtype == bool for m in s.masks)
        assert set(s.category_ids) <= set(range(1, len(CATEGORIES) + 1))


def test_masks_are_disjoint_visible_parts_with_tight_boxes():
    cfg = SceneConfig()
    n_objects = 0
    for index in range(12):
        s = generate_scene(1, index, cfg)
        n_objects += len(s.masks)
        if s.masks:
            stack = np.stack(s.masks)
            assert stack.sum(0).max() <= 1, f"masks of scene {index} overlap"
            assert stack.sum((1, 2)).min() >= cfg.min_visible_px
        for mask, (x1, y1, x2, y2) in zip(s.masks, s.boxes()):
            x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
            assert mask[y1:y2, x1:x2].sum() == mask.sum()  # box holds the whole mask...
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()  # ...and is tight
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
    assert n_objects > 12  # scenes do hold objects


def test_config_limits_objects_and_shapes():
    cfg = SceneConfig(num_objects=(2, 2), shapes=("ellipse",), touch_prob=0.0)
    for index in range(6):
        s = generate_scene(0, index, cfg)
        assert len(s.masks) <= 2 and set(s.category_ids) <= {1}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown shapes \\['hexagon'\\]"):
        SceneConfig(shapes=("hexagon",))
    with pytest.raises(ValueError, match="num_objects must be"):
        SceneConfig(num_objects=(5, 2))


def test_mask_box_of_empty_mask():
    with pytest.raises(ValueError, match="empty mask"):
        mask_box(np.zeros((4, 4), bool))


# --- COCO writer and reader ------------------------------------------------------------------


def test_coco_round_trip(dataset_dir):
    ds = CocoDataset.from_folder(dataset_dir)
    assert len(ds) == 6 and ds.image_ids == [1, 2, 3, 4, 5, 6]
    assert {c["name"] for c in ds.coco.loadCats(ds.coco.getCatIds())} == set(CATEGORIES)
    for i in (0, 5):
        sample, scene = ds[i], generate_scene(3, i)
        assert sample.image_id == ds.image_ids[i] and ds.index_of(sample.image_id) == i
        assert np.array_equal(sample.image, scene.image)  # PNG is lossless
        assert np.array_equal(sample.masks, np.stack(scene.masks))
        assert np.allclose(sample.boxes, scene.boxes())
        assert sample.category_ids.dtype == np.int64
        assert sample.category_ids.tolist() == scene.category_ids
        assert len(sample.ann_ids) == len(scene.masks)
        for ann_id, mask in zip(sample.ann_ids, sample.masks):
            ann = ds.coco.anns[int(ann_id)]
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)


def test_coco_json_is_plain_json(dataset_dir):
    data = json.loads((dataset_dir / "annotations.json").read_text())
    ann = data["annotations"][0]
    assert isinstance(ann["segmentation"]["counts"], str)
    assert len(ann["bbox"]) == 4 and data["info"]["seed"] == 3
    assert {"id", "file_name", "width", "height"} <= set(data["images"][0])


def test_grayscale_and_rgba_images_become_rgb(dataset_dir, tmp_path):
    data = json.loads((dataset_dir / "annotations.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    for k, info in enumerate(data["images"]):
        rgb = Image.open(dataset_dir / "images" / info["file_name"])
        (rgb.convert("L") if k % 2 else rgb.convert("RGBA")).save(images / info["file_name"])
    ds = CocoDataset(images, dataset_dir / "annotations.json")
    for i in (0, 1):
        assert ds[i].image.ndim == 3 and ds[i].image.shape[2] == 3


def test_make_dataset_refuses_to_overwrite(dataset_dir):
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        make_dataset(dataset_dir, num_images=1, seed=0, progress=False)


def test_make_dataset_overwrite_and_progress(tmp_path, capsys):
    make_dataset(tmp_path, num_images=2, seed=0)
    assert "make-data: 2/2 images" in capsys.readouterr().err
    path = make_dataset(tmp_path, num_images=1, seed=1, overwrite=True, progress=False)
    assert len(json.loads(path.read_text())["images"]) == 1


# --- reader errors ---------------------------------------------------------------------------


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_missing_folder_and_file(dataset_dir, tmp_path):
    with pytest.raises(DataError, match="images folder .* does not exist"):
        CocoDataset(tmp_path / "nope", dataset_dir / "annotations.json")
    with pytest.raises(DataError, match="annotations file .* does not exist"):
        CocoDataset(dataset_dir / "images", tmp_path / "nope.json")


def test_json_without_images_or_annotations(dataset_dir, tmp_path):
    data = json.loads((dataset_dir / "annotations.json").read_text())
    no_anns = _write(tmp_path / "a.json", {**data, "annotations": []})
    with pytest.raises(DataError, match="dataset has no annotations"):
        CocoDataset(dataset_dir / "images", no_anns)
    no_images = _write(tmp_path / "b.json", {k: v for k, v in data.items() if k != "images"})
    with pytest.raises(DataError, match="dataset has no images"):
        CocoDataset(dataset_dir / "images", no_images)
    broken = tmp_path / "c.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        CocoDataset(dataset_dir / "images", broken)


def test_unreadable_and_missing_images_are_named(dataset_dir, tmp_path):
    data = json.loads((dataset_dir / "annotations.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    (images / data["images"][0]["file_name"]).write_bytes(b"not a png")
    ds = CocoDataset(images, dataset_dir / "annotations.json")
    with pytest.raises(DataError, match="image '000000.png' \\(id 1\\) cannot be loaded"):
        ds[0]
    with pytest.raises(DataError, match="image '000001.png' \\(id 2\\) is missing"):
        ds[1]
    with pytest.raises(DataError, match="image id 99 is not in the dataset"):
        ds.index_of(99)
    with pytest.raises(IndexError):
        ds[len(ds)]


# --- detections ------------------------------------------------------------------------------


def test_load_detections(dataset_dir, tmp_path):
    ds = CocoDataset.from_folder(dataset_dir)
    dets = [
        {"image_id": 2, "bbox": [10, 20, 30, 40], "score": 0.2, "category_id": 1},
        {"image_id": 2, "bbox": [0, 0, 5, 5], "score": 0.9, "category_id": 3},
    ]
    out = load_detections(_write(tmp_path / "d.json", dets), ds)
    assert set(out) == set(ds.image_ids) and len(out[1]) == 0
    d = out[2]
    assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float32
    assert d.category_ids.dtype == np.int64
    assert d.scores.tolist() == pytest.approx([0.9, 0.2])  # highest score first
    assert d.boxes.tolist() == [[0, 0, 5, 5], [10, 20, 40, 60]]  # xywh -> xyxy


def test_detections_errors(dataset_dir, tmp_path):
    ds = CocoDataset.from_folder(dataset_dir)
    good = {"image_id": 1, "bbox": [1, 1, 4, 4], "score": 0.5, "category_id": 1}
    cases = [
        ([{**good, "image_id": 12345}], "image ids not in the dataset, e.g. \\[12345\\]"),
        ([{**good, "bbox": [1, 1, 0, 4]}], "degenerate box, width 0.0 and height 4.0"),
        ([{**good, "bbox": [1, 1, 3, -2]}], "degenerate box"),
        ([{k: v for k, v in good.items() if k != "score"}], "detection 0 .* lacks \\['score'\\]"),
        ({"annotations": []}, "must be a JSON list"),
    ]
    for k, (content, message) in enumerate(cases):
        with pytest.raises(DataError, match=message):
            load_detections(_write(tmp_path / f"{k}.json", content), ds)
    with pytest.raises(DataError, match="detections file .* does not exist"):
        load_detections(tmp_path / "missing.json", ds)


# --- command line ----------------------------------------------------------------------------


def test_cli_make_data(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["make-data", "--out", str(out), "--num-images", "2", "--seed", "4"]
    assert cli.main(args) == 0
    ds = CocoDataset.from_folder(out)
    assert len(ds) == 2 and np.array_equal(ds[1].image, generate_scene(4, 1).image)
    assert cli.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*args, "--force"]) == 0


def test_cli_rejects_non_positive_count(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["make-data", "--out", str(tmp_path), "--num-images", "0"])
