"""
What the command-line scripts (train, sample, sample_ddp, evaluate, ptq, pack) share, so each of them reads as its
own job: argument checks that fail with one clear line, writes that a crash cannot leave half done, the checksum
that tells a corrupt checkpoint, the lock that gives a run directory to one training run, the stop signals a
cluster sends before it preempts a job, and the wrapper that turns a bad input or a full disk into one
"error: ..." line and a non-zero exit.

    python -c "import cli; print(cli.number(int, 1, what='a positive integer')('8'))"
"""

import os
import signal
import sys

if os.path.dirname(os.path.abspath(getattr(sys.modules["__main__"], "__file__", "/"))) == \
        os.path.dirname(os.path.abspath(__file__)):
    # One of this folder's scripts is starting: a Ctrl-C during its slow imports (torch, CuPy) is one line and exit
    # 130 too, not an import traceback. run() gives Ctrl-C back to Python before main() starts.
    signal.signal(signal.SIGINT, lambda *_: (print("interrupted", file=sys.stderr), os._exit(130)))

import argparse  # noqa: E402 (after the handler: these take time too)
import errno
import math
import socket
import tempfile
import zlib
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
        # the range first: an int too large for a float (a seed of 400 digits) would make isfinite raise
        if v is None or not lo <= v <= hi or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v
    return parse


# --seed of every script: seeds are combined with step and batch numbers (seed * 1_000_003 + step), which 32 bits
# leave room for in the 64 bits a torch generator takes
SEED = number(int, 0, 2**32 - 1, what="an integer in 0..4294967295")


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
    path in one step. A crash or an error leaves path as it was and no temp file behind; an error of the system
    (disk full, quota, I/O) comes back as an OSError that names path and the cause, for run's one line."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".",
                                   suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~UMASK)  # the permissions open() would have given (mkstemp's are owner-only)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = 0
        if tmp and os.path.exists(tmp):
            written = os.path.getsize(tmp)  # how far the write got, for the message
            os.remove(tmp)
        err = system_error(e) if isinstance(e, Exception) else None  # Ctrl-C stays Ctrl-C
        if err is not None:
            cause = (f"disk full after {written:,} bytes (the file is left as it was): free some space or write "
                     f"elsewhere") if err.errno == errno.ENOSPC else err.strerror
            raise OSError(err.errno, cause, path) from None
        raise


def system_error(e):
    """The error of the system (an OSError with an errno) that e is, or that it was raised in handling
    (torch.save turns a failed write into a RuntimeError); None if there is none."""
    while e is not None and not (isinstance(e, OSError) and e.errno is not None):
        e = e.__cause__ or e.__context__
    return e


def checksum(obj, crc=0):
    """zlib.crc32 (as pack.py's files) of a checkpoint: every tensor's bytes, every other value's repr and the keys
    that lead to them, in order (pickle keeps the order of dicts). What a flipped bit or a torn write changes."""
    if isinstance(obj, torch.Tensor):
        return zlib.crc32(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    if isinstance(obj, (dict, list, tuple)):
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            crc = checksum(v, zlib.crc32(repr(k).encode(), crc))
        return crc
    return zlib.crc32(repr(obj).encode(), crc)


def verify(ckpt, path):
    """ValueError (one line) if the checkpoint ckpt, loaded from path, does not match the "checksum" that
    train.py stored in it. One without (written before there were checksums) passes unchecked."""
    if isinstance(ckpt, dict) and "checksum" in ckpt and \
            ckpt["checksum"] != checksum({k: v for k, v in ckpt.items() if k != "checksum"}):
        raise ValueError(f"{path} is corrupt: its contents do not match the checksum it was saved with (a flipped "
                         f"bit or a damaged copy); use another copy or an earlier checkpoint")


def load_checkpoint(path, unreadable):
    """What every loader of a train.py checkpoint calls: torch.load of plain data (weights_only), verified. A file
    torch cannot read is the ValueError `unreadable` (one line: torch's own text is many lines about pickling)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{unreadable} ({type(e).__name__})") from None
    verify(ckpt, path)
    return ckpt


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def read_lock(path):
    """(PID, host) in a run lock, or (None, None) if it is empty or unreadable."""
    try:
        with open(path) as f:
            pid, _, host = f.read().strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return None, None
    return (int(pid), host) if pid.isdigit() and host else (None, None)


@contextmanager
def run_dir_lock(out_dir):
    """Own out_dir for the run: <out_dir>/lock holds "PID host". It is written whole beside the lock, then linked
    into place (a link, unlike a rename, fails if the lock exists), so a second run into the same directory is
    refused and nobody reads a half-written lock. A lock of a process that is gone (same host) is stale and taken
    over; so is an empty or unreadable one (left by an older version of this code on a full disk: a lock linked
    into place is never empty). The lock goes at exit, and so does the directory if this run created it and left
    it empty; if the disk is full, neither is made."""
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
    except OSError:  # a full disk: no lock, and no directory this run made
        if created and os.path.isdir(out_dir):
            os.rmdir(out_dir)
        raise
    try:
        while True:
            try:
                os.link(os.path.join(out_dir, f"lock.{os.getpid()}"), path)
                break
            except FileExistsError:
                pid, owner = read_lock(path)
                if pid is None:
                    print(f"warning: taking over the lock {path}: it is empty or unreadable, so no run holds it")
                elif owner != host or pid_alive(pid):
                    raise FileExistsError(f"{out_dir} is in use by another run (PID {pid} on {owner}): wait for it, "
                                          f"or choose another --out-dir (delete {path} if that run is gone)") from None
                else:
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


def error_line(e):
    """The one line that says what went wrong: for an error of the system (errno set: disk full, I/O, permissions)
    the file and the cause; else the exception's text, whose last line is the message (a worker's exception
    arrives with a traceback in its text)."""
    if isinstance(e, OSError) and e.errno is not None:
        cause = e.strerror or os.strerror(e.errno)
        cause = "disk full" if e.errno == errno.ENOSPC and not cause.startswith("disk full") else cause
        return f"{e.filename}: {cause}" if e.filename else cause
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def run(main):
    """Call main() as a script's entry point: a bad input (missing or existing file, bad value, missing package),
    an error of the system (disk full, I/O) or a diverged run ends with one "error: ..." line and exit code 1,
    Ctrl-C with one line and 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own again (see the handler at the top)
    try:
        main()
    except (OSError, ValueError, FloatingPointError, ImportError) as e:
        sys.exit(f"error: {error_line(e)}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
