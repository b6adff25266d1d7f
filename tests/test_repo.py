"""The repository itself: lint clean, and the README's Python snippet runs as documented."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The README's three-line use, run verbatim with a small calibration set."""
    from samq_fx.data import generate_scene, mask_box

    readme = (ROOT / "README.md").read_text()
    snippet, _ = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    calib_samples = []
    for i in range(2):
        scene = generate_scene(123, i)
        boxes = np.array([mask_box(m) for m in scene.masks], dtype=np.float32)
        calib_samples.append({"image": scene.image, "boxes": boxes})
    monkeypatch.chdir(tmp_path)
    namespace = {"calib_samples": calib_samples}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert (tmp_path / "tiny_w4a4.samq").is_file()
    import samq_fx

    q = namespace["q"]
    assert isinstance(q, samq_fx.QuantizedSam) and q.samq_config.w_bits == 4


def test_readme_lowering_snippet_runs(tmp_path, monkeypatch):
    """The README's lowering snippet, verbatim (torch.compile itself is skipped: the CPU
    compile of the lowered model is tested in tests/test_lower.py)."""
    from segment_anything import SamPredictor

    import samq_fx
    from samq_fx.data import generate_scene, mask_box

    readme = (ROOT / "README.md").read_text()
    _, snippet = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    scene = generate_scene(124, 0)
    calib = [{"image": scene.image, "boxes": np.array([mask_box(m) for m in scene.masks])}]
    lowering = sys.modules["samq_fx.lower"]  # the module (samq_fx.lower is the function)
    monkeypatch.setattr(lowering, "compile_parts", lambda model, **options: model)
    monkeypatch.chdir(tmp_path)
    namespace = {"samq_fx": samq_fx, "sam": samq_fx.build_sam("tiny"), "calib_samples": calib,
                 "image": scene.image, "SamPredictor": SamPredictor}  # fmt: skip
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert isinstance(namespace["fast"], samq_fx.LoweredSam)
    assert isinstance(samq_fx.load(tmp_path / "sam_int8.samq"), samq_fx.LoweredSam)
