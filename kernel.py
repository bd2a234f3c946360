"""
Fused 2-bit unpack + tensor-core matmul for ternary weights: Y = alpha * (X @ W~^T) + b, W~ in {-1,0,+1}.

    python -m pytest tests/test_kernel.py -v          # CPU tests always; GPU tests need CUDA + cupy
    python bench.py --what kernels --out bench_results/kernels_h200.md

References: TerDiT (arXiv 2405.14854); Marlin (IST-DASLab/marlin) and its 2-bit fork TriRun
(NolanoOrg/TriRun) for the offline re-pack + magic-number dequant; CUTLASS example 55 and vLLM's Machete
for the mixed-input wgmma (the weight as wgmma's register operand); PTX ISA for mma.m16n8k16 and wgmma.
The CUDA sources are in kernel.cu; this file lays out the bits, compiles, picks a kernel and launches it.

How the packed matmul works
---------------------------
Storage. A trit w becomes the code q = w + 1 in {0,1,2}, 2 bits, 16 codes per 32-bit word. W (N, K) is
zero-padded to (Np, Kp) = (16*, 128*) and cut into tiles of 16 rows x 128 k. One tile is 512 bytes: 32
lanes x 16 bytes, so a warp fetches a tile with a single coalesced 16-byte load per lane, and what lane
(g = lane/4, t = lane%4) receives is *exactly* its A-fragments of 8 consecutive k16 steps, in register
order: word w holds steps 2w and 2w+1, i.e. rows g and g+8 at columns k = 16s + 2t, 16s + 2t + 1,
16s + 8 + 2t, 16s + 9 + 2t of each step s (the m16n8k16 A fragment; k is not permuted). Word w holds 8
"pairs"; pair j has its low code at bit 2j, its high code at bit 16+2j, so it turns into one f16x2/bf16x2
register with two instructions (LOP3 + FMA, never cvt):
    (word >> s) & (0x00030003 << p) | magic   ->  two floats  magic + q*4^(p/2)      (exact)
    fma(that, 4^(-p/2), -(magic*4^(-p/2) + 1))   ->  q - 1 in {-1, 0, 1}            (exact)
magic is 128.0 for bf16 (7 mantissa bits: 3 pairs per shift) and 1024.0 for fp16 (10 bits: 5 per shift).

Roles. We compute Y^T = W X^T: the dequantised weights are the A operand (16 output channels per warp) and
the activations the B operand (the tokens), so the smallest M tile is 8, not 16 -- good for adaLN/GEMV. On
Hopper this is also what wgmma wants: its A operand may come from registers (where we dequantise), B must
come from shared memory; and a warpgroup's wgmma A fragment is four warps' mma.sync A fragments stacked, so
one packing serves both kernels.

Four kernels (kernel.cu), alpha (a device scalar, or one per output channel for fused linears) and the bias
applied in the epilogue:
  tmv (mma.sync, any GPU from sm_80): the GEMV, M <= 16 (adaLN: M = 2 x batch). Latency sets its time, so
    it has no pipeline and little code: each warp's first instructions load all its weight words into
    registers (one 16-byte load per lane and k128 chunk is exactly the warp's A fragments), the CTA copies
    the M rows of X into shared memory once (XOR-swizzled: 16-byte piece ^ row%8, read with ldmatrix.x4,
    conflict-free), each warp multiplies its chunks, the CTA sums its warps. A CTA = TN n16-tiles x KW warps
    along K; it covers all of K (or 1/CS of it, over a cluster as below), so nothing waits on a ring slot.
    Staged tiles (name ending in "s") copy X first and each chunk's words through shared memory, one cp.async
    group per chunk, so that a warp multiplies a chunk as soon as it lands.
  tmm (mma.sync m16n8k16, any GPU from sm_80): M = 17..63 on Hopper, from M = 17 elsewhere. Weights and X
    stream through a 3-8 stage cp.async ring in shared memory; a CTA owns a BN x BM block of Y; warps are laid
    out WN x WM x WK: WK > 1 warp groups take different k128 chunks of each stage.
  wgmm / wgmm8 (wgmma, sm_90a): M >= 64 on Hopper, and M = 9..16 where N is large (16-token tiles: the GEMV
    copies all of X's rows into each of its many CTAs before it multiplies, they stream X and W chunk by chunk);
    wgmm8 for ternary x fp8 activations (W1.58A8, opt-in: fp8=True). WGN warpgroups each own 64 channels; per k16
    step (k32 for fp8) a warpgroup issues an asynchronous wgmma.m64n<BM> whose A is its dequantised weights in
    registers and whose B, the X tile, the tensor cores read from shared memory through a matrix descriptor (the
    canonical K-major layout with the 128-byte swizzle: 16-byte piece c of row r at piece c ^ r%8, 8-row groups 1024
    bytes apart). The operands arrive through a ring of stages filled by the copy engine (TMA): thread 0 issues a
    stage's copies (the CTA's weight tiles in one, through a 3-D tensor map of the codes: _w_map), which count their
    bytes into the stage's mbarrier; warps release stages through mbarriers, so the main loop has no CTA barrier and
    no address arithmetic. 16-bit X is read through a tensor map too (_x_map: the driver's cuTensorMapEncodeTiled
    through ctypes), whose copies write the swizzle themselves. Without a cluster split the epilogue scales and
    rounds in registers and stores the tile through stmatrix and shared memory in 16-byte pieces. For fp8, quant8
    first turns each token's row into e4m3 codes and one float32 scale (amax / 448), written as the shared-memory
    image of a stage (chunk-major, k permuted within each 16 as dequant8 orders the weights' bytes, pieces
    swizzled): one bulk copy per stage. Trits are exact in e4m3: two PRMTs per register turn 4 codes into 4 e4m3
    bytes; wgmma.e4m3 runs at twice the bf16 rate; the epilogue multiplies by alpha and the token's scale. A
    warpgroup dequantises the next group of 4 wgmmas into a second register set while the current one multiplies.
When (N/BN)*(M/BM) CTAs cannot fill the SMs, K is also split over a thread-block *cluster* of CS = 2..8 CTAs
(Hopper) whose partial tiles are summed through distributed shared memory: one launch, no workspace, memset or
atomics, deterministic, CUDA-graph safe. tmv and tmm read the other CTAs' tiles (mapa + ld.shared::cluster); in
wgmm each CTA pushes the partial sums of the rows another CTA stores straight from its accumulators with st.async,
which counts the bytes on that CTA's mbarrier, so no cluster barrier has to publish them (ptxas turns a barrier's
cluster-scope release into a GPU-wide memory fence). When the tiles fill the SMs a few times
over but leave the last wave at most half full (3072->9216 at M = 512: 144 tiles of 128 x 256 for 132 SMs), the
wgmma kernels run the full waves as one launch and the last wave's tiles as a second one whose K is split over
clusters (tiles.launches): it takes a fraction of a tile's time, not a whole one. Which tile and split runs a problem:
tiles.py (the tile catalogue, the fastest choice per shape and M measured by `python bench.py --sweep`, and
heuristics for other shapes).

What limits it (H200: 4.8 TB/s, ~990 TFLOP/s dense bf16; cuBLAS reaches ~800 on these shapes). At K=N=3072
the bf16 weights are 18.9 MB, the 2-bit ones 2.4 MB: 8x fewer bytes. Each token adds 2*K*N FLOPs but no
weight bytes, so a 2-bit kernel is compute bound from M ~ 25 (bf16: M ~ 200). At small M it is latency bound,
not 8x faster: per-CTA timers (globaltimer) on an H200 at K = N = 3072, M = 1 put the CTAs' partial sums in
shared memory 2.3 us after they start (the first cold DRAM read alone takes ~0.6-0.9 us, the 2.4 MB ~0.6 us
more, the dequantisation ~0.3 us of the GPU's issue slots), then 0.3 us to sum and store, plus ~0.5 us of launch
per graph node: 3.5-3.6 us against cuBLAS's 9.3-10.3 (2.7-2.9x; tmm, with its ring, cluster barriers and 4x
the code, took 4.8). From M ~ 256 both are tensor-core bound. mma.sync tops out near 360 TFLOP/s; wgmm reaches
718-787 TFLOP/s at M = 8192 on the 4.2B shapes, 0.99-1.14x cuBLAS, and wgmm8 with quant8 1.28-1.68x (README).
At M = 256-512 3072->3072 stays at 0.88-0.89x: few output tiles for 132 SMs (64 of 192 x 128 at M = 512, K split
in 2) and 12 chunks per CTA. Per-CTA timers (H200) there: ~1 us until the first stage lands, ~11 us of main
loop, ~3.3 us of cluster epilogue (before the st.async push, which took 0.3 us off), against cuBLAS's 14.9 us for
the whole (README). Nsight Compute on wgmm8 (M = 8192, an earlier session) showed the warps mostly waiting on
mbarriers while L2 and DRAM were far from busy: each warpgroup's chain of wait, dequantise, multiply leaves the
tensor cores partly idle. Off Hopper, M >= 512 expands the codes to a transient 16-bit matrix for cuBLAS instead
(below).
"""

