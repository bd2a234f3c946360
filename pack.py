"""
Turn a training checkpoint into a deployment file: ternary weights in 2 bits (or 1.6), the rest in bf16.

    python pack.py --ckpt out/ckpt.pt --out terdit.tdit    # writes terdit.tdit (2-bit) and terdit.tdit3 (base-3)
    python pack.py --ckpt checkpoints/3B_1180000 --out 3B.tdit   # an official TerDiT checkpoint folder, likewise
    python pack.py --ckpt old.tdit --out new.tdit          # an older file (patch layout, tile order), rewritten
    python -c "import pack; m = pack.load_packed('terdit.tdit'); print(m.config)"

Like llm.c's export (train_gpt2.py, `write_model`): a versioned binary written and read with struct and numpy,
no pickle. The reference TerDiT stores the same 2-bit codes (value+1, 4 per byte, hqq's layout); we store them
in kernel.py's own tile order so that loading is a byte copy and kernel.ternary_matmul can use them directly.

Two packings of the trits
-------------------------
A trit carries log2(3) = 1.585 bits. 2 bits per trit (4 per byte, ".tdit") wastes 21% of that but decodes with
shifts and masks, which is what the matmul kernel needs. Base 3 packs 5 trits per byte (3^5 = 243 <= 256,
1.6 bits per trit, ".tdit3"), within 1% of the bound and 20% smaller, but decoding needs division by powers of 3,
so it is storage only: load_packed expands it to the 2-bit layout once, at load time. The base-3 file is also
independent of kernel.py's tile order, so it stays readable if that order ever changes.

File format (version 1, little-endian throughout)
-------------------------------------------------
    header, 28 bytes (struct "<IIIIQI"):
        magic           uint32  0x54694454, which puts the bytes "TDiT" at the start of the file
        version         uint32  FORMAT_VERSION; bumped on any change to this layout
        trits_per_byte  uint32  4 = 2-bit packing, 5 = base-3 packing
        index_bytes     uint32  length of the JSON index that follows the header
        data_bytes      uint64  length of the data section
        crc32           uint32  zlib.crc32 of the JSON index followed by the data section
    JSON index (UTF-8): {"config": TerDiTConfig fields, "step": training step of the weights,
        "pack_2bit_probe": crc32 of kernel.pack_2bit on a fixed probe (2-bit files: detects a changed tile order),
        "tensors": [{"name", "encoding", "shape", "offset", "nbytes", and for 2-bit trits "packed_shape"}, ...]}
    zero padding up to a multiple of 64 bytes, then the data section: every tensor at a 64-byte-aligned offset
    (relative to the section start). The file size must equal align64(28 + index_bytes) + data_bytes.

Tensors, in the order of TerDiT.state_dict() (fixed by model.py's module registration order), each ternary
TernaryLinear's "weight" replaced by its trits under the name "<layer>.packed":
    "trits"     <layer>.packed: W̃ of shape (N, K) = (out, in). 2-bit: kernel.pack_2bit(W̃) verbatim. Base 3: W̃
                flattened row-major, codes c = W̃ + 1, byte = c0 + 3·c1 + 9·c2 + 27·c3 + 81·c4 (last one padded).
    "float32"   <layer>.alphas: α, shape (1,), kept exact.
    "bfloat16"  everything else (embedders, norms, adaLN biases, final layer). bf16, not fp16: bf16 keeps
                float32's exponent range, so nothing overflows (fp16 stops at 65504) or flushes to zero; it
                pays in mantissa bits instead (relative rounding error <= 2^-9).

API for sample.py: is_packed(path), read_header(path) (config and index only), load_packed(path, device, dtype, act),
set_act(model, act).
"""

import argparse
import json
import os
import struct
import sys
import zlib
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import kernel
from model import SIZES, TerDiT, TerDiTConfig, config_from_dict, rms_norm, to_reference_patch_layout
from quant import TernaryLinear, export_ternary

