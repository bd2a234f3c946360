"""Shared test helpers: the repo root on sys.path, and a tiny ImageFolder."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def image_folder(tmp_path):
    """4 classes × 2 images of distinct random blobs, 20×24 RGB PNGs (so the centre crop has work to do)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(2):
            arr = (rng.random((20, 24, 3)) * 64 + c * 60).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"img{k}.png")
    return str(root)
