"""
Fused 2-bit unpack + tensor-core matmul for ternary weights: Y = alpha * (X @ W~^T), W~ in {-1,0,+1}.

    python -m pytest tests/test_kernel.py -v          # CPU tests always; GPU tests need CUDA + cupy
    python bench.py --what kernels --out bench_results/kernels_h100.md

References: TerDiT (arXiv 2405.14854); Marlin (IST-DASLab/marlin) and its 2-bit fork TriRun
(NolanoOrg/TriRun) for the offline re-pack + magic-number dequant; PTX ISA for mma.m16n8k16.

How the packed matmul works
---------------------------
Storage. A trit w becomes the code q = w + 1 in {0,1,2}, 2 bits, 16 codes per 32-bit word. W (N, K) is
zero-padded to (Np, Kp) = (16*, 128*) and cut into tiles of 16 rows x 128 k. One tile is 512 bytes: 32
lanes x 16 bytes, so a warp fetches a tile with a single coalesced 16-byte load per lane, and what lane
(g = lane/4, t = lane%4) receives is *exactly* its A-fragments of 8 consecutive mma.m16n8k16 steps, in
register order. Word w of a lane holds 8 "pairs"; pair j has its low code at bit 2j, its high code at bit
16+2j, so it turns into one f16x2/bf16x2 register with two instructions (LOP3 + FMA, never cvt):
    (word >> s) & (0x00030003 << p) | magic   ->  two floats  magic + q*4^(p/2)      (exact)
    fma(that, 4^(-p/2), -(magic*4^(-p/2) + 1))   ->  q - 1 in {-1, 0, 1}            (exact)
magic is 128.0 for bf16 (7 mantissa bits: 3 pairs per shift) and 1024.0 for fp16 (10 bits: 5 per shift).
The reduction index k is permuted inside each 128-chunk (W and X the same way, so the sum is unchanged)
such that lane t needs X[m, 32w+8t : 32w+8t+8] for step pair w: one 16-byte load feeds two mma steps.

Roles. We compute Y^T = W X^T: the dequantised weights are the mma A operand (16 output channels) and the
activations the B operand (8 tokens), so the smallest M tile is 8, not 16 -- good for adaLN/GEMV.

Tiling. A CTA owns a BN x BM block of Y and a K range. Weights (2-bit) and X (16-bit) stream through a 3-8
stage cp.async ring in shared memory (X XOR-swizzled: conflict-free 16-byte reads). Warps are laid out
WN x WM x WK: WK > 1 warp groups take different k128 chunks of each stage, so a CTA's chunks are consumed
in parallel rather than one after another (what matters at small M, where everything is latency). Each
warp dequantises its weights once per chunk and reuses them for all its m8 tiles; partial tiles are summed
in shared memory, alpha (a device scalar) is applied in the epilogue. When (N/BN)*(M/BM) CTAs cannot fill
the 132 SMs, K is also split over a thread-block *cluster* of CS = 2..8 CTAs whose partial tiles are
summed through distributed shared memory (mapa + ld.shared::cluster): one launch, no workspace, memset or
atomics, deterministic, CUDA-graph safe. CONFIGS lists the tiles (k8/k16: 32x8/32x16 with 4 K-groups;
m64/k64: 64x64; l128: 128x128 and x256: 256x128 with 64x64 warp tiles); _TUNED holds the fastest
(config, CS) per shape and M measured on an H100 (bench.py --sweep), _pick falls back to a heuristic.

What limits it (H100 SXM: 3.0 TB/s, ~640 TFLOP/s for mma.sync, ~800 for cuBLAS's wgmma). At K=N=3072 the
bf16 weights are 18.9 MB (6.3 us to read), the 2-bit ones 2.4 MB (0.8 us): 8x fewer bytes. Measured with
cold weights in CUDA graphs: 5.3 us vs cuBLAS 11.8 us at M <= 8 (2.2x), 2.4-2.7x for the 4.2B MLP and
adaLN shapes, 1.3-2x for the small 600M/DiT-XL ones. Nsight Compute shows the small-M kernel at 10-17% of
DRAM bandwidth: it is latency bound (launch ~1 us + a DRAM round trip + the per-chunk dependency chain +
the epilogue), not bandwidth bound, so the 8x byte saving shows up only partly. Each token adds 2*K*N
FLOPs but no weight bytes, so a 2-bit kernel is compute bound from M ~ 33 (bf16: M ~ 267): around M = 64
we tie cuBLAS, and from M ~ 256 both are tensor-core bound. There mma.sync reaches ~360 TFLOP/s (tensor
pipe 54% busy with 2 warps per scheduler: 248 registers and 108 KB of smem per CTA) vs ~780 for cuBLAS,
i.e. ~0.45x. Parity at large M needs wgmma (sm_90a, dequantised W as the register A operand, X from
shared memory) or 8-bit activations; the natural next step, not done here.
"""

