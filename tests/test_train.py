"""Training (train.py): overfitting, DDP on CPU, exact resume, safe checkpoints, NaN stop.
Run: python -m pytest tests/test_train.py -v"""
import json
import os
import subprocess
import sys
import time
import types
from types import SimpleNamespace

import pytest
import torch

import evaluate
import quant
import train
from conftest import ROOT

FAST = ["--size", "tiny", "--image-size", "16", "--log-every", "1", "--sample-every", "0", "--num-workers", "0",
        "--no-compile"]  # no grids; eager on a GPU too (a compile per run would take minutes; one test below compiles)


def states(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_tiny_ternary_model_overfits_a_handful_of_images(tmp_path, image_folder):
    out = str(tmp_path / "run")
    train.main(FAST + ["--data", image_folder, "--global-batch-size", "8", "--max-steps", "150", "--lr", "1e-3",
                       "--lr-drop", "1", "--out-dir", out, "--ckpt-every", "1000"])
    curve = losses(out)
    first, last = sum(curve[:10]) / 10, sum(curve[-20:]) / 20
    assert first / last > 3, f"loss fell only from {first:.3f} to {last:.3f}"  # the stated factor: 3×
    ckpt = states(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 150 and ckpt["model_config"]["ternary"] and ckpt["args"]["lr"] == 1e-3


def test_resume_equals_straight_run(tmp_path, image_folder):
    common = FAST + ["--data", image_folder, "--global-batch-size", "4", "--ckpt-every", "3", "--lr", "1e-3",
                     "--lr-drop", "1"]  # no lr drop: its step depends on --max-steps
    train.main(common + ["--max-steps", "6", "--out-dir", str(tmp_path / "straight")])
    half = str(tmp_path / "halves")
    train.main(common + ["--max-steps", "3", "--out-dir", half])  # stopped after 3 steps ...
    train.main(common + ["--max-steps", "6", "--out-dir", half, "--resume"])  # ... and continued
    a, b = states(str(tmp_path / "straight" / "ckpt.pt")), states(os.path.join(half, "ckpt.pt"))
    assert a["step"] == b["step"] == 6
    assert_same_weights(a["model"], b["model"], atol=1e-6)
    assert_same_weights(a["ema"], b["ema"], atol=1e-6)


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, image_folder, monkeypatch):
    out = str(tmp_path / "run")
    args = FAST + ["--data", image_folder, "--global-batch-size", "4", "--ckpt-every", "1", "--out-dir", out]
    train.main(args + ["--max-steps", "2"])
    good = states(os.path.join(out, "ckpt.pt"))

    def crash_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed while writing
    monkeypatch.setattr(train.torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--max-steps", "4", "--resume"])
    after = states(os.path.join(out, "ckpt.pt"))
    assert after["step"] == 2
    assert_same_weights(good["model"], after["model"], atol=0)


def test_nan_loss_stops_without_checkpoint(tmp_path, image_folder, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setattr(train.Diffusion, "training_loss", 
                        lambda self, model, x, y, t, *rest, **kw: model(x, t, y).sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train.main(FAST + ["--data", image_folder, "--global-batch-size", "4", "--max-steps", "3", "--out-dir", out])
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


def two_cpu_processes(*args):
    """train.py under torchrun with 2 CPU processes (gloo), whatever GPUs the machine has; its stdout."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_cpu_processes_match_one_and_resume(tmp_path, mode):
    """torchrun --nproc_per_node=2 (gloo) with global batch 8 equals one process with global batch 8; stopped
    after 3 steps and resumed (still 2 processes), it ends exactly where a straight 5-step run does."""
    args = FAST + ["--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-3", "--lr-drop", "1"]

    def torchrun(out, *more):
        stdout = two_cpu_processes(*args, *(["--fsdp"] if mode == "fsdp" else []), *more, "--out-dir", out)
        assert "global batch 8 = 2 x 2 x 2" in stdout
        assert ("weights identical on all 2 ranks: yes" in stdout) == (mode == "ddp")  # FSDP holds shards
        return states(os.path.join(out, "ckpt.pt"))

    halves, straight = str(tmp_path / "halves"), str(tmp_path / "straight")
    three = torchrun(halves, "--max-steps", "3")
    train.main(args + ["--max-steps", "3", "--out-dir", str(tmp_path / "single")])
    single = states(str(tmp_path / "single" / "ckpt.pt"))
    for k in ("model", "ema"):
        assert_same_weights(three[k], single[k], atol=2e-5)
    # the logged loss is the all-reduced mean over the global batch: equal in both runs
    assert all(abs(x - y) < 1e-4 for x, y in zip(losses(halves), losses(str(tmp_path / "single"))))
    # (later steps drift apart by float summation order, amplified where Adam normalises tiny gradients,
    # so resume is checked against the same world size, where it must be exact)
    a, b = torchrun(halves, "--max-steps", "5", "--resume"), torchrun(straight, "--max-steps", "5")
    assert a["step"] == b["step"] == 5
    for k in ("model", "ema"):
        assert_same_weights(a[k], b[k], atol=0)


def test_carried_adam_state_is_the_same_under_fsdp(tmp_path):
    """--init-from with --carry-adam over 2 FSDP processes takes the same first step as in one process (torch's
    sharded loader must not give the α, which have no carried state, a state of its own)."""
    fp, args = str(tmp_path / "fp" / "ckpt.pt"), FAST + ["--global-batch-size", "4", "--lr", "1e-3"]
    train.main(args + ["--fp", "--max-steps", "3", "--out-dir", str(tmp_path / "fp")])
    warm = args + ["--max-steps", "1", "--init-from", fp, "--carry-adam"]
    train.main(warm + ["--out-dir", str(tmp_path / "single")])
    two_cpu_processes(*warm, "--fsdp", "--out-dir", str(tmp_path / "fsdp"))
    single, fsdp = states(str(tmp_path / "single" / "ckpt.pt")), states(str(tmp_path / "fsdp" / "ckpt.pt"))
    # an α whose gradient is near Adam's eps moves by up to ~3e-5 with the summation order; a state one step
    # old would move each α's first step ~25% less: ~2.5e-4 at lr 1e-3
    assert_same_weights(fsdp["model"], single["model"], atol=1e-4)


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(ValueError, match="launch with torchrun"):
        train.main(FAST + ["--fsdp", "--max-steps", "1", "--out-dir", str(tmp_path / "run")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the blocks runs on CUDA only")
def test_cuda_compiled_training_resumes_exactly_and_tracks_eager(tmp_path, image_folder):
    """On a GPU train.py compiles the blocks: a stopped and resumed compiled run ends exactly where a straight one
    does, and its losses follow the eager run's (bf16: the fused kernels round differently, so not bit-equal)."""
    common = [a for a in FAST if a != "--no-compile"] + ["--data", image_folder, "--global-batch-size", "8",
                                                         "--ckpt-every", "3", "--lr", "1e-3", "--lr-drop", "1"]
    train.main(common + ["--max-steps", "6", "--out-dir", str(tmp_path / "straight")])
    half = str(tmp_path / "halves")
    train.main(common + ["--max-steps", "3", "--out-dir", half])
    train.main(common + ["--max-steps", "6", "--out-dir", half, "--resume"])
    a, b = states(str(tmp_path / "straight" / "ckpt.pt")), states(os.path.join(half, "ckpt.pt"))
    for k in ("model", "ema"):
        assert_same_weights(a[k], b[k], atol=0)
    train.main(common + ["--max-steps", "6", "--no-compile", "--out-dir", str(tmp_path / "eager")])
    compiled, eager = losses(str(tmp_path / "straight")), losses(str(tmp_path / "eager"))
    assert all(abs(x - y) < 0.02 * y for x, y in zip(compiled, eager)), (compiled, eager)


def test_warm_start_begins_at_the_fp_model_ternarised(tmp_path, image_folder):
    """--init-from: the first forward pass of the ternary model is the FP checkpoint's EMA model with each ternary
    layer's weight replaced by fit_alpha(W) · ternarize(W)."""
    fp_dir = str(tmp_path / "fp")
    train.main(FAST + ["--data", image_folder, "--global-batch-size", "4", "--max-steps", "3", "--fp", "--lr", "1e-3",
                       "--out-dir", fp_dir])
    fp = states(os.path.join(fp_dir, "ckpt.pt"))
    cfg = train.TerDiTConfig(**{**fp["model_config"], "ternary": True})
    init = train.fp_checkpoint(os.path.join(fp_dir, "ckpt.pt"), cfg, "--init-from")["ema"]
    args = SimpleNamespace(seed=1, no_compile=True, fsdp=False)
    warm, ema, _ = train.build_model(cfg, args, torch.device("cpu"), init)
    by_hand = train.TerDiT(train.TerDiTConfig(**fp["model_config"]))
    by_hand.load_state_dict(fp["ema"])
    n_ternary = 0
    with torch.no_grad():
        for name, layer in warm.named_modules():
            if isinstance(layer, quant.TernaryLinear) and layer.ternary:
                w = by_hand.get_submodule(name).weight
                w.copy_(quant.fit_alpha(w) * quant.ternarize(w)[0])
                n_ternary += 1
    assert n_ternary > 10
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900]), torch.tensor([0, 1, 3])
    warm.eval(), ema.eval(), by_hand.eval()  # eval: no random label drops
    with torch.no_grad():
        torch.testing.assert_close(warm(x, t, y), by_hand(x, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ema(x, t, y), by_hand(x, t, y), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(warm(x, t, y), train.TerDiT(cfg).eval()(x, t, y), atol=1e-3)  # not a fresh model
    # a ternary run starts from it and trains; a checkpoint of another model, or a ternary one, is refused
    train.main(FAST + ["--data", image_folder, "--global-batch-size", "4", "--max-steps", "2", "--out-dir",
                       str(tmp_path / "warm"), "--init-from", os.path.join(fp_dir, "ckpt.pt")])
    # --carry-adam: the latent weights' AdamW state goes on from the FP run's 3 steps; the α's starts fresh
    fresh = states(str(tmp_path / "warm" / "ckpt.pt"))["opt"]["state"]
    train.main(FAST + ["--data", image_folder, "--global-batch-size", "4", "--max-steps", "1", "--out-dir",
                       str(tmp_path / "carried"), "--init-from", os.path.join(fp_dir, "ckpt.pt"), "--carry-adam"])
    carried = states(str(tmp_path / "carried" / "ckpt.pt"))["opt"]["state"]
    alphas = [k for k in carried if k.endswith(".alphas")]
    assert len(alphas) == n_ternary and carried.keys() == fresh.keys()
    for k, s in carried.items():
        assert float(s["step"]) == (1 if k in alphas else 4) and float(fresh[k]["step"]) == 2, k
        if k not in alphas:  # v = β2·v_fp + (1 - β2)·g² >= β2·v_fp, which a fresh v (= (1 - β2)·g²) is not
            assert (s["exp_avg_sq"] >= 0.999 * fp["opt"]["state"][k]["exp_avg_sq"] * (1 - 1e-6)).all(), k
    with pytest.raises(ValueError, match="give --init-from too"):
        train.main(FAST + ["--data", image_folder, "--max-steps", "1", "--out-dir", str(tmp_path / "none"),
                           "--carry-adam"])
    with pytest.raises(ValueError, match="has input_size = 16 where this run has 8"):
        train.main(FAST + ["--data", image_folder, "--image-size", "8", "--max-steps", "1", "--out-dir",
                           str(tmp_path / "other"), "--init-from", os.path.join(fp_dir, "ckpt.pt")])
    with pytest.raises(ValueError, match="holds a ternary model"):
        train.main(FAST + ["--data", image_folder, "--max-steps", "1", "--out-dir", str(tmp_path / "again"),
                           "--init-from", str(tmp_path / "warm" / "ckpt.pt")])
    with pytest.raises(ValueError, match="drop --fp"):
        train.main(FAST + ["--data", image_folder, "--max-steps", "1", "--fp", "--out-dir", str(tmp_path / "fp2"),
                           "--teacher", os.path.join(fp_dir, "ckpt.pt")])
    # distillation from the FP model: the run trains, and its first loss is the plain one plus the matching term
    train.main(FAST + ["--data", image_folder, "--global-batch-size", "4", "--max-steps", "1", "--out-dir",
                       str(tmp_path / "plain")])
    train.main(FAST + ["--data", image_folder, "--global-batch-size", "4", "--max-steps", "1", "--out-dir",
                       str(tmp_path / "distilled"), "--teacher", os.path.join(fp_dir, "ckpt.pt")])
    assert losses(str(tmp_path / "distilled"))[0] > losses(str(tmp_path / "plain"))[0] + 1e-4
    # evaluate.py reports each run's recipe, also after a --resume that does not repeat --init-from
    train.main(FAST + ["--data", image_folder, "--global-batch-size", "4", "--max-steps", "3", "--out-dir",
                       str(tmp_path / "carried"), "--resume"])
    recipe = lambda run: evaluate.recipe(str(tmp_path / run / "ckpt.pt"))
    assert [recipe(r) for r in ("plain", "warm", "carried", "distilled")] == \
        ["from scratch", "warm start", "warm start + carried AdamW", "teacher"]


def test_sample_grids_leave_the_training_as_it_is(tmp_path):
    """Grids of the EMA model every 2 steps and at the end (their own generator) leave the weights as a run without
    grids has them; --sample-every 0 draws none (the tests train with it: a grid is 50 CFG steps)."""
    runs = {every: str(tmp_path / f"every{every}") for every in ("0", "2")}
    for every, out in runs.items():
        train.main(FAST + ["--global-batch-size", "4", "--max-steps", "3", "--sample-every", every, "--out-dir", out])
    grids = {every: sorted(f for f in os.listdir(out) if f.endswith(".png")) for every, out in runs.items()}
    assert grids == {"0": [], "2": ["samples_0000002.png", "samples_0000003.png"]}
    with_grids, without = (states(os.path.join(runs[e], "ckpt.pt")) for e in ("2", "0"))
    for k in ("model", "ema"):
        assert_same_weights(with_grids[k], without[k], atol=0)


def test_steps_per_second_leave_the_sample_grids_out(tmp_path, monkeypatch):
    """Issue 30: the steps/s logged after a sample grid counted the grid's time. Here each grid takes 1000 s of
    train.py's clock: the rate logged after it stays that of the steps (each far under 100 s), not 1/1000."""
    clock = [0.0]  # seconds the grids took
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: time.time() + clock[0]))
    monkeypatch.setattr(train, "sample_grid", lambda *a, **k: clock.__setitem__(0, clock[0] + 1000))
    out = str(tmp_path / "run")
    train.main(FAST + ["--global-batch-size", "4", "--max-steps", "2", "--sample-every", "1", "--out-dir", out])
    rates = [json.loads(line)["steps_per_s"] for line in open(os.path.join(out, "log.jsonl"))]
    assert len(rates) == 2 and rates[1] > 0.01, rates


def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch):
    """Issue 30 (item 2): rank 1 of 2 on a machine with one GPU stops before the process group, in one line naming
    both numbers and the fix (it used to ask for cuda:1 and leave rank 0 hanging)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^torchrun started 2 processes per node but this machine has 1 GPU\(s\): "
                                         r"use --nproc_per_node=1, or CUDA_VISIBLE_DEVICES= to train on the CPU$"):
        train.setup_distributed()


def test_a_full_disk_under_the_log_is_one_line_naming_it(tmp_path, monkeypatch):
    import errno
    import io

    import cli

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(train, "open", lambda *a, **k: Full(), raising=False)  # log.jsonl's append
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train.main(FAST + ["--global-batch-size", "4", "--max-steps", "1", "--out-dir", out]))
    assert e.value.code == f"error: {out}/log.jsonl: disk full" and not os.path.exists(os.path.join(out, "lock"))
