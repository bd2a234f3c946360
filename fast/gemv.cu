// tmv: the GEMV, M <= 8*MT tokens, any GPU from sm_80; compiled after common.cuh with the #defines of a GEMV tile
// (fast/tiles.py: TN, KW, MT, CPW, STAGE) and CS, the cluster split of K. Here latency sets the time, not bandwidth
// or FLOPs, so there is no pipeline and little code: each warp's first instructions load all its weight words into
// registers (per k128 chunk one 16-byte load per lane, which is the warp's A fragments), the CTA copies the M rows
// of X to shared memory once, each warp multiplies its chunks, the CTA sums its warps. A CTA = TN n16-tiles x KW
// warps along K, a warp up to CPW chunks; a CTA covers all of K, or 1/CS of it with the partial tiles summed over a
// cluster as in tmm. STAGE: the weight words take a detour through shared memory, X's copy first and then one
// cp.async group per chunk, so that a warp multiplies chunk j as soon as it has landed. Loaded into registers, a
// warp's chunks share one scoreboard (ptxas's choice), so its first multiply waits for all of them; but X's copy
// goes first, ahead of the weights (the sweep picks per layer).
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
