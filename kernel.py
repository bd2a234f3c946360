"""
The ternary matmul of a deployed TerDiT: Y = alpha * (X @ W~^T) + b, W~ in {-1, 0, +1} (TerDiT, arXiv 2405.14854,
Eq. 2), with W~ held in 2 bits per weight. This file is its definition: the storage, a plain PyTorch reference, a
short CUDA kernel that reads the stored codes as they are, and the dispatch every packed layer calls.

    python -m pytest tests/test_kernel.py -v                     # CPU tests always; GPU tests need CUDA + cupy
    TERDIT_KERNEL=simple python sample.py --ckpt out/model.tdit --device cuda      # sample with the readable kernel

Storage. A trit w becomes the code q = w + 1 in {0, 1, 2}: 2 bits. W~ (N, K) is stored row-major, 4 codes per
byte: byte j of row n holds k = 4j + i at bits 2i..2i+1 (i = 0..3), so a row takes ceil(K/4) bytes and the last
byte's unused codes are 1 (trit 0). pack_2bit / unpack_2bit convert; the .tdit file holds these bytes (pack.py).

The readable kernel (SOURCE, below). One warp computes one output Y[m, n]: its 32 lanes walk row n of the codes a
byte at a time (lane l takes bytes l, l + 32, ...), shift each code out of its byte, subtract 1 and multiply by
X[m, 4j + i] as a float32; a shuffle reduction sums the 32 partial sums; lane 0 scales by alpha (one, or one per
output channel: linears fused along N), adds the bias and writes float32, which torch rounds to X's dtype once.
It reads every weight byte once per token, so it is slow at large M; it runs on any GPU that cupy supports.

The fast kernels (fast/) compute the same product from the codes permuted, once at load (prepare), into the order
of the tensor cores' mma fragments, with one kernel family per range of M and tuned tiles per GPU. Their design,
and what bounds each regime, is docs/kernel.md.
"""

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

import fast

try:
    import cupy as cp
except Exception:  # CPU-only machines: everything still works through the reference
    cp = None

TILE_N = fast.layout.TILE_N  # widths that are multiples of this concatenate along N in both layouts
FP8_MAX = 448.0              # e4m3's largest finite value
HALF = (torch.bfloat16, torch.float16)

# -----------------------------------------------------------------------------
# storage: 2-bit codes, row-major


