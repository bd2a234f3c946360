// CUDA sources of kernel.py: read its docstring first (the bit layout, the roles of W and X, the tiling).
// NVRTC compiles this file through CuPy once per configuration; kernel.py (_source) puts the configuration in
// front of it as #defines and picks the kernel: TMV (the GEMV, M <= 16) and TMM (mma.sync, any GPU from sm_80),
// WGMM (wgmma, sm_90a only), DEQUANT (expand the codes to a 16-bit matrix for cuBLAS), and for fp8 activations
// QUANT8 (X to e4m3 per token) then WGMM8 (ternary x e4m3 wgmma, sm_90a).
typedef unsigned int u32; typedef unsigned short u16; typedef unsigned long long u64;

__device__ __forceinline__ u32 sptr(const void* p) {
  u32 r; asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p)); return r; }
__device__ __forceinline__ void cp16(u32 dst, const void* src, int bytes) {  // bytes=0 -> zero fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes)); }
#ifdef IS_BF16
__device__ __forceinline__ float to_f32(u32 v) {  // the low 16 bits, a value of the kernel's dtype (bf16 or fp16)
  float f;
  if (IS_BF16) f = __uint_as_float(v << 16); else asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)v));
  return f;
}
#endif

#if !defined(DEQUANT) && !defined(QUANT8)
// one 32-bit word = 8 pairs of codes -> 8 x2 registers of {-1,0,1}: (q >> shift) & mask | MAGIC in one LOP3
// (0xEA = a&b|c) gives MAGIC + q * 4^p exactly, one FMA takes it to q - 1 (kernel.py's docstring)
__device__ __forceinline__ void dequant(u32 q, u32* a) {
  const u32 SC[5] = {SCALES}, BI[5] = {BIASES};
#pragma unroll
  for (int j = 0; j < 8; j++) {
    u32 v;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(q >> (2 * PER * (j / PER))), "r"(0x00030003u << (2 * (j % PER))), "r"(MAGIC));
    asm("fma.rn." DT "x2 %0, %1, %2, %3;" : "=r"(a[j]) : "r"(v), "r"(SC[j % PER]), "r"(BI[j % PER]));
  }
}
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32." DT "." DT ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)); }
__device__ __forceinline__ u32 word(const uint4& q, int w) { return w == 0 ? q.x : w == 1 ? q.y : w == 2 ? q.z : q.w; }
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory"); }
__device__ __forceinline__ u32 mapa(const float* p, int rank) {  // p's address in another CTA's shared memory
  u32 r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(sptr(p)), "r"(rank));
  return r; }
__device__ __forceinline__ float4 ld_rank(const float* p, int rank) {  // read another CTA's shared memory
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(mapa(p, rank)));
  return v; }
__device__ __forceinline__ float ld_rank1(const float* p, int rank) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(mapa(p, rank)));
  return v; }
__device__ __forceinline__ float bias_at(const void* b, int n) {
#if BIAS == 2
  return ((const float*)b)[n];
#elif BIAS == 1
  return to_f32(((const u16*)b)[n]);
#else
  return 0.f;
#endif
}

