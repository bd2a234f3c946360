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
__device__ __forceinline__ void cluster_sync() {  // makes this CTA's shared-memory writes visible to the cluster
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory"); }
// The same barrier without release, where it publishes nothing: ptxas compiles a cluster-scope release to
// MEMBAR.ALL.GPU, which waits until the thread's global stores have reached L2. At the end of a kernel it only keeps
// this CTA's shared memory alive until the others have read it (their loads returned before their arrive: they used
// the values); in wgmm it says that every CTA is done with the stages that other CTAs' pushes overwrite.
__device__ __forceinline__ void cluster_done() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory"); }
__device__ __forceinline__ u32 mapa(u32 p, int rank) {  // shared address p in another CTA's shared memory
  u32 r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(p), "r"(rank));
  return r; }
__device__ __forceinline__ float4 ld_rank(const float* p, int rank) {  // read another CTA's shared memory
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(mapa(sptr(p), rank)));
  return v; }
// 4 floats into another CTA's shared memory (address p in ours), counted in bytes on its mbarrier (bar in ours)
__device__ __forceinline__ void st_async(u32 p, u32 bar, int rank, const float* v) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];"
               :: "r"(mapa(p, rank)), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3]), "r"(mapa(bar, rank)) : "memory"); }
__device__ __forceinline__ float ld_rank1(const float* p, int rank) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(mapa(sptr(p), rank)));
  return v; }
