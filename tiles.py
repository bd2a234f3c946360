"""
The fused kernels' tiles and which one runs a problem: the catalogue of tile configurations (kernel.py passes a
tile's numbers to kernel.cu as #defines), the tables of the fastest tile per layer shape and token count that
`bench.py --sweep` measures on a GPU, and the heuristics for shapes the tables do not hold.

    python bench.py --what kernels --sweep                   # time every candidate per row; prints TUNED to paste here
    python bench.py --what kernels --act fp8 --sweep --m 64,256,512,2048,8192      # the same for TUNED8

A problem is (M tokens, N output channels, K input features). A choice is (tile name, CS): CS > 1 splits K over a
thread-block cluster of CS CTAs (Hopper); launches() says how a wgmma tile's grid runs (a part-filled last wave
apart, its K split). Which kernel a tile names, and how the kernels work: kernel.py.
"""

import functools
import re

# -----------------------------------------------------------------------------
# the catalogue

# mma.sync tiles, name: (WNT, WMT, WN, WM, WK, ST, NACC) -> CTA tile BN = 16*WNT*WN output channels x
# BM = 8*WMT*WM tokens; WN x WM x WK warps (WK warp groups split each stage's K), ST pipeline stages, NACC
# accumulator sets
CONFIGS = {
    "s32": (1, 4, 4, 1, 1, 6, 2), "k32": (1, 4, 2, 1, 4, 3, 1), "k64": (2, 4, 2, 2, 2, 3, 1),
    "m64": (2, 4, 2, 2, 1, 4, 1), "l128": (4, 8, 2, 2, 1, 3, 1), "x256": (4, 8, 4, 2, 1, 4, 1),
}
# GEMV tiles (tmv, M <= 16) are named by their parameters, "v<TN>x<KW>m<MT>c<CPW>": a CTA of TN n16-tiles x KW
# warps along K, up to 8*MT tokens, a warp up to CPW k128 chunks in registers (a CTA takes K <= 128*KW*CPW, a
# cluster of CS CTAs CS times that); a trailing "s" stages the chunks through shared memory (kernel.cu, STAGE).
# Their best shape depends on K, so the tuned table spells them out.
GEMV_MAX_M = 16


@functools.lru_cache(maxsize=None)
def gemv_tile(name):
    """(TN, KW, MT, CPW, STAGE) of a GEMV tile name, or None for other names (cached: kernel._launch asks on every
    call)."""
    m = re.fullmatch(r"v(\d+)x(\d+)m([12])c(\d+)(s?)", name)
    return (*(int(v) for v in m.groups()[:4]), int(m[5] == "s")) if m else None


# wgmma tiles (sm_90a), name: (WGN, BM, ST, MINB) -> BN = 64*WGN channels x BM tokens, WGN warpgroups, ST stages,
# MINB CTAs per SM: a warpgroup waits for its own wgmmas, so the SM needs several warpgroups to keep the tensor
# cores busy. Each won rows of an H200 sweep (a 5-stage w2x128 won none; 3 x 64 channels x 64 tokens spilled).
# w16 (16 tokens, 8 stages: each CTA's chunks stream in one after another, so the ring hides their latency) and
# w16s4 (4 stages; with K split in 2, adaLN's winner) are for M = 9-16 where N is large; they split K at most in 2
# (max_split).
WG_CONFIGS = {"w64": (1, 64, 4, 3), "w64s6": (1, 64, 6, 2), "w128": (1, 128, 3, 2), "w2x64": (2, 64, 4, 2),
              "w2x128": (2, 128, 3, 2), "w3x128": (3, 128, 4, 1), "w2x256": (2, 256, 3, 1), "w16": (1, 16, 8, 4),
              "w16s4": (1, 16, 4, 4)}
# ternary x fp8 wgmma tiles (wgmm8), same fields: the survivors of an H200 sweep. Independent CTAs of one
# warpgroup did best (a CTA's warpgroups wait for one another's stage releases); 4 warpgroups per CTA did worst.
WG8_CONFIGS = {"f64": (1, 64, 6, 3), "f128": (1, 128, 4, 3), "f2x128": (2, 128, 4, 2), "f2x256": (2, 256, 4, 1)}