// The epilogue of the matmul kernels: the CTA's fp32 partial tiles red[kk][m][n] (kk < NK warp groups that split K,
// LD floats per row) are summed over kk and over the CS CTAs of the cluster (each CTA reads the others' shared
// memory and writes its own slice of the tile), scaled by alpha, the bias added, rounded once, stored.
template <int BM_, int BN_, int NK, int LD_, int NT>
__device__ __forceinline__ void store_tile(const float* red, float al, const void* bias, u16* Y, int M, int N,
                                           int m0, int n0, int z, int tid, const float* rs = nullptr) {
  const int E = BM_ * BN_ / 4, e1 = E * (z + 1) / CS;
  for (int e = E * z / CS + tid; e < e1; e += NT) {
    int r = e / (BN_ / 4), c4 = (e % (BN_ / 4)) * 4, m = m0 + r, n = n0 + c4;
    if (m >= M || n >= N) continue;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int q = 0; q < CS; q++)
#pragma unroll
      for (int kk = 0; kk < NK; kk++) {
        const float* src = red + (kk * BM_ + r) * LD_ + c4;
        float4 p = CS > 1 ? ld_rank(src, q) : *(const float4*)src;
        v.x += p.x; v.y += p.y; v.z += p.z; v.w += p.w;
      }
    const float sc = rs ? al * rs[m] : al;   // rs: wgmm8's per-token scales of X
    float o[4] = {v.x * sc, v.y * sc, v.z * sc, v.w * sc};
    if (BIAS)
#pragma unroll
      for (int j = 0; j < 4; j++) o[j] += bias_at(bias, min(n + j, N - 1));
    u32 lo, hi;
    asm("cvt.rn." DT "x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(o[1]), "f"(o[0]));
    asm("cvt.rn." DT "x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(o[3]), "f"(o[2]));
    u16* y = Y + (size_t)m * N + n;
    if ((N & 3) == 0) *(uint2*)y = make_uint2(lo, hi);
    else { y[0] = lo; if (n + 1 < N) y[1] = lo >> 16; if (n + 2 < N) y[2] = hi; if (n + 3 < N) y[3] = hi >> 16; }
  }
}
#endif

#ifdef TMM
// ---------------------------------------------------------------------------------------------------------
// mma.sync (m16n8k16): M from 17 to what wgmma takes (or any M without wgmma)
#define NTHR (32 * WN * WM * WK)
#define BN (16 * WNT * WN)
#define BM (8 * WMT * WM)
#define LD (BN + 4)  // fp32 epilogue tile row stride: +4 floats keeps the fragment stores conflict-free

extern "C" __global__ void __launch_bounds__(NTHR) CLUSTER
tmm(const uint4* __restrict__ W, const uint4* __restrict__ X, const float* __restrict__ alpha,
    const void* __restrict__ bias, u16* __restrict__ Y, int M, int N, int KC, int NT16) {
  extern __shared__ uint4 smem[];
  // a pipeline stage holds WK consecutive k128 chunks; warp-group wk works on chunk wk of each stage
  uint4* Ws = smem;                             // [ST][WK][BN/16 tiles][32 lanes]
  uint4* Xs = smem + ST * WK * BN * 2;          // [ST][WK][BM rows][16 pieces of 8 k], piece ^= row & 7
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
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
      cp16(sptr(Xs + ((stage * WK + kk) * BM + r) * 16 + (ch ^ (r & 7))),
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
    // ldmatrix.x4: lanes 8j..8j+7 point at rows 0..7 of piece 4w+j, which hold B of steps 2w (j=0,1), 2w+1 (j=2,3)
    const u32 xs = sptr(Xs + (((i % ST) * WK + wk) * BM + wm * WMT * 8 + (lane & 7)) * 16);
    uint4 wq[WNT];
#pragma unroll
    for (int a = 0; a < WNT; a++) wq[a] = ws[a * 32];
#pragma unroll
    for (int w = 0; w < 4; w++) {                  // word w = mma steps 2w, 2w+1
      u32 xq[WMT][4];
#pragma unroll
      for (int b = 0; b < WMT; b++)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(xq[b][0]), "=r"(xq[b][1]), "=r"(xq[b][2]), "=r"(xq[b][3])
                     : "r"(xs + (b * 128 + ((4 * w + (lane >> 3)) ^ (lane & 7))) * 16));
#pragma unroll
      for (int a = 0; a < WNT; a++) {
        u32 f[8];
        dequant(word(wq[a], w), f);
#pragma unroll
        for (int b = 0; b < WMT; b++) mma(acc[(2 * w) % NACC][a][b], f, xq[b][0], xq[b][1]);
#pragma unroll
        for (int b = 0; b < WMT; b++) mma(acc[(2 * w + 1) % NACC][a][b], f + 4, xq[b][2], xq[b][3]);
      }
    }
  }
  asm volatile("cp.async.wait_group 0;");
#pragma unroll
  for (int p = 1; p < NACC; p++)
#pragma unroll
    for (int q = 0; q < WNT * WMT * 4; q++) (&acc[0][0][0][0])[q] += (&acc[p][0][0][0])[q];
  __syncthreads();
  float* red = (float*)smem + wk * BM * LD;      // fp32 tiles [WK][BM][LD] in smem
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int a = 0; a < WNT; a++)
#pragma unroll
    for (int b = 0; b < WMT; b++) {
      int n = (wn * WNT + a) * 16 + g, m = (wm * WMT + b) * 8 + 2 * t;
      red[m * LD + n] = acc[0][a][b][0]; red[(m + 1) * LD + n] = acc[0][a][b][1];
      red[m * LD + n + 8] = acc[0][a][b][2]; red[(m + 1) * LD + n + 8] = acc[0][a][b][3];
    }
  if (CS > 1) cluster_sync(); else __syncthreads();
  store_tile<BM, BN, WK, LD, NTHR>((const float*)smem, al, bias, Y, M, N, m0, tn0 * 16, z, tid);
  if (CS > 1) cluster_sync();  // keep our smem alive until every CTA of the cluster has read it
}
#endif