MAGIC = 0x54694454        # b"TDiT" read as a little-endian uint32
FORMAT_VERSION = 1
HEADER = struct.Struct("<IIIIQI")  # magic, version, trits_per_byte, index_bytes, data_bytes, crc32
ALIGN = 64
POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)  # place values of the 5 base-3 digits in a byte


def _align(n):
    return -(-n // ALIGN) * ALIGN


def base3_path(path):
    """Where the base-3 twin of a 2-bit file goes: model.tdit -> model.tdit3, anything else gets .tdit3 appended."""
    return path + "3" if path.endswith(".tdit") else path + ".tdit3"


V1_PROBE = 3214266006  # _layout_probe() of the tile order before the wgmma kernel (kernel._PERM_V1)


def _layout_probe():
    """crc32 of kernel.pack_2bit on a fixed trit pattern: it changes when kernel.py's tile order changes."""
    probe = (torch.arange(48 * 200) * 7919 % 3 - 1).to(torch.int8).view(48, 200)
    return zlib.crc32(kernel.pack_2bit(probe).contiguous().numpy().tobytes())


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
# the deployment-time ternary layer

def _autocast(x):
    """x in autocast's dtype inside an autocast region (the packed layers act like nn.Linear there: the kernel needs
    bf16/fp16), else x."""
    return x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x


def _stack_codes(owner, linears):
    """Stack the linears' codes along N into owner's buffer "packed" (left out of the state dict) and make each
    linear's `packed` a view of its rows, so nothing is stored twice. pack_2bit stores 16-row tiles one after
    another, so for widths that are multiples of 16 the stack is the codes concatenated (tests/test_pack.py)."""
    owner.register_buffer("packed", torch.cat([m.packed for m in linears]), persistent=False)
    end = 0
    for m in linears:
        m.packed = owner.packed[end: end + m.out_features]
        end += m.out_features


class PackedTernaryLinear(nn.Module):
    """y = x · (α W̃)ᵀ + b with W̃ held as kernel.pack_2bit codes (uint8) and multiplied by kernel.ternary_matmul
    through its custom op (kernel.ternary_matmul_op), so that torch.compile traces the layer without a break;
    α and b are applied in the kernel's epilogue (one rounding). fp8 (a plain attribute, not in the state dict;
    set_act sets it): x quantised per token to e4m3 first, the kernel's W1.58A8 path."""

    def __init__(self, in_features, out_features, bias, packed_shape, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # K, N
        self.register_buffer("packed", torch.empty(packed_shape, dtype=torch.uint8, device=device))
        self.register_buffer("alphas", torch.empty(1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.fp8 = False

    def forward(self, x):
        return kernel.ternary_matmul_op(_autocast(x), self.packed, self.alphas, self.out_features, self.in_features, self.bias,
                                        self.fp8)

    def _apply(self, fn, recurse=True):
        # Module.to/half/bfloat16 cast every floating buffer. uint8 `packed` is safe (integer buffers are never
        # cast), but α must stay float32 and exact: move the original α to wherever `packed` went, uncast.
        alphas = self.alphas
        super()._apply(fn, recurse)
        self.alphas = alphas.to(self.packed.device)
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8={self.fp8}")


class FusedAdaLN(nn.Module):
    """Every block's adaLN (SiLU -> ternary linear -> RMSNorm) in one ternary matmul: the blocks' codes stacked
    into one (depth * 6 * dim, cond_dim) matrix, multiplied with α = 1, then each block's α, bias and RMSNorm
    applied to its slice (elementwise work that torch.compile fuses). One GEMV of depth x the rows instead of
    depth small ones. pack_2bit stores 16-row tiles one after another and 6 * dim is a multiple of 16, so the
    stacked codes are the blocks' codes concatenated along dim 0 (tests/test_pack.py checks it).

    It owns only the stacked codes (a buffer left out of the state dict: checkpoints and files are unchanged);
    each block's `packed` becomes a view of its rows, so nothing is stored twice. α, bias and norm gain are read
    from the blocks at each call, so they are never stale and keep their dtypes (α float32)."""

    def __init__(self, blocks):
        super().__init__()
        self.linears = [b.adaLN_modulation[1] for b in blocks]  # a plain list: the blocks stay their owners
        self.norms = [b.adaLN_modulation[2] for b in blocks]
        if not all(isinstance(m, PackedTernaryLinear) and m.bias is not None for m in self.linears):
            raise ValueError("FusedAdaLN needs every block's adaLN linear packed (PackedTernaryLinear, with bias)")
        first = self.linears[0]
        self.in_features, self.width = first.in_features, first.out_features  # cond_dim, 6 * dim
        if self.width % kernel.TILE_N:
            raise ValueError(f"adaLN width {self.width} is not a multiple of {kernel.TILE_N}: cannot stack the codes")
        _stack_codes(self, self.linears)
        self.register_buffer("one", torch.ones(1, device=first.packed.device), persistent=False)

    def forward(self, c):
        """c (N, cond_dim) -> every block's modulation, (N, depth, 6 * dim)."""
        x = _autocast(F.silu(c))
        depth = len(self.linears)
        # never fp8 (set_act leaves adaLN alone): M is the batch, too few rows for 8-bit activations to pay, and
        # these modulations scale and gate every block's residual stream
        y = kernel.ternary_matmul_op(x, self.packed, self.one, depth * self.width, self.in_features)
        alphas = torch.stack([m.alphas for m in self.linears])  # (depth, 1), float32
        bias = torch.stack([m.bias for m in self.linears])       # (depth, 6 * dim)
        # float32 from the matmul to the norm, even in the bf16 model: these are all blocks' modulations at once,
        # (N, depth, 6 * dim), computed once per step (a handful of ops, not per block), and they scale and gate
        # every block's residual stream, so they get one rounding to the model's dtype, at the end
        y = y.view(-1, depth, self.width).float() * alphas + bias.float()
        if isinstance(self.norms[0], nn.Identity):  # trained without the adaLN RMSNorm
            return y.to(x.dtype)
        gain = torch.stack([n.weight for n in self.norms])     # (depth, 6 * dim)
        return rms_norm(y, gain.float(), self.norms[0].eps).to(torch.promote_types(x.dtype, gain.dtype))


class FusedLinears(nn.Module):
    """Packed linears that read one input (attention's wq, wk, wv; SwiGLU's w1, w3) as one ternary matmul: their
    codes stacked along N (each width a multiple of 16, so pack_2bit's tiles follow one another, as in FusedAdaLN)
    and their α's spread over the output channels, which the kernel applies in its epilogue as it applies one α,
    so the outputs are what the linears compute one by one. One wide matmul instead of two or three narrow ones,
    and with fp8 activations one quantisation of the input instead of one per linear. It owns the stacked codes (a
    buffer left out of the state dict); each linear's `packed` becomes a view of its rows; α and fp8 are read from
    the linears at each call."""

    def __init__(self, linears):
        super().__init__()
        self.linears = list(linears)  # a plain list: the block stays their owner
        if not self.fits(self.linears):
            raise ValueError("FusedLinears needs packed linears without bias, of one input width, each output width "
                             f"a multiple of {kernel.TILE_N}")
        self.widths = [m.out_features for m in self.linears]
        _stack_codes(self, self.linears)

    @staticmethod
    def fits(linears):
        """Whether these linears can be fused: packed, no bias, one input width, each width on the 16-row tile."""
        return all(isinstance(m, PackedTernaryLinear) and m.bias is None and m.in_features == linears[0].in_features
                   and m.out_features % kernel.TILE_N == 0 for m in linears)

    def forward(self, x):
        x = _autocast(x)
        alphas = torch.cat([m.alphas.expand(m.out_features) for m in self.linears])  # (N,) float32
        first = self.linears[0]
        y = kernel.ternary_matmul_op(x, self.packed, alphas, sum(self.widths), first.in_features, None, first.fp8)
        return y.split(self.widths, -1)


def fuse(model):
    """Give a packed TerDiT its fused matmuls: the one-matmul adaLN of all blocks (FusedAdaLN, which
    TerDiT.modulations uses from then on) and, in each block, wq/wk/wv and w1/w3 (FusedLinears). Call it after
    moving the model to its device (a later .to() copies the shared codes apart: correct, but stored twice)."""
    model.fused_adaln = FusedAdaLN(model.layers)
    for block in model.layers:  # linears that cannot be fused (FusedLinears.fits) stay apart
        attn, ff = block.attention, block.feed_forward
        if FusedLinears.fits(qkv := [attn.wq, attn.wk, attn.wv]):
            attn.fused_qkv = FusedLinears(qkv)
        if FusedLinears.fits(w13 := [ff.w1, ff.w3]):
            ff.fused_w13 = FusedLinears(w13)
    return model


def set_act(model, act):
    """Activations of a packed model's token-wise ternary matmuls (attention wq, wk, wv, wo; SwiGLU w1, w2, w3):
    "bf16" (the model's dtype, as loaded) or "fp8" (e4m3 per token, one scale each: kernel.py's W1.58A8 path).
    The adaLN linears, like FusedAdaLN, never take fp8 (FusedAdaLN.forward says why). Returns the model."""
    if act not in ("bf16", "fp8"):
        raise ValueError(f"act must be 'bf16' or 'fp8', got {act!r}")
    for name, m in model.named_modules():
        if isinstance(m, PackedTernaryLinear) and "adaLN" not in name:
            m.fp8 = act == "fp8"
    return model


def _ternary_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TernaryLinear) and m.ternary]


# -----------------------------------------------------------------------------
# writing

def _encode(model):
    """(name, encoding, logical shape, tensor) for every tensor to store, in the documented fixed order."""
    trits = {f"{name}.weight": export_ternary(m)[0] for name, m in _ternary_layers(model)}
    out = []
    for key, t in model.state_dict().items():
        if key in trits:
            out.append((key[: -len("weight")] + "packed", "trits", list(t.shape), trits[key]))
        elif key.endswith(".alphas"):
            out.append((key, "float32", list(t.shape), t.float()))
        else:
            out.append((key, "bfloat16", list(t.shape), t.to(torch.bfloat16)))
    return out


def write_packed(path, config, step, encoded, trits_per_byte):
    """Write one packed file (trits_per_byte 4 = 2-bit, 5 = base-3). Returns its size in bytes."""
    index = {"config": config, "step": step, "tensors": []}
    if trits_per_byte == 4:
        index["pack_2bit_probe"] = _layout_probe()
    data = bytearray()
    for name, encoding, shape, t in encoded:
        entry = {"name": name, "encoding": encoding, "shape": shape}
        if encoding == "trits" and trits_per_byte == 4:
            packed = kernel.pack_2bit(t).contiguous()
            entry["packed_shape"], blob = list(packed.shape), packed.numpy().tobytes()
        elif encoding == "trits":
            blob = pack_base3(t).tobytes()
        elif encoding == "bfloat16":
            blob = t.contiguous().view(torch.int16).numpy().tobytes()  # numpy has no bf16: write the raw bits
        else:
            blob = t.contiguous().numpy().tobytes()
        data += bytes(_align(len(data)) - len(data))  # zero padding: every tensor starts 64-byte aligned
        entry.update(offset=len(data), nbytes=len(blob))
        index["tensors"].append(entry)
        data += blob
    index_bytes = json.dumps(index).encode()
    crc = zlib.crc32(data, zlib.crc32(index_bytes))
    header = HEADER.pack(MAGIC, FORMAT_VERSION, trits_per_byte, len(index_bytes), len(data), crc)
    tmp = path + ".tmp"  # written aside, then renamed: a crash never leaves a half-written packed file
    with open(tmp, "wb") as f:
        f.write(header + index_bytes)
        f.write(bytes(_align(f.tell()) - f.tell()))  # zero padding up to the data section
        f.write(data)
    os.replace(tmp, path)
    return os.path.getsize(path)


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
        if len(head) < HEADER.size:
            raise ValueError(f"{path} is truncated ({size} bytes, shorter than the header): re-run pack.py")
        magic, version, trits_per_byte, index_len, data_len, crc = HEADER.unpack(head)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {version}, this pack.py reads version {FORMAT_VERSION}: "
                             "re-run this pack.py on the training checkpoint")
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
    """(header, state dict) of a packed file, checked (checksum, tile order); 2-bit trits stay in the kernel's
    layout as "<layer>.packed" uint8 tensors, everything else comes back as float32."""
    hdr = read_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER.size)
        index_bytes = f.read(hdr["index_bytes"])
        f.seek(hdr["data_start"])
        data = f.read()
    if zlib.crc32(data, zlib.crc32(index_bytes)) != hdr["crc32"]:
        raise ValueError(f"{path} is corrupt (checksum mismatch): re-run pack.py")
    v1 = hdr["trits_per_byte"] == 4 and hdr["pack_2bit_probe"] == V1_PROBE  # before the wgmma kernel: convert
    if hdr["trits_per_byte"] == 4 and hdr["pack_2bit_probe"] != _layout_probe() and not v1:
        raise ValueError(f"{path} was packed for a different kernel.pack_2bit tile order than this kernel.py: "
                         "load its .tdit3 twin instead, or re-run pack.py")
    state = {}
    for e in hdr["tensors"]:
        raw = np.frombuffer(data, dtype=np.uint8, count=e["nbytes"], offset=e["offset"])
        if e["encoding"] == "trits" and hdr["trits_per_byte"] == 4:
            t = torch.from_numpy(raw.copy()).view(e["packed_shape"])     # already in the kernel's layout
            if v1:
                t = kernel.pack_2bit(kernel.unpack_2bit(t, *e["shape"], perm=kernel._PERM_V1))
        elif e["encoding"] == "trits":
            t = kernel.pack_2bit(unpack_base3(raw, *e["shape"]))        # base 3 -> trits -> 2-bit layout
        elif e["encoding"] == "bfloat16":
            t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().view(e["shape"])
        else:
            t = torch.from_numpy(raw.view(np.float32).copy()).view(e["shape"])
        state[e["name"]] = t
    return hdr, state


