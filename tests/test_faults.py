"""The fault suite (issue 14): bad input and faults get one clear line and a non-zero exit, or correct behaviour,
and leave every file as it was. Run: python -m pytest tests/test_faults.py -v"""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cli as cli_py
import data
import evaluate
import pack
import ptq
import sample
import sample_ddp
import train
from conftest import ROOT

FAST = ["--size", "tiny", "--image-size", "16", "--global-batch-size", "4", "--log-every", "1", "--sample-every", "0",
        "--num-workers", "0", "--no-compile"]  # eager on a GPU too: the suite stays quick there


@pytest.fixture(scope="module", autouse=True)
def no_grids():
    """In-process runs skip the end-of-run sample grid (16 images × 50 steps: most of a 2-step run's time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "sample_grid", lambda *a, **k: None)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, no_grids):
    """One tiny 2-step run, shared: its directory (ckpt.pt, log.jsonl) is the input every case must leave alone."""
    out = str(tmp_path_factory.mktemp("faults") / "run")
    train.main(FAST + ["--max-steps", "2", "--out-dir", out])
    return out


def hashes(folder):
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


def main_of(module, argv, capsys):
    """(exit code, last stderr line) of a script's main, as `python <script>.py` reports it: argparse exits 2 with
    its message on stderr; the other errors become the one "error: ..." line of the script's __main__ block."""
    try:
        module.main(argv)
        return 0, ""
    except SystemExit as e:
        if isinstance(e.code, str):
            return 1, e.code
        return e.code, capsys.readouterr().err.strip().splitlines()[-1]
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        assert len(str(e).splitlines()) == 1, str(e)
        return 1, f"error: {e}"


def cli(script, *argv):
    """(exit code, stderr) of `python <script> argv` in a fresh process."""
    r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


ARG_CASES = [  # (script, argv, message): refused by argparse before anything runs
    (train, ["--max-steps", "0"], "--max-steps: must be a positive integer"),
    (train, ["--max-steps", "-3"], "--max-steps: must be a positive integer"),
    (train, ["--global-batch-size", "0"], "--global-batch-size: must be a positive integer"),
    (train, ["--global-batch-size", "-8"], "--global-batch-size: must be a positive integer"),
    (train, ["--log-every", "0"], "--log-every: must be a positive integer"),
    (train, ["--ckpt-every", "0"], "--ckpt-every: must be a positive integer"),
    (train, ["--micro-batch-size", "0"], "--micro-batch-size: must be a positive integer"),
    (train, ["--lr", "nan"], "--lr: must be a positive number"),
    (sample, ["--cfg-scale", "nan"], "--cfg-scale: must be a finite number >= 0"),
    (sample, ["--cfg-scale", "inf"], "--cfg-scale: must be a finite number >= 0"),
    (sample, ["--cfg-scale", "-3"], "--cfg-scale: must be a finite number >= 0"),
    (sample, ["--device", "gpu0"], "unknown device 'gpu0'"),
    pytest.param(sample, ["--device", "cuda"], "this torch has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")),
    (train, ["--seed", str(2**64)], "--seed: must be an integer in 0..4294967295"),  # issue 30: no more overflow
    (sample, ["--seed", str(2**64)], "--seed: must be an integer in 0..4294967295"),
    (sample_ddp, ["--seed", "1" * 400], "--seed: must be an integer in 0..4294967295"),
    (evaluate, ["--seed", "-1"], "--seed: must be an integer in 0..4294967295"),
    (ptq, ["--calib-seed", str(2**64)], "--calib-seed: must be an integer in 0..4294967295"),
]


@pytest.mark.parametrize("module,argv,message", ARG_CASES)
def test_bad_arguments_are_refused_up_front(module, argv, message, run, capsys):
    before = hashes(run)
    code, line = main_of(module, argv + ["--out-dir" if module is train else "--out", run], capsys)
    assert code == 2 and message in line
    assert hashes(run) == before