#ifdef TMV
// ---------------------------------------------------------------------------------------------------------
// GEMV, M <= 8*MT tokens. Here latency sets the time, not bandwidth or FLOPs, so there is no pipeline and little
// code: each warp's first instructions load all its weight words into registers (per k128 chunk one 16-byte load
// per lane, which is the warp's A fragments), the CTA copies the M rows of X to shared memory once, each warp
// multiplies its chunks, the CTA sums its warps. A CTA = TN n16-tiles x KW warps along K, a warp up to CPW
// chunks; a CTA covers all of K, or 1/CS of it with the partial tiles summed over a cluster as in tmm.
#define NTHR (32 * TN * KW)
__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {  // read once: not kept in L1
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v; }

extern "C" __global__ void __launch_bounds__(NTHR) CLUSTER
tmv(const uint4* __restrict__ W, const uint4* __restrict__ X, const float* __restrict__ alpha,
    const void* __restrict__ bias, u16* __restrict__ Y, int M, int N, int KC, int NT16) {
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, z = blockIdx.z;
  const int tw = warp % TN, kw = warp / TN, tn = min((int)blockIdx.x * TN + tw, NT16 - 1);
  const int KCZ = (KC + CS - 1) / CS, cz = z * KCZ, ncz = min(KC - cz, KCZ);  // the CTA's chunks: cz, cz+1, ..
  const int cw = kw * CPW, nw = max(0, min(ncz - cw, CPW));                 // the warp's: cz+cw, .. (nw of them)
  uint4 wq[CPW];
  const uint4* wp = W + ((size_t)tn * KC + cz + cw) * 32 + lane;
#pragma unroll
  for (int j = 0; j < CPW; j++) wq[j] = j < nw ? ldg_stream(wp + j * 32) : make_uint4(0, 0, 0, 0);
  const float al = *alpha;

  // shared memory: red[KW][TN][MT][4][32] fp32 partials | X[m][chunk][16 pieces], piece ^= m % 8 (as in tmm)
  float* red = (float*)smem;
  const u32 xs = sptr(smem + KW * TN * MT * 32);
#pragma unroll 1
  for (int m = 0; m < M; m++)
#pragma unroll 1
    for (int r = tid; r < ncz * 16; r += NTHR)  // r = 16 * chunk + piece
      cp16(xs + (m * KCZ * 16 + (r & ~15) + ((r & 15) ^ (m & 7))) * 16, X + ((size_t)m * KC + cz) * 16 + r, 16);
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
  __syncthreads();

  // ldmatrix.x4 as in tmm. Lanes of tokens m >= M read row M-1 instead: those outputs are never stored, and
  // each token's column of the mma is independent of the others.
  const int jq = lane >> 3;
  u32 xrow[MT], sw[MT];
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
    const int m = min(8 * mt + (lane & 7), M - 1);
    xrow[mt] = xs + (m * KCZ + cw) * 256;
    sw[mt] = m & 7;
  }
  float acc[4][MT][4];  // 4 independent mma chains
#pragma unroll
  for (int p = 0; p < 4 * MT * 4; p++) (&acc[0][0][0])[p] = 0.f;
