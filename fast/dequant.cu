// dequant: expand the tile-order codes to a 16-bit (N, K) matrix of -1, 0, 1 for cuBLAS (large M on GPUs without
// wgmma, launch.py: _dequant_matmul). Compiled after common.cuh, no #defines.
extern "C" __global__ void dequant(const u32* __restrict__ packed, u32* __restrict__ w, int K, int words, u32 one) {
  // one thread per 32-bit word = 16 codes of the tile layout (fast/layout.py): word i = (Tn, Ck, g, t, wq);
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