OUTPUT_CASES = [  # (script, argv with {run} for the run directory, message)
    (pack, ["--ckpt", "{run}/ckpt.pt", "--out", "{run}/ckpt.pt"], "is the input"),
    (sample, ["--ckpt", "{run}/ckpt.pt", "--out", "{run}/ckpt.pt"], "is the input"),
    (pack, ["--ckpt", "{run}/ckpt.pt", "--out", "{run}/log.jsonl"], "is not a packed model: pass --force"),
    (pack, ["--ckpt", "{run}/ckpt.pt", "--out", "{run}/missing/m.tdit"], "does not exist"),
    (sample, ["--ckpt", "{run}/ckpt.pt", "--out", "{run}/missing/s.png"], "does not exist"),
    (train, FAST + ["--out-dir", "{run}/log.jsonl/sub"], "cannot write to --out-dir"),
    (train, FAST + ["--resume", "--size", "XS", "--out-dir", "{run}"], "--size XS conflicts with the checkpoint's tiny"),
    (sample, ["--ckpt", "{run}/empty.pt"], "is empty (0 bytes)"),
    (sample, ["--ckpt", "{run}/cut.pt"], "cannot be read as a torch checkpoint"),
    (sample, ["--ckpt", "{run}/random.pt"], "cannot be read as a torch checkpoint"),
    # issue 30: a flipped bit in a checkpoint, wherever one is loaded
    (sample, ["--ckpt", "{run}/flipped.pt"], "flipped.pt is corrupt: its contents do not match the checksum"),
    (sample_ddp, ["--ckpt", "{run}/flipped.pt"], "flipped.pt is corrupt"),
    (evaluate, ["--ckpt", "{run}/flipped.pt"], "flipped.pt is corrupt"),
    (ptq, ["--ckpt", "{run}/flipped.pt"], "flipped.pt is corrupt"),
    (pack, ["--ckpt", "{run}/flipped.pt", "--out", "{run}/flipped.tdit"], "flipped.pt is corrupt"),
    (train, FAST + ["--resume", "--out-dir", "{run}/flipped"], "flipped/ckpt.pt is corrupt"),
    # issue 30: messages that say what is wrong
    (train, FAST + ["--resume", "--out-dir", "{run}/random"], "not a readable train.py checkpoint ("),
    (train, FAST + ["--resume", "--max-steps", "2", "--out-dir", "{run}"], "is at step 2 and --max-steps is 2: nothing"),
    (train, FAST + ["--resume", "--max-steps", "1", "--out-dir", "{run}"], "is at step 2 and --max-steps is 1: nothing"),
    (train, FAST + ["--data", "{run}/log.jsonl", "--out-dir", "{run}/d"], "is a file, not a folder of class sub-folders"),
    (sample, ["--ckpt", "{run}/version257.tdit"], "version257.tdit is corrupt or not a .tdit file"),
    (sample, ["--vae", "{run}", "--ckpt", "{run}/ckpt.pt"], "--vae is for models of VAE latents"),
]


def flip_a_bit(ckpt_bytes, ckpt):
    """The checkpoint's bytes with one bit flipped in the middle of its first EMA tensor."""
    t = next(iter(torch.load(ckpt, weights_only=True)["ema"].values())).numpy().tobytes()
    at = ckpt_bytes.index(t) + len(t) // 2
    return ckpt_bytes[:at] + bytes([ckpt_bytes[at] ^ 1]) + ckpt_bytes[at + 1:]


