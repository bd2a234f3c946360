// quant8 (fp8 activations, before wgmm8): X (M, 128 KC) 16-bit -> e4m3 codes in wgmm8's layout + one float32
// scale per token: s = amax / 448 (448 is e4m3's largest finite value), q = rn(x * (448 / amax)). One CTA per
// token row m < Mp; rows >= M are zeros. Compiled after common.cuh with IS_BF16 defined.
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
