"""Data (data.py): embedded set, ImageFolder, bad input, and latent mode with a tiny random VAE.
Run: python -m pytest tests/test_data.py -v"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
import train
from conftest import ROOT


def test_embedded_dataset():
    ds = data.load_dataset(None, 32)
    x, y = ds[0]
    assert len(ds) == 40000 and ds.channels == 1 and len(ds.class_names) == 10
    assert x.shape == (1, 32, 32) and -1 <= x.min() < x.max() <= 1 and 0 <= y < 10
    counts = torch.bincount(ds.y, minlength=10)
    assert (counts == 4000).all()


def test_image_folder_converts_every_mode(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 30)) * 255).astype(np.uint8), "L").save(root / "a" / "grey.png")
    Image.fromarray((rng.random((30, 40, 4)) * 255).astype(np.uint8), "RGBA").save(root / "a" / "rgba.png")
    Image.fromarray((rng.random((33, 33, 3)) * 255).astype(np.uint8)).convert("CMYK").save(root / "b" / "cmyk.jpg")
    Image.fromarray((rng.random((50, 20, 3)) * 255).astype(np.uint8)).convert("P").save(root / "b" / "pal.png")
    (root / "b" / "notes.txt").write_text("not an image")
    ds = data.load_dataset(str(root), 16)
    assert len(ds) == 4 and ds.class_names == ["a", "b"]
    for i in range(4):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert [ds[i][1] for i in range(4)] == [0, 0, 1, 1]


def last_lines(*commands):
    """Run each script (its argument list) at once, each its own process; the last stderr line of each, which must
    have failed without a traceback. Concurrent: each process spends its first seconds importing torch."""
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args in commands]
    lines = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0 and "Traceback" not in err, err
        lines.append(err.strip().splitlines()[-1])
    return lines


def test_bad_input_gets_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    common = lambda run: ["--size", "tiny", "--max-steps", "1", "--num-workers", "0", "--out-dir", str(tmp_path / run)]
    lines = last_lines(["train.py", "--data", str(tmp_path / "missing"), *common("o1")],
                       ["train.py", "--data", str(empty), *common("o2")],
                       ["train.py", "--data", str(tmp_path / "bad"), *common("o3")],
                       ["train.py", "--size", "XL"],
                       ["sample.py", "--ckpt", str(tmp_path / "nope.pt")],
                       ["sample.py", "--ckpt", str(junk)],
                       ["sample.py", "--ckpt", str(other)],
                       ["train.py", "--resume", *common("o4")])
    assert lines[0].startswith("error:") and "does not exist" in lines[0]
    assert "no images found" in lines[1]
    assert "broken.png" in lines[2] and "cannot read image" in lines[2]
    assert "invalid choice: 'XL'" in lines[3]
    assert "does not exist" in lines[4]
    assert "cannot be read as a torch checkpoint" in lines[5]
    assert "not a TerDiT checkpoint" in lines[6]
    assert "--resume: no checkpoint" in lines[7]


def test_latent_mode_with_a_tiny_random_vae(tmp_path, image_folder):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    out = str(tmp_path / "run")
    train.main(["--size", "tiny", "--data", image_folder, "--vae", str(tmp_path / "vae"), "--image-size", "32",
                "--global-batch-size", "4", "--max-steps", "2", "--num-workers", "0", "--out-dir", out])
    cfg = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model_config"]
    assert cfg["in_channels"] == 4 and cfg["input_size"] == 4  # 32 px -> 4×4×4 latents
    assert os.path.exists(os.path.join(out, "samples_0000002.png"))  # decoded through the VAE
    png = str(tmp_path / "s.png")
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--vae", str(tmp_path / "vae"), "--classes", "0", "1",
                 "--num-steps", "3", "--out", png])
    assert Image.open(png).size == (2 * 130 + 2, 130 + 2)  # 32 px upscaled 4× by sample.py
    # the latent is drawn from the noise passed in, never from the global RNG (train.py's per-step generator)
    v, x = data.VAE(str(tmp_path / "vae"), "cpu"), torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(2, 4, 4, 4)
    torch.manual_seed(1)
    a = v.encode(x, noise)
    torch.manual_seed(2)
    assert torch.equal(a, v.encode(x, noise)) and not torch.equal(a, v.encode(x, torch.randn(2, 4, 4, 4)))


def test_more_workers_than_cores_warn_once_and_are_capped(tmp_path, image_folder, capsys, monkeypatch):
    """Issue 30: --num-workers 4 on a 2-core machine got torch's warning twice (at the loader's creation and at
    its first batch); now the loader gets one worker per core and train.py says so once."""
    import warnings
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(train, "sample_grid", lambda *a, **k: None)  # the end-of-run grid: most of the time
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(["--size", "tiny", "--data", image_folder, "--image-size", "16", "--global-batch-size", "4",
                    "--max-steps", "1", "--sample-every", "0", "--num-workers", str(cores + 2),
                    "--out-dir", str(tmp_path / "run")])
    assert not [w for w in caught if "worker processes" in str(w.message)]
    assert capsys.readouterr().out.count(f"warning: --num-workers {cores + 2} is more than the {cores} CPU core") == 1
    assert data.workers(cores, log=pytest.fail) == cores