def load_packed(path, device="cpu", dtype=torch.float32, act="bf16"):
    """A TerDiT in eval mode whose ternary layers are PackedTernaryLinear; its full-precision tensors (embedders,
    norm gains, biases, final layer) in dtype, α float32 and the 2-bit codes as stored whatever dtype is. act:
    the token-wise ternary matmuls' activations, "bf16" or "fp8" (set_act; ValueError otherwise).

    dtype=torch.bfloat16 is the lean inference model sample.py runs on a GPU, without autocast: bf16 from input
    to output (the file stores these tensors in bf16, so nothing is lost), the packed layers straight into the
    fused kernel, and model.lean() makes RMSNorm, modulation and RoPE skip float32 round trips. float32 (the
    default) is for a CPU, or for bf16 autocast as training runs; .to(dtype) later also leaves codes and α alone."""
    hdr, state = read_packed(path)
    # Build on the meta device (no memory, no init), swap in packed layers, then take every tensor from the file.
    model = TerDiT(config_from_dict(hdr["config"]), device="meta")
    for name, m in _ternary_layers(model):
        packed_shape = state.get(f"{name}.packed", torch.empty(0)).shape  # a missing one fails strict loading
        model.set_submodule(name, PackedTernaryLinear(m.in_features, m.out_features, m.bias is not None,
                                                      packed_shape, device="meta"))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is corrupt (its tensors do not match its config): {err}") from None
    return set_act(fuse(model.requires_grad_(False).eval().to(device=device, dtype=dtype)), act)