#pragma unroll
  for (int j = 0; j < CPW; j++) {
    if (j >= nw) break;
#pragma unroll
    for (int w = 0; w < 4; w++) {
      u32 xq[MT][4], f[8];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        const u32 a = xrow[mt] + j * 256 + ((4 * w + jq) ^ sw[mt]) * 16;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(xq[mt][0]), "=r"(xq[mt][1]), "=r"(xq[mt][2]), "=r"(xq[mt][3]) : "r"(a));
      }
      dequant(word(wq[j], w), f);
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        mma(acc[(2 * w) & 3][mt], f, xq[mt][0], xq[mt][1]);
        mma(acc[(2 * w + 1) & 3][mt], f + 4, xq[mt][2], xq[mt][3]);
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int r = 0; r < 4; r++)
      red[((kw * TN + tw) * MT + mt) * 128 + r * 32 + lane] = acc[0][mt][r] + acc[1][mt][r] + acc[2][mt][r] + acc[3][mt][r];
  if (CS > 1) cluster_sync(); else __syncthreads();

  // element e = (tile, mt, r, lane) of the CTA's tiles: sum over the KW warps (and the CS CTAs), scale, store
  const int E = TN * MT * 128, e1 = E * (z + 1) / CS;
  for (int e = E * z / CS + tid; e < e1; e += NTHR) {
    float v = 0.f;
#pragma unroll 1
    for (int q = 0; q < CS; q++)
#pragma unroll
      for (int k = 0; k < KW; k++) v += CS > 1 ? ld_rank1(red + k * E + e, q) : red[k * E + e];
    const int ln = e & 31, r = (e >> 5) & 3, mt = (e >> 7) % MT, t16 = e / (128 * MT);
    const int n = ((int)blockIdx.x * TN + t16) * 16 + (ln >> 2) + 8 * (r >> 1), m = 8 * mt + 2 * (ln & 3) + (r & 1);
    if (m < M && n < N) {
      u16 o;
      asm("cvt.rn." DT ".f32 %0, %1;" : "=h"(o) : "f"(v * al + bias_at(bias, n)));
      Y[(size_t)m * N + n] = o;
    }
  }
  if (CS > 1) cluster_sync();  // keep our smem alive until every CTA of the cluster has read it
}
#endif

#if defined(WGMM) || defined(WGMM8)
#define NTHR (128 * WGN)               // WGN warpgroups
#define BN (64 * WGN)                  // each owns 64 output channels
#define LD (BN + 4)
// Shared-memory matrix descriptor of a K-major operand with the 128-byte swizzle: start address, leading byte
// offset (unused for this swizzle, 1 by convention), stride byte offset 1024 (8 rows of 128 bytes), mode 1 = SW128.
__device__ __forceinline__ u64 desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62); }
__device__ __forceinline__ void fence_acc(float* d) {  // keep the compiler from touching in-flight accumulators
#pragma unroll
  for (int i = 0; i < BM / 2; i++) asm volatile("" : "+f"(d[i]) :: "memory"); }
// wgmma_mma(float* d, const u32* a, u64 desc): generated by kernel.py (_wgmma_source), one inline-asm
// wgmma.mma_async.sync.aligned.m64n<BM>k<16|32>.f32.<type>.<type> with its BM/2 accumulator operands
WGMMA_FN
// a warpgroup's accumulators into the fp32 tile red[BM][LD]: the thread holds channels warp*16 + g (+8), tokens
// 8j + 2t (+1)
__device__ __forceinline__ void acc_to_red(const float* acc, float* red, int warp, int lane) {
  const int g = lane >> 2, t = lane & 3, n = warp * 16 + g;
#pragma unroll
  for (int j = 0; j < BM / 8; j++) {
    int m = 8 * j + 2 * t;
    red[m * LD + n] = acc[4 * j]; red[(m + 1) * LD + n] = acc[4 * j + 1];
    red[m * LD + n + 8] = acc[4 * j + 2]; red[(m + 1) * LD + n + 8] = acc[4 * j + 3];
  }
}
#endif

#ifdef WGMM
// ---------------------------------------------------------------------------------------------------------
// wgmma (sm_90a): WGN warpgroups, each owning 64 output channels (4 warps x one 16-row tile), times BM tokens;
// MINB CTAs per SM (registers are capped so that they fit).
// Per k16 step a warpgroup issues wgmma.m64n<BM>k16: A = its dequantised weights from registers (per warp the
// mma.sync A fragment, which is why the packing serves both kernels), B = the X tile in shared memory, read by
// the tensor cores through a matrix descriptor, accumulators in registers (BM/2 floats per thread).
#define XSTAGE (BM * 256)              // X: 2 swizzle atoms of 64 k, each BM rows x 128 bytes
#define STAGE (XSTAGE + WGN * 2048)    // then W: one 512-byte tile per warp