import ctypes
import functools
import os
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

import tiles

try:
    import cupy as cp
except Exception:  # CPU-only machines: everything still works through the reference path
    cp = None

# -----------------------------------------------------------------------------
# packing (plain torch, CPU or GPU, deterministic)

TILE_N, TILE_K = 16, 128
# view of the padded (Np, Kp) code matrix whose dims are  n = (Tn, r0, g)  and  k = (Ck, w, s1, r1, t, h):
#   Tn n16-tile, r0 upper/lower 8 rows of the A fragment, g = lane/4 | Ck k128-chunk, w word (= pair of k16
#   steps), s1 step within the pair, r1 low/high 8 columns of the fragment, t = lane%4, h pair element.
_PERM = (0, 3, 2, 7, 4, 8, 5, 6, 1)  # -> (Tn, Ck, g, t, w | h, s1, r1, r0): the last 4 dims = 16 codes/word
# Files packed before the wgmma kernel (pack.py converts them on load) permuted k inside each 32-k block as
# k = (w, t, s1, r1, h), so that the mma.sync kernel could read X with 16-byte loads; wgmma needs k in order.
_PERM_V1 = (0, 3, 2, 5, 4, 8, 6, 7, 1)


def _padded(N, K):
    return -(-N // TILE_N) * TILE_N, -(-K // TILE_K) * TILE_K


def _dims(Np, Kp, perm):
    """The (n, k) dims of the padded code matrix in the order the comment above names them, for perm."""
    return (Np // 16, 2, 8, Kp // 128, 4) + ((2, 2, 4, 2) if perm == _PERM else (4, 2, 2, 2))


def pack_2bit(trits: torch.Tensor, perm=_PERM) -> torch.Tensor:
    """int8 trits (N, K) in {-1,0,1} -> uint8 (Np, Kp/4): codes trit+1, 4 per byte, mma-fragment order.
    perm=_PERM_V1 writes the older files' tile order (tests only)."""
    if trits.dim() != 2:
        raise ValueError(f"pack_2bit expects a 2-D (N, K) tensor, got shape {tuple(trits.shape)}")
    if trits.numel() and (trits.min() < -1 or trits.max() > 1):
        raise ValueError("pack_2bit expects values in {-1, 0, 1}")
    N, K = trits.shape
    Np, Kp = _padded(N, K)
    q = torch.ones(Np, Kp, dtype=torch.uint8, device=trits.device)  # code 1 == trit 0 in the padding
    q[:N, :K] = (trits + 1).to(torch.uint8)
    q = q.view(_dims(Np, Kp, perm)).permute(*perm).reshape(-1, 4)
    b = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)  # little-endian: code i at bit 2i of a word
    return b.view(Np, Kp // 4)


def unpack_2bit(packed: torch.Tensor, N: int, K: int, perm=_PERM) -> torch.Tensor:
    """Exact inverse of pack_2bit -> int8 (N, K). perm=_PERM_V1 reads the tile order of older files."""
    Np, Kp = _padded(N, K)
    if packed.dtype != torch.uint8 or packed.numel() != Np * Kp // 4:
        raise ValueError(f"packed must be uint8 with {Np * Kp // 4} elements for N={N}, K={K}")
    b = packed.reshape(-1)
    q = torch.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
    dims = _dims(Np, Kp, perm)
    q = q.view(*[dims[i] for i in perm]).permute(*[perm.index(i) for i in range(9)]).reshape(Np, Kp)
    return q[:N, :K].to(torch.int8) - 1


def ternary_matmul_ref(x, packed, alpha, N, K, bias=None, fp8=False):
    """Plain-PyTorch reference: unpack, cast, F.linear(x, alpha * W, bias). fp8: x quantised per token to e4m3
    first (fp8_codes), the products summed in float32 and scaled by alpha * the token's scale, as wgmm8 does."""
    w = unpack_2bit(packed.to(x.device), N, K)
    if not fp8:
        y = F.linear(x, alpha.to(device=x.device, dtype=x.dtype).view(-1, 1) * w.to(x.dtype))
        return y if bias is None else y + bias.to(y.dtype)
    q, s = fp8_codes(x.reshape(-1, K))
    y = F.linear(q.float(), w.float()) * (alpha.to(x.device).float() * s[:, None])
    y = y if bias is None else y + bias.to(x.device).float()
    return y.to(x.dtype).view(*x.shape[:-1], N)

# -----------------------------------------------------------------------------
# fp8 activations (W1.58A8): each token's row of X becomes e4m3 codes and one float32 scale, s = amax / 448
# (e4m3's largest finite value), so X ~ s * q; -1, 0, 1 are exact in e4m3, so the tensor cores multiply codes
# by trits in fp8 at twice the bf16 rate, and the epilogue applies alpha * s. X's image for wgmm8 is chunk-
# major with k permuted as dequant8 orders the weights' bytes (kernel.cu) and the rows' 16-byte pieces swizzled,
# so that a tile of it is one contiguous block: one bulk copy per pipeline stage.

FP8_MAX = 448.0
FP8_ROWS = 256  # the image's token count is padded (zero rows) to a multiple of the tallest wgmm8 tile


def fp8_codes(x2):
    """Per-token e4m3 quantisation of x2 (M, K): codes (M, K) float8_e4m3fn and scales (M,) float32."""
    amax = x2.abs().amax(dim=-1).float()
    top = torch.full_like(amax, FP8_MAX)  # tensor / tensor: one rounding, as quant8 (a Python scalar takes two)
    inv = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
    return (x2.float() * inv[:, None]).to(torch.float8_e4m3fn), amax / top


def fp8_image(q, Mp):
    """Codes q (M, Kp) as wgmm8 reads them: uint8 (Kp/128, Mp, 128); rows >= M zero; in each 16 k, k = 8 r1 +
    2 t + h sits at byte 4 t + 2 h + r1; the 16-byte piece p of row m at p ^ m % 8."""
    M, Kp = q.shape
    b = torch.zeros(Mp, Kp, dtype=torch.uint8, device=q.device)
    b[:M] = q.view(torch.uint8)
    b = b.view(Mp, Kp // 16, 2, 4, 2).permute(0, 1, 3, 4, 2).reshape(Mp, Kp // 128, 8, 16)
    swz = torch.arange(8, device=q.device) ^ (torch.arange(Mp, device=q.device) % 8)[:, None]  # (Mp, 8), an involution
    b = b.gather(2, swz[:, None, :, None].expand_as(b))
    return b.permute(1, 0, 2, 3).reshape(Kp // 128, Mp, 128)


def quantize_fp8_ref(x2, Mp):
    """Reference of the quant8 kernel: (image, scales padded to Mp with zeros) for x2 (M, Kp), Kp % 128 == 0."""
    q, s = fp8_codes(x2)
    return fp8_image(q, Mp), F.pad(s, (0, Mp - s.shape[0]))

# -----------------------------------------------------------------------------
# compiling kernel.cu (NVRTC through cupy, once per configuration; the configuration arrives as #defines)

_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.cu")

def _magic_consts(bf16):
    """(PER, MAGIC, SCALES, BIASES) of the LOP3/FMA dequant; exact for codes 0..2 (tested on CPU)."""
    dt, per, magic = (torch.bfloat16, 3, 128.0) if bf16 else (torch.float16, 5, 1024.0)
    bits = lambda v: int(torch.tensor([v], dtype=dt).view(torch.int16).item()) & 0xFFFF
    x2 = lambda v: bits(v) * 0x10001
    return per, x2(magic), [x2(4.0 ** -i) for i in range(5)], [x2(-(magic * 4.0 ** -i + 1)) for i in range(5)]


def _wgmma_source(bm, dt):
    """The wgmma_mma device function for tile width bm and input type dt (bf16, f16: k16; e4m3: k32, which
    takes no transpose flag): one asm statement with bm/2 accumulator operands."""
    n = bm // 2
    d = ", ".join(f"%{i}" for i in range(n))
    a = ", ".join(f"%{n + i}" for i in range(4))
    ops = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    shape, flags = ("k32", "1, 1") if dt == "e4m3" else ("k16", "1, 1, 0")
    return (f"__device__ __forceinline__ void wgmma_mma(float* d, const u32* a, u64 desc) {{\n"
            f'  asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{n + 5}, 0;\\n"\n'
            f'    "wgmma.mma_async.sync.aligned.m64n{bm}{shape}.f32.{dt}.{dt} {{{d}}}, {{{a}}}, %{n + 4}, p, {flags}; }}"\n'
            f'    : {ops}\n'
            f'    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));\n}}\n')


def _source(kind, name=None, cs=1, bf16=True, bias=0, avec=False):
    """kernel.cu with the #defines of one configuration in front. kind: TMV, TMM, WGMM, WGMM8, QUANT8 or DEQUANT;
    bias: 0 none, 1 in the output dtype, 2 float32; avec: alpha per output channel instead of one."""
    d = {kind: 1}
    if kind == "QUANT8":
        d.update(IS_BF16=int(bf16))
    elif kind != "DEQUANT":
        per, magic, sc, bi = _magic_consts(bf16)
        d.update(CS=cs, PER=per, MAGIC=f"{magic:#x}u", SCALES=",".join(f"{v:#x}u" for v in sc),
                 BIASES=",".join(f"{v:#x}u" for v in bi), DT='"bf16"' if bf16 else '"f16"', IS_BF16=int(bf16),
                 BIAS=bias, AVEC=int(avec), CLUSTER=f"__cluster_dims__(1, 1, {cs})" if cs > 1 else "")
    if kind == "TMM":
        d.update(zip(("WNT", "WMT", "WN", "WM", "WK", "ST", "NACC"), tiles.CONFIGS[name]))
    if kind == "TMV":
        d.update(zip(("TN", "KW", "MT", "CPW", "STAGE"), tiles.gemv_tile(name)))
    if kind in ("WGMM", "WGMM8"):
        d.update(zip(("WGN", "BM", "ST", "MINB"), (tiles.WG_CONFIGS if kind == "WGMM" else tiles.WG8_CONFIGS)[name]))
    with open(_CU) as f:
        src = f.read()
    if kind in ("WGMM", "WGMM8"):
        dt = "e4m3" if kind == "WGMM8" else "bf16" if bf16 else "f16"
        src = src.replace("WGMMA_FN\n", _wgmma_source(d["BM"], dt))
    return "".join(f"#define {k} {v}\n" for k, v in d.items()) + src


@functools.lru_cache(maxsize=None)
def _kernel(name, cs, bf16, bias, avec, device):
    """Compile (NVRTC) and cache one config; must first run outside CUDA-graph capture."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("kernel.py: call ternary_matmul once eagerly (to compile) before graph capture")
    kind, fn = (("WGMM", "wgmm") if name in tiles.WG_CONFIGS else ("WGMM8", "wgmm8") if name in tiles.WG8_CONFIGS
                else ("TMV", "tmv") if tiles.gemv_tile(name) else ("TMM", "tmm"))
    options = ("-std=c++17", "-arch=sm_90a") if kind.startswith("WGMM") else ("-std=c++17",)  # wgmma: sm_90a only
    with cp.cuda.Device(device):
        k = cp.RawModule(code=_source(kind, name, cs, bf16, bias, avec), options=options).get_function(fn)
        nthr, smem = tiles.dims(name)[2:]  # a GEMV tile's is its most (16 tokens); _launch checks what it uses
        if smem + k.shared_size_bytes > 48 * 1024:  # past 48 KB with the static arrays: opt in
            k.max_dynamic_shared_size_bytes = min(smem, _gpu(device).smem - k.shared_size_bytes)
    if k.max_threads_per_block < nthr:
        raise RuntimeError(f"kernel.py: config {name} compiled to {k.num_regs} registers per thread, too many for "
                           f"{nthr} threads per CTA on this GPU")
    return k


class _GPU(NamedTuple):
    sms: int     # multiprocessors
    wgmma: bool  # Hopper (sm_90): wgmma, and the clusters that split K
    smem: int    # the most dynamic shared memory a CTA may opt in to, bytes


@functools.lru_cache(maxsize=None)
def _gpu(device):
    """What the dispatch needs to know of a CUDA device index, read once."""
    p = torch.cuda.get_device_properties(device)
    return _GPU(p.multi_processor_count, (p.major, p.minor) == (9, 0), p.shared_memory_per_block_optin)

@functools.lru_cache(maxsize=None)
def _stream(ptr, device):
    """cupy view of a torch stream (cached: creating one per call costs Python time and a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr, device)


def _bias_kind(bias, dtype):
    return 0 if bias is None else 1 if bias.dtype == dtype else 2


def _launch(x2, packed, alpha, y, N, K, name, cs, bias=None, scales=None):
    """Launch one config on torch's current stream. x2 (M, Kp) contiguous (for a wgmm8 tile: the fp8 image
    (Kp/128, Mp, 128) and its scales (Mp,)), y (M, N) output, bias (N,) in y's dtype or float32, contiguous, or None."""
    M, Kp = y.shape[0], _padded(N, K)[1]
    bn, bm, nthr, smem = tiles.dims(name)
    if gv := tiles.gemv_tile(name):  # the GEMV's shared memory holds X's M rows of the CTA's chunks
        kcz, (_, kw, _, cpw, _) = -(-Kp // 128 // cs), gv
        smem = tiles.gemv_smem(name, M, kcz)
        if M > bm or kcz > kw * cpw or smem > _gpu(y.device.index).smem:
            raise ValueError(f"GEMV tile {name}/cs{cs} takes M <= {bm}, K <= {128 * kw * cpw * cs} and X's rows in "
                             f"shared memory ({smem} bytes here), got M={M}, K={K}")
    variant = (y.dtype == torch.bfloat16, _bias_kind(bias, y.dtype), alpha.numel() > 1, y.device.index)
    nt16 = _padded(N, K)[0] // 16
    wgmma = name in tiles.WG_CONFIGS or name in tiles.WG8_CONFIGS  # they read W through a tensor map too
    if wgmma and cs > tiles.max_split(name):
        raise ValueError(f"wgmma tile {name} splits K over at most {tiles.max_split(name)} CTAs, got {cs}")
    if name in tiles.WG_CONFIGS:  # wgmm reads X through a tensor map, passed by value
        xargs = (_x_map(x2.data_ptr(), M, Kp, bm),)
    elif scales is not None:  # wgmm8: quant8's image of X, its scales, its padded row count
        xargs = (cp.uint64(x2.data_ptr()), cp.uint64(scales.data_ptr()), cp.int32(x2.shape[1]))
    else:
        xargs = (cp.uint64(x2.data_ptr()),)
    wargs = _w_map(packed.data_ptr(), nt16, Kp // 128, bn // 16) if wgmma else cp.uint64(packed.data_ptr())
    args = (wargs, *xargs, cp.uint64(alpha.data_ptr()),
            cp.uint64(0 if bias is None else bias.data_ptr()), cp.uint64(y.data_ptr()),
            *(cp.int32(v) for v in (M, N, Kp // 128, nt16)))
    stream = _stream(torch.cuda.current_stream(y.device).cuda_stream, y.device.index)
    with cp.cuda.Device(y.device.index):
        if wgmma:  # output tiles t0.. of the problem, K split z ways
            for t0, n, z in tiles.launches(M, nt16 * 16, Kp, name, cs, _gpu(y.device.index).sms):
                _kernel(name, z, *variant)((n, 1, z), (nthr,), args + (cp.int32(t0),), shared_mem=smem, stream=stream)
        else:
            _kernel(name, cs, *variant)((-(-nt16 * 16 // bn), -(-M // bm), cs), (nthr,), args, shared_mem=smem,
                                        stream=stream)


@functools.lru_cache(maxsize=1)
def _encode_tiled():
    """The CUDA driver's cuTensorMapEncodeTiled (a host function: it only fills a 128-byte descriptor)."""
    f = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p] + [ctypes.c_int] * 4
    f.restype = ctypes.c_int
    return f


def _tensor_map(ptr, dtype, dims, strides, box, swizzle, what):
    """A CUtensorMap (the driver's cuTensorMapEncodeTiled) of the array at ptr as a one-element numpy array, which
    cupy passes by value. dtype: CU_TENSOR_MAP_DATA_TYPE (1 UINT16, 2 UINT32); dims and box innermost first,
    strides in bytes (dims 1..); swizzle: 0 none, 3 the 128-byte swizzle. No interleave, L2 promotion 128B,
    out-of-bounds elements read as zero."""
    buf = np.zeros(256, dtype=np.uint8)
    off = -buf.ctypes.data % 64  # the driver wants the map 64-byte aligned
    m = buf[off:off + 128].view(np.dtype((np.void, 128)))
    n = len(dims)
    err = _encode_tiled()(m.ctypes.data, dtype, n, ptr, (ctypes.c_uint64 * n)(*dims),
                          (ctypes.c_uint64 * (n - 1))(*strides), (ctypes.c_uint32 * n)(*box),
                          (ctypes.c_uint32 * n)(*[1] * n), 0, swizzle, 2, 0)
    if err:
        raise RuntimeError(f"kernel.py: cuTensorMapEncodeTiled failed (CUresult {err}) for {what} at {ptr:#x}")
    return m


@functools.lru_cache(maxsize=4096)
def _x_map(ptr, M, Kp, bm):
    """The tensor map of X (M, Kp), 16-bit row-major at ptr, through which wgmm's copies read it: boxes of 64 k x
    bm rows (128 bytes x bm), written to shared memory with the 128-byte swizzle; rows past M read as zeros.
    Cached per (pointer, shape, box): a CUDA graph replays the launch with the map it was captured with, and eager
    calls reuse the caching allocator's pointers."""
    return _tensor_map(ptr, 1, (Kp, M), (2 * Kp,), (64, bm), 3, f"X ({M}, {Kp})")


@functools.lru_cache(maxsize=4096)
def _w_map(ptr, nt16, kc, tiles_per_cta):
    """The tensor map of the packed codes (nt16 tiles x kc chunks x 512 bytes, as 32-bit words) at ptr, through
    which a wgmma CTA's one copy per stage reads its tiles_per_cta consecutive tiles' chunk (tiles past the end
    read as zeros): thread 0, which also multiplies, issues one copy instead of one per warp (README: what that
    gained). Cached as _x_map's."""
    return _tensor_map(ptr, 2, (128, kc, nt16), (512, 512 * kc), (128, 1, tiles_per_cta), 0, "W")


def quantize_fp8(x2, Mp):
    """quantize_fp8_ref on the GPU (the quant8 kernel): x2 (M, Kp) 16-bit contiguous on CUDA."""
    M, Kp = x2.shape
    q = torch.empty(Kp // 128, Mp, 128, dtype=torch.uint8, device=x2.device)
    s = torch.empty(Mp, dtype=torch.float32, device=x2.device)
    stream = _stream(torch.cuda.current_stream(x2.device).cuda_stream, x2.device.index)
    with cp.cuda.Device(x2.device.index):
        _aux_kernel("QUANT8", x2.dtype == torch.bfloat16, x2.device.index)((Mp,), (128,), (
            cp.uint64(x2.data_ptr()), cp.uint64(q.data_ptr()), cp.uint64(s.data_ptr()), cp.int32(M), cp.int32(Mp),
            cp.int32(Kp // 128)), stream=stream)
    return q, s


# -----------------------------------------------------------------------------
# large M off Hopper: expand to a 16-bit workspace, then cuBLAS. From M ~ 256 both paths are tensor-core
# bound, and cuBLAS (~780 TFLOP/s on Hopper) beats our mma.sync (~360) by more than the extra pass costs: one
# read of the 2-bit codes and one write of K*N 16-bit values (3072x3072: 2.4 + 18.9 MB, ~8 us), layer by layer
# into a transient buffer (one layer's worth of memory, reused). Small M, where 2 bits pay, never takes this path.

@functools.lru_cache(maxsize=None)
def _aux_kernel(kind, bf16, device):
    """The DEQUANT (expand codes) or QUANT8 (fp8 activations) kernel, compiled and cached like _kernel."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("kernel.py: call ternary_matmul once eagerly (to compile) before graph capture")
    with cp.cuda.Device(device):
        return cp.RawModule(code=_source(kind, bf16=bf16), options=("-std=c++17",)).get_function(kind.lower())


def _dequant_matmul(x2, packed, alpha, N, K, bias=None):
    """alpha * (x2 @ W~^T) + bias through a transient 16-bit copy of W~ (exact: -1, 0, 1) and cuBLAS."""
    w = torch.empty(N, K, dtype=x2.dtype, device=x2.device)
    words = N * K // 16
    one = 0x3F80 if x2.dtype == torch.bfloat16 else 0x3C00
    stream = _stream(torch.cuda.current_stream(x2.device).cuda_stream, x2.device.index)
    with cp.cuda.Device(x2.device.index):
        _aux_kernel("DEQUANT", True, x2.device.index)((-(-words // 256),), (256,), (
            cp.uint64(packed.data_ptr()), cp.uint64(w.data_ptr()), cp.int32(K), cp.int32(words), cp.uint32(one)),
            stream=stream)
    y = F.linear(x2, w)
    y = torch.mul(y, alpha, out=y)  # alpha in float32, one rounding to x's dtype
    return y if bias is None else y.add_(bias)


_warned = set()


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        print(f"WARNING: {msg}")


def ternary_matmul(x, packed, alpha, N, K, bias=None, config=None, fp8=False):
    """Y = alpha * (x @ W~^T) + bias for x (..., K) -> (..., N) in x.dtype, alpha one float32 scale or N of them (one
    per output channel: linears fused along N, pack.FusedLinears). Fused kernel on CUDA bf16/fp16 +
    cupy (wgmma on Hopper from M = 64, for wide layers from M = 9), else the reference. Off Hopper, from M = 512
    (K >= 1152, K % 128 == 0, N % 16 == 0): a transient 16-bit copy + cuBLAS. fp8: activations quantised per token
    to e4m3 (quant8, then wgmm8; Hopper only, the reference elsewhere). config=(name, cluster_size), name a tile
    or "dequant", overrides the choice (benchmarks/tests only)."""
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    if alpha.numel() not in (1, N):
        raise ValueError(f"alpha must hold one scale (per tensor) or N={N} (per output channel), got {alpha.numel()}")
    if not x.is_cuda:
        return ternary_matmul_ref(x, packed, alpha, N, K, bias, fp8)
    if x.dtype not in (torch.bfloat16, torch.float16):
        _warn_once(f"kernel.py: no fused kernel for {x.dtype}, using the slow reference ternary matmul")
        return ternary_matmul_ref(x, packed, alpha, N, K, bias, fp8)
    if cp is None:
        _warn_once("kernel.py: cupy not found, using the slow reference ternary matmul")
        return ternary_matmul_ref(x, packed, alpha, N, K, bias, fp8)
    if fp8 and not _gpu(x.device.index).wgmma:
        _warn_once("kernel.py: fp8 activations need a Hopper GPU (wgmma); using the slow reference ternary matmul")
        return ternary_matmul_ref(x, packed, alpha, N, K, bias, fp8)
    Np, Kp = _padded(N, K)
    if packed.dtype != torch.uint8 or packed.numel() != Np * Kp // 4 or packed.device != x.device:
        raise ValueError(f"packed must be a uint8 tensor from pack_2bit((N={N}, K={K})) on {x.device}")
    alpha = alpha.to(device=x.device, dtype=torch.float32).contiguous()
    if bias is not None:
        bias = bias.to(x.device)
        if bias.dtype not in (x.dtype, torch.float32):
            bias = bias.float()
        bias = bias.contiguous()
    if not packed.is_contiguous() or packed.data_ptr() % 16:
        packed = packed.clone(memory_format=torch.contiguous_format)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if Kp != K:
        x2 = F.pad(x2, (0, Kp - K))  # zero columns meet zero-trit padding; only for awkward K
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    M = x2.shape[0]
    sms, wgmma, _ = _gpu(x.device.index)
    if fp8:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M > 0:
            xq, scales = quantize_fp8(x2, -(-M // FP8_ROWS) * FP8_ROWS)
            name, cs = config or tiles.pick8(M, N, K, sms)
            if name not in tiles.WG8_CONFIGS:
                raise ValueError(f"fp8 activations take a wgmm8 tile ({', '.join(tiles.WG8_CONFIGS)}), got {name}")
            _launch(xq, packed, alpha, y, N, K, name, cs, bias, scales)
        return y.view(*lead, N)
    name, cs = config or tiles.pick(M, N, K, sms, wgmma)
    if name == "dequant":
        if K % 128 or N % 16:
            raise ValueError(f"the dequant path needs K % 128 == 0 and N % 16 == 0, got K={K}, N={N}")
        return _dequant_matmul(x2, packed, alpha, N, K, bias).view(*lead, N)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M > 0:
        if name in tiles.WG_CONFIGS and not wgmma:
            raise ValueError(f"config {name} needs wgmma (compute capability 9.0)")
        _launch(x2, packed, alpha, y, N, K, name, cs, bias)
    return y.view(*lead, N)


# -----------------------------------------------------------------------------
# the same function as a PyTorch custom op: what the model calls. torch.compile cannot trace into a cupy launch,
# but it treats a custom op as one opaque node whose output shape and dtype the fake implementation gives, so a
# packed model compiles with no graph break (and the op runs inside CUDA-graph capture like any kernel).

@torch.library.custom_op("terdit::ternary_matmul", mutates_args=())
def ternary_matmul_op(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, N: int, K: int,
                      bias: Optional[torch.Tensor] = None, fp8: bool = False) -> torch.Tensor:
    """ternary_matmul(x, packed, alpha, N, K, bias, fp8=fp8) with the automatic choice of path (no config: ops
    take tensors, ints and bools)."""
    return ternary_matmul(x, packed, alpha, N, K, bias, fp8=fp8)


@ternary_matmul_op.register_fake
def _(x, packed, alpha, N, K, bias=None, fp8=False):
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    return x.new_empty(*x.shape[:-1], N)
