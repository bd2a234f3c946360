"""The scripts' shared helpers (cli.py): atomic writes, the one-line error wrapper, the argument checks, the run lock.
Run: python -m pytest tests/test_cli.py -v"""
import argparse
import os
import subprocess
import sys
import threading

import pytest

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