extern "C" __global__ void __launch_bounds__(NTHR, MINB) CLUSTER
wgmm(const uint4* __restrict__ W, const uint4* __restrict__ X, const float* __restrict__ alpha,
     const void* __restrict__ bias, u16* __restrict__ Y, int M, int N, int KC, int NT16) {
  extern __shared__ uint4 smem_raw[];
  // the swizzle is a function of address bits 4-9: each 8-row group must start 1024-byte aligned
  const u32 pad = (1024 - (sptr(smem_raw) & 1023)) & 1023, sbase = sptr(smem_raw) + pad;
  char* smem = (char*)smem_raw + pad;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tn0 = blockIdx.x * (BN / 16), m0 = blockIdx.y * BM;
  const int z = blockIdx.z, c0 = KC * z / CS, nch = KC * (z + 1) / CS - c0;  // this CTA's k128 chunks
  const float al = *alpha;

  // Loads. Each thread copies the same pieces of every chunk: X rows r0 + j*RS (piece ch) and one 16-byte piece
  // of its warp's weight tile; their offsets are computed once, a chunk only adds its k offset. Swizzle: piece ch
  // of row r goes to atom ch/8, piece (ch%8) ^ (r%8), and r%8 is the same for all of a thread's rows.
  constexpr int RS = NTHR / 16, XJ = BM / RS;
  const int ch = tid & 15, r0 = tid >> 4, tn = tn0 + warp;
  u32 xoff[XJ], xok = 0;       // in 16-byte units (kernel.py checks that X has fewer than 2^32 of them)
#pragma unroll
  for (int j = 0; j < XJ; j++) {
    const int m = m0 + r0 + j * RS;
    xoff[j] = (u32)min(m, M - 1) * (u32)(KC * 16) + ch;
    xok |= (u32)(m < M) << j;
  }
  const u32 xdst = (ch >> 3) * (BM * 128) + r0 * 128 + (((ch & 7) ^ (r0 & 7)) << 4);
  const uint4* wsrc = W + (size_t)min(tn, NT16 - 1) * KC * 32 + lane;
  auto load = [&](int stage, int c) {
    const u32 st = sbase + stage * STAGE;
#pragma unroll
    for (int j = 0; j < XJ; j++) cp16(st + xdst + j * RS * 128, X + xoff[j] + c * 16, (xok >> j) & 1 ? 16 : 0);
    cp16(st + XSTAGE + tid * 16, wsrc + c * 32, tn < NT16 ? 16 : 0);
  };
  float acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; i++) acc[i] = 0.f;

  // Per chunk: wait for its data, refill the stage freed by the previous chunk, dequantise all 8 steps, then
  // fence, 8 wgmmas, commit, and wait for them. Nothing may write a wgmma input (A registers, descriptors)
  // between the fence and the wait, or ptxas serialises every wgmma (its note C7513): so a warpgroup does not
  // dequantise chunk i+1 while chunk i multiplies; the other warpgroups on the SM keep the tensor cores busy.
#pragma unroll
  for (int s = 0; s < ST - 1; s++) { if (s < nch) load(s, c0 + s); asm volatile("cp.async.commit_group;"); }
  fence_acc(acc);
  for (int i = 0; i < nch; i++) {
    asm volatile("cp.async.wait_group %0;" :: "n"(ST - 2));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async wrote it, the tensor cores read it
    __syncthreads();             // chunk i landed; every warpgroup finished chunk i-1, so its stage is free
    if (i + ST - 1 < nch) load((i + ST - 1) % ST, c0 + i + ST - 1);
    asm volatile("cp.async.commit_group;");
    const u32 xs = sbase + (i % ST) * STAGE;
    const uint4 wq = *(const uint4*)(smem + (i % ST) * STAGE + XSTAGE + (warp * 32 + lane) * 16);
    u32 f[4][8];                 // word w = k16 steps 2w, 2w+1: k 32w .. 32w+31 of the chunk
    u64 d[8];                    // step s: swizzle atom s/4, 32 bytes per step within it
#pragma unroll
    for (int w = 0; w < 4; w++) dequant(word(wq, w), f[w]);
#pragma unroll
    for (int s = 0; s < 8; s++) d[s] = desc(xs + (s >> 2) * (BM * 128) + (s & 3) * 32);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int s = 0; s < 8; s++) wgmma_mma(acc, f[s >> 1] + 4 * (s & 1), d[s]);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_acc(acc);
  asm volatile("cp.async.wait_group 0;");
  __syncthreads();
  float* red = (float*)smem;
  acc_to_red(acc, red, warp, lane);
  if (CS > 1) cluster_sync(); else __syncthreads();
  store_tile<BM, BN, 1, LD, NTHR>(red, al, bias, Y, M, N, m0, tn0 * 16, z, tid);
  if (CS > 1) cluster_sync();
}
#endif

