"""
The fast kernels' tiles and which one runs a problem: the catalogue of tile configurations (compile.py passes a
tile's numbers to the CUDA sources as #defines), the rules that pick one for a problem, and the tuned tables that
`bench.py --what kernels --sweep` measures on a GPU and writes to fast/tuned/<GPU name>.json.

    python bench.py --what kernels --sweep                   # time every candidate per row: fast/tuned/<GPU>.json
    python bench.py --what kernels --act fp8 --sweep --m 64,256,512,2048,8192      # the same for fp8 activations

A problem is (M tokens, N output channels, K input features). A choice is (tile name, CS): CS > 1 splits K over a
thread-block cluster of CS CTAs (Hopper); launches() says how a wgmma tile's grid runs (a part-filled last wave
apart, its K split). What each kernel does and what bounds it: docs/kernel.md.
"""

import functools
import glob
import json
import os
import re
import sys

import cli

# -----------------------------------------------------------------------------
# the catalogue

# mma.sync tiles (tmm), name: (WNT, WMT, WN, WM, WK, ST, NACC) -> CTA tile BN = 16*WNT*WN output channels x
# BM = 8*WMT*WM tokens; WN x WM x WK warps (WK warp groups split each stage's K), ST pipeline stages, NACC
# accumulator sets
CONFIGS = {
    "s32": (1, 4, 4, 1, 1, 6, 2), "k32": (1, 4, 2, 1, 4, 3, 1), "k64": (2, 4, 2, 2, 2, 3, 1),
    "m64": (2, 4, 2, 2, 1, 4, 1), "l128": (4, 8, 2, 2, 1, 3, 1), "x256": (4, 8, 4, 2, 1, 4, 1),
}
# GEMV tiles (tmv, M <= 16) are named by their parameters, "v<TN>x<KW>m<MT>c<CPW>": a CTA of TN n16-tiles x KW
# warps along K, up to 8*MT tokens, a warp up to CPW k128 chunks in registers (a CTA takes K <= 128*KW*CPW, a
# cluster of CS CTAs CS times that); a trailing "s" stages the chunks through shared memory (gemv.cu, STAGE).
# Their best shape depends on K, so the tuned tables spell them out.
GEMV_MAX_M = 16


@functools.lru_cache(maxsize=None)
def gemv_tile(name):
    """(TN, KW, MT, CPW, STAGE) of a GEMV tile name, or None for other names (cached: the launch asks on every
    call)."""
    m = re.fullmatch(r"v(\d+)x(\d+)m([12])c(\d+)(s?)", name)
    return (*(int(v) for v in m.groups()[:4]), int(m[5] == "s")) if m else None


# wgmma tiles (wgmm, sm_90a), name: (WGN, BM, ST, MINB) -> BN = 64*WGN channels x BM tokens, WGN warpgroups, ST
# stages, MINB CTAs per SM: a warpgroup waits for its own wgmmas, so the SM needs several warpgroups to keep the
# tensor cores busy. Each won rows of an H200 sweep (a 5-stage w2x128 won none; 3 x 64 channels x 64 tokens
# spilled). w16 (16 tokens, 8 stages: each CTA's chunks stream in one after another, so the ring hides their
# latency) and w16s4 (4 stages) are for M = 9-16 where N is large; only a tuned table picks them; they split K at
# most in 2 (max_split).
WG_CONFIGS = {"w64": (1, 64, 4, 3), "w64s6": (1, 64, 6, 2), "w128": (1, 128, 3, 2), "w2x64": (2, 64, 4, 2),
              "w2x128": (2, 128, 3, 2), "w3x128": (3, 128, 4, 1), "w2x256": (2, 256, 3, 1), "w16": (1, 16, 8, 4),
              "w16s4": (1, 16, 4, 4)}
# ternary x fp8 wgmma tiles (wgmm8), same fields: the survivors of an H200 sweep. Independent CTAs of one
# warpgroup did best (a CTA's warpgroups wait for one another's stage releases); 4 warpgroups per CTA did worst.
WG8_CONFIGS = {"f64": (1, 64, 6, 3), "f128": (1, 128, 4, 3), "f2x128": (2, 128, 4, 2), "f2x256": (2, 256, 4, 1)}