def launches(M, N, K, name, cs, sms):
    """How a wgmma tile's problem is launched: [(first output tile, tiles, cluster split)]. One launch, except where
    more tiles than the SMs hold (sms x MINB) leave the last wave at most half full and K is not split: then the
    full waves are one launch and the last wave's tiles a second one, K split over clusters that (nearly) fill the
    SMs, so that wave takes a fraction of a tile's time instead of a whole one. (3072->9216 at M = 512 in tiles of
    128 x 256: 144 tiles for 132 SMs, the last 12 split 8 ways.)"""
    bn, bm = dims(name)[:2]
    n_tiles, slots = -(-N // bn) * -(-M // bm), sms * (WG_CONFIGS.get(name) or WG8_CONFIGS[name])[3]
    full, rest = divmod(n_tiles, slots)
    if cs > 1 or full == 0 or not 0 < rest <= slots // 2:
        return [(0, n_tiles, cs)]
    kc, cs2 = -(-K // 128), 1
    while cs2 < max_split(name) and 4 * cs2 <= kc and 2 * cs2 * rest <= slots:
        cs2 *= 2
    return [(0, full * slots, 1), (full * slots, rest, cs2)] if cs2 > 1 else [(0, n_tiles, 1)]
# (Tried instead: stream-K, one launch of a CTA per SM, each an equal share of all the tiles' chunks, partial sums
# handed on through a global workspace. Correct, but slower than this and the tuned tiles on every 4.2B shape
# measured: README, and git branch stream-k-attempt.)


def max_split(name):
    """The most CTAs a wgmma tile's K may be split over (kernel.cu: each CTA of the cluster sum stores whole groups
    of 8 tokens; clusters of up to 8)."""
    return min(8, dims(name)[1] // 8)


def dims(name):
    """(BN, BM, threads, dynamic shared memory bytes) of a config."""
    if gv := gemv_tile(name):
        tn, kw, mt, cpw, _ = gv
        return 16 * tn, 8 * mt, 32 * tn * kw, gemv_smem(name, 8 * mt, kw * cpw)
    if name in WG_CONFIGS or name in WG8_CONFIGS:
        fp8 = name in WG8_CONFIGS
        wgn, bm, st, _ = (WG8_CONFIGS if fp8 else WG_CONFIGS)[name]
        bn, xrow = 64 * wgn, 128 if fp8 else 256  # bytes of a token's k128 chunk
        # the stages, or at the end the cluster sum's fp32 partials or the 16-bit output tile; +1024: alignment
        smem = max(st * (bm * xrow + wgn * 2048), bm * bn * 4) + 1024
        return bn, bm, 128 * wgn, smem
    wnt, wmt, wn, wm, wk, st, _ = CONFIGS[name]
    bn, bm, nthr = 16 * wnt * wn, 8 * wmt * wm, 32 * wn * wm * wk
    return bn, bm, nthr, max(st * wk * (bn * 32 + bm * 256), wk * bm * (bn + 4) * 4)


def gemv_smem(name, M, kcz):
    """Shared memory of a GEMV tile for M tokens and kcz chunks per CTA: fp32 partials, X's rows, staged weights."""
    tn, kw, mt, cpw, stage = gemv_tile(name)
    return kw * tn * mt * 512 + M * kcz * 256 + stage * kw * tn * cpw * 512


# -----------------------------------------------------------------------------
# choosing: the tuned tables first, else heuristics distilled from them

DEQUANT_MIN_M, DEQUANT_MIN_K = 512, 1152  # from bench.py's H100 table: below either, the fused kernel is faster


def use_dequant(M, N, K):
    """Whether a problem takes the expand + cuBLAS path off Hopper (kernel.py, _dequant_matmul)."""
    return M >= DEQUANT_MIN_M and K >= DEQUANT_MIN_K and K % 128 == 0 and N % 16 == 0


# fastest (config, cluster split) per (K, N) -> {M: ...}, from `python bench.py --what kernels --sweep` on an
# NVIDIA H200 (candidates: mma.sync and wgmma tiles x cluster splits, and dequant + cuBLAS from M = 512, which
# won nowhere); a problem uses the entry of the smallest tuned M >= its M. wgmma entries apply on Hopper only
# (pick falls back to its heuristic elsewhere).
TUNED = {
    (1536, 1536): {1: ('v1x4m1c3', 1), 8: ('v1x16m1c1', 1), 16: ('v1x8m2c2', 1), 64: ('w64', 4), 256: ('w64s6', 2), 512: ('w64', 2), 2048: ('w3x128', 1), 8192: ('w2x128', 1)},
    (1536, 4096): {1: ('v1x4m1c3', 1), 8: ('v2x4m1c3', 1), 16: ('v2x4m2c3', 1), 64: ('w64s6', 2), 256: ('w128', 2), 512: ('w2x128', 1), 2048: ('w2x256', 1), 8192: ('w2x128', 1)},
    (4096, 1536): {1: ('v1x8m1c4', 1), 8: ('v1x16m1c2', 1), 16: ('v1x8m2c4', 1), 64: ('w64', 8), 256: ('w128', 4), 512: ('w64', 2), 2048: ('w3x128', 1), 8192: ('w2x256', 1)},
    (1024, 9216): {1: ('v1x4m1c2s', 1), 8: ('v3x4m1c2', 1), 16: ('v6x2m2c4', 1), 64: ('w64', 2), 256: ('w3x128', 1), 512: ('w3x128', 1), 2048: ('w3x128', 1), 8192: ('w2x128', 1)},
    (3072, 3072): {1: ('v2x8m1c3s', 1), 8: ('v2x8m1c3', 1), 16: ('v2x4m2c6', 1), 64: ('w64s6', 4), 256: ('w64', 2), 512: ('w3x128', 2), 2048: ('w3x128', 1), 8192: ('w2x128', 1)},
    (3072, 8192): {1: ('v2x8m1c3s', 1), 8: ('v4x4m1c6s', 1), 16: ('v4x4m2c6s', 1), 64: ('w2x64', 2), 256: ('w2x128', 1), 512: ('w2x256', 1), 2048: ('w2x256', 1), 8192: ('w3x128', 1)},
    (8192, 3072): {1: ('v2x8m1c8s', 1), 8: ('v3x4m1c8s', 2), 16: ('v3x4m2c8', 2), 64: ('w2x64', 8), 256: ('w64', 2), 512: ('w3x128', 2), 2048: ('w3x128', 1), 8192: ('w2x256', 1)},
    (1024, 18432): {1: ('v1x4m1c2s', 1), 8: ('v3x4m1c2', 1), 16: ('w16s4', 2), 64: ('w64', 1), 256: ('w3x128', 1), 512: ('w3x128', 1), 2048: ('w2x128', 1), 8192: ('w2x128', 1)},
    (1152, 1152): {1: ('v1x4m1c3', 1), 8: ('v1x8m1c2', 1), 16: ('v1x8m2c2', 1), 64: ('w64', 4), 256: ('w64', 2), 512: ('w64', 2), 2048: ('w3x128', 1), 8192: ('w3x128', 1)},
    (1536, 4608): {1: ('v1x4m1c3', 1), 8: ('v3x4m1c3', 1), 16: ('v3x4m2c3', 1), 64: ('w64', 4), 256: ('w64', 1), 512: ('w3x128', 1), 2048: ('w3x128', 1), 8192: ('w2x128', 1)},
    (1536, 8192): {1: ('v2x4m1c3s', 1), 8: ('v4x4m1c3', 1), 16: ('v4x2m2c6', 1), 64: ('w64', 2), 256: ('w2x128', 1), 512: ('w2x256', 1), 2048: ('w2x128', 1), 8192: ('w2x128', 1)},
    (3072, 9216): {1: ('v1x4m1c6s', 1), 8: ('v3x4m1c3s', 2), 16: ('v3x2m2c6s', 2), 64: ('w64', 2), 256: ('w3x128', 1), 512: ('w3x128', 1), 2048: ('w3x128', 1), 8192: ('w2x256', 1)},
    (3072, 16384): {1: ('v4x4m1c6s', 1), 8: ('v4x4m1c6s', 1), 16: ('w16', 2), 64: ('w2x64', 2), 256: ('w2x256', 1), 512: ('w2x128', 1), 2048: ('w2x128', 1), 8192: ('w2x256', 1)},
}
WGMMA_MIN_M = 64  # from here on Hopper the wgmma kernel (the heuristic's threshold; TUNED may say otherwise)


def _split(M, N, K, name, sms):
    """Cluster split of K: the smallest power of two that (nearly) fills the SMs, at most 8."""
    bn, bm = dims(name)[:2]
    tiles, kc, cs = -(-N // bn) * -(-M // bm), -(-K // 128), 1
    while cs < 8 and 2 * cs <= kc and tiles * cs < sms:
        cs *= 2
    return cs


TUNED8 = {  # as TUNED, for fp8 activations: `python bench.py --what kernels --act fp8 --sweep` on an NVIDIA H200
    (1536, 1536): {64: ('f64', 4), 256: ('f64', 2), 512: ('f64', 2), 2048: ('f128', 1), 8192: ('f2x128', 1)},
    (1536, 4096): {64: ('f64', 2), 256: ('f128', 2), 512: ('f128', 1), 2048: ('f2x128', 1), 8192: ('f2x128', 1)},
    (4096, 1536): {64: ('f64', 4), 256: ('f128', 4), 512: ('f64', 2), 2048: ('f128', 1), 8192: ('f2x128', 1)},
    (3072, 3072): {64: ('f64', 4), 256: ('f64', 2), 512: ('f128', 2), 2048: ('f128', 1), 8192: ('f2x128', 1)},
    (3072, 8192): {64: ('f64', 2), 256: ('f2x128', 2), 512: ('f2x256', 1), 2048: ('f2x128', 1), 8192: ('f2x256', 1)},
    (8192, 3072): {64: ('f64', 4), 256: ('f2x128', 4), 512: ('f128', 2), 2048: ('f2x256', 1), 8192: ('f2x256', 1)},
    (1152, 1152): {64: ('f64', 4), 256: ('f64', 2), 512: ('f64', 2), 2048: ('f128', 1), 8192: ('f128', 1)},
    (1536, 4608): {64: ('f64', 4), 256: ('f128', 2), 512: ('f128', 1), 2048: ('f128', 1), 8192: ('f2x128', 1)},
    (1536, 8192): {64: ('f64', 2), 256: ('f128', 1), 512: ('f2x128', 1), 2048: ('f2x128', 1), 8192: ('f2x128', 1)},
    (3072, 9216): {64: ('f64', 2), 256: ('f128', 1), 512: ('f128', 1), 2048: ('f2x128', 1), 8192: ('f2x128', 1)},
    (3072, 16384): {64: ('f2x128', 1), 256: ('f2x128', 1), 512: ('f2x256', 1), 2048: ('f2x128', 1), 8192: ('f2x128', 1)},
}


def _tuned(table, M, N, K):
    """A tuned table's entry for a problem (that of the smallest tuned M >= M, else of the largest), or None."""
    t = table.get((K, N))
    return t[min((m for m in t if m >= M), default=max(t))] if t else None


def _widest(names, M, N, K, sms):
    """(config, cluster split): the first of names (widest first) whose tiles give about a CTA per SM, else the
    last; then the cluster split that fills the SMs."""
    for name in names:
        bn, bm = dims(name)[:2]
        if -(-N // bn) * -(-M // bm) >= sms:
            break
    return name, _split(M, N, K, name, sms)


def pick8(M, N, K, sms=132):
    """(wgmm8 config, cluster split) for fp8 activations: the tuned table, else the widest tile that fills the SMs."""
    return _tuned(TUNED8, M, N, K) or _widest(("f2x256", "f128", "f64"), M, N, K, sms)


def _gemv(M, K, clusters):
    """Untuned GEMV tile for M <= 16: one n16-tile x 8 warps per CTA (a frequent winner of the sweep), K split
    over a cluster while X's rows would take more than 96 KB of shared memory; None when K is too long for it."""
    kc, cs = -(-K // 128), 1
    while clusters and cs < 8 and M * -(-kc // cs) * 256 > 96 * 1024:
        cs *= 2
    kcz = -(-kc // cs)
    name = f"v1x8m{1 if M <= 8 else 2}c{-(-kcz // 8)}"
    return (name, cs) if kcz <= 64 and gemv_smem(name, M, kcz) <= 200 * 1024 else None


def pick(M, N, K, sms=132, wgmma=False):
    """(config, cluster split) for a problem: the tuned table, else a heuristic distilled from it. The config
    may be "dequant" (expand + cuBLAS). Off Hopper, tuned wgmma/dequant/cluster entries give way to the heuristic,
    which then splits no K over clusters (sm_90 and later)."""
    hit = _tuned(TUNED, M, N, K)
    if hit and (wgmma or (hit[0] in CONFIGS or gemv_tile(hit[0])) and hit[1] == 1):
        return hit
    if not wgmma and use_dequant(M, N, K):
        return "dequant", 1
    if wgmma and M >= WGMMA_MIN_M:
        return _widest(("w2x256", "w2x128", "w64"), M, N, K, sms)
    if M <= GEMV_MAX_M and (gemv := _gemv(M, K, wgmma)):
        return gemv
    if M <= 64:
        name = "k32" if K <= 1536 else "m64"
    elif M <= 512:
        name = "m64" if N * K <= 1536 * 1536 else "l128"
    else:
        name = "x256" if N % 256 == 0 else "l128"
    return name, _split(M, N, K, name, sms) if wgmma else 1
