"""Sampling (sample.py, sample_ddp.py) from a train.py checkpoint and from its packed files.
Run: python -m pytest tests/test_sample.py -v"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import deploy
import kernel
import model
import pack
import sample
import sample_ddp
import train
from conftest import ROOT


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    # trained on the CPU on every machine: a GPU run (bf16, non-deterministic) gives another model each time, and
    # the image bounds below were measured on this one
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        train.main(["--size", "tiny", "--image-size", "16", "--global-batch-size", "8", "--max-steps", "20",
                    "--lr", "1e-3", "--sample-every", "0", "--log-every", "10", "--out-dir", out])
    return os.path.join(out, "ckpt.pt")


def draw(path, out, *extra):
    sample.main(["--ckpt", path, "--classes", "0", "3", "9", "--num-steps", "6", "--device", "cpu", "--out", out, *extra])
    return np.asarray(Image.open(out)).astype(np.int16)


def test_sample_grid_size_and_seed(ckpt, tmp_path):
    a = draw(ckpt, str(tmp_path / "a.png"), "--seed", "1")
    assert a.shape == (130 + 2, 3 * 130 + 2)  # one row of three 16×16 greyscale images upscaled 8×, 2 px borders
    assert np.array_equal(a, draw(ckpt, str(tmp_path / "b.png"), "--seed", "1"))
    assert not np.array_equal(a, draw(ckpt, str(tmp_path / "c.png"), "--seed", "2"))


def test_grid_rows_hold_up_to_ten_classes(ckpt, tmp_path):
    out = str(tmp_path / "g.png")
    sample.main(["--ckpt", ckpt, "--classes", *map(str, list(range(10)) * 2), "--num-steps", "1", "--device", "cpu",
                 "--out", out])
    assert np.asarray(Image.open(out)).shape == (2 * 130 + 2, 10 * 130 + 2)  # 10 + 10, not 16 + 4


def test_packed_files_sample_the_same_images(ckpt, tmp_path):
    tdit = str(tmp_path / "m.tdit")
    pack.main(["--ckpt", ckpt, "--out", tdit])
    ref = draw(ckpt, str(tmp_path / "ref.png"), "--method", "ddim")
    for path in (tdit, pack.base3_path(tdit)):
        img = draw(path, str(tmp_path / "p.png"), "--method", "ddim")
        # the same image up to the bf16 rounding of the full-precision tensors (amplified by CFG 4 along the
        # sampling chain): seen here, at most 6 grey levels on a pixel and 0.11 on average
        assert np.abs(img - ref).max() <= 8 and np.abs(img - ref).mean() < 0.5


def test_fp8_activations_draw_a_close_image(ckpt, tmp_path):
    tdit = str(tmp_path / "m.tdit")
    pack.main(["--ckpt", ckpt, "--out", tdit])
    ref, img = draw(tdit, str(tmp_path / "b.png")), draw(tdit, str(tmp_path / "f.png"), "--act", "fp8")
    # the same image up to e4m3 rounding, amplified by CFG 4 along the chain: seen here, 4 grey levels off on
    # average (another seed's image: 94)
    assert img.shape == ref.shape and 0 < np.abs(img - ref).mean() < 10


def test_fp8_activations_need_a_packed_model(ckpt, tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt, "--act", "fp8", "--device", "cpu", "--out",
                        str(tmp_path / "s.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: fp8 activations (--act fp8) need a packed model") and "python pack.py" in r.stderr
    assert not os.listdir(tmp_path)


def test_compile_flag_draws_the_same_image(ckpt, tmp_path, monkeypatch, capsys):
    tdit = str(tmp_path / "m.tdit")
    pack.main(["--ckpt", ckpt, "--out", tdit])
    compile_blocks = model.TerDiT.compile_blocks  # aot_eager: Inductor's C++ compile is slow on 2 CPU cores
    monkeypatch.setattr(model.TerDiT, "compile_blocks", lambda self: compile_blocks(self, backend="aot_eager"))
    torch._dynamo.reset()
    img = draw(tdit, str(tmp_path / "c.png"), "--compile")
    assert "compiled in" in capsys.readouterr().out
    assert np.abs(img - draw(tdit, str(tmp_path / "e.png"))).max() <= 1


gpu_cupy = pytest.mark.skipif(not torch.cuda.is_available() or kernel.cp is None, reason="needs CUDA and cupy")


@gpu_cupy
def test_cuda_graph_of_the_compiled_packed_model(ckpt, tmp_path):
    """Regional torch.compile (Inductor) + the fused kernels' custom op + CUDAGraphed capture of the bf16 packed
    model sample.py runs: the replayed step is as close to a float32 reference as the eager bf16 step is (Inductor
    rounds fused elementwise chains once, eager bf16 after every op, so the two differ by more than rounding),
    and no block recompiles."""
    from torch._dynamo.utils import counters
    tdit = str(tmp_path / "g.tdit")
    pack.main(["--ckpt", ckpt, "--out", tdit])
    eager, compiled = sample.load_model(tdit, "cuda"), sample.load_model(tdit, "cuda")
    assert next(compiled.parameters()).dtype == torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(6, 1, 16, 16, device="cuda", generator=g)
    t, y = torch.randint(0, 1000, (6,), device="cuda", generator=g), torch.tensor([0, 1, 2, 10, 10, 10], device="cuda")
    with torch.no_grad():
        ref = deploy.load_packed(tdit, "cuda").forward_with_cfg(x, t, y, 4.0)  # float32 (the kernel's reference path)
    err = lambda out: ((out.float() - ref).norm() / ref.norm()).item()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), sample.inference_context(compiled):
        runner = sample.CUDAGraphed(compiled)
        seconds = sample.compile_model(runner, compiled, 3, 4.0)
        want = eager.forward_with_cfg(x, t, y, 4.0)
        for _ in range(2):
            got = runner.forward_with_cfg(x, t, y, 4.0)
            assert err(got) < 1.5 * err(want) + 2e-3, (err(got), err(want))
    # one graph for the fused adaLN and one for a block that every block reuses (block 0 too: the residual stream
    # is bf16 from the embedder on), at most one more: not one per block
    assert seconds > 0 and counters["stats"]["unique_graphs"] <= 3 < len(compiled.layers) + 1
    assert not counters["recompiles"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_model_on_gpu_matches_unpacked(ckpt, tmp_path):
    """Through the fused kernel (cupy) or its reference: packed and unpacked EMA models agree under bf16 autocast."""
    tdit = str(tmp_path / "g.tdit")
    pack.main(["--ckpt", ckpt, "--out", tdit])
    a, b = sample.load_model(ckpt, "cuda"), sample.load_model(tdit, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 1, 16, 16, device="cuda", generator=g)
    t, y = torch.randint(0, 1000, (8,), device="cuda", generator=g), torch.arange(8, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ya, yb = a(x, t, y).float(), b(x, t, y).float()
    assert ((ya - yb).norm() / ya.norm()).item() < 2e-2


def test_fid_samples_npz_resumable_and_independent_of_process_count(ckpt, tmp_path):
    out = str(tmp_path / "fid.npz")
    args = ["--ckpt", ckpt, "--num-fid-samples", "5", "--batch-size", "2", "--num-steps", "4", "--method", "ddpm",
            "--cfg-scale", "1.5", "--device", "cpu"]
    sample_ddp.main([*args, "--out", out])
    with np.load(out) as f:
        arr = f["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8  # the ADM suite's layout; greyscale as 3 channels
    assert sorted(os.listdir(out + ".parts")) == ["000000.npy", "000001.npy", "000002.npy", "fingerprint.json"]
    os.remove(os.path.join(out + ".parts", "000001.npy"))  # as if killed during batch 1: only it is sampled again
    stamp = os.path.getmtime(os.path.join(out + ".parts", "000000.npy"))
    sample_ddp.main([*args, "--out", out])
    assert os.path.getmtime(os.path.join(out + ".parts", "000000.npy")) == stamp
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], arr)
    out2 = str(tmp_path / "fid2.npz")  # two processes (gloo) draw the same samples as one
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "sample_ddp.py", *args, "--out", out2], check=True, cwd=ROOT, capture_output=True)
    with np.load(out2) as f:
        assert np.array_equal(f["arr_0"], arr)