@pytest.fixture
def bad_files(run):
    """An empty, a truncated, a random and a bit-flipped .pt next to the checkpoint, run folders of the random
    and the flipped one, and a .tdit whose header says version 257 (all removed afterwards)."""
    ckpt = open(os.path.join(run, "ckpt.pt"), "rb").read()
    demo = bytearray(open(sample.DEMO, "rb").read())
    demo[4:8] = (257).to_bytes(4, "little")
    flipped, random = flip_a_bit(ckpt, os.path.join(run, "ckpt.pt")), np.random.default_rng(0).bytes(4096)
    files = {"empty.pt": b"", "cut.pt": ckpt[: len(ckpt) // 2], "random.pt": random, "flipped.pt": flipped,
             "random/ckpt.pt": random, "flipped/ckpt.pt": flipped, "version257.tdit": bytes(demo)}
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(run, name)), exist_ok=True)
        open(os.path.join(run, name), "wb").write(content)
    yield
    for name in files:
        os.remove(os.path.join(run, name))
    for folder in ("random", "flipped"):
        os.rmdir(os.path.join(run, folder))


@pytest.mark.parametrize("module,argv,message", OUTPUT_CASES)
def test_outputs_never_replace_inputs_and_bad_files_get_one_line(module, argv, message, run, bad_files, capsys):
    before = hashes(run)
    code, line = main_of(module, [a.format(run=run) for a in argv] + (["--out", "x.png"] * (argv[-2] == "--ckpt")),
                         capsys)
    assert code == 1 and message in line and "weights_only" not in line
    assert hashes(run) == before


def test_the_command_line_says_it_in_one_line(run, bad_files):
    before = hashes(run)
    for argv in (["pack.py", "--ckpt", f"{run}/ckpt.pt", "--out", f"{run}/ckpt.pt"],
                 ["sample.py", "--ckpt", f"{run}/empty.pt"]):
        code, err = cli(*argv)
        assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert hashes(run) == before


def test_a_second_run_into_a_locked_run_dir_is_refused(run):
    before = hashes(run)
    lock = os.path.join(run, "lock")
    open(lock, "w").write(f"{os.getpid()} {socket.gethostname()}")  # a live process holds it
    try:
        with pytest.raises(FileExistsError, match="is in use by another run"):
            train.main(FAST + ["--resume", "--max-steps", "3", "--out-dir", run])
    finally:
        os.remove(lock)
    assert hashes(run) == before


def test_fresh_run_refuses_an_old_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(FileExistsError, match="log.jsonl exists from a run that wrote no checkpoint"):
        train.main(FAST + ["--max-steps", "2", "--out-dir", str(out)])
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n' and not (out / "lock").exists()


def test_resume_takes_a_stale_lock_and_truncates_the_log(run, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # a crash after the checkpoint: steps 3, 4 and a torn line
        f.write('{"step": 3, "loss": 0.9}\n{"step": 4, "loss": 0.9}\n{"step": 5, "lo')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    open(os.path.join(out, "lock"), "w").write(f"{dead.pid} {socket.gethostname()}")
    train.main(FAST + ["--resume", "--max-steps", "3", "--out-dir", out])
    assert "taking over the stale lock" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
    assert steps == [1, 2, 3] and not os.path.exists(os.path.join(out, "lock"))


def test_diverging_loss_stops_without_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="the run diverged.*try a lower --lr"):
        train.main(FAST + ["--lr", "1e6", "--max-steps", "5", "--out-dir", out])
    assert not os.path.exists(os.path.join(out, "ckpt.pt")) and not os.path.exists(os.path.join(out, "lock"))


