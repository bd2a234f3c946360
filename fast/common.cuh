// Shared device code of the fast kernels (docs/kernel.md: the bit layout, the roles of W and X, the tiling).
// fast/compile.py compiles this header followed by one family's .cu (gemv.cu, mma.cu, wgmma.cu, quant8.cu,
// dequant.cu), with the configuration in front as #defines. MATMUL is defined for the four matmul kernels
// (tmv, tmm, wgmm, wgmm8), which share the dequantisation, the mma, the cluster sum and the epilogue below.
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

#ifdef MATMUL
// one 32-bit word = 8 pairs of codes -> 8 x2 registers of {-1,0,1}: (q >> shift) & mask | MAGIC in one LOP3
// (0xEA = a&b|c) gives MAGIC + q * 4^p exactly, one FMA takes it to q - 1 (docs/kernel.md)
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
#if AVEC  // one alpha per output channel (fused linears)
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
