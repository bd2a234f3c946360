"""
Running the fast kernels: the choice of tile for a problem on this GPU (its tuned table, else the rules of
tiles.py), the CUDA tensor maps the wgmma kernels read through, the launches on torch's current stream, fp8
activations (quant8, then wgmm8) and, off Hopper at large M, expanding the codes for cuBLAS.

    python -m pytest tests/test_fast.py -v -k poisoned       # every tile against the reference (CUDA + cupy)
"""

import ctypes
import functools
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import compile, tiles
from .layout import padded

try:
    import cupy as cp
except Exception:  # CPU-only machines: kernel.py runs the reference instead
    cp = None

FP8_ROWS = 256  # quant8's image pads the token count (zero rows) to a multiple of the tallest wgmm8 tile


class GPU(NamedTuple):
    sms: int     # multiprocessors
    wgmma: bool  # Hopper (sm_90): wgmma, and the clusters that split K
    smem: int    # the most dynamic shared memory a CTA may opt in to, bytes
    name: str    # the GPU whose tuned table applies: this one (torch.cuda.get_device_name), or one of its kind


@functools.lru_cache(maxsize=None)
def gpu(device):
    """What the dispatch needs to know of a CUDA device index, read once."""
    p = torch.cuda.get_device_properties(device)
    sms, wgmma = p.multi_processor_count, (p.major, p.minor) == (9, 0)
    return GPU(sms, wgmma, p.shared_memory_per_block_optin, tiles.stand_in(p.name, sms, wgmma))


def choose(M, N, K, device, fp8=False):
    """(tile, cluster split) for a problem on a CUDA device: its GPU's tuned table, else the rules."""
    g = gpu(device)
    if fp8:
        return tiles.pick8(M, N, K, g.sms, tiles.tuned(g.name, "fp8"))
    return tiles.pick(M, N, K, g.sms, g.wgmma, tiles.tuned(g.name, "bf16"))


@functools.lru_cache(maxsize=None)
def _stream(ptr, device):
    """cupy view of a torch stream (cached: creating one per call costs Python time and a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr, device)


def stream(device):
    """cupy view of torch's current stream on a torch CUDA device."""
    return _stream(torch.cuda.current_stream(device).cuda_stream, device.index)


def _bias_kind(bias, dtype):
    return 0 if bias is None else 1 if bias.dtype == dtype else 2


