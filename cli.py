"""
What the command-line scripts (train, sample, sample_ddp, evaluate, ptq, pack) share, so each of them reads as its
own job: argument checks that fail with one clear line, writes that a crash cannot leave half done, the lock that
gives a run directory to one training run, the stop signals a cluster sends before it preempts a job, and the
wrapper that turns a bad input into one "error: ..." line and a non-zero exit.

    python -c "import cli; print(cli.number(int, 1, what='a positive integer')('8'))"
"""

import argparse
import math
import os
import signal
import socket
import sys
import tempfile
from contextlib import contextmanager

import torch
import torch.distributed as dist


def number(cast, lo=-math.inf, hi=math.inf, what="a number"):
    """argparse type: cast, then require a finite value in [lo, hi] (nan and inf parse as floats, then do harm)."""
    def parse(text):
        try:
            v = cast(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v
    return parse


def device(text):
    """argparse type for --device: cpu, cuda or cuda:N, and CUDA only where there is one."""
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but this torch has no CUDA device: use --device cpu")
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported here: use cpu, cuda or cuda:N")
    return d


def check_output(path, inputs=(), flag="--out"):
    """Refuse, before any work, an output that would overwrite one of the inputs, that is not a regular file (a
    device or a FIFO would be replaced by the rename of atomic_write), or that cannot be written."""
    if not path:
        raise ValueError(f"{flag} is empty: give a file name")
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        raise ValueError(f"{flag} {path} is not a regular file (a device, FIFO or socket): choose another {flag}")
    for i in inputs:
        if os.path.exists(i) and os.path.realpath(path) == os.path.realpath(i):
            raise ValueError(f"{flag} {path} is the input {i}: writing it would destroy the input; choose another {flag}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory: give a file name")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {path}: the folder {folder} does not exist; create it or choose another {flag}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable; choose another {flag}")


UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it) and put back at once
os.umask(UMASK)


@contextmanager
def atomic_write(path):
    """Open a binary file that replaces path only when the with-block ends without an exception: the data goes to
    a temp file of a unique name beside path (two writers never share one), is flushed to disk, then renamed over
    path in one step. A crash or an error leaves path as it was and no temp file behind."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # the permissions open() would have given (mkstemp's are owner-only)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextmanager
def run_dir_lock(out_dir):
    """Own out_dir for the run: <out_dir>/lock holds "PID host". It is written whole beside the lock, then linked
    into place (a link, unlike a rename, fails if the lock exists), so a second run into the same directory is
    refused and nobody reads a half-written lock. A lock of a process that is gone (same host) is stale and taken
    over. The lock goes at exit, and so does the directory if this run created it and left it empty."""
    created = not os.path.isdir(out_dir)
    path, host = os.path.join(out_dir, "lock"), socket.gethostname()
    try:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_write(os.path.join(out_dir, f"lock.{os.getpid()}")) as f:
            f.write(f"{os.getpid()} {host}".encode())
    except FileExistsError:
        raise ValueError(f"--out-dir {out_dir} is not a directory: choose another --out-dir") from None
    except (PermissionError, NotADirectoryError) as e:
        raise ValueError(f"cannot write to --out-dir {out_dir} ({e.strerror}): choose another --out-dir") from None
    try:
        while True:
            try:
                os.link(os.path.join(out_dir, f"lock.{os.getpid()}"), path)
                break
            except FileExistsError:
                with open(path) as f:
                    pid, _, owner = f.read().strip().partition(" ")
                if not (pid.isdigit() and owner == host and not pid_alive(int(pid))):
                    raise FileExistsError(f"{out_dir} is in use by another run (PID {pid or '?'} on {owner or '?'}): "
                                          f"wait for it, or choose another --out-dir (delete {path} if that run is "
                                          f"gone)") from None
                print(f"warning: taking over the stale lock {path} (PID {pid} is no longer running)")
                os.remove(path)
    finally:
        os.remove(os.path.join(out_dir, f"lock.{os.getpid()}"))
    try:
        yield
    finally:
        os.remove(path)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)


class StopSignal:
    """SIGTERM, SIGINT and SIGUSR1 set a flag; the loop ends after the step it is in (a second signal interrupts
    at once). Under DDP each rank's flag is all-reduced (MAX) asynchronously over a CPU (gloo) group and read one
    step later: every rank stops at the same step, and no step waits for the GPU or the other ranks."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __enter__(self):
        self.signum, self.work, self.group = 0, None, None
        self.previous = [signal.signal(s, self.handler) for s in self.SIGNALS]
        return self

    def handler(self, signum, frame):
        if self.signum:
            signal.default_int_handler(signum, frame)
        self.signum = signum

    def __call__(self):
        """The signal number all ranks stop for after this step (0: go on)."""
        if not dist.is_initialized():
            return self.signum
        self.group = self.group or dist.new_group(backend="gloo")
        agreed = 0
        if self.work is not None:
            self.work.wait()
            agreed = int(self.flag.item())
        self.flag = torch.tensor([self.signum])
        self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def drain(self):
        if self.work is not None:
            self.work.wait()  # every rank issued the same all-reduces: none is left in flight at teardown

    def __exit__(self, *exc):
        for s, h in zip(self.SIGNALS, self.previous):
            signal.signal(s, h)


def run(main):
    """Call main() as a script's entry point: a bad input (missing or existing file, bad value, missing package)
    or a diverged run ends with one "error: ..." line and exit code 1, Ctrl-C with one line and 130."""
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError, ImportError) as e:
        # a worker's exception arrives with a traceback in its text: its last line is the message
        lines = str(e).strip().splitlines()
        sys.exit(f"error: {lines[-1] if lines else type(e).__name__}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