__device__ __forceinline__ u32 pack2(float lo, float hi) {  // two values of the kernel's dtype, lo -> bits 0..15
  u32 r; asm("cvt.rn." DT "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
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
// memory and writes its own slice of the tile), scaled by alpha (al = alpha[0]; AVEC: alpha[n]), the bias added,
// rounded once, stored.
template <int BM_, int BN_, int NK, int LD_, int NT>
__device__ __forceinline__ void store_tile(const float* red, const float* alpha, float al, const void* bias, u16* Y, int M, int N,
                                           int m0, int n0, int z, int tid) {
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
#if AVEC  // one alpha per output channel (kernel.py: fused linears)
    float o[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) o[j] *= alpha[min(n + j, N - 1)];
#else
    float o[4] = {v.x * al, v.y * al, v.z * al, v.w * al};
#endif
    if (BIAS)
#pragma unroll
      for (int j = 0; j < 4; j++) o[j] += bias_at(bias, min(n + j, N - 1));
    const u32 lo = pack2(o[0], o[1]), hi = pack2(o[2], o[3]);
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
  store_tile<BM, BN, WK, LD, NTHR>((const float*)smem, alpha, al, bias, Y, M, N, m0, tn0 * 16, z, tid);
  if (CS > 1) cluster_done();  // keep our smem alive until every CTA of the cluster has read it
}
#endif

#ifdef TMV
// ---------------------------------------------------------------------------------------------------------
// GEMV, M <= 8*MT tokens. Here latency sets the time, not bandwidth or FLOPs, so there is no pipeline and little
// code: each warp's first instructions load all its weight words into registers (per k128 chunk one 16-byte load
// per lane, which is the warp's A fragments), the CTA copies the M rows of X to shared memory once, each warp
// multiplies its chunks, the CTA sums its warps. A CTA = TN n16-tiles x KW warps along K, a warp up to CPW
// chunks; a CTA covers all of K, or 1/CS of it with the partial tiles summed over a cluster as in tmm.
// STAGE: the weight words take a detour through shared memory, X's copy first and then one cp.async group per
// chunk, so that a warp multiplies chunk j as soon as it has landed. Loaded into registers, a warp's chunks share
// one scoreboard (ptxas's choice), so its first multiply waits for all of them; but X's copy goes first, ahead of
// the weights (the sweep picks per layer).
#define NTHR (32 * TN * KW)
__device__ __forceinline__ void cp_wait(int n) {  // cp.async.wait_group n: n must be known once unrolled
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
    case 7: asm volatile("cp.async.wait_group 7;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 8;" ::: "memory"); break;  // CPW <= 8
  }
}
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
  // shared memory: red[KW][TN][MT][4][32] fp32 partials | X[m][chunk][16 pieces], piece ^= m % 8 (as in tmm) |
  // STAGE: ws[KW * TN][CPW][32] a lane's 16 bytes of each of its warp's chunks
  float* red = (float*)smem;
  const u32 xs = sptr(smem + KW * TN * MT * 32);
#if STAGE
  const u32 ws = xs + (M * KCZ * 16 + (warp * CPW * 32 + lane)) * 16;
#endif
  auto copy_x = [&] {
#pragma unroll 1
    for (int m = 0; m < M; m++)
#pragma unroll 1
      for (int r = tid; r < ncz * 16; r += NTHR)  // r = 16 * chunk + piece
        cp16(xs + (m * KCZ * 16 + (r & ~15) + ((r & 15) ^ (m & 7))) * 16, X + ((size_t)m * KC + cz) * 16 + r, 16);
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
#if STAGE
  copy_x();
#pragma unroll
  for (int j = 0; j < CPW; j++) {  // group 1 + j: chunk j (zeros past the warp's chunks, from a valid address)
    cp16(ws + j * 512, W + ((size_t)tn * KC + min(cz + cw + j, KC - 1)) * 32 + lane, j < nw ? 16 : 0);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  const float al = *alpha;
  cp_wait(CPW);  // X's rows (this thread's pieces; after the barrier, everyone's)
#else
  uint4 wq[CPW];
  const uint4* wp = W + ((size_t)tn * KC + cz + cw) * 32 + lane;
#pragma unroll
  for (int j = 0; j < CPW; j++) wq[j] = j < nw ? ldg_stream(wp + j * 32) : make_uint4(0, 0, 0, 0);
  const float al = *alpha;
  copy_x();
  cp_wait(0);
#endif
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
#if STAGE
    cp_wait(CPW - 1 - j);  // chunk j has landed (this lane's own bytes: no barrier)
    uint4 wj;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(wj.x), "=r"(wj.y), "=r"(wj.z), "=r"(wj.w) : "r"(ws + j * 512));
#else
    const uint4 wj = wq[j];
#endif
#pragma unroll
    for (int w = 0; w < 4; w++) {
      u32 xq[MT][4], f[8];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        const u32 a = xrow[mt] + j * 256 + ((4 * w + jq) ^ sw[mt]) * 16;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(xq[mt][0]), "=r"(xq[mt][1]), "=r"(xq[mt][2]), "=r"(xq[mt][3]) : "r"(a));
      }
      dequant(word(wj, w), f);
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
      asm("cvt.rn." DT ".f32 %0, %1;" : "=h"(o) : "f"(v * (AVEC ? alpha[n] : al) + bias_at(bias, n)));
      Y[(size_t)m * N + n] = o;
    }
  }
  if (CS > 1) cluster_done();  // keep our smem alive until every CTA of the cluster has read it
}
#endif