def launch_tile(x2, tiled, alpha, y, N, K, name, cs, bias=None, scales=None):
    """Launch one config on torch's current stream. x2 (M, Kp) contiguous (for a wgmm8 tile: the fp8 image
    (Kp/128, Mp, 128) and its scales (Mp,)), y (M, N) output, bias (N,) in y's dtype or float32, contiguous, or None."""
    M, (Np, Kp), g = y.shape[0], padded(N, K), gpu(y.device.index)
    bn, bm, nthr, smem = tiles.dims(name)
    if gv := tiles.gemv_tile(name):  # the GEMV's shared memory holds X's M rows of the CTA's chunks
        kcz, (_, kw, _, cpw, _) = -(-Kp // 128 // cs), gv
        smem = tiles.gemv_smem(name, M, kcz)
        if M > bm or kcz > kw * cpw or smem > g.smem:
            raise ValueError(f"GEMV tile {name}/cs{cs} takes M <= {bm}, K <= {128 * kw * cpw * cs} and X's rows in "
                             f"shared memory ({smem} bytes here), got M={M}, K={K}")
    variant = (y.dtype == torch.bfloat16, _bias_kind(bias, y.dtype), alpha.numel() > 1, y.device.index, g.smem)
    nt16 = Np // 16
    wgmma = name in tiles.WG_CONFIGS or name in tiles.WG8_CONFIGS  # they read W through a tensor map too
    if wgmma and cs > tiles.max_split(name):
        raise ValueError(f"wgmma tile {name} splits K over at most {tiles.max_split(name)} CTAs, got {cs}")
    if name in tiles.WG_CONFIGS:  # wgmm reads X through a tensor map, passed by value
        xargs = (_x_map(x2.data_ptr(), M, Kp, bm),)
    elif scales is not None:  # wgmm8: quant8's image of X, its scales, its padded row count
        xargs = (cp.uint64(x2.data_ptr()), cp.uint64(scales.data_ptr()), cp.int32(x2.shape[1]))
    else:
        xargs = (cp.uint64(x2.data_ptr()),)
    wargs = _w_map(tiled.data_ptr(), nt16, Kp // 128, bn // 16) if wgmma else cp.uint64(tiled.data_ptr())
    args = (wargs, *xargs, cp.uint64(alpha.data_ptr()),
            cp.uint64(0 if bias is None else bias.data_ptr()), cp.uint64(y.data_ptr()),
            *(cp.int32(v) for v in (M, N, Kp // 128, nt16)))
    s = stream(y.device)
    with cp.cuda.Device(y.device.index):
        if wgmma:  # output tiles t0.. of the problem, K split z ways
            for t0, n, z in tiles.launches(M, nt16 * 16, Kp, name, cs, g.sms):
                compile.kernel(name, z, *variant)((n, 1, z), (nthr,), args + (cp.int32(t0),), shared_mem=smem,
                                                  stream=s)
        else:
            compile.kernel(name, cs, *variant)((-(-nt16 * 16 // bn), -(-M // bm), cs), (nthr,), args,
                                               shared_mem=smem, stream=s)

# -----------------------------------------------------------------------------
# tensor maps: the descriptors through which the copy engine (TMA) of the wgmma kernels reads W and X

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
        raise RuntimeError(f"fast: cuTensorMapEncodeTiled failed (CUresult {err}) for {what} at {ptr:#x}")
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
    """The tensor map of the tiled codes (nt16 tiles x kc chunks x 512 bytes, as 32-bit words) at ptr, through
    which a wgmma CTA's one copy per stage reads its tiles_per_cta consecutive tiles' chunk (tiles past the end
    read as zeros): thread 0, which also multiplies, issues one copy instead of one per warp. Cached as _x_map's."""
    return _tensor_map(ptr, 2, (128, kc, nt16), (512, 512 * kc), (128, 1, tiles_per_cta), 0, "W")

# -----------------------------------------------------------------------------
# fp8 activations, and the expansion for cuBLAS

def quantize_fp8(x2, Mp):
    """The quant8 kernel: x2 (M, Kp) 16-bit contiguous on CUDA -> (fp8_image of kernel.fp8_codes(x2)'s codes,
    scales padded to Mp with zeros)."""
    M, Kp = x2.shape
    q = torch.empty(Kp // 128, Mp, 128, dtype=torch.uint8, device=x2.device)
    s = torch.empty(Mp, dtype=torch.float32, device=x2.device)
    with cp.cuda.Device(x2.device.index):
        compile.aux_kernel("QUANT8", x2.dtype == torch.bfloat16, x2.device.index)((Mp,), (128,), (
            cp.uint64(x2.data_ptr()), cp.uint64(q.data_ptr()), cp.uint64(s.data_ptr()), cp.int32(M), cp.int32(Mp),
            cp.int32(Kp // 128)), stream=stream(x2.device))
    return q, s


def _dequant_matmul(x2, tiled, alpha, N, K, bias=None):
    """alpha * (x2 @ W~^T) + bias through a transient 16-bit copy of W~ (exact: -1, 0, 1) and cuBLAS. Off Hopper
    from M ~ 512 both paths are tensor-core bound and cuBLAS beats mma.sync by more than the extra pass costs (one
    read of the codes, one write of K*N 16-bit values into a buffer of one layer's size, reused)."""
    w = torch.empty(N, K, dtype=x2.dtype, device=x2.device)
    words = N * K // 16
    one = 0x3F80 if x2.dtype == torch.bfloat16 else 0x3C00
    with cp.cuda.Device(x2.device.index):
        compile.aux_kernel("DEQUANT", True, x2.device.index)((-(-words // 256),), (256,), (
            cp.uint64(tiled.data_ptr()), cp.uint64(w.data_ptr()), cp.int32(K), cp.int32(words), cp.uint32(one)),
            stream=stream(x2.device))
    y = F.linear(x2, w)
    y = torch.mul(y, alpha, out=y)  # alpha in float32, one rounding to x's dtype
    return y if bias is None else y.add_(bias)

# -----------------------------------------------------------------------------
# the entry point


def matmul(x, tiled, alpha, N, K, bias=None, fp8=False, config=None):
    """alpha * (x @ W~^T) + bias with W~ in the tile order (layout.tile_codes) on the GPU, x (..., K) bf16/fp16 on
    CUDA; fp8: activations quantised per token to e4m3 (quant8, then wgmm8: Hopper only). config=(name, cluster
    split), name a tile or "dequant", overrides the choice (benchmarks and tests)."""
    Np, Kp = padded(N, K)
    if tiled.dtype != torch.uint8 or tiled.numel() != Np * Kp // 4 or tiled.device != x.device:
        raise ValueError(f"tiled codes must be uint8 from tile_codes(N={N}, K={K}) on {x.device}")
    alpha = alpha.to(device=x.device, dtype=torch.float32).contiguous()
    if bias is not None:
        bias = bias.to(x.device)
        if bias.dtype not in (x.dtype, torch.float32):
            bias = bias.float()
        bias = bias.contiguous()
    if not tiled.is_contiguous() or tiled.data_ptr() % 16:
        tiled = tiled.clone(memory_format=torch.contiguous_format)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if Kp != K:
        x2 = F.pad(x2, (0, Kp - K))  # zero columns meet zero-trit padding; only for awkward K
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    M = x2.shape[0]
    if fp8:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M > 0:
            xq, scales = quantize_fp8(x2, -(-M // FP8_ROWS) * FP8_ROWS)
            name, cs = config or choose(M, N, K, x.device.index, fp8=True)
            if name not in tiles.WG8_CONFIGS:
                raise ValueError(f"fp8 activations take a wgmm8 tile ({', '.join(tiles.WG8_CONFIGS)}), got {name}")
            launch_tile(xq, tiled, alpha, y, N, K, name, cs, bias, scales)
        return y.view(*lead, N)
    name, cs = config or choose(M, N, K, x.device.index)
    if name == "dequant":
        if K % 128 or N % 16:
            raise ValueError(f"the dequant path needs K % 128 == 0 and N % 16 == 0, got K={K}, N={N}")
        return _dequant_matmul(x2, tiled, alpha, N, K, bias).view(*lead, N)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M > 0:
        if name in tiles.WG_CONFIGS and not gpu(x.device.index).wgmma:
            raise ValueError(f"config {name} needs wgmma (compute capability 9.0)")
        launch_tile(x2, tiled, alpha, y, N, K, name, cs, bias)
    return y.view(*lead, N)