def pack_2bit(trits: torch.Tensor) -> torch.Tensor:
    """int8 trits (N, K) in {-1, 0, 1} -> uint8 codes (N, ceil(K/4)): code trit + 1, k = 4j + i at bits 2i of byte j,
    padding code 1. CPU or GPU."""
    if trits.dim() != 2:
        raise ValueError(f"pack_2bit expects a 2-D (N, K) tensor, got shape {tuple(trits.shape)}")
    if trits.numel() and (trits.min() < -1 or trits.max() > 1):
        raise ValueError("pack_2bit expects values in {-1, 0, 1}")
    N, K = trits.shape
    q = torch.ones(N, 4 * -(-K // 4), dtype=torch.uint8, device=trits.device)  # code 1 == trit 0 in the padding
    q[:, :K] = trits + 1
    q = q.view(N, -1, 4)
    return q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)


def _check_codes(codes, N, K):
    if codes.dtype != torch.uint8 or codes.shape != (N, -(-K // 4)):
        raise ValueError(f"codes must be uint8 of shape ({N}, {-(-K // 4)}) (pack_2bit of (N={N}, K={K})), got "
                         f"{codes.dtype} {tuple(codes.shape)}")


def unpack_2bit(codes: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The exact inverse of pack_2bit -> int8 trits (N, K)."""
    _check_codes(codes, N, K)
    q = torch.stack([(codes >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).view(N, -1)
    return q[:, :K].to(torch.int8) - 1

# -----------------------------------------------------------------------------
# the semantics: plain PyTorch


def fp8_codes(x2):
    """Per-token e4m3 quantisation of x2 (M, K) (W1.58A8, fp8=True): codes (M, K) float8_e4m3fn and scales (M,)
    float32, s = amax / 448, so that x ~ s * q; trits are exact in e4m3."""
    amax = x2.abs().amax(dim=-1).float()
    top = torch.full_like(amax, FP8_MAX)  # tensor / tensor: one rounding, as the quant8 kernel (a scalar takes two)
    inv = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
    return (x2.float() * inv[:, None]).to(torch.float8_e4m3fn), amax / top


def ternary_matmul_ref(x, codes, alpha, N, K, bias=None, fp8=False):
    """The reference: unpack, cast, F.linear(x, alpha * W~, bias) in x's dtype. fp8: x quantised per token to e4m3
    first (fp8_codes), the products summed in float32 and scaled by alpha * the token's scale."""
    w = unpack_2bit(codes.to(x.device), N, K)
    if not fp8:
        y = F.linear(x, alpha.to(device=x.device, dtype=x.dtype).view(-1, 1) * w.to(x.dtype))
        return y if bias is None else y + bias.to(y.dtype)
    q, s = fp8_codes(x.reshape(-1, K))
    y = F.linear(q.float(), w.float()) * (alpha.to(x.device).float() * s[:, None])
    y = y if bias is None else y + bias.to(x.device).float()
    return y.to(x.dtype).view(*x.shape[:-1], N)

# -----------------------------------------------------------------------------
# the readable kernel: the same product on the GPU, from the row-major codes

SOURCE = r"""
typedef unsigned char u8; typedef unsigned short u16;

__device__ float to_float(u16 v) {                   // one element of X (bf16 or fp16) as a float32
#if BF16
  return __uint_as_float((unsigned)v << 16);         // bf16 is the upper half of a float32
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));     // fp16 -> float32, exact
  return f;
#endif
}

// Y[m, n] = alpha[n or 0] * sum_k X[m, k] * (code(n, k) - 1) + bias[n]: one warp per output element
extern "C" __global__ void ternary_matmul(const u16* X, const u8* codes, const float* alpha, int n_alpha,
                                          const float* bias, float* Y, int M, int N, int K) {
  const int lane = threadIdx.x % 32, m = blockIdx.x;
  const int n = blockIdx.y * (blockDim.x / 32) + threadIdx.x / 32;  // this warp's output channel
  if (n >= N) return;                                // all 32 lanes of a warp share n: they leave together
  const int row_bytes = (K + 3) / 4;                 // 4 codes per byte
  const u8* w = codes + (size_t)n * row_bytes;       // row n of W~
  const u16* x = X + (size_t)m * K;                  // row m of X
  float acc = 0.f;                                   // fp32 accumulation
  for (int j = lane; j < row_bytes; j += 32) {       // lane l: bytes l, l + 32, ...
    const int byte = w[j];
    for (int i = 0; i < 4 && 4 * j + i < K; i++) {
      const int trit = ((byte >> (2 * i)) & 3) - 1;  // k = 4j + i sits at bits 2i..2i+1 as trit + 1
      acc += trit * to_float(x[4 * j + i]);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2)     // sum the 32 lanes' partial sums
    acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) Y[(size_t)m * N + n] = acc * alpha[n_alpha == 1 ? 0 : n] + (bias ? bias[n] : 0.f);
}
"""
WARPS = 8  # output channels per CTA of the readable kernel


@functools.lru_cache(maxsize=None)
def _readable_kernel(bf16, device):
    """SOURCE compiled (NVRTC through cupy) for X in bf16 or fp16, on one device; first outside graph capture."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("kernel.py: call ternary_matmul once eagerly (to compile) before graph capture")
    with cp.cuda.Device(device):
        return cp.RawModule(code=f"#define BF16 {int(bf16)}\n" + SOURCE).get_function("ternary_matmul")


def readable_matmul(x, codes, alpha, N, K, bias=None):
    """ternary_matmul_ref through the readable kernel: x (..., K) bf16/fp16 and row-major codes on one CUDA device."""
    if codes.device != x.device:
        raise ValueError(f"codes are on {codes.device}, x on {x.device}")
    x2 = x.reshape(-1, K).contiguous()
    codes = codes.contiguous()
    alpha = alpha.to(device=x.device, dtype=torch.float32).contiguous()
    bias = None if bias is None else bias.to(device=x.device, dtype=torch.float32).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M > 0 and N > 0:
        ptr = lambda t: cp.uint64(0 if t is None else t.data_ptr())
        with cp.cuda.Device(x.device.index):
            _readable_kernel(x.dtype == torch.bfloat16, x.device.index)(
                (M, -(-N // WARPS)), (32 * WARPS,),
                (ptr(x2), ptr(codes), ptr(alpha), cp.int32(alpha.numel()), ptr(bias), ptr(y),
                 cp.int32(M), cp.int32(N), cp.int32(K)), stream=fast.launch.stream(x.device))
    return y.to(x.dtype).view(*x.shape[:-1], N)

# -----------------------------------------------------------------------------
# the dispatch: which kernel multiplies a layer's codes


def prepare(codes, N, K, kernel=None):
    """(w, tiled) for a layer's row-major codes, already on their device, once at load. On CUDA (compute capability
    8.0 or more) with cupy and kernel "fast": the codes permuted on the GPU into the fast kernels' tile order, True.
    Else (CPU, no cupy, kernel "simple"): the codes, False. kernel=None reads TERDIT_KERNEL (default "fast")."""
    kernel = kernel or os.environ.get("TERDIT_KERNEL", "fast")
    if kernel not in ("fast", "simple"):
        raise ValueError(f"the kernel must be 'fast' or 'simple' (TERDIT_KERNEL), got {kernel!r}")
    _check_codes(codes, N, K)
    if kernel == "fast" and codes.is_cuda and cp is not None and torch.cuda.get_device_capability(codes.device) >= (8, 0):
        return fast.tile_codes(codes, N, K), True
    return codes, False


_warned = set()


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        print(f"WARNING: kernel.py: {msg}, using the slow PyTorch reference")


def ternary_matmul(x, w, alpha, N, K, bias=None, fp8=False, tiled=False, config=None):
    """Y = alpha * (x @ W~^T) + bias for x (..., K) -> (..., N) in x.dtype; alpha one float32 scale or N of them
    (one per output channel). w: row-major codes (tiled=False) or prepare's tile order (tiled=True). tiled: the fast
    kernels (fp8: Hopper). Row-major on CUDA: the readable kernel (fp8: the reference). x in float32 or on the CPU,
    or no cupy: the reference (tiled codes are untiled for it). config=(tile, cluster split) overrides the fast
    kernels' choice (benchmarks and tests)."""
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    if alpha.numel() not in (1, N):
        raise ValueError(f"alpha must hold one scale (per tensor) or N={N} (per output channel), got {alpha.numel()}")
    if config is not None and not tiled:
        raise ValueError("config picks a tile of the fast kernels: it needs tiled codes (prepare)")
    kernels = x.is_cuda and cp is not None and x.dtype in HALF
    if tiled:
        if kernels and (not fp8 or fast.gpu(x.device.index).wgmma):
            return fast.matmul(x, w, alpha, N, K, bias, fp8, config)
        w = fast.untile_codes(w.to(x.device), N, K)
    elif kernels and not fp8:
        return readable_matmul(x, w, alpha, N, K, bias)
    if x.is_cuda:  # reached only for one of these reasons
        _warn_once("cupy not found" if cp is None else f"no kernel for {x.dtype}" if x.dtype not in HALF else
                   "fp8 activations need a Hopper GPU" if tiled else "fp8 activations need the fast kernels")
    return ternary_matmul_ref(x, w, alpha, N, K, bias, fp8)

# -----------------------------------------------------------------------------
# the same function as a PyTorch custom op: what the model calls. torch.compile cannot trace into a cupy launch,
# but it treats a custom op as one opaque node whose output shape and dtype the fake implementation gives, so a
# packed model compiles with no graph break (and the op runs inside CUDA-graph capture like any kernel).


@torch.library.custom_op("terdit::ternary_matmul", mutates_args=())
def ternary_matmul_op(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, N: int, K: int,
                      bias: Optional[torch.Tensor] = None, fp8: bool = False, tiled: bool = False) -> torch.Tensor:
    """ternary_matmul(x, w, alpha, N, K, bias, fp8, tiled) with the automatic choice of kernel."""
    return ternary_matmul(x, w, alpha, N, K, bias, fp8, tiled)


@ternary_matmul_op.register_fake
def _(x, w, alpha, N, K, bias=None, fp8=False, tiled=False):
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    return x.new_empty(*x.shape[:-1], N)