#if defined(WGMM) || defined(WGMM8)
// ---------------------------------------------------------------------------------------------------------
// wgmma (sm_90a), 16-bit (WGMM) or fp8 (WGMM8, W1.58A8) activations. WGN warpgroups each own 64 output channels
// (4 warps x one 16-row tile) times BM tokens; MINB CTAs per SM (registers are capped so that they fit).
// Per k16 (k32 for fp8) step a warpgroup issues wgmma.m64n<BM>: A = its dequantised weights from registers (per
// warp the mma.sync A fragment, which is why the packing serves both kernels), B = the X tile in shared memory,
// read by the tensor cores through a matrix descriptor, accumulators in registers (BM/2 floats per thread).
//
// The pipeline: a ring of ST stages, each one k128 chunk (X's BM rows, then the CTA's weight tiles), filled by
// the copy engine (TMA): thread 0 issues a stage's copies (X's, then one for all the CTA's weight tiles through a
// 3-D tensor map of the packed codes, kernel.py _w_map), which count their bytes into the stage's "full" mbarrier;
// each warp releases a stage through its "empty" one once its wgmmas have read it. So the compute
// warps issue no loads and no address arithmetic, and no CTA barrier orders the main loop. (A separate producer
// warp would cost a whole warpgroup of registers: the SM hands them out per warpgroup.) X arrives as
//   16-bit: tiles of the caller's X (M, Kp) through a tensor map (kernel.py, _x_map): 64 k x BM rows per copy,
//           which the copy engine writes with the 128-byte swizzle wgmma's descriptor names; rows past M read 0;
//   fp8:    quant8's image of the stage (chunk-major, already swizzled), one contiguous bulk copy.
#define NTHR (128 * WGN)
#define BN (64 * WGN)
#ifdef WGMM8
#define XSTAGE (BM * 128)              // X: BM rows x 128 e4m3 codes, one swizzle atom
#define GPC 1                          // groups of 4 wgmmas per chunk: 4 x k32
#define LAG 2
#define KNAME wgmm8
#define XPARAM const uint4* __restrict__ X, const float* __restrict__ xs_scale, int Mp
#else
#define XSTAGE (BM * 256)              // X: 2 swizzle atoms of 64 k, each BM rows x 128 bytes
#define GPC 2                          // 8 x k16, issued as 2 groups of 4
#define LAG 1
#define KNAME wgmm
#define XPARAM const __grid_constant__ TMap xmap
#endif
#define STAGE (XSTAGE + WGN * 2048)    // then W: one 512-byte tile per warp
struct __align__(64) TMap { u64 v[16]; };  // a CUtensorMap, opaque: cuTensorMapEncodeTiled fills it (kernel.py)

// Shared-memory matrix descriptor of a K-major operand with the 128-byte swizzle: start address, leading byte
// offset (unused for this swizzle, 1 by convention), stride byte offset 1024 (8 rows of 128 bytes), mode 1 = SW128.
// The swizzle is a function of address bits 4-9 (16-byte piece c of row r at c ^ r%8): atoms start 1024-aligned.
__device__ __forceinline__ u64 desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62); }
__device__ __forceinline__ void fence_acc(float* d) {  // keep the compiler from touching in-flight accumulators
#pragma unroll
  for (int i = 0; i < BM / 2; i++) asm volatile("" : "+f"(d[i]) :: "memory"); }
