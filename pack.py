"""
Turn a training checkpoint into a deployment file: ternary weights in 2 bits (or 1.6), the rest in bf16.

    python pack.py --ckpt out/ckpt.pt --out terdit.tdit    # writes terdit.tdit (2-bit) and terdit.tdit3 (base-3),
                                                           # as a pair or not at all
    python pack.py --ckpt checkpoints/3B_1180000 --out 3B.tdit   # an official TerDiT checkpoint folder (official.py)
    python -c "import deploy; m = deploy.load_packed('terdit.tdit'); print(m.config)"

Like llm.c's export (train_gpt2.py, `write_model`): a versioned binary written and read with struct and numpy,
no pickle. The reference TerDiT stores its trits as 2-bit codes too (value+1, 4 per byte, in hqq's layout: see
official.py). We store them row-major, the plain layout of kernel.pack_2bit, which no kernel's tiling depends on:
loading the codes is a byte copy, and deploy.finish permutes them once, on the GPU, into whatever order the fast
kernels read (kernel.prepare).

Two packings of the trits
-------------------------
A trit carries log2(3) = 1.585 bits. 2 bits per trit (4 per byte, ".tdit") wastes 21% of that but decodes with
shifts and masks, which is what the matmul kernels need. Base 3 packs 5 trits per byte (3^5 = 243 <= 256,
1.6 bits per trit, ".tdit3"), within 1% of the bound and 20% smaller, but decoding needs division by powers of 3,
so it is storage only: read_packed expands it to the 2-bit codes once, at load time.

File format (version 2, little-endian throughout)
-------------------------------------------------
    header, 28 bytes (struct "<IIIIQI"):
        magic           uint32  0x54694454, which puts the bytes "TDiT" at the start of the file
        version         uint32  FORMAT_VERSION; bumped on any change to this layout
        trits_per_byte  uint32  4 = 2-bit packing, 5 = base-3 packing
        index_bytes     uint32  length of the JSON index that follows the header
        data_bytes      uint64  length of the data section
        crc32           uint32  zlib.crc32 of the JSON index followed by the data section
    JSON index (UTF-8): {"config": every TerDiTConfig field, "step": training step of the weights (null for an
        official checkpoint), "tensors": [{"name", "encoding", "shape", "offset", "nbytes"}, ...]}
    zero padding up to a multiple of 64 bytes, then the data section: every tensor at a 64-byte-aligned offset
    (relative to the section start). The file size must equal align64(28 + index_bytes) + data_bytes.

Tensors, in the order of TerDiT.state_dict() (fixed by model.py's module registration order), each ternary
TernaryLinear's "weight" replaced by its trits under the name "<layer>.packed":
    "trits"     <layer>.packed: W̃ of shape (N, K) = (out, in), as codes c = W̃ + 1. 2-bit: row-major, N rows of
                ceil(K/4) bytes; byte j of row n holds k = 4j + i in bits 2i..2i+1, a row's last byte padded with
                code 1 (trit 0): kernel.pack_2bit(W̃) verbatim. Base 3: W̃ flattened row-major,
                byte = c0 + 3·c1 + 9·c2 + 27·c3 + 81·c4 (the last one zero-padded).
    "float32"   <layer>.alphas: α, shape (1,), kept exact.
    "bfloat16"  everything else (embedders, norms, adaLN biases, final layer). bf16, not fp16: bf16 keeps
                float32's exponent range, so nothing overflows (fp16 stops at 65504) or flushes to zero; it
                pays in mantissa bits instead (relative rounding error <= 2^-9).

A file of an older version is refused with one line that says how to regenerate it; one whose header holds a
version that never existed (a flipped bit, or another format) as corrupt or not a .tdit file.
"""

import argparse
import fcntl
import json
import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import asdict

import cli  # before torch: a Ctrl-C while the imports below load ends in one line (cli.py)

import numpy as np
import torch

import kernel
import official
from model import TerDiT, config_from_dict
from quant import TernaryLinear, export_ternary

MAGIC = 0x54694454        # b"TDiT" read as a little-endian uint32
FORMAT_VERSION = 2
OLDER_VERSIONS = (1,)     # what earlier versions of this code wrote: refused with the command that regenerates them
HEADER = struct.Struct("<IIIIQI")  # magic, version, trits_per_byte, index_bytes, data_bytes, crc32
ALIGN = 64
POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)  # place values of the 5 base-3 digits in a byte