import functools
import warnings

import torch
import torch.nn.functional as F

try:
    import cupy as cp
except Exception:  # CPU-only machines: everything still works through the reference path
    cp = None

# -----------------------------------------------------------------------------
# packing (plain torch, CPU or GPU, deterministic)

TILE_N, TILE_K = 16, 128
# view of the padded (Np, Kp) code matrix whose dims are  n = (Tn, r0, g)  and  k = (Ck, w, t, s1, r1, h):
#   Tn n16-tile, r0 upper/lower 8 rows of the mma A fragment, g = lane/4 | Ck k128-chunk, w word (= pair of
#   mma steps), t = lane%4, s1 step within the pair, r1 low/high 8 columns of the fragment, h pair element.
_PERM = (0, 3, 2, 5, 4, 8, 6, 7, 1)  # -> (Tn, Ck, g, t, w | h, s1, r1, r0): the last 4 dims = 16 codes/word
_INV = tuple(_PERM.index(i) for i in range(9))


def _padded(N, K):
    return -(-N // TILE_N) * TILE_N, -(-K // TILE_K) * TILE_K


def pack_2bit(trits: torch.Tensor) -> torch.Tensor:
    """int8 trits (N, K) in {-1,0,1} -> uint8 (Np, Kp/4): codes trit+1, 4 per byte, mma-fragment order."""
    if trits.dim() != 2:
        raise ValueError(f"pack_2bit expects a 2-D (N, K) tensor, got shape {tuple(trits.shape)}")
    if trits.numel() and (trits.min() < -1 or trits.max() > 1):
        raise ValueError("pack_2bit expects values in {-1, 0, 1}")
    N, K = trits.shape
    Np, Kp = _padded(N, K)
    q = torch.ones(Np, Kp, dtype=torch.uint8, device=trits.device)  # code 1 == trit 0 in the padding
    q[:N, :K] = (trits + 1).to(torch.uint8)
    q = q.view(Np // 16, 2, 8, Kp // 128, 4, 4, 2, 2, 2).permute(*_PERM).reshape(-1, 4)
    b = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)  # little-endian: code i at bit 2i of a word
    return b.view(Np, Kp // 4)


def unpack_2bit(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Exact inverse of pack_2bit -> int8 (N, K)."""
    Np, Kp = _padded(N, K)
    if packed.dtype != torch.uint8 or packed.numel() != Np * Kp // 4:
        raise ValueError(f"packed must be uint8 with {Np * Kp // 4} elements for N={N}, K={K}")
    b = packed.reshape(-1)
    q = torch.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
    q = q.view(Np // 16, Kp // 128, 8, 4, 4, 2, 2, 2, 2).permute(*_INV).reshape(Np, Kp)
    return q[:N, :K].to(torch.int8) - 1


def ternary_matmul_ref(x, packed, alpha, N, K):
    """Plain-PyTorch reference: unpack, cast, F.linear(x, alpha * W)."""
    w = unpack_2bit(packed.to(x.device), N, K).to(x.dtype)
    return F.linear(x, alpha.to(device=x.device, dtype=x.dtype) * w)

# -----------------------------------------------------------------------------
# the CUDA kernel (compiled per config by NVRTC through cupy; config arrives as #defines)

_SRC = r"""
typedef unsigned int u32; typedef unsigned short u16;
#define NTHR (32 * WN * WM * WK)
#define BN (16 * WNT * WN)
#define BM (8 * WMT * WM)
#define LD (BN + 4)  // fp32 epilogue tile row stride: +4 floats keeps the fragment stores conflict-free

__device__ __forceinline__ u32 sptr(const void* p) {
  u32 r; asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p)); return r; }
__device__ __forceinline__ void cp16(u32 dst, const void* src, int bytes) {  // bytes=0 -> zero fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes)); }
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32." DT "." DT ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)); }
// one 32-bit word = 8 pairs of codes -> 8 x2 registers of {-1,0,1} (see the docstring)
__device__ __forceinline__ void dequant(u32 q, u32* a) {
  const u32 SC[5] = {SCALES}, BI[5] = {BIASES};
#pragma unroll
  for (int j = 0; j < 8; j++) {
    u32 v;  // (q >> shift) & mask | MAGIC in one LOP3 (0xEA = a&b|c)
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(q >> (2 * PER * (j / PER))), "r"(0x00030003u << (2 * (j % PER))), "r"(MAGIC));
    asm("fma.rn." DT "x2 %0, %1, %2, %3;" : "=r"(a[j]) : "r"(v), "r"(SC[j % PER]), "r"(BI[j % PER]));
  }
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory"); }
__device__ __forceinline__ float4 ld_rank(const float* p, int rank) {  // read another CTA's shared memory
  u32 a = sptr(p), r; float4 v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(r));
  return v; }

extern "C" __global__ void __launch_bounds__(NTHR) CLUSTER
tmm(const uint4* __restrict__ W, const uint4* __restrict__ X, const float* __restrict__ alpha,
    u16* __restrict__ Y, int M, int N, int KC, int NT16) {
  extern __shared__ uint4 smem[];
  // a pipeline stage holds WK consecutive k128 chunks; warp-group wk works on chunk wk of each stage
  uint4* Ws = smem;                             // [ST][WK][BN/16 tiles][32 lanes]
  uint4* Xs = smem + ST * WK * BN * 2;          // [ST][WK][BM rows][16 pieces of 8 k], piece ^= (row&1)<<2
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wn = warp % WN, wm = (warp / WN) % WM, wk = warp / (WN * WM);
  const int tn0 = blockIdx.x * (BN / 16), m0 = blockIdx.y * BM, KS = (KC + WK - 1) / WK;  // KS stages of K
  const int z = blockIdx.z, c0 = KS * z / CS, nch = KS * (z + 1) / CS - c0;  // this CTA's share of them
  const float al = *alpha;                      // issued now, so its latency hides behind the main loop

  auto load = [&](int stage, int sc) {
    for (int i = tid; i < WK * BN * 2; i += NTHR) {  // weights: BN/16 contiguous 512-byte tiles per chunk
      int kk = i / (BN * 2), j = i % (BN * 2), tn = tn0 + j / 32, c = sc * WK + kk;
      cp16(sptr(Ws + (stage * WK + kk) * BN * 2 + j), W + ((size_t)min(tn, NT16 - 1) * KC + min(c, KC - 1)) * 32 + (j & 31),
           tn < NT16 && c < KC ? 16 : 0);
    }
    for (int i = tid; i < WK * BM * 16; i += NTHR) {  // activations: BM rows x 256 bytes; rows >= M read as 0
      int kk = i / (BM * 16), r = (i >> 4) % BM, ch = i & 15, m = m0 + r, c = sc * WK + kk;
      cp16(sptr(Xs + ((stage * WK + kk) * BM + r) * 16 + (ch ^ ((r & 1) << 2))),
           X + (size_t)min(m, M - 1) * KC * 16 + min(c, KC - 1) * 16 + ch, m < M && c < KC ? 16 : 0);
    }
  };
  float acc[NACC][WNT][WMT][4];                  // NACC > 1: independent mma chains (small tiles, short K)
#pragma unroll
  for (int p = 0; p < NACC * WNT * WMT * 4; p++) (&acc[0][0][0][0])[p] = 0.f;

#pragma unroll
  for (int s = 0; s < ST - 1; s++) { if (s < nch) load(s, c0 + s); asm volatile("cp.async.commit_group;"); }
  for (int i = 0; i < nch; i++) {
    asm volatile("cp.async.wait_group %0;" :: "n"(ST - 2));
    __syncthreads();                               // chunk i landed; stage (i-1)%ST is free again
    if (i + ST - 1 < nch) load((i + ST - 1) % ST, c0 + i + ST - 1);
    asm volatile("cp.async.commit_group;");
    const uint4* ws = Ws + ((i % ST) * WK + wk) * BN * 2 + wn * WNT * 32 + lane;
    const uint4* xs = Xs + (((i % ST) * WK + wk) * BM + wm * WMT * 8 + g) * 16;
    uint4 wq[WNT];
#pragma unroll
    for (int a = 0; a < WNT; a++) wq[a] = ws[a * 32];
#pragma unroll
    for (int w = 0; w < 4; w++) {                  // word w = mma steps 2w, 2w+1
      uint4 xq[WMT];
#pragma unroll
      for (int b = 0; b < WMT; b++) xq[b] = xs[b * 128 + ((4 * w + t) ^ ((g & 1) << 2))];
#pragma unroll
      for (int a = 0; a < WNT; a++) {
        u32 f[8];
        dequant(w == 0 ? wq[a].x : w == 1 ? wq[a].y : w == 2 ? wq[a].z : wq[a].w, f);
#pragma unroll
        for (int b = 0; b < WMT; b++) mma(acc[(2 * w) % NACC][a][b], f, xq[b].x, xq[b].y);
#pragma unroll
        for (int b = 0; b < WMT; b++) mma(acc[(2 * w + 1) % NACC][a][b], f + 4, xq[b].z, xq[b].w);
      }
    }
  }
  asm volatile("cp.async.wait_group 0;");
#pragma unroll
  for (int p = 1; p < NACC; p++)
#pragma unroll
    for (int q = 0; q < WNT * WMT * 4; q++) (&acc[0][0][0][0])[q] += (&acc[p][0][0][0])[q];
  __syncthreads();
  // epilogue: fp32 tiles [WK][BM][LD] in smem, summed over warp groups and the cluster's K slices,
  // scaled by alpha, stored
  float* red = (float*)smem + wk * BM * LD;
#pragma unroll
  for (int a = 0; a < WNT; a++)
#pragma unroll
    for (int b = 0; b < WMT; b++) {
      int n = (wn * WNT + a) * 16 + g, m = (wm * WMT + b) * 8 + 2 * t;
      red[m * LD + n] = acc[0][a][b][0]; red[(m + 1) * LD + n] = acc[0][a][b][1];
      red[m * LD + n + 8] = acc[0][a][b][2]; red[(m + 1) * LD + n + 8] = acc[0][a][b][3];
    }
  if (CS > 1) cluster_sync(); else __syncthreads();
  const int E = BM * BN / 4, e1 = E * (z + 1) / CS;  // this CTA writes its slice of the tile
  for (int e = E * z / CS + tid; e < e1; e += NTHR) {
    int r = e / (BN / 4), c4 = (e % (BN / 4)) * 4, m = m0 + r, n = tn0 * 16 + c4;
    if (m >= M || n >= N) continue;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int q = 0; q < CS; q++)
#pragma unroll
      for (int kk = 0; kk < WK; kk++) {
        const float* src = (const float*)smem + (kk * BM + r) * LD + c4;
        float4 p = CS > 1 ? ld_rank(src, q) : *(const float4*)src;
        v.x += p.x; v.y += p.y; v.z += p.z; v.w += p.w;
      }
    u32 lo, hi;
    asm("cvt.rn." DT "x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(v.y * al), "f"(v.x * al));
    asm("cvt.rn." DT "x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(v.w * al), "f"(v.z * al));
    u16* y = Y + (size_t)m * N + n;
    if ((N & 3) == 0) *(uint2*)y = make_uint2(lo, hi);
    else { y[0] = lo; if (n + 1 < N) y[1] = lo >> 16; if (n + 2 < N) y[2] = hi; if (n + 3 < N) y[3] = hi >> 16; }
  }
  if (CS > 1) cluster_sync();  // keep our smem alive until every CTA of the cluster has read it
}
"""

# name: (WNT, WMT, WN, WM, WK, ST, NACC) -> CTA tile BN = 16*WNT*WN output channels x BM = 8*WMT*WM tokens;
# WN x WM x WK warps (WK warp groups split each stage's K), ST pipeline stages, NACC accumulator sets
CONFIGS = {
    "s8": (1, 1, 4, 1, 1, 8, 4), "s16": (1, 2, 4, 1, 1, 8, 2), "s32": (1, 4, 4, 1, 1, 6, 2),
    "k8": (1, 1, 2, 1, 4, 4, 2), "k8b": (1, 1, 4, 1, 2, 4, 2), "k16": (1, 2, 2, 1, 4, 4, 2),
    "k32": (1, 4, 2, 1, 4, 3, 1), "k64": (2, 4, 2, 2, 2, 3, 1),
    "m64": (2, 4, 2, 2, 1, 4, 1), "l128": (4, 8, 2, 2, 1, 3, 1), "x256": (4, 8, 4, 2, 1, 4, 1),
}


def _tile(name):
    wnt, wmt, wn, wm, wk, st, _ = CONFIGS[name]
    bn, bm, nthr = 16 * wnt * wn, 8 * wmt * wm, 32 * wn * wm * wk
    smem = max(st * wk * (bn * 32 + bm * 256), wk * bm * (bn + 4) * 4)
    return bn, bm, nthr, smem


def _magic_consts(bf16):
    """(PER, MAGIC, SCALES, BIASES) of the LOP3/FMA dequant; exact for codes 0..2 (tested on CPU)."""
    dt, per, magic = (torch.bfloat16, 3, 128.0) if bf16 else (torch.float16, 5, 1024.0)
    bits = lambda v: int(torch.tensor([v], dtype=dt).view(torch.int16).item()) & 0xFFFF
    x2 = lambda v: bits(v) * 0x10001
    return per, x2(magic), [x2(4.0 ** -i) for i in range(5)], [x2(-(magic * 4.0 ** -i + 1)) for i in range(5)]


def _source(name, cs, bf16):
    wnt, wmt, wn, wm, wk, st, nacc = CONFIGS[name]
    per, magic, sc, bi = _magic_consts(bf16)
    d = dict(WNT=wnt, WMT=wmt, WN=wn, WM=wm, WK=wk, ST=st, NACC=nacc, CS=cs, PER=per, MAGIC=f"{magic:#x}u",
             SCALES=",".join(f"{v:#x}u" for v in sc), BIASES=",".join(f"{v:#x}u" for v in bi),
             DT='"bf16"' if bf16 else '"f16"', CLUSTER=f"__cluster_dims__(1, 1, {cs})" if cs > 1 else "")
    return "".join(f"#define {k} {v}\n" for k, v in d.items()) + _SRC


@functools.lru_cache(maxsize=None)
def _kernel(name, cs, bf16, device):
    """Compile (NVRTC, sm_90 by default) and cache one config; must first run outside CUDA-graph capture."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("kernel.py: call ternary_matmul once eagerly (to compile) before graph capture")
    with cp.cuda.Device(device):
        k = cp.RawModule(code=_source(name, cs, bf16), options=("-std=c++17",)).get_function("tmm")
        smem = _tile(name)[3]
        if smem > 48 * 1024:
            k.max_dynamic_shared_size_bytes = smem
    return k


# fastest (config, cluster split) per (K, N) -> {M: ...}, from `python bench.py --sweep` on an H100 80GB HBM3;
# a problem uses the entry of the smallest tuned M >= its M
_TUNED = {
    (1536, 1536): {1: ("k8", 1), 8: ("k8", 1), 16: ("k16", 1), 64: ("k32", 1), 256: ("l128", 4), 512: ("m64", 2), 2048: ("l128", 2), 8192: ("x256", 1)},
    (1536, 4096): {1: ("k8", 1), 8: ("k8", 1), 16: ("k16", 1), 64: ("k32", 1), 256: ("k64", 1), 512: ("x256", 2), 2048: ("x256", 1), 8192: ("x256", 1)},
    (4096, 1536): {1: ("k8b", 8), 8: ("k8b", 8), 16: ("k16", 4), 64: ("m64", 8), 256: ("l128", 8), 512: ("x256", 4), 2048: ("l128", 2), 8192: ("x256", 1)},
    (1024, 9216): {1: ("k8", 1), 8: ("k8", 1), 16: ("k16", 1), 64: ("s32", 1), 256: ("m64", 1), 512: ("l128", 2), 2048: ("l128", 1), 8192: ("l128", 1)},
    (3072, 3072): {1: ("k8b", 4), 8: ("k8", 1), 16: ("k16", 1), 64: ("m64", 4), 256: ("l128", 4), 512: ("x256", 2), 2048: ("l128", 1), 8192: ("x256", 1)},
    (3072, 8192): {1: ("k8", 1), 8: ("k8", 1), 16: ("k16", 1), 64: ("k64", 2), 256: ("x256", 2), 512: ("x256", 1), 2048: ("x256", 1), 8192: ("x256", 1)},
    (8192, 3072): {1: ("k8b", 4), 8: ("k8b", 4), 16: ("s16", 8), 64: ("m64", 4), 256: ("x256", 4), 512: ("l128", 8), 2048: ("x256", 2), 8192: ("x256", 1)},
    (1024, 18432): {1: ("k8b", 1), 8: ("k8b", 1), 16: ("s16", 1), 64: ("m64", 1), 256: ("l128", 2), 512: ("l128", 1), 2048: ("x256", 1), 8192: ("x256", 1)},
    (1152, 1152): {1: ("k8", 1), 8: ("k8", 1), 16: ("k16", 1), 64: ("k32", 1), 256: ("m64", 4), 512: ("m64", 2), 2048: ("x256", 1), 8192: ("l128", 1)},
}


def _pick(M, N, K, sms=132):
    """(config, cluster split) for a problem: the tuned table, else a heuristic distilled from it."""
    t = _TUNED.get((K, N))
    if t:
        return t[min((m for m in t if m >= M), default=max(t))]
    if M <= 16:  # 4 K-groups per CTA; split K over a cluster only when N is too small to fill the GPU
        name = ("k8" if K < 2 * N else "k8b") if M <= 8 else "k16"
    elif M <= 64:
        name = "k32" if K <= 1536 else "m64"
    elif M <= 512:
        name = "m64" if N * K <= 1536 * 1536 else "l128"
    else:
        name = "x256" if N % 256 == 0 else "l128"
    bn, bm = _tile(name)[:2]
    tiles, kc, cs = -(-N // bn) * -(-M // bm), -(-K // 128), 1
    while cs < 8 and 2 * cs <= kc and tiles * cs < sms and not (M <= 16 and K < 2 * N):
        cs *= 2
    return name, cs


@functools.lru_cache(maxsize=None)
def _stream(ptr, device):
    """cupy view of a torch stream (cached: creating one per call costs Python time and a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr, device)


def _launch(x2, packed, alpha, y, N, K, name, cs):
    """Launch one config on torch's current stream. x2 (M, Kp) contiguous, y (M, N) output."""
    M, Kp = x2.shape
    bn, bm, nthr, smem = _tile(name)
    k = _kernel(name, cs, x2.dtype == torch.bfloat16, x2.device.index)
    nt16 = _padded(N, K)[0] // 16
    args = tuple(cp.uint64(t.data_ptr()) for t in (packed, x2, alpha, y)) + tuple(
        cp.int32(v) for v in (M, N, Kp // 128, nt16))
    stream = _stream(torch.cuda.current_stream(x2.device).cuda_stream, x2.device.index)
    with cp.cuda.Device(x2.device.index):
        k((-(-nt16 * 16 // bn), -(-M // bm), cs), (nthr,), args, shared_mem=smem, stream=stream)


# -----------------------------------------------------------------------------
# large M: expand to a 16-bit workspace, then cuBLAS (wgmma). From M ~ 256 both paths are tensor-core bound,
# and cuBLAS's wgmma (~780 TFLOP/s) beats our mma.sync (~360) by more than the extra pass costs: one read of
# the 2-bit codes and one write of K*N 16-bit values (3072x3072: 2.4 + 18.9 MB, ~8 us), layer by layer into a
# transient buffer (one layer's worth of memory, reused). Small M, where 2 bits pay, never takes this path.

DEQUANT_MIN_M, DEQUANT_MIN_K = 512, 1152  # from bench.py's H100 table: below either, the fused kernel is faster


def _use_dequant(M, N, K):
    return M >= DEQUANT_MIN_M and K >= DEQUANT_MIN_K and K % 128 == 0 and N % 16 == 0

_DEQUANT_SRC = r"""
extern "C" __global__ void dequant(const unsigned int* __restrict__ packed, uint4* __restrict__ w,
                                   int K, int words, unsigned int one) {
    // one thread per 32-bit word = 16 codes of the tile layout (pack_2bit): word i = (Tn, Ck, g, t, wq),
    // code j = (r0, s1, r1, h) at bit 2j; row n = 16 Tn + 8 h + g, column k = 128 Ck + 32 wq + 8 t + 4 s1 + 2 r1 + r0
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= words) return;
    unsigned int word = packed[i];
    int wq = i & 3, t = (i >> 2) & 3, g = (i >> 4) & 7, rest = i >> 7, ck_n = K >> 7;
    int ck = rest % ck_n, tn = rest / ck_n;
    for (int h = 0; h < 2; h++) {
        unsigned int v[4];
        for (int e = 0; e < 8; e += 2) {      // e = 4 s1 + 2 r1 + r0: 8 consecutive k, two per 32-bit store
            unsigned int pair = 0;
            for (int r0 = 0; r0 < 2; r0++) {
                unsigned int q = (word >> (2 * (r0 * 8 + (e >> 2) * 4 + ((e >> 1) & 1) * 2 + h))) & 3u;
                unsigned int bits = q == 1u ? 0u : (q == 2u ? one : (one | 0x8000u));
                pair |= bits << (16 * r0);
            }
            v[e >> 1] = pair;
        }
        long n = 16L * tn + 8 * h + g, k = 128L * ck + 32 * wq + 8 * t;
        w[(n * K + k) >> 3] = make_uint4(v[0], v[1], v[2], v[3]);
    }
}
"""


@functools.lru_cache(maxsize=None)
def _dequant_kernel(device):
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("kernel.py: call ternary_matmul once eagerly (to compile) before graph capture")
    with cp.cuda.Device(device):
        return cp.RawKernel(_DEQUANT_SRC, "dequant")


def _dequant_matmul(x2, packed, alpha, N, K):
    """alpha * (x2 @ W~^T) through a transient 16-bit copy of W~ (exact: -1, 0, 1) and cuBLAS."""
    w = torch.empty(N, K, dtype=x2.dtype, device=x2.device)
    words = N * K // 16
    one = 0x3F80 if x2.dtype == torch.bfloat16 else 0x3C00
    stream = _stream(torch.cuda.current_stream(x2.device).cuda_stream, x2.device.index)
    with cp.cuda.Device(x2.device.index):
        _dequant_kernel(x2.device.index)((-(-words // 256),), (256,), (
            cp.uint64(packed.data_ptr()), cp.uint64(w.data_ptr()), cp.int32(K), cp.int32(words), cp.uint32(one)),
            stream=stream)
    y = F.linear(x2, w)
    return torch.mul(y, alpha, out=y)  # alpha in float32, one rounding to x's dtype


_warned = set()


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        print(f"WARNING: {msg}")


def ternary_matmul(x, packed, alpha, N, K, config=None):
    """Y = alpha * (x @ W~^T) for x (..., K) -> (..., N) in x.dtype. Fused kernel on CUDA bf16/fp16 + cupy,
    else the reference. From M = 512 (K >= 1152, K % 128 == 0, N % 16 == 0): a transient 16-bit copy + cuBLAS.
    config=(name, cluster_size) or "dequant" overrides the choice (benchmarks/tests only)."""
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    if not x.is_cuda:
        return ternary_matmul_ref(x, packed, alpha, N, K)
    if x.dtype not in (torch.bfloat16, torch.float16):
        _warn_once(f"kernel.py: no fused kernel for {x.dtype}, using the slow reference ternary matmul")
        return ternary_matmul_ref(x, packed, alpha, N, K)
    if cp is None:
        _warn_once("kernel.py: cupy not found, using the slow reference ternary matmul")
        return ternary_matmul_ref(x, packed, alpha, N, K)
    Np, Kp = _padded(N, K)
    if packed.dtype != torch.uint8 or packed.numel() != Np * Kp // 4 or packed.device != x.device:
        raise ValueError(f"packed must be a uint8 tensor from pack_2bit((N={N}, K={K})) on {x.device}")
    if alpha.numel() != 1:
        raise ValueError("alpha must hold a single (per-tensor) scale")
    alpha = alpha.to(device=x.device, dtype=torch.float32)
    if not packed.is_contiguous() or packed.data_ptr() % 16:
        packed = packed.clone(memory_format=torch.contiguous_format)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if Kp != K:
        x2 = F.pad(x2, (0, Kp - K))  # zero columns meet zero-trit padding; only for awkward K
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    M = x2.shape[0]
    if config == "dequant" and K % 128 == 0 and N % 16 == 0 or config is None and _use_dequant(M, N, K):
        return _dequant_matmul(x2, packed, alpha, N, K).view(*lead, N)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M > 0:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        name, cs = config or _pick(M, N, K, sms)
        _launch(x2, packed, alpha, y, N, K, name, cs)
    return y.view(*lead, N)


# -----------------------------------------------------------------------------
# the same function as a PyTorch custom op: what the model calls. torch.compile cannot trace into a cupy launch,
# but it treats a custom op as one opaque node whose output shape and dtype the fake implementation gives, so a
# packed model compiles with no graph break (and the op runs inside CUDA-graph capture like any kernel).

@torch.library.custom_op("terdit::ternary_matmul", mutates_args=())
def ternary_matmul_op(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """ternary_matmul(x, packed, alpha, N, K) with the automatic choice of path (no config: ops take tensors and ints)."""
    return ternary_matmul(x, packed, alpha, N, K)


@ternary_matmul_op.register_fake
def _(x, packed, alpha, N, K):
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    return x.new_empty(*x.shape[:-1], N)

