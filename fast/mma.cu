// tmm: the mma.sync (m16n8k16) matmul, any GPU from sm_80. Compiled after common.cuh with the #defines of a tile of
// fast/tiles.py CONFIGS (WNT, WMT, WN, WM, WK, ST, NACC) and CS, the cluster split of K. It runs what neither the
// GEMV nor wgmma takes (tiles.pick, where no tuned entry decides): off Hopper M > 16 (from M = 512 with long K the
// codes are expanded for cuBLAS instead), on Hopper M = 17..63; and M <= 16 where K is too long for the GEMV.
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