# -----------------------------------------------------------------------------
# the reference's official checkpoints (Hugging Face lucky-lance/TerDiT)

REFERENCE_MODELS = {"DiT_Llama_600M_patch2": "600M", "DiT_Llama_3B_patch2": "4.2B"}  # its registry -> model.SIZES
REFERENCE_WEIGHTS = "consolidated_ema_ternary.00-of-01.pth"


# The reference trained on an ImageFolder of class folders "0" ... "999", whose labels are the folders' ranks sorted
# as strings ("0", "1", "10", "100", ...): ImageNet class c is its label REFERENCE_LABELS[c].
REFERENCE_LABELS = torch.argsort(torch.tensor(sorted(range(1000), key=str))).tolist()  # inverse of the string order


def unpack_hqq_2bit(w):
    """hqq's 2-bit layout, uint8 (out/4, in) -> int8 trits (out, in): codes = trit + 1, and byte row i holds rows
    i, i + out/4, i + 2·out/4, i + 3·out/4 in bits 7-6, 5-4, 3-2, 1-0."""
    return torch.cat([(w >> s) & 3 for s in (6, 4, 2, 0)]).to(torch.int8) - 1


def read_reference(folder):
    """(config, state dict of a TerDiT) from an official checkpoint folder. Each ternary layer's latent weight
    becomes its trits: ternarize(W̃) = W̃ (γ = mean|W̃| <= 1), so the QAT forward computes the reference's α·W̃.
    The label table's rows are permuted so that our label c is ImageNet class c (REFERENCE_LABELS)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the one class its pickle may build
            train_args = vars(torch.load(os.path.join(folder, "model_args.pth"), weights_only=True))
        state = torch.load(os.path.join(folder, REFERENCE_WEIGHTS), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"'{folder}' is not an official TerDiT checkpoint folder (model_args.pth and "
                         f"{REFERENCE_WEIGHTS}): {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None
    name = train_args.get("model")
    if name not in REFERENCE_MODELS or train_args.get("num_classes") != 1000 or train_args.get("image_size", 0) % 16:
        raise ValueError(f"'{folder}' holds {name} at {train_args.get('image_size')} px with "
                         f"{train_args.get('num_classes')} classes: only {', '.join(REFERENCE_MODELS)}, ImageNet (1000 classes) "
                         f"and a size divisible by 16 are supported")
    config = TerDiTConfig(**SIZES[REFERENCE_MODELS[name]], input_size=train_args["image_size"] // 8,
                          in_channels=4, num_classes=1000, qk_norm=bool(train_args.get("qk_norm", False)),
                          learn_sigma=True, patch_layout="cpp", reference_cfg=True)
    model = TerDiT(config, device="meta")
    ternary = {f"{n}.weight" for n, _ in _ternary_layers(model)}
    state = {k: unpack_hqq_2bit(v).float() if k in ternary else v.float() for k, v in state.items()}
    table = state["y_embedder.embedding_table.weight"]
    state["y_embedder.embedding_table.weight"] = table[REFERENCE_LABELS + [1000]]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"'{folder}': its weights do not match {name}: {str(err).splitlines()[0]}") from None
    return asdict(config), model.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# the CLI

def _mb(n):
    return f"{n:>12,d} bytes ({n / 1e6:8.2f} MB)"


def relayout_packed(src, out):
    """Rewrite an older packed file in today's layouts: the legacy "ppc" patch layout in the reference's "cpp"
    one (model.to_reference_patch_layout: the patch embedder's columns permuted), and 2-bit codes of the older
    tile order (read_packed converts them) in kernel.py's. The same values, exactly. Returns the new file's size."""
    hdr, state = read_packed(src)
    state, config = to_reference_patch_layout(state, hdr["config"])
    shapes = {e["name"]: e for e in hdr["tensors"]}
    decode = {"trits": lambda t, e: kernel.unpack_2bit(t, *e["shape"]), "bfloat16": lambda t, e: t.to(torch.bfloat16),
              "float32": lambda t, e: t}  # write_packed takes what _encode gives: trits, bf16, float32
    encoded = [(name, e["encoding"], e["shape"], decode[e["encoding"]](state[name], e)) for name, e in shapes.items()]
    return write_packed(out, config, hdr["step"], encoded, hdr["trits_per_byte"])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pack a TerDiT checkpoint (EMA weights) for deployment.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training checkpoint written by train.py, an official TerDiT "
                        "checkpoint folder (model_args.pth + consolidated_ema_ternary.00-of-01.pth), or an older packed "
                        "file to rewrite in today's patch layout and tile order")
    parser.add_argument("--out", required=True, help="2-bit output file (e.g. terdit.tdit); the base-3 twin "
                                                     "goes next to it (terdit.tdit3)")
    parser.add_argument("--force", action="store_true", help="overwrite existing --out files that are not packed models")
    args = parser.parse_args(argv)

    for out in (args.out, base3_path(args.out)):  # checked before the work: both files are written at the end
        try:
            data.check_output(out, [args.ckpt])
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")
        if os.path.isfile(out) and os.path.getsize(out) and not is_packed(out) and not args.force:
            sys.exit(f"error: {out} exists and is not a packed model: pass --force to overwrite it, or choose another --out")

    if os.path.isfile(args.ckpt) and is_packed(args.ckpt):
        try:
            print(f"rewrote {args.ckpt} in today's patch layout and tile order: {args.out}, "
                  f"{_mb(relayout_packed(args.ckpt, args.out))}")
        except ValueError as err:
            sys.exit(f"error: {err}")
        return
    if os.path.isdir(args.ckpt):
        try:
            config, model = read_reference(args.ckpt)
        except ValueError as err:
            sys.exit(f"error: {err}")
        ckpt = {"model_config": config, "step": None}
    else:
        try:
            ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        except Exception as err:
            sys.exit(f"error: {args.ckpt} is not a readable torch checkpoint ({type(err).__name__})")
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict) or "ema" not in ckpt:
            sys.exit(f"error: {args.ckpt} is not a TerDiT training checkpoint (needs 'ema' and 'model_config')")
        if not ckpt["model_config"].get("ternary", False):
            sys.exit(f"error: {args.ckpt} holds a full-precision model (ternary=False): there is nothing to pack")
        try:
            model = TerDiT(config_from_dict(ckpt["model_config"]), device="meta")
            model.load_state_dict(ckpt["ema"], strict=True, assign=True)  # the EMA weights are the ones to deploy
        except (TypeError, RuntimeError) as err:
            sys.exit(f"error: {args.ckpt}'s EMA weights do not match its model_config ({str(err).splitlines()[0]})")

    encoded = _encode(model)
    step = ckpt.get("step")
    size2 = write_packed(args.out, ckpt["model_config"], step, encoded, trits_per_byte=4)
    size3 = write_packed(base3_path(args.out), ckpt["model_config"], step, encoded, trits_per_byte=5)
    n_ternary = sum(m.weight.numel() for _, m in _ternary_layers(model))
    n_total = sum(p.numel() for p in model.parameters())
    print(f"packed the EMA weights of step {step}: {n_total:,d} parameters, "
          f"{n_ternary:,d} ({100 * n_ternary / n_total:.1f}%) of them ternary")
    if os.path.isfile(args.ckpt):
        print(f"training checkpoint  {args.ckpt}: {_mb(os.path.getsize(args.ckpt))}")
    print(f"EMA weights in bf16  (reference): {_mb(2 * n_total)}")
    print(f"2-bit packing        {args.out}: {_mb(size2)}")
    print(f"base-3 packing       {base3_path(args.out)}: {_mb(size3)}")


if __name__ == "__main__":
    main()
