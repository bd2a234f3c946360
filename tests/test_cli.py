"""The scripts' shared helpers (cli.py): atomic writes, the one-line error wrapper, the argument checks, the run lock.
Run: python -m pytest tests/test_cli.py -v"""
import argparse
import errno
import os
import subprocess
import sys
import threading

import pytest
import torch

import cli
from conftest import ROOT


def test_atomic_write_replaces_the_target_whole(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with cli.atomic_write(str(target)) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # nothing visible until the block ends
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it, not mkstemp's 0600


@pytest.mark.parametrize("error", [ValueError("disk full"), KeyboardInterrupt()])
def test_a_failing_write_leaves_neither_a_temp_file_nor_a_changed_target(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with cli.atomic_write(str(target)) as f:
            f.write(b"half")
            raise error
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(RuntimeError):  # a new file: not created at all
        with cli.atomic_write(str(tmp_path / "new.bin")):
            raise RuntimeError
    assert os.listdir(tmp_path) == ["out.bin"]


def test_concurrent_writers_use_unique_temp_names(tmp_path):
    target, seen, both_open = str(tmp_path / "out.bin"), [], threading.Barrier(2)

    def write(data):
        with cli.atomic_write(target) as f:
            both_open.wait(timeout=10)  # both temp files exist at once
            seen.append(sorted(os.listdir(tmp_path)))
            both_open.wait(timeout=10)
            f.write(data)
    threads = [threading.Thread(target=write, args=(d,)) for d in (b"a" * 1000, b"b" * 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0] == seen[1] and len(seen[0]) == 2 and all(n.startswith("out.bin.") for n in seen[0])
    assert open(target, "rb").read() in (b"a" * 1000, b"b" * 1000) and os.listdir(tmp_path) == ["out.bin"]


def run(error):
    """What cli.run makes of a main() that raises error: (exit code as sys.exit gets it)."""
    def main():
        raise error
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    return e.value.code


@pytest.mark.parametrize("error", [FileNotFoundError, FileExistsError, ValueError, ImportError, FloatingPointError])
def test_bad_input_is_one_error_line(error):
    assert run(error("no such file: x")) == "error: no such file: x"  # sys.exit(str): the line on stderr, exit 1
    # a worker's exception (torchrun) carries a traceback in its text: its last line is the message
    assert run(error("Traceback (most recent call last):\n  ...\nno such file: x")) == "error: no such file: x"


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    assert run(KeyboardInterrupt()) == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("phase", ["imports", "main"])
def test_ctrl_c_while_a_script_still_imports_is_one_line_too(tmp_path, phase):
    """The handler is for this folder's scripts only (cli.py beside the script): a copy of cli.py beside a script
    that signals, then sleeps where the slow imports would be (or in main, after cli.run gave Ctrl-C back)."""
    import shutil
    import signal
    shutil.copy(os.path.join(ROOT, "cli.py"), tmp_path / "cli.py")
    wait = "print('ready', flush=True)\nimport time\ntime.sleep(60)"
    body = (f"import cli\n{wait}\n" if phase == "imports" else
            f"import cli\n\ndef main():\n    " + wait.replace("\n", "\n    ") + "\n\ncli.run(main)\n")
    (tmp_path / "script.py").write_text(body)
    p = subprocess.Popen([sys.executable, str(tmp_path / "script.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "interrupted\n", err
    assert getattr(signal.getsignal(signal.SIGINT), "__name__", "") != "<lambda>"  # not installed by pytest's import


def test_a_script_exits_1_with_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    path = tmp_path / "script.py"
    for body, code, last in (("raise ValueError('bad value')", 1, "error: bad value"),
                             ("raise ZeroDivisionError('a bug')", 1, "ZeroDivisionError: a bug")):
        path.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport cli\n\ndef main():\n    {body}\n\n"
                        f"cli.run(main)\n")
        r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and lines[-1] == last and (len(lines) == 1) == last.startswith("error:"), r.stderr


def test_number_accepts_finite_values_in_range_only():
    positive = cli.number(int, 1, what="a positive integer")
    assert positive("3") == 3
    for bad in ("0", "-1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer"):
            positive(bad)
    fraction = cli.number(float, 0, 1, what="a number in [0, 1]")
    assert fraction("0.25") == 0.25
    for bad in ("nan", "inf", "-inf", "1.01"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a number in \\[0, 1\\], got '{bad}'"):
            fraction(bad)


def test_device_names_cpu_or_cuda():
    assert cli.device("cpu").type == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown device 'gpu0'"):
        cli.device("gpu0")
    with pytest.raises(argparse.ArgumentTypeError, match="not supported here"):
        cli.device("meta")


def test_check_output_refuses_inputs_folders_and_missing_folders(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    cli.check_output(str(tmp_path / "out.png"), [str(src)])
    with pytest.raises(ValueError, match="is the input .*would destroy the input"):
        cli.check_output(str(src), [str(src)])
    with pytest.raises(ValueError, match="--out-file .* is a directory"):
        cli.check_output(str(tmp_path), flag="--out-file")
    with pytest.raises(FileNotFoundError, match="the folder .* does not exist"):
        cli.check_output(str(tmp_path / "missing" / "out.png"))


def test_check_output_refuses_an_empty_name_and_special_files(tmp_path):
    """--out "" and --out naming a FIFO or a device are refused before any work (the rename of atomic_write would
    replace a device node or a FIFO with a regular file)."""
    with pytest.raises(ValueError, match="--out is empty"):
        cli.check_output("")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special in (str(fifo), os.devnull):
        with pytest.raises(ValueError, match="not a regular file"):
            cli.check_output(special)


def test_pack_and_sample_refuse_special_outputs_in_one_line(tmp_path, capsys):
    import pack
    import sample
    for main, argv in ((pack.main, ["--ckpt", "missing.pt", "--out", os.devnull]),
                       (sample.main, ["--out", os.devnull]), (sample.main, ["--out", ""])):
        with pytest.raises(ValueError, match="not a regular file|is empty"):
            main(argv)
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)  # the device node is still one


def test_run_dir_lock_refuses_a_second_run_and_cleans_up(tmp_path):
    out = str(tmp_path / "run")
    with cli.run_dir_lock(out):
        assert os.listdir(out) == ["lock"] and open(os.path.join(out, "lock")).read().startswith(f"{os.getpid()} ")
        with pytest.raises(FileExistsError, match="is in use by another run"):
            with cli.run_dir_lock(out):
                pass
        assert os.listdir(out) == ["lock"]
    assert not os.path.exists(out)  # created by the run and left empty: removed
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        with cli.run_dir_lock(str(tmp_path / "file")):
            pass


def test_a_full_disk_names_the_path_and_the_cause_and_leaves_no_temp_file(tmp_path, full_disk):
    """ENOSPC (or any error of the system) in an atomic write: the temp file goes, the target stays as it was,
    and run's one line names the path and the cause (ENOSPC: how far the write got)."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    full_disk(room=100)

    def main():
        with cli.atomic_write(str(target)) as f:
            f.write(b"x" * 60)
            f.flush()
            f.write(b"y" * 60)
            f.flush()
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == f"error: {target}: disk full after 60 bytes (the file is left as it was): free some " \
                           f"space or write elsewhere"
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    assert run(OSError(errno.EIO, os.strerror(errno.EIO), "x.bin")) == "error: x.bin: Input/output error"
    assert run(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "log.jsonl")) == "error: log.jsonl: disk full"


def test_a_full_disk_leaves_no_lock_and_no_run_dir(tmp_path, full_disk):
    out = str(tmp_path / "run")
    full_disk(room=0)
    with pytest.raises(OSError, match="disk full"):
        with cli.run_dir_lock(out):
            pass
    assert os.listdir(tmp_path) == []  # nor an empty lock that would refuse every later run
    os.mkdir(out)
    with pytest.raises(OSError, match="disk full"):
        with cli.run_dir_lock(out):
            pass
    assert os.listdir(out) == []


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"not a lock"])
def test_an_empty_or_unreadable_lock_is_taken_over_with_a_warning(tmp_path, content, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_bytes(content)
    with cli.run_dir_lock(str(out)):
        assert (out / "lock").read_text().startswith(f"{os.getpid()} ")
    assert "warning: taking over the lock" in capsys.readouterr().out and os.listdir(out) == []


def test_seeds_beyond_their_range_are_argument_errors():
    assert cli.SEED("4294967295") == 2**32 - 1
    for bad in (str(2**32), str(2**64), "1" * 400, "-1", "1.5"):  # "1" * 400: too large even for a float
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer in 0..4294967295"):
            cli.SEED(bad)


def test_checksum_tells_a_changed_tensor_and_passes_checkpoints_without_one():
    ckpt = {"model": {"w": torch.arange(6.0)}, "opt": {"state": {0: {"step": torch.tensor(3.0)}}}, "step": 3}
    saved = {**ckpt, "checksum": cli.checksum(ckpt)}
    cli.verify(saved, "ckpt.pt")
    cli.verify(ckpt, "old.pt")  # written before there were checksums
    flipped = {**saved, "model": {"w": torch.arange(6.0)}}
    flipped["model"]["w"].view(torch.uint8)[5] ^= 1  # one bit of one float
    for bad in (flipped, {**saved, "step": 4}):
        with pytest.raises(ValueError, match="^ckpt.pt is corrupt: its contents do not match the checksum"):
            cli.verify(bad, "ckpt.pt")