// wgmma_mma(float* d, const u32* a, u64 desc): generated by kernel.py (_wgmma_source), one inline-asm
// wgmma.mma_async.sync.aligned.m64n<BM>k<16|32>.f32.<type>.<type> with its BM/2 accumulator operands
WGMMA_FN
// The epilogue runs on the accumulators (a thread holds channels warp*16 + g (+8) of tokens 8j + 2t (+1) in
// acc[4j..4j+3]): each thread scales its values (alpha; fp8: the tokens' scales of X), adds the bias and rounds
// them to 16 bits in registers, stmatrix.trans writes each warp's 8 x 8 blocks into a (BM, BN) tile laid out as Y
// (a row per token) in shared memory, and the CTA stores whole rows in 16-byte pieces: half the shared-memory
// traffic of an fp32 tile, a quarter of the store instructions. With K split over a cluster, only the CTA's own
// token groups, once the other CTAs' partial sums are added (the kernel's end).
#define LDH (BN + 8)  // the 16-bit tile's row stride: +16 bytes puts the 8 rows of a stmatrix on different banks
__device__ __forceinline__ void store_acc(const float* acc, u16* tile, const float* alpha, float al, const void* bias,
                                          const float* rs, u16* Y, int M, int N, int m0, int n0, int warp, int tid,
                                          int j0 = 0, int j1 = BM / 8) {  // token groups j0 .. j1 - 1 only
  const int lane = tid & 31, g = lane >> 2, t = lane & 3, n = n0 + warp * 16 + g;  // channels n, n + 8
  const float a0 = AVEC ? alpha[min(n, N - 1)] : al, a1 = AVEC ? alpha[min(n + 8, N - 1)] : al;
  const float b0 = bias_at(bias, min(n, N - 1)), b1 = bias_at(bias, min(n + 8, N - 1));
  // stmatrix.x4 takes 4 registers per thread = 4 8x8 blocks: i = 0, 1 tokens 8j.., i = 2, 3 tokens 8j + 8..;
  // even i channels n0 + 16 warp.., odd i 8 further. .trans stores block i's column (token) r at the address
  // lane 8i + r gives: row 8j + 8 (i >> 1) + r of the tile, at that channel.
  const int i = lane >> 3;
  const u32 row = sptr(tile) + ((8 * (i >> 1) + (lane & 7)) * LDH + warp * 16 + 8 * (i & 1)) * 2;
#pragma unroll
  for (int j = 0; j < BM / 8; j += 2) {
    if (j + 2 <= j0 || j >= j1) continue;
    u32 r[4];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const float* c = acc + 4 * (j + h);     // tokens 8(j+h) + 2t, +1 of channel n, then of n + 8
      float s0 = 1.f, s1 = 1.f;
      if (rs) { const int m = m0 + 8 * (j + h) + 2 * t; s0 = rs[min(m, M - 1)]; s1 = rs[min(m + 1, M - 1)]; }
      r[2 * h] = pack2(c[0] * (a0 * s0) + b0, c[1] * (a0 * s1) + b0);
      r[2 * h + 1] = pack2(c[2] * (a1 * s0) + b1, c[3] * (a1 * s1) + b1);
    }
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};"
                 :: "r"(row + j * 16 * LDH), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
  }
  __syncthreads();
  const int rows = min(8 * j1, M - m0);
  if ((N & 7) == 0) {                         // rows of Y start 16-byte aligned
#pragma unroll 4
    for (int e = 8 * j0 * (BN / 8) + tid; e < 8 * j1 * (BN / 8); e += NTHR) {
      const int r = e / (BN / 8), c = e % (BN / 8) * 8;
      if (r < rows && n0 + c < N) *(uint4*)(Y + (size_t)(m0 + r) * N + n0 + c) = *(const uint4*)(tile + r * LDH + c);
    }
  } else
    for (int e = 8 * j0 * BN + tid; e < 8 * j1 * BN; e += NTHR) {
      const int r = e / BN, c = e % BN;
      if (r < rows && n0 + c < N) Y[(size_t)(m0 + r) * N + n0 + c] = tile[r * LDH + c];
    }
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
__device__ __forceinline__ void tma3d(u32 dst, const TMap* map, int x, int y, int z, u32 bar) {
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
               :: "r"(dst), "l"(map), "r"(x), "r"(y), "r"(z), "r"(bar) : "memory"); }
__device__ __forceinline__ void tma2d(u32 dst, const TMap* map, int k, int m, u32 bar) {  // box at (k, m)
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
               :: "r"(dst), "l"(map), "r"(k), "r"(m), "r"(bar) : "memory"); }

#ifdef WGMM8
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
#endif