#ifdef WGMM8
// ---------------------------------------------------------------------------------------------------------
// ternary x fp8 (W1.58A8, wgmma, sm_90a). X arrives as e4m3 codes and one float32 scale per token (quant8 below),
// stored as the shared-memory image of a stage: chunk-major [KC][Mp tokens][128 bytes], the 16-byte pieces of a
// row already swizzled (piece p at p ^ row%8). A stage (BM rows of one k128 chunk, plus the weight tiles) is
// then contiguous, and one thread moves it with bulk copies (cp.async.bulk: the TMA engine, no tensor map),
// which count their bytes into the stage's "full" mbarrier; warps release a stage through its "empty" one.
// No CTA-wide barrier in the main loop, and no address arithmetic in the compute warps. (A separate producer
// warp would cost a whole warpgroup of registers: the SM hands them out per warpgroup.)
// Per chunk a warpgroup expands its codes straight to e4m3 bytes (dequant8: -1, 0, 1 are exact in e4m3) and
// issues 4 wgmma.m64n<BM>k32.e4m3.e4m3; alpha times the token's scale, and the bias, in the epilogue.
#define XSTAGE (BM * 128)
#define STAGE (XSTAGE + WGN * 2048)

// one 32-bit word of codes = the A fragment of one k32 step (4 registers of 4 e4m3 bytes). The 8-bit fragment
// wants k 4t..4t+3 in a register where the 16-bit one had 2t, 2t+1, 2t+8, 2t+9: same row, other positions.
// So the bytes hold k = 2t + 0, 8, 1, 9 (codes at bits 0, 4, 16, 20 of the word, shifted by 2 for rows g+8,
// by 8 for k+16) and quant8 permutes X's k the same way. Two PRMTs: gather the 4 codes into the low 4
// nibbles, then look each up in the 3-byte table {0xB8 = -1, 0x00 = 0, 0x38 = +1}.
__device__ __forceinline__ void dequant8(u32 q, u32* a) {
  const u32 q2 = q >> 2, LUT = 0x003800B8u;
  a[0] = __byte_perm(LUT, 0, __byte_perm(q, 0, 0x20) & 0x3333);   // row g,   k 0..15 of the step
  a[1] = __byte_perm(LUT, 0, __byte_perm(q2, 0, 0x20) & 0x3333);  // row g+8, k 0..15
  a[2] = __byte_perm(LUT, 0, __byte_perm(q, 0, 0x31) & 0x3333);   // row g,   k 16..31
  a[3] = __byte_perm(LUT, 0, __byte_perm(q2, 0, 0x31) & 0x3333);  // row g+8, k 16..31
}
__device__ __forceinline__ void mbar_init(u32 b, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(b), "r"(count) : "memory"); }
__device__ __forceinline__ void mbar_arrive(u32 b) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" :: "r"(b) : "memory"); }
__device__ __forceinline__ void mbar_expect(u32 b, u32 bytes) {  // arrive, and expect this many bytes
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" :: "r"(b), "r"(bytes) : "memory"); }
__device__ __forceinline__ void mbar_wait(u32 b, u32 parity) {
  u32 done;
  do asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                  : "=r"(done) : "r"(b), "r"(parity) : "memory");
  while (!done);
}
__device__ __forceinline__ void bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory"); }

