"""Shared test helpers: the repo root on sys.path, a tiny ImageFolder, a full disk."""
import errno
import io
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


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(room): from then on each file that cli.atomic_write opens takes `room` bytes, and a write that
    does not fit fails as on a full disk (OSError ENOSPC), writing nothing."""
    import cli

    class Full(io.FileIO):
        def write(self, b):
            if self.tell() + len(b) > Full.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)

    def fill(room=100):
        Full.room = room
        monkeypatch.setattr(cli.os, "fdopen", lambda fd, mode: io.BufferedWriter(Full(fd, mode)))
    return fill