def test_sample_refuses_to_save_non_finite_images(run, tmp_path, monkeypatch):
    monkeypatch.setattr(sample.Diffusion, "sample", lambda self, model, y, shape, *a, **k: torch.full((len(y), *shape), float("nan")))
    with pytest.raises(ValueError, match="not finite"):
        sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--device", "cpu", "--out", str(tmp_path / "s.png")])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_checkpoints_and_resume_continues(tmp_path, ranks):
    """SIGTERM to every process of the job, as a scheduler sends it: the step in flight finishes, a checkpoint is
    written, exit 143. With 2 gloo ranks under torchrun both stop at the same step (torchrun itself exits 1)."""
    out = str(tmp_path / "run")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if ranks == 2 else []
    proc = subprocess.Popen([sys.executable, *launch, "train.py", *FAST, "--global-batch-size", "8", "--max-steps",
                             "1000", "--out-dir", out], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == (128 + signal.SIGTERM if ranks == 1 else 1), "".join(lines)
    stopped = [line for line in lines if line.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 1 and "the same command with --resume" in stopped[0]
    assert ranks == 2 or "Traceback" not in "".join(lines)
    assert ranks == 1 or "weights identical on all 2 ranks: yes" in "".join(lines)
    step = int(stopped[0].split()[5].rstrip(":"))
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == step >= 2
    train.main(FAST + ["--global-batch-size", "8", "--resume", "--max-steps", str(step + 1), "--out-dir", out])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == step + 1


def test_image_folder_converts_16_bit_and_transparent_images_and_skips_empty_classes(tmp_path, capsys):
    root = tmp_path / "images"
    for c in ("grey16", "rgba", "empty"):
        (root / c).mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(root / "grey16" / "a.png")  # 128 * 257
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black: white once composited
    Image.fromarray(rgba).save(root / "rgba" / "a.png")
    ds = data.load_dataset(str(root), 8)
    assert ds.class_names == ["grey16", "rgba"] and "ignoring 1 class folder(s) without images" in capsys.readouterr().out
    grey, white = ((ds[i][0] + 1) * 127.5 for i in range(2))
    assert torch.allclose(grey, torch.full_like(grey, 128), atol=0.5) and torch.allclose(white, torch.full_like(white, 255))


def test_readme_has_a_cpu_install_line():
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in open(os.path.join(ROOT, "README.md")).read()


FID = {"--num-fid-samples": "3", "--batch-size": "2", "--num-steps": "1", "--seed": "0", "--device": "cpu"}


def fid(ckpt, out, changes={}):
    """sample_ddp.py's argv for FID, with changes such as {"seed": "1"} (for --seed 1)."""
    flags = {**FID, "--ckpt": ckpt, "--out": out, **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
    return [x for kv in flags.items() for x in kv]


@pytest.mark.parametrize("change", [dict(seed="1"), dict(cfg_scale="2"), dict(num_steps="2"), dict(method="ddim"),
                                    dict(batch_size="3"), dict(ckpt="other")])
def test_fid_batches_of_another_checkpoint_or_settings_are_refused(run, tmp_path, change, capsys):
    """Issue 30: <out>.parts/ of another checkpoint or other settings is refused in one line (it used to be
    reused: another model's samples under this one's name, or fewer samples than asked); --force starts over
    and gives what a fresh run gives."""
    ckpt, other, out = os.path.join(run, "ckpt.pt"), str(tmp_path / "other.pt"), str(tmp_path / "fid.npz")
    c = torch.load(ckpt, weights_only=True)
    c = {**{k: v for k, v in c.items() if k != "checksum"}, "step": 3}  # the same weights, another file content
    torch.save({**c, "checksum": cli_py.checksum(c)}, other)
    change = {k: other if v == "other" else v for k, v in change.items()}
    sample_ddp.main(fid(ckpt, out))
    before, npz = hashes(out + ".parts"), open(out, "rb").read()
    code, line = main_of(sample_ddp, fid(ckpt, out, change), capsys)
    assert code == 1 and "holds batches of another checkpoint or other settings" in line and "--force" in line
    assert hashes(out + ".parts") == before and open(out, "rb").read() == npz
    sample_ddp.main(fid(ckpt, out, change) + ["--force"])
    sample_ddp.main(fid(ckpt, str(tmp_path / "fresh.npz"), change))
    with np.load(out) as a, np.load(str(tmp_path / "fresh.npz")) as b:
        assert a["arr_0"].shape == (3, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])


def test_fid_batches_without_a_fingerprint_or_too_few_samples_are_refused(run, tmp_path, capsys):
    ckpt, out = os.path.join(run, "ckpt.pt"), str(tmp_path / "fid.npz")
    sample_ddp.main(fid(ckpt, out))
    parts = out + ".parts"
    np.save(os.path.join(parts, "000001.npy"), np.zeros((0, 16, 16, 3), np.uint8))  # a batch that lost its images
    code, line = main_of(sample_ddp, fid(ckpt, out), capsys)
    assert code == 1 and "holds 2 samples where 3 were asked: pass --force" in line
    os.remove(os.path.join(parts, "fingerprint.json"))  # batches of an older version of the script
    code, line = main_of(sample_ddp, fid(ckpt, out), capsys)
    assert code == 1 and "no fingerprint there" in line
    sample_ddp.main(fid(ckpt, out) + ["--force"])
    with np.load(out) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3)


DISK_FULL_CASES = [  # (script, argv with {run} and {tmp}): each ends in ENOSPC on its first output file
    (train, FAST + ["--max-steps", "1", "--out-dir", "{tmp}/run"]),
    (pack, ["--ckpt", "{run}/ckpt.pt", "--out", "{tmp}/m.tdit"]),
    (sample, ["--ckpt", "{run}/ckpt.pt", "--num-steps", "1", "--device", "cpu", "--out", "{tmp}/s.png"]),
    (sample_ddp, ["--ckpt", "{run}/ckpt.pt", "--num-fid-samples", "2", "--num-steps", "1", "--device", "cpu",
                  "--out", "{tmp}/f.npz"]),
    (evaluate, ["--ckpt", "{run}/ckpt.pt", "--num-samples", "10", "--num-steps", "1", "--device", "cpu",
                "--out", "{tmp}/r.json"]),
]


@pytest.mark.parametrize("module,argv", DISK_FULL_CASES)
def test_a_full_disk_is_one_line_and_leaves_no_temp_files(module, argv, run, tmp_path, full_disk):
    """Issue 30: a full disk used to end in a traceback and leave *.tmp files filling it."""
    before = hashes(run)
    full_disk(room=100)  # what the run lock takes fits; no output does
    with pytest.raises(SystemExit) as e:
        cli_py.run(lambda: module.main([a.format(run=run, tmp=tmp_path) for a in argv]))
    line = e.value.code
    assert line.startswith(f"error: {tmp_path}/") and ": disk full after " in line and len(line.splitlines()) == 1
    left = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path) for f in files]
    assert not [f for f in left if f.endswith(".tmp") or f in ("m.tdit", "m.tdit3", "s.png", "f.npz", "r.json")]
    assert not os.path.exists(tmp_path / "run" / "lock") and not os.path.exists(tmp_path / "run" / "ckpt.pt")
    assert hashes(run) == before