extern "C" __global__ void __launch_bounds__(NTHR, MINB) CLUSTER
wgmm8(const uint4* __restrict__ W, const uint4* __restrict__ X, const float* __restrict__ xs_scale,
      const float* __restrict__ alpha, const void* __restrict__ bias, u16* __restrict__ Y, int M, int Mp, int N,
      int KC, int NT16) {
  extern __shared__ uint4 smem_raw[];
  __shared__ __align__(8) u64 bars[2 * ST];    // full[s], then empty[s]
  const u32 pad = (1024 - (sptr(smem_raw) & 1023)) & 1023, sbase = sptr(smem_raw) + pad;
  char* smem = (char*)smem_raw + pad;
  const u32 full = sptr(bars), empty = full + 8 * ST;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tn0 = blockIdx.x * (BN / 16), m0 = blockIdx.y * BM;
  const int z = blockIdx.z, c0 = KC * z / CS, nch = KC * (z + 1) / CS - c0;
  const float al = *alpha;
  if (tid == 0)
    for (int s = 0; s < ST; s++) { mbar_init(full + 8 * s, 1); mbar_init(empty + 8 * s, 4 * WGN); }
  __syncthreads();
  auto issue = [&](int i) {                    // thread 0: chunk c0 + i into stage i % ST, counted by full[s]
    const int s = i % ST, c = c0 + i;
    const u32 st = sbase + s * STAGE, f = full + 8 * s;
    mbar_expect(f, STAGE);
    bulk(st, X + ((size_t)c * Mp + m0) * 8, XSTAGE, f);
    for (int w = 0; w < 4 * WGN; w++)          // one 512-byte weight tile per warp
      bulk(st + XSTAGE + w * 512, W + ((size_t)min(tn0 + w, NT16 - 1) * KC + c) * 32, 512, f);
  };
  if (tid == 0)
    for (int i = 0; i < ST - 2 && i < nch; i++) issue(i);
  float acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; i++) acc[i] = 0.f;
  fence_acc(acc);
  // Chunk i: wait for its stage, dequantise (prep), fence + 4 wgmmas + commit (mma), wait, release the stage.
  // Two register sets alternate, so that chunk i+1 is dequantised while chunk i multiplies: the registers
  // written are never those of a wgmma in flight (else ptxas serialises every wgmma, its note C7513).
  auto prep = [&](int i, u32 (&f)[4][4]) {
    // refill ST - 2 chunks ahead, into the stage of chunk i - 2: by now every warp has (nearly always) released
    // it, so thread 0 seldom waits, and the other warps never wait for one another
    if (tid == 0 && i + ST - 2 < nch) {
      if (i >= 2) mbar_wait(empty + 8 * ((i - 2) % ST), ((i - 2) / ST) & 1);
      issue(i + ST - 2);
    }
    mbar_wait(full + 8 * (i % ST), (i / ST) & 1);
    const uint4 wq = *(const uint4*)(smem + (i % ST) * STAGE + XSTAGE + (warp * 32 + lane) * 16);
#pragma unroll
    for (int w = 0; w < 4; w++) dequant8(word(wq, w), f[w]);  // word w = k32 step w
  };
  auto mma = [&](int i, u32 (&f)[4][4]) {
    const u32 xs = sbase + (i % ST) * STAGE;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int w = 0; w < 4; w++) wgmma_mma(acc, f[w], desc(xs + w * 32));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  };
  auto done = [&](int i) {
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + 8 * (i % ST));  // this warp is done with the stage
  };
  u32 fa[4][4], fb[4][4];
  if (nch > 0) prep(0, fa);
  for (int i = 0; i < nch; i += 2) {
    mma(i, fa);
    if (i + 1 < nch) prep(i + 1, fb);
    done(i);
    if (i + 1 < nch) {
      mma(i + 1, fb);
      if (i + 2 < nch) prep(i + 2, fa);
      done(i + 1);
    }
  }
  fence_acc(acc);
  __syncthreads();                             // every copy was waited for and consumed: the stages become red
  float* red = (float*)smem;
  acc_to_red(acc, red, warp, lane);
  if (CS > 1) cluster_sync(); else __syncthreads();
  store_tile<BM, BN, 1, LD, NTHR>(red, al, bias, Y, M, N, m0, tn0 * 16, z, tid, xs_scale);
  if (CS > 1) cluster_sync();
}
#endif

#ifdef QUANT8
// ---------------------------------------------------------------------------------------------------------
// X (M, 128 KC) 16-bit -> e4m3 codes in wgmm8's layout + one float32 scale per token: s = amax / 448 (448 is
// e4m3's largest finite value), q = rn(x * (448 / amax)). One CTA per token row m < Mp; rows >= M are zeros.
__device__ __forceinline__ float hi_f(u32 v) { return to_f32(v >> 16); }
__device__ __forceinline__ u32 e4m3x2(float hi, float lo) {  // lo -> byte 0, hi -> byte 1
  u16 r; asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo)); return r; }

