"""Shared test helpers: the repo root on sys.path, threads split between parallel workers, a tiny ImageFolder, a
full disk."""
import errno
import io
import os
import sys

# Under pytest-xdist (`-n N`) N workers share the cores, and each torch process (a worker or a script it starts)
# would take one thread per core: on a 16-core GPU machine, `-n 12` had tiny CPU forwards still running after 4 min.
# So, before numpy or torch is imported, the cores are split between the workers; the scripts inherit it.
workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
if workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // workers)))

import numpy as np  # noqa: E402 (after the thread split)
import pytest  # noqa: E402

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