def _align(n):
    return -(-n // ALIGN) * ALIGN


def base3_path(path):
    """Where the base-3 twin of a 2-bit file goes: model.tdit -> model.tdit3, anything else gets .tdit3 appended."""
    return path + "3" if path.endswith(".tdit") else path + ".tdit3"


def pair_paths(out):
    """(2-bit file, base-3 file) that pack.py --out writes: out and its twin, or, when out names a .tdit3 (a
    repack of one), the .tdit beside it and out, so that each packing keeps its own suffix."""
    return (out[:-1], out) if out.endswith(".tdit3") else (out, base3_path(out))


def ternary_layers(model):
    """(name, layer) of every ternary TernaryLinear of a TerDiT: the layers a packed file stores as trits."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TernaryLinear) and m.ternary]


# -----------------------------------------------------------------------------
# base-3 packing: 5 trits per byte

def pack_base3(trits):
    """int8 trits (any shape) -> uint8 numpy array of ceil(numel/5) bytes, row-major."""
    c = (trits.flatten().to(torch.int16) + 1).to(torch.uint8).numpy()  # codes in {0, 1, 2}
    c = np.pad(c, (0, -len(c) % 5)).reshape(-1, 5)                    # (bytes, 5), zero-padded
    return (c * POW3).sum(axis=1, dtype=np.uint8)                      # <= 2·121 = 242: fits a byte


def unpack_base3(packed, N, K):
    """Inverse of pack_base3: uint8 numpy array -> int8 trits (N, K)."""
    if packed.max(initial=0) >= 243:
        raise ValueError("corrupt base-3 data (a byte >= 243): re-run pack.py on the checkpoint")
    digits = packed[:, None] // POW3 % 3                               # (bytes, 5) codes in {0, 1, 2}
    return torch.from_numpy(digits.reshape(-1)[: N * K].astype(np.int8) - 1).view(N, K)


# -----------------------------------------------------------------------------
# writing

def encode(model):
    """(name, encoding, logical shape, tensor) for every tensor to store, in the documented fixed order: int8 trits,
    float32 α, bf16 for the rest."""
    trits = {f"{name}.weight": export_ternary(m)[0] for name, m in ternary_layers(model)}
    out = []
    for key, t in model.state_dict().items():
        if key in trits:
            out.append((key[: -len("weight")] + "packed", "trits", list(t.shape), trits[key]))
        elif key.endswith(".alphas"):
            out.append((key, "float32", list(t.shape), t.float()))
        else:
            out.append((key, "bfloat16", list(t.shape), t.to(torch.bfloat16)))
    return out


def packed_bytes(config, step, encoded, trits_per_byte):
    """The bytes of one packed file (trits_per_byte 4 = 2-bit, 5 = base-3) of encode()'s tensors: header, JSON
    index and padding, then the data section."""
    index = {"config": config, "step": step, "tensors": []}
    data = bytearray()
    for name, encoding, shape, t in encoded:
        if encoding == "trits" and trits_per_byte == 4:
            blob = kernel.pack_2bit(t).contiguous().numpy().tobytes()
        elif encoding == "trits":
            blob = pack_base3(t).tobytes()
        elif encoding == "bfloat16":
            blob = t.contiguous().view(torch.int16).numpy().tobytes()  # numpy has no bf16: write the raw bits
        else:
            blob = t.contiguous().numpy().tobytes()
        data += bytes(_align(len(data)) - len(data))  # zero padding: every tensor starts 64-byte aligned
        index["tensors"].append({"name": name, "encoding": encoding, "shape": shape, "offset": len(data),
                                 "nbytes": len(blob)})
        data += blob
    index_bytes = json.dumps(index).encode()
    crc = zlib.crc32(data, zlib.crc32(index_bytes))
    head = HEADER.pack(MAGIC, FORMAT_VERSION, trits_per_byte, len(index_bytes), len(data), crc) + index_bytes
    return head + bytes(_align(len(head)) - len(head)), data  # zero padding up to the data section


def write_packed(path, config, step, encoded, trits_per_byte):
    """Write one packed file of encode()'s tensors, atomically (a crash never leaves a half-written file). Returns
    its size in bytes."""
    with cli.atomic_write(path) as f:
        f.writelines(packed_bytes(config, step, encoded, trits_per_byte))
    return os.path.getsize(path)


@contextmanager
def folder_lock(folder):
    """Hold an exclusive flock of folder: two pack.py runs into it write one after the other. Where the file
    system has no flock for folders (some NFS), they go unlocked."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def write_pair(out, config, step, encoded):
    """The 2-bit file and its base-3 twin (pair_paths(out)) as a pair or not at all: both go to temp files, which
    are renamed only when both are written whole, under a lock of their folder (so that two runs to one --out
    cannot leave the twins of different checkpoints). Should the 2-bit file's rename fail after its twin's, the
    twin is removed again. Returns their sizes."""
    path2, path3 = pair_paths(out)
    twin_renamed = False
    try:
        with folder_lock(os.path.dirname(os.path.abspath(path2))), cli.atomic_write(path2) as f2:
            with cli.atomic_write(path3) as f3:
                f2.writelines(packed_bytes(config, step, encoded, trits_per_byte=4))
                f3.writelines(packed_bytes(config, step, encoded, trits_per_byte=5))
            twin_renamed = True
    except BaseException:
        if twin_renamed:
            os.remove(path3)
        raise
    return os.path.getsize(path2), os.path.getsize(path3)


# -----------------------------------------------------------------------------
# reading

def is_packed(path):
    """True if the file starts with pack.py's magic number (reads 4 bytes; read_header checks the rest)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and struct.unpack("<I", head)[0] == MAGIC


def read_header(path):
    """Header and JSON index of a packed file, without reading the tensors (nor checking the checksum): a dict
    with "config", "step", "tensors", "trits_per_byte", ... ValueError if not one, of another version, or cut short."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < 4 or struct.unpack("<I", head[:4])[0] != MAGIC:
            raise ValueError(f"{path} is not a TerDiT packed file (wrong magic number): make one with pack.py")
        version = struct.unpack("<I", head[4:8])[0] if len(head) >= 8 else FORMAT_VERSION
        if version in OLDER_VERSIONS:
            raise ValueError(f"{path} has format version {version}, this code reads version {FORMAT_VERSION}: "
                             f"regenerate it with `python pack.py --ckpt <training checkpoint> --out {path}`")
        if version != FORMAT_VERSION:  # a flipped bit in the header, or a file that only starts like ours
            raise ValueError(f"{path} is corrupt or not a .tdit file (its header's version field reads {version}; "
                             f"this code knows versions 1-{FORMAT_VERSION}): re-run pack.py on the training checkpoint")
        if len(head) < HEADER.size:
            raise ValueError(f"{path} is truncated ({size} bytes, shorter than the header): re-run pack.py")
        magic, version, trits_per_byte, index_len, data_len, crc = HEADER.unpack(head)
        if trits_per_byte not in (4, 5):
            raise ValueError(f"{path} is corrupt (unknown packing {trits_per_byte}): re-run pack.py")
        data_start = _align(HEADER.size + index_len)
        if size != data_start + data_len:
            what = "truncated" if size < data_start + data_len else "corrupt (longer than its header says)"
            raise ValueError(f"{path} is {what}: {size} bytes, expected {data_start + data_len}; re-run pack.py")
        try:
            index = json.loads(f.read(index_len))
        except ValueError:
            raise ValueError(f"{path} is corrupt (unreadable JSON index): re-run pack.py") from None
    return dict(index, version=version, trits_per_byte=trits_per_byte, index_bytes=index_len,
                data_start=data_start, crc32=crc)


def read_packed(path):
    """(header, state dict) of a packed file, checksum checked. The trits of both packings come back as
    "<layer>.packed", uint8 (N, ceil(K/4)) row-major 2-bit codes (kernel.pack_2bit); everything else as float32."""
    hdr = read_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER.size)
        index_bytes = f.read(hdr["index_bytes"])
        f.seek(hdr["data_start"])
        data = f.read()
    if zlib.crc32(data, zlib.crc32(index_bytes)) != hdr["crc32"]:
        raise ValueError(f"{path} is corrupt (checksum mismatch): re-run pack.py")
    state = {}
    for e in hdr["tensors"]:
        raw = np.frombuffer(data, dtype=np.uint8, count=e["nbytes"], offset=e["offset"])
        if e["encoding"] == "trits" and hdr["trits_per_byte"] == 4:
            N, K = e["shape"]
            t = torch.from_numpy(raw.copy()).view(N, -(-K // 4))         # the codes as stored: a byte copy
        elif e["encoding"] == "trits":
            t = kernel.pack_2bit(unpack_base3(raw, *e["shape"]))        # base 3 -> trits -> 2-bit codes
        elif e["encoding"] == "bfloat16":
            t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().view(e["shape"])
        else:
            t = torch.from_numpy(raw.view(np.float32).copy()).view(e["shape"])
        state[e["name"]] = t
    return hdr, state


# -----------------------------------------------------------------------------
# the CLI

def _mb(n):
    return f"{n:>12,d} bytes ({n / 1e6:8.2f} MB)"


def read_checkpoint(path):
    """(config dict, step, TerDiT with the weights to deploy) of a train.py checkpoint (its EMA weights) or an
    official TerDiT checkpoint folder. ValueError (one line) for anything else."""
    if os.path.isdir(path):
        config, model = official.read_reference(path)
        return config, None, model
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ckpt {path} does not exist")
    if is_packed(path):
        raise ValueError(f"{path} is already packed: pack its training checkpoint "
                         "(python pack.py --ckpt <training checkpoint> --out <file>)")
    ckpt = cli.load_checkpoint(path, f"{path} is not a readable torch checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict) or "ema" not in ckpt:
        raise ValueError(f"{path} is not a TerDiT training checkpoint (needs 'ema' and 'model_config')")
    if not ckpt["model_config"].get("ternary", False):
        raise ValueError(f"{path} holds a full-precision model (ternary=False): there is nothing to pack")
    try:
        config = config_from_dict(ckpt["model_config"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    try:
        model = TerDiT(config, device="meta")
        model.load_state_dict(ckpt["ema"], strict=True, assign=True)  # the EMA weights are the ones to deploy
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"{path}'s EMA weights do not match its model_config ({str(err).splitlines()[0]})") from None
    return asdict(config), ckpt.get("step"), model


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pack a TerDiT checkpoint (EMA weights) for deployment.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training checkpoint written by train.py, or an official "
                        "TerDiT checkpoint folder (model_args.pth + consolidated_ema_ternary.00-of-01.pth)")
    parser.add_argument("--out", required=True, help="2-bit output file (e.g. terdit.tdit); the base-3 twin "
                        "goes next to it (terdit.tdit3); --out terdit.tdit3 writes the same pair")
    parser.add_argument("--force", action="store_true", help="overwrite existing --out files that are not packed models")
    args = parser.parse_args(argv)

    path2, path3 = pair_paths(args.out)
    for out in (path2, path3):  # checked before the work: both files are written at the end
        cli.check_output(out, [args.ckpt])
        if os.path.isfile(out) and os.path.getsize(out) and not is_packed(out) and not args.force:
            raise ValueError(f"{out} exists and is not a packed model: pass --force to overwrite it, or choose "
                             "another --out")
    config, step, model = read_checkpoint(args.ckpt)
    size2, size3 = write_pair(args.out, config, step, encode(model))
    n_ternary = sum(m.weight.numel() for _, m in ternary_layers(model))
    n_total = sum(p.numel() for p in model.parameters())
    print(f"packed the EMA weights of step {step}: {n_total:,d} parameters, "
          f"{n_ternary:,d} ({100 * n_ternary / n_total:.1f}%) of them ternary")
    if os.path.isfile(args.ckpt):
        print(f"training checkpoint  {args.ckpt}: {_mb(os.path.getsize(args.ckpt))}")
    print(f"EMA weights in bf16  (reference): {_mb(2 * n_total)}")
    print(f"2-bit packing        {path2}: {_mb(size2)}")
    print(f"base-3 packing       {path3}: {_mb(size3)}")


if __name__ == "__main__":
    cli.run(main)