extern "C" __global__ void __launch_bounds__(128) quant8(const uint4* __restrict__ X, uint4* __restrict__ Q,
                                                         float* __restrict__ S, int M, int Mp, int KC) {
  constexpr int KEEP = 4;                      // pieces per thread held in registers between the two passes
  __shared__ float wmax[4];                    // (all of a row up to K = 8192; beyond, re-read from L2)
  const int m = blockIdx.x, tid = threadIdx.x, P = m < M ? KC * 8 : 0;  // P pieces of 16 k; none for pad rows
  const uint4* x = X + (size_t)min(m, M - 1) * KC * 16;
  uint4 keep[2 * KEEP];
  float amax = 0.f;
  auto absmax = [&](const uint4& a, const uint4& b) {
    const u32 v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int j = 0; j < 8; j++) amax = fmaxf(amax, fmaxf(fabsf(to_f32(v[j])), fabsf(hi_f(v[j]))));
  };
#pragma unroll
  for (int j = 0; j < KEEP; j++) {
    const int p = tid + 128 * j;
    if (p < P) { keep[2 * j] = x[2 * p]; keep[2 * j + 1] = x[2 * p + 1]; absmax(keep[2 * j], keep[2 * j + 1]); }
  }
  for (int p = tid + 128 * KEEP; p < P; p += 128) absmax(x[2 * p], x[2 * p + 1]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((tid & 31) == 0) wmax[tid >> 5] = amax;
  __syncthreads();
  amax = fmaxf(fmaxf(wmax[0], wmax[1]), fmaxf(wmax[2], wmax[3]));
  const float inv = amax > 0.f ? 448.f / amax : 0.f;
  if (tid == 0) S[m] = amax / 448.f;
  auto at = [&](int p) { return ((size_t)(p >> 3) * Mp + m) * 8 + ((p & 7) ^ (m & 7)); };  // piece p in the image
  // piece = k 8 r1 + 2 t + h (words v[4 r1 + t], half h) -> byte 4 t + 2 h + r1 (dequant8's order)
  auto store = [&](int p, const uint4& a, const uint4& b) {
    const u32 v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    u32 r[4];
#pragma unroll
    for (int t = 0; t < 4; t++)
      r[t] = e4m3x2(to_f32(v[4 + t]) * inv, to_f32(v[t]) * inv) | e4m3x2(hi_f(v[4 + t]) * inv, hi_f(v[t]) * inv) << 16;
    Q[at(p)] = make_uint4(r[0], r[1], r[2], r[3]);
  };
#pragma unroll
  for (int j = 0; j < KEEP; j++)
    if (tid + 128 * j < P) store(tid + 128 * j, keep[2 * j], keep[2 * j + 1]);
  for (int p = tid + 128 * KEEP; p < P; p += 128) store(p, x[2 * p], x[2 * p + 1]);
  if (m >= M)                                  // padding rows: zero codes
    for (int p = tid; p < KC * 8; p += 128) Q[at(p)] = make_uint4(0u, 0u, 0u, 0u);
}
#endif

#ifdef DEQUANT
// ---------------------------------------------------------------------------------------------------------
// expand the codes to a 16-bit (N, K) matrix of -1, 0, 1 for cuBLAS (large M on GPUs without wgmma)
extern "C" __global__ void dequant(const u32* __restrict__ packed, u32* __restrict__ w, int K, int words, u32 one) {
  // one thread per 32-bit word = 16 codes of the tile layout (kernel.pack_2bit): word i = (Tn, Ck, g, t, wq);
  // pair p = (s1, r1, r0) holds its two codes at bits 2p and 16 + 2p: row n = 16 Tn + 8 r0 + g,
  // columns k, k+1 with k = 128 Ck + 32 wq + 16 s1 + 8 r1 + 2 t
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= words) return;
  u32 q = packed[i];
  int wq = i & 3, t = (i >> 2) & 3, g = (i >> 4) & 7, rest = i >> 7, ck_n = K >> 7;
  int ck = rest % ck_n, tn = rest / ck_n;
#pragma unroll
  for (int p = 0; p < 8; p++) {
    u32 lo = (q >> (2 * p)) & 3u, hi = (q >> (16 + 2 * p)) & 3u;
    u32 blo = lo == 1u ? 0u : (lo == 2u ? one : (one | 0x8000u)), bhi = hi == 1u ? 0u : (hi == 2u ? one : (one | 0x8000u));
    long n = 16L * tn + 8 * (p & 1) + g, k = 128L * ck + 32 * wq + 16 * (p >> 2) + 8 * ((p >> 1) & 1) + 2 * t;
    w[(n * K + k) >> 1] = blo | (bhi << 16);
  }
}
#endif