def is_tile(name):
    """Whether name is a tile of the catalogue (or "dequant": expand the codes + cuBLAS)."""
    return name in CONFIGS or name in WG_CONFIGS or name in WG8_CONFIGS or gemv_tile(name) is not None \
        or name == "dequant"


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


def max_split(name):
    """The most CTAs a wgmma tile's K may be split over (wgmma.cu: each CTA of the cluster sum stores whole groups
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
# the tuned tables: fast/tuned/<GPU name>.json, one per GPU model, written by `bench.py --sweep` on that GPU:
#   {"gpu": name, "sms": multiprocessors, "wgmma": Hopper or not, "bf16": {"sweeps": [{"date", "commit", "command"}, ...], "shapes": {"<K>x<N>": {"<M>": [tile, CS]}}},
#    "fp8": the same for fp8 activations (wgmm8 tiles)}
# A problem uses its shape's entry of the smallest tuned M >= its M (else of the largest M). A GPU with no table of
# its own uses that of a tuned GPU of the same kind (stand_in).

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def tuned_path(gpu):
    """fast/tuned/<gpu>.json, the name made safe for a file: 'NVIDIA H200' -> NVIDIA_H200.json."""
    return os.path.join(TUNED_DIR, re.sub(r"[^A-Za-z0-9._-]", "_", gpu) + ".json")


@functools.lru_cache(maxsize=None)
def tuned(gpu, act="bf16"):
    """{(K, N): {M: (tile, CS)}} measured on the GPU named gpu for act ("bf16" or "fp8"); {} where none was. An
    entry that names no tile of the catalogue -> ValueError (the file predates a change of the catalogue)."""
    path = tuned_path(gpu)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        shapes = json.load(f).get(act, {}).get("shapes", {})
    table = {}
    for kn, by_m in shapes.items():
        K, N = map(int, kn.split("x"))
        table[K, N] = {int(m): (name, int(cs)) for m, (name, cs) in by_m.items()}
        if bad := [name for name, _ in table[K, N].values() if not is_tile(name)]:
            raise ValueError(f"{path}: shape {kn} names unknown tiles {bad}: re-run python bench.py --what kernels "
                             f"--sweep on this GPU")
    return table


def stand_in(gpu, sms, wgmma):
    """The GPU whose tuned table gpu uses (fast.launch.gpu asks once per device): its own; else, said on stderr, a
    tuned GPU of the same kind (as many SMs, and wgmma or not: a tile's waves and tail fall the same; on an H100
    the H200's table ran the 4.2B packed step 1.10x faster than the rules, docs/results.md); else gpu itself,
    whose missing table means the rules."""
    if os.path.exists(tuned_path(gpu)):
        return gpu
    for path in sorted(glob.glob(os.path.join(TUNED_DIR, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if (data.get("sms"), data.get("wgmma")) == (sms, wgmma):
            print(f"fast: no tuned table for {gpu}; using the {data['gpu']}'s ({sms} SMs{', wgmma' if wgmma else ''}"
                  f"); `python bench.py --what kernels --sweep` tunes for this GPU", file=sys.stderr)
            return data["gpu"]
    return gpu


def save_tuned(gpu, act, found, sweep, sms, wgmma):
    """Merge found {(K, N): {M: (tile, CS)}} into fast/tuned/<gpu>.json for act (entries swept replace theirs),
    record sweep ({"date", "commit", "command"}) and the GPU's kind (sms, wgmma: which GPUs may stand in for it),
    write the file atomically; returns its path."""
    path = tuned_path(gpu)
    data = {"gpu": gpu}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(sms=sms, wgmma=wgmma)
    table = data.setdefault(act, {"sweeps": [], "shapes": {}})
    table["sweeps"].append(sweep)
    for (K, N), by_m in found.items():
        row = table["shapes"].setdefault(f"{K}x{N}", {})
        row.update({str(m): list(choice) for m, choice in by_m.items()})
        table["shapes"][f"{K}x{N}"] = dict(sorted(row.items(), key=lambda kv: int(kv[0])))
    with cli.atomic_write(path) as f:
        f.write(dump_tuned(data).encode())
    tuned.cache_clear()
    return path


def dump_tuned(data):
    """The JSON text of a tuned file, one line per shape (diffs show which rows a sweep changed)."""
    out = ["{", f'  "gpu": {json.dumps(data["gpu"])}, "sms": {json.dumps(data.get("sms"))}, '
                f'"wgmma": {json.dumps(data.get("wgmma"))},']
    acts = [a for a in ("bf16", "fp8") if a in data]
    for i, act in enumerate(acts):
        t = data[act]
        out += [f'  "{act}": {{', '    "sweeps": [']
        out += [f"      {json.dumps(s)}" + ("," if j + 1 < len(t["sweeps"]) else "") for j, s in enumerate(t["sweeps"])]
        out += ["    ],", '    "shapes": {']
        rows = list(t["shapes"].items())
        out += [f"      {json.dumps(kn)}: {json.dumps(by_m)}" + ("," if j + 1 < len(rows) else "")
                for j, (kn, by_m) in enumerate(rows)]
        out += ["    }", "  }" + ("," if i + 1 < len(acts) else "")]
    return "\n".join(out + ["}"]) + "\n"

# -----------------------------------------------------------------------------
# choosing: the GPU's tuned table first, else rules distilled from the H200's

# Off Hopper (no wgmma) from these sizes on, the codes are expanded to a 16-bit matrix for cuBLAS (launch.py,
# _dequant_matmul). A rule of thumb, not a measurement of today's kernels: from M ~ 512 both paths are tensor-core
# bound, and cuBLAS outruns mma.sync by more than the expansion costs where K is long enough. `bench.py --sweep` on
# such a GPU times dequant against the tiles from M = 512 and writes the winner to its table.
DEQUANT_MIN_M, DEQUANT_MIN_K = 512, 1152


def use_dequant(M, N, K):
    """Whether a problem takes the expand + cuBLAS path off Hopper (launch.py, _dequant_matmul)."""
    return M >= DEQUANT_MIN_M and K >= DEQUANT_MIN_K and K % 128 == 0 and N % 16 == 0


WGMMA_MIN_M = 64  # the rules' threshold for wgmma on Hopper (a tuned table may say otherwise, as for w16)


def _split(M, N, K, name, sms):
    """Cluster split of K: the smallest power of two that (nearly) fills the SMs, at most 8."""
    bn, bm = dims(name)[:2]
    tiles, kc, cs = -(-N // bn) * -(-M // bm), -(-K // 128), 1
    while cs < 8 and 2 * cs <= kc and tiles * cs < sms:
        cs *= 2
    return cs


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


def pick8(M, N, K, sms=132, table=None):
    """(wgmm8 config, cluster split) for fp8 activations: the tuned table, else the widest tile that fills the SMs."""
    return _tuned(table or {}, M, N, K) or _widest(("f2x256", "f128", "f64"), M, N, K, sms)


def _gemv(M, K, clusters):
    """Untuned GEMV tile for M <= 16: one n16-tile x 8 warps per CTA (a frequent winner of the sweep), K split
    over a cluster while X's rows would take more than 96 KB of shared memory; None when K is too long for it."""
    kc, cs = -(-K // 128), 1
    while clusters and cs < 8 and M * -(-kc // cs) * 256 > 96 * 1024:
        cs *= 2
    kcz = -(-kc // cs)
    name = f"v1x8m{1 if M <= 8 else 2}c{-(-kcz // 8)}"
    return (name, cs) if kcz <= 64 and gemv_smem(name, M, kcz) <= 200 * 1024 else None


def pick(M, N, K, sms=132, wgmma=False, table=None):
    """(config, cluster split) for a problem: the tuned table of this GPU, else rules. The config may be "dequant"
    (expand + cuBLAS). The rules: M <= 16 a GEMV tile; on Hopper from M = 64 the widest wgmma tile that fills the
    SMs, M = 17..63 an mma.sync tile with K split over a cluster; off Hopper mma.sync tiles, no clusters, and from
    M = 512 (long K) dequant. A tuned shape takes the entry of the smallest tuned M >= M: in the H200's table,
    M = 17..63 run the M = 64 entry, a wgmma tile, so there tmm runs only shapes the table lacks."""
    if hit := _tuned(table or {}, M, N, K):
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