@pytest.mark.parametrize("script", ["sample.py", "evaluate.py", "sample_ddp.py"])
def test_ctrl_c_is_one_line_and_exit_130(run, tmp_path, script):
    """SIGINT once the script is at work (sampling; for sample_ddp.py after its first batch): exit 130, the
    line "interrupted" and no traceback, no output or temp file, and the FID batches finished so far kept."""
    argv = {"sample.py": ["--num-steps", "1000", "--out", "s.png"],
            "evaluate.py": ["--num-samples", "10", "--num-steps", "1000", "--out", "r.json"],
            "sample_ddp.py": ["--num-fid-samples", "8", "--batch-size", "1", "--num-steps", "200", "--out", "f.npz"]}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--ckpt", os.path.join(run, "ckpt.pt"),
                             "--device", "cpu", *argv[script]], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    at_work, seen = (proc.stdout, b"batch 1/") if script == "sample_ddp.py" else (proc.stderr, b"sampling step")
    out = b""
    while seen not in out:
        out += os.read(at_work.fileno(), 1024) or pytest.fail(f"{script} ended: {out}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.decode().endswith("interrupted\n") and b"Traceback" not in err, err
    left = sorted(os.listdir(tmp_path))
    if script == "sample_ddp.py":
        assert left == ["f.npz.parts"] and "000000.npy" in os.listdir(tmp_path / "f.npz.parts")
        assert not [f for f in os.listdir(tmp_path / "f.npz.parts") if f.endswith(".tmp")]
    else:
        assert left == []