extern "C" __global__ void __launch_bounds__(NTHR, MINB) CLUSTER
KNAME(const __grid_constant__ TMap wmap, XPARAM, const float* __restrict__ alpha, const void* __restrict__ bias,
      u16* __restrict__ Y, int M, int N, int KC, int NT16, int tile0) {
  extern __shared__ uint4 smem_raw[];
  __shared__ __align__(8) u64 bars[2 * ST + 1];  // full[s], empty[s], then the cluster sum's (CS > 1)
  const u32 pad = (1024 - (sptr(smem_raw) & 1023)) & 1023, sbase = sptr(smem_raw) + pad;
  char* smem = (char*)smem_raw + pad;
  const u32 full = sptr(bars), empty = full + 8 * ST;
  constexpr int G = BM / 8 / CS;               // with K split, CTA z stores token groups z G .. z G + G - 1
  static_assert(BM / 8 % CS == 0, "a CTA stores whole groups of 8 tokens");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // output tile t: channel tiles first, so that CTAs running together share X's rows. A launch may run only the
  // tiles from tile0 on (tiles.launches: a last, part-filled wave runs as a second launch that splits K)
  const int t = tile0 + blockIdx.x, ntn = (NT16 + BN / 16 - 1) / (BN / 16);
  const int tn0 = t % ntn * (BN / 16), m0 = t / ntn * BM;
  const int z = blockIdx.z, c0 = KC * z / CS, nch = KC * (z + 1) / CS - c0;  // this CTA's k128 chunks
  const float al = *alpha;
  if (tid == 0) {
#ifndef WGMM8
    asm volatile("prefetch.tensormap [%0];" :: "l"(&xmap) : "memory");
#endif
    asm volatile("prefetch.tensormap [%0];" :: "l"(&wmap) : "memory");
    for (int s = 0; s < ST; s++) { mbar_init(full + 8 * s, 1); mbar_init(empty + 8 * s, 4 * WGN); }
#if CS > 1
    mbar_init(full + 16 * ST, 1);              // the partial sums the cluster's other CTAs push here (epilogue):
    mbar_expect(full + 16 * ST, (CS - 1) * G * NTHR * 16);  // CS - 1 senders x G groups x 16 bytes per thread
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
  }
  __syncthreads();
  auto issue = [&](int i) {                    // thread 0: chunk c0 + i into stage i % ST, counted by full[s]
    const int s = i % ST, c = c0 + i;
    const u32 st = sbase + s * STAGE, f = full + 8 * s;
    mbar_expect(f, STAGE);
#ifdef WGMM8
    bulk(st, X + ((size_t)c * Mp + m0) * 8, XSTAGE, f);
#else
    tma2d(st, &xmap, 128 * c, m0, f);                  // k 0..63 of the chunk: the first swizzle atom
    tma2d(st + BM * 128, &xmap, 128 * c + 64, m0, f);  // k 64..127
#endif
    tma3d(st + XSTAGE, &wmap, 0, c, tn0, f);    // the CTA's 4 WGN weight tiles (512 bytes per warp) of chunk c
  };
  if (tid == 0)
    for (int i = 0; i < ST - LAG && i < nch; i++) issue(i);
  float acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; i++) acc[i] = 0.f;
  fence_acc(acc);
  // A chunk's wgmmas go in groups of 4: GPC per chunk, group g of chunk g / GPC uses part `half` of it (fp8: all).
  // prep dequantises a group (on its chunk's first group, after waiting for the stage), mma issues its 4 wgmmas,
  // retire waits for them and releases the stage after its chunk's last group. Group g+1 is dequantised while
  // group g multiplies, into the other of two register sets: the registers written are never those of a wgmma in
  // flight (else ptxas serialises every wgmma, its note C7513). Measured on an H200: waiting only for group g-1
  // (the next group always queued) was 12-20% slower with fp8 and up to 9% with bf16 (the widest tile 3% faster);
  // and the same loop with prep(g + 1) outside the `if` made ptxas emit other address code, 10-20% slower bf16.
  uint4 wq;
  auto prep = [&](int g, u32 (&f)[16], int half) {
    const int i = g / GPC;
    // refill the stage of chunk i - LAG, the newest this warp has released by now: at the chunk's last group that
    // is chunk i - 1 with two groups per chunk (LAG 1), else i - 2; so ST - LAG chunks are in flight. Thread 0
    // waits for other warps' releases only when they are further behind; no other warp waits for another.
    if (half == GPC - 1 && tid == 0 && i + ST - LAG < nch) {
      if (i >= LAG) mbar_wait(empty + 8 * ((i - LAG) % ST), ((i - LAG) / ST) & 1);
      issue(i + ST - LAG);
    }
    if (half == 0) {
      mbar_wait(full + 8 * (i % ST), (i / ST) & 1);
      wq = *(const uint4*)(smem + (i % ST) * STAGE + XSTAGE + (warp * 32 + lane) * 16);
    }
#ifdef WGMM8
#pragma unroll
    for (int w = 0; w < 4; w++) dequant8(word(wq, w), f + 4 * w);      // word w = k32 step w
#else
#pragma unroll
    for (int w = 0; w < 2; w++) dequant(word(wq, 2 * half + w), f + 8 * w);  // word = k16 steps 2 word, +1
#endif
  };
  auto mma = [&](int g, u32 (&f)[16], int half) {
    const u32 xs = sbase + (g / GPC % ST) * STAGE + half * (BM * 128);  // 32 bytes per step within an atom
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int j = 0; j < 4; j++) wgmma_mma(acc, f + 4 * j, desc(xs + 32 * j));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  };
  auto retire = [&](int g) {                   // wait for group g, release its stage if it was the chunk's last
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    if (g % GPC == GPC - 1) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + 8 * (g / GPC % ST));  // this warp is done with the stage
    }
  };
  u32 fa[16], fb[16];
  const int ng = nch * GPC;
  if (ng > 0) prep(0, fa, 0);
  for (int g = 0; g < ng; g += 2) {
    mma(g, fa, 0);
    if (g + 1 < ng) {
      prep(g + 1, fb, 1 % GPC);
      retire(g);
      mma(g + 1, fb, 1 % GPC);
      if (g + 2 < ng) prep(g + 2, fa, 0);
      retire(g + 1);
    } else retire(g);
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_acc(acc);
  __syncthreads();                             // every copy was waited for and consumed: the stages are free
#ifdef WGMM8
  const float* rs = xs_scale;
#else
  const float* rs = nullptr;
#endif
#if CS == 1
  store_acc(acc, (u16*)smem, alpha, al, bias, rs, Y, M, N, m0, tn0 * 16, warp, tid);
#else
  // K split over the cluster: CTA z stores its G groups of 8 tokens (above). Each CTA pushes its partial sums of
  // the other CTAs' groups into their shared memory with st.async, which counts the bytes on the receiver's mbarrier
  // (16 bytes per thread, consecutive threads consecutive), adds what the others pushed to its own groups once its
  // mbarrier has them all, and stores them as CS == 1 does. The one cluster barrier (relaxed:
  // nothing to publish) only says that every CTA is done with the stages the pushes overwrite.
  const float4* recv = (const float4*)smem;    // [CS - 1 senders][G][NTHR]
  const u32 rbar = full + 16 * ST;             // bars' last: the cluster sum's mbarrier
  cluster_done();
#pragma unroll
  for (int j = 0; j < BM / 8; j++) {
    const int q = j / G, slot = (z - q - 1 + CS) % CS;  // owner q; the senders to q take slots 0 .. CS - 2
    if (q != z) st_async(sptr(recv + (slot * G + j % G) * NTHR + tid), rbar, q, acc + 4 * j);
  }
  mbar_wait(rbar, 0);
#pragma unroll
  for (int j = 0; j < BM / 8; j++)
    if (j / G == z)
#pragma unroll
      for (int s = 0; s < CS - 1; s++) {
        const float4 v = recv[(s * G + j % G) * NTHR + tid];
        acc[4 * j] += v.x; acc[4 * j + 1] += v.y; acc[4 * j + 2] += v.z; acc[4 * j + 3] += v.w;
      }
  __syncthreads();                             // the tile below overwrites recv
  store_acc(acc, (u16*)smem, alpha, al, bias, rs, Y, M, N, m0, tn0 * 16, warp, tid, z * G, z * G + G);
#endif
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
