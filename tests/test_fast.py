"""
Tests for fast/: the tile order of the codes, the fp8 image of X, the tile catalogue and its choice rules, the tuned
tables per GPU, the CUDA sources (compiled with NVRTC on the CPU), and on a GPU every tile against the reference.

    python -m pytest tests/test_fast.py -v

The CPU part always runs; the GPU part needs CUDA + cupy (and Hopper for the wgmma tiles), with outputs poisoned
(NaN) first so that an unwritten element fails.
"""
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import fast
import kernel
from fast import tiles
from test_kernel import check, gpu, nvrtc, nvrtc_compile, poison_allocator, rand_trits, reference, tiled, wgmma_gpu

# -----------------------------------------------------------------------------
# CPU: layouts


@pytest.mark.parametrize("N,K", [(1, 1), (3, 3), (17, 100), (100, 17), (1, 1000), (200, 72), (16, 128),
                                 (33, 257), (1152, 1152), (1000, 3), (48, 129)])
def test_tile_codes_roundtrip(N, K):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    w = rand_trits(N, K, gen)
    codes = kernel.pack_2bit(w)
    t = fast.tile_codes(codes, N, K)
    Np, Kp = fast.padded(N, K)
    assert t.dtype == torch.uint8 and t.shape == (Np, Kp // 4)
    assert torch.equal(fast.untile_codes(t, N, K), codes)
    # padding holds zero-trits (code 1): the tiles of a zero matrix are all 0b01010101
    assert torch.equal(fast.tile_codes(kernel.pack_2bit(torch.zeros_like(w)), N, K), torch.full_like(t, 0x55))


def test_tile_order_is_the_fragment_order():
    """The layout the fast kernels (and the dequant kernel) rely on, decoded from the bytes as fast/layout.py says:
    word (Tn, Ck, g, t, w) holds pair p = (s1, r1, r0) at bits 2p (low code) and 16 + 2p (high code), for row
    16 Tn + 8 r0 + g and columns k, k + 1, k = 128 Ck + 32 w + 16 s1 + 8 r1 + 2 t (k in natural order)."""
    N, K = 32, 256
    w = rand_trits(N, K, torch.Generator().manual_seed(5))
    words = tiled(w).contiguous().view(torch.int32).flatten().tolist()
    i = 0
    for tn in range(N // 16):
        for ck in range(K // 128):
            for g in range(8):
                for t in range(4):
                    for wq in range(4):
                        q = words[i] & 0xFFFFFFFF
                        i += 1
                        for p in range(8):
                            s1, r1, r0 = p >> 2, (p >> 1) & 1, p & 1
                            n, k = 16 * tn + 8 * r0 + g, 128 * ck + 32 * wq + 16 * s1 + 8 * r1 + 2 * t
                            assert (q >> 2 * p) & 3 == w[n, k] + 1 and (q >> 16 + 2 * p) & 3 == w[n, k + 1] + 1


def test_tiled_codes_concatenate_along_n():
    """Widths that are multiples of 16 (kernel.TILE_N) concatenate along N in the tile order too (FusedLinears)."""
    gen = torch.Generator().manual_seed(6)
    K, blocks = 200, [rand_trits(n, 200, gen) for n in (48, 16, 32)]
    assert kernel.TILE_N == 16
    assert torch.equal(tiled(torch.cat(blocks)), torch.cat([tiled(w) for w in blocks]))
    assert fast.tile_codes(kernel.pack_2bit(torch.cat(blocks)), 96, K).shape == (96, 256 // 4)


def test_tile_codes_rejects_bad_input():
    with pytest.raises(ValueError, match="codes must be uint8 of shape"):
        fast.tile_codes(torch.zeros(16, 31, dtype=torch.uint8), 16, 128)
    with pytest.raises(ValueError, match="tiled codes must be uint8"):
        fast.untile_codes(torch.zeros(10, dtype=torch.uint8), 16, 128)


def test_magic_consts_dequantise_exactly():
    """compile.py's LOP3/FMA constants, emulated: MAGIC with code q at pair position p, times SCALES[p], plus
    BIASES[p] is q - 1 exactly, in bf16 and fp16, for every code and position of a word."""
    for bf16, dt in ((True, torch.bfloat16), (False, torch.float16)):
        per, magic, scales, biases = fast.compile._magic_consts(bf16)
        value = lambda bits: torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dt).double().item()
        for p in range(per):
            for q in range(3):
                v = value((magic | q << 2 * p) & 0xFFFF)
                assert v * value(scales[p]) + value(biases[p]) == q - 1, (bf16, p, q)


def test_fp8_image_layout():
    """fp8_image puts code (m, k) where wgmma.cu's dequant8 expects it: chunk k // 128, row m, 16-byte piece
    p = k % 128 // 16 at p ^ m % 8, and within the piece k = 8 r1 + 2 t + h at byte 4 t + 2 h + r1."""
    gen = torch.Generator().manual_seed(12)
    M, Kp, Mp = 11, 256, 16
    q = (torch.randn(M, Kp, generator=gen) * 50).to(torch.float8_e4m3fn)
    img = fast.fp8_image(q, Mp)
    assert img.shape == (Kp // 128, Mp, 128) and img.dtype == torch.uint8
    assert torch.equal(img[:, M:], torch.zeros_like(img[:, M:]))
    codes = q.view(torch.uint8)
    for m in range(M):
        for k in range(Kp):
            c, p, r1, t, h = k // 128, k % 128 // 16, k % 16 // 8, k % 8 // 2, k % 2
            assert img[c, m, 16 * (p ^ m % 8) + 4 * t + 2 * h + r1] == codes[m, k]


def test_fp8_dequant8_bytes_meet_the_image():
    """A Python model of wgmma.cu's dequant8 (its two PRMTs) on tiled words: the e4m3 byte at each k32 fragment
    position decodes to the trit whose X value fp8_image puts at that position, so wgmma pairs the right k."""
    def prmt(x, s):  # __byte_perm(x, 0, s), selectors < 8 (no sign mode)
        return sum(((x >> (8 * ((s >> (4 * i)) & 7))) & 0xFF if (s >> (4 * i)) & 7 < 4 else 0) << (8 * i)
                   for i in range(4))

    def dequant8(q):  # a[0..3]: (q, 0x20), (q >> 2, 0x20), (q, 0x31), (q >> 2, 0x31)
        return [prmt(0x003800B8, prmt(v, sel) & 0x3333) for sel in (0x20, 0x31) for v in (q, q >> 2)]

    gen = torch.Generator().manual_seed(15)
    w = rand_trits(16, 128, gen)  # one tile
    words = tiled(w).reshape(-1).view(torch.int32).tolist()  # lane-major: lane * 4 + word
    # position in row 0's 128-byte chunk of fp8_image (row 0: no swizzle) -> k, from an image of the bytes k
    pos_k = fast.fp8_image(torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).view(1, 128), 8)[0, 0]
    decode = {0xB8: -1, 0x00: 0, 0x38: 1}
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for wd in range(4):
            a0, a1, a2, a3 = dequant8(words[lane * 4 + wd] & 0xFFFFFFFF)
            for reg, row, half in ((a0, g, 0), (a1, g + 8, 0), (a2, g, 16), (a3, g + 8, 16)):
                for j in range(4):
                    pos = 32 * wd + half + 4 * t + j  # the fragment's k position within the chunk
                    assert decode[(reg >> (8 * j)) & 0xFF] == w[row, int(pos_k[pos])]


def test_weight_tensor_map_addresses_the_tiles(monkeypatch):
    """The wgmma kernels read a CTA's weight tiles through _w_map, one copy per stage: element (word, chunk c,
    tile t) of that map must be the tile order's 512 bytes of tile t (16 channels) x chunk c (128 k), and the copy's
    box the CTA's consecutive tiles of one chunk. Checked by tiling trits that are nonzero only in one such block."""
    calls = []
    monkeypatch.setattr(fast.launch, "_encode_tiled", lambda: lambda *a: calls.append(a) or 0)
    N, K, t, c = 70, 500, 2, 3  # 5 tiles x 4 chunks (padded), block (t, c) = channels 32..47, k 384..499
    nt16, kc = fast.padded(N, K)[0] // 16, fast.padded(N, K)[1] // 128
    fast.launch._w_map.__wrapped__(0x1000, nt16, kc, 8)
    (_, dtype, rank, _, dims, strides, box, step, *_), = calls
    assert (dtype, rank, list(dims), list(box), list(step)) == (2, 3, [128, kc, nt16], [128, 1, 8], [1, 1, 1])
    w = torch.zeros(N, K, dtype=torch.int8)
    w[16 * t:16 * t + 16, 128 * c:] = rand_trits(16, K - 128 * c, torch.Generator().manual_seed(7)) | 1  # all +-1
    diff = (tiled(w) != tiled(torch.zeros_like(w))).view(-1).view(torch.uint8)
    changed = diff.nonzero().view(-1)
    start = c * strides[0] + t * strides[1]  # bytes, as the copy engine walks the map
    assert changed.min() >= start and changed.max() < start + 4 * dims[0] and len(changed) > 256

# -----------------------------------------------------------------------------
# CPU: the catalogue, the rules, the tuned tables


def split_fits(name, cs):
    """A wgmma tile's K split: each CTA of the cluster sum stores whole groups of 8 tokens (wgmma.cu's assert)."""
    return tiles.dims(name)[1] // 8 % cs == 0


def gemv_fits(name, cs, M, K):
    """A GEMV tile takes the problem: M tokens, K in its warps' registers, X's rows in shared memory."""
    tn, kw, mt, cpw, _ = tiles.gemv_tile(name)
    kcz = -(-K // 128 // cs)
    return M <= 8 * mt and kcz <= kw * cpw and tiles.gemv_smem(name, M, kcz) <= 227 * 1024


def test_dispatch_names_only_existing_tiles():
    """Every entry of the H200's tables names a tile that exists (a GEMV tile: one that takes the shape); with the
    table, every choice on Hopper is a tile; without one (another GPU), off Hopper pick never returns a wgmma tile or
    a cluster split."""
    table, table8 = tiles.tuned("NVIDIA H200"), tiles.tuned("NVIDIA H200", "fp8")
    assert table and table8
    tile = lambda name: name in tiles.CONFIGS or name in tiles.WG_CONFIGS or tiles.gemv_tile(name) is not None
    for (K, N), by_m in table.items():
        assert all(tile(name) for name, _ in by_m.values())
        assert all(gemv_fits(name, cs, M, K) for M, (name, cs) in by_m.items() if tiles.gemv_tile(name))
        for M in (1, 2, 9, 16, 17, 64, 100, 512, 5000, 20000):
            name, cs = tiles.pick(M, N, K, wgmma=False)
            assert (name in tiles.CONFIGS or name == "dequant" or tiles.gemv_tile(name)) and cs == 1
            name, cs = tiles.pick(M, N, K, wgmma=True, table=table)
            assert tile(name) and cs in (1, 2, 4, 8)
            assert M <= tiles.GEMV_MAX_M or not tiles.gemv_tile(name)  # up to 16 tokens: a GEMV tile or w16
            if 17 <= M < 64:  # the H200's table runs its M = 64 entry, a wgmma tile, here (tmm never)
                assert name in tiles.WG_CONFIGS
            if tiles.gemv_tile(name):
                assert gemv_fits(name, cs, M, K)
            elif name in tiles.WG_CONFIGS:
                assert split_fits(name, cs)
    for M, N, K in [(1, 17, 100), (70, 333, 1100), (4096, 5000, 640)]:  # untuned shapes: the rules
        assert tile(tiles.pick(M, N, K, wgmma=True, table=table)[0])
        assert tiles.pick8(M, N, K, table=table8)[0] in tiles.WG8_CONFIGS
    for (K, N), by_m in table8.items():  # fp8 activations: wgmm8 tiles only
        assert all(name in tiles.WG8_CONFIGS and cs in (1, 2, 4, 8) for name, cs in by_m.values())


def test_dispatch_reads_the_table_of_the_gpu_it_runs_on(monkeypatch):
    """fast.choose takes the tuned table named after this GPU (torch.cuda.get_device_name) and the rules for a GPU
    without one and for shapes the table lacks; no launch, no GPU."""
    monkeypatch.setattr(fast.launch, "gpu", lambda device: fast.launch.GPU(132, True, 232448, "NVIDIA H200"))
    with open(tiles.tuned_path("NVIDIA H200")) as f:
        data = json.load(f)
    assert data["gpu"] == "NVIDIA H200" and tiles.tuned_path("NVIDIA H200").endswith("fast/tuned/NVIDIA_H200.json")
    for act in ("bf16", "fp8"):  # provenance: where the table was measured, when, by which command
        assert all(s["date"] and s["command"].startswith("python bench.py") for s in data[act]["sweeps"])
    assert fast.choose(1, 18432, 1024, 0) == tuple(data["bf16"]["shapes"]["1024x18432"]["1"])
    assert fast.choose(16, 18432, 1024, 0) == ("w16s4", 2)
    assert fast.choose(30, 3072, 3072, 0) == tuple(data["bf16"]["shapes"]["3072x3072"]["64"])
    assert fast.choose(300, 3072, 3072, 0, fp8=True) == tuple(data["fp8"]["shapes"]["3072x3072"]["512"])
    assert fast.choose(5, 100, 1100, 0) == tiles.pick(5, 100, 1100, 132, True)  # a shape it lacks
    monkeypatch.setattr(fast.launch, "gpu", lambda device: fast.launch.GPU(114, True, 232448, "A Hopper GPU"))
    assert tiles.tuned("A Hopper GPU") == {} and tiles.stand_in("A Hopper GPU", 114, True) == "A Hopper GPU"
    for M, N, K in [(1, 18432, 1024), (16, 18432, 1024), (30, 3072, 3072), (512, 9216, 3072)]:  # no table: rules
        assert fast.choose(M, N, K, 0) == tiles.pick(M, N, K, 114, True)
        assert fast.choose(M, N, K, 0, fp8=True) == tiles.pick8(M, N, K, 114)
    monkeypatch.setattr(fast.launch, "gpu", lambda device: fast.launch.GPU(132, False, 166912, "Some GPU/x 1"))
    assert tiles.tuned_path("Some GPU/x 1").endswith("Some_GPU_x_1.json")
    assert fast.choose(16, 18432, 1024, 0) == tiles.pick(16, 18432, 1024, 132, False)  # 132 SMs, but no wgmma
    assert fast.choose(600, 3072, 3072, 0) == ("dequant", 1)


def test_a_gpu_without_a_table_uses_that_of_one_of_the_same_kind_and_says_so(monkeypatch, capsys):
    """An H100 SXM (132 SMs, wgmma) runs the H200's table, said once on stderr; the table's GPU records its kind."""
    h100 = SimpleNamespace(multi_processor_count=132, major=9, minor=0, shared_memory_per_block_optin=232448,
                           name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    fast.launch.gpu.cache_clear()
    with open(tiles.tuned_path("NVIDIA H200")) as f:
        data = json.load(f)
    assert (data["sms"], data["wgmma"]) == (132, True)
    try:
        for M, N, K in [(1, 18432, 1024), (16, 18432, 1024), (30, 3072, 3072), (512, 9216, 3072)]:
            assert fast.choose(M, N, K, 0) == tiles.pick(M, N, K, 132, True, tiles.tuned("NVIDIA H200"))
            assert fast.choose(M, N, K, 0, fp8=True) == tiles.pick8(M, N, K, 132, tiles.tuned("NVIDIA H200", "fp8"))
        assert fast.choose(1, 18432, 1024, 0) == tuple(data["bf16"]["shapes"]["1024x18432"]["1"])
    finally:
        fast.launch.gpu.cache_clear()  # the real device's record, for the tests after this one
    err = capsys.readouterr().err
    assert err.count("no tuned table for NVIDIA H100 80GB HBM3; using the NVIDIA H200's") == 1, err


def test_sweep_results_merge_into_the_gpu_file(tmp_path, monkeypatch):
    """tiles.save_tuned (what bench.py --sweep calls): the rows swept replace their entries, the others stay, each
    sweep's provenance is kept, the file reads back; an entry naming no tile is one clear error."""
    monkeypatch.setattr(tiles, "TUNED_DIR", str(tmp_path))
    tiles.tuned.cache_clear()
    sweep = {"date": "2026-12-01", "commit": "abc1234", "command": "python bench.py --what kernels --sweep"}
    path = tiles.save_tuned("Test GPU", "bf16", {(128, 64): {1: ("v1x8m1c1", 1), 64: ("k32", 2)}}, sweep, 78, True)
    assert path == str(tmp_path / "Test_GPU.json")
    tiles.save_tuned("Test GPU", "bf16", {(128, 64): {64: ("m64", 1)}, (256, 32): {8: ("s32", 1)}}, sweep, 78, True)
    tiles.save_tuned("Test GPU", "fp8", {(128, 64): {64: ("f64", 2)}}, sweep, 78, True)
    assert tiles.tuned("Test GPU") == {(128, 64): {1: ("v1x8m1c1", 1), 64: ("m64", 1)}, (256, 32): {8: ("s32", 1)}}
    assert tiles.tuned("Test GPU", "fp8") == {(128, 64): {64: ("f64", 2)}}
    data = json.loads((tmp_path / "Test_GPU.json").read_text())
    assert data["gpu"] == "Test GPU" and len(data["bf16"]["sweeps"]) == 2 and data["bf16"]["sweeps"][0] == sweep
    assert (data["sms"], data["wgmma"]) == (78, True) and tiles.stand_in("Another GPU", 78, True) == "Test GPU"
    assert not list(tmp_path.glob("*.tmp"))
    data["bf16"]["shapes"]["128x64"]["1"] = ["nonesuch", 1]
    (tmp_path / "Test_GPU.json").write_text(json.dumps(data))
    tiles.tuned.cache_clear()
    with pytest.raises(ValueError, match="unknown tiles"):
        tiles.tuned("Test GPU")
    tiles.tuned.cache_clear()


def test_launches_split_a_part_filled_last_wave():
    """tiles.launches: one launch, except where a last wave at most half full follows full ones and K is not split
    (then the last wave's tiles run with K split over a cluster, as many CTAs as still fit); every output tile is
    run exactly once."""
    assert tiles.launches(512, 9216, 3072, "w2x256", 1, 132) == [(0, 132, 1), (132, 12, 8)]  # 144 tiles, 1 per SM
    assert tiles.launches(512, 9216, 3072, "w2x256", 2, 132) == [(0, 144, 2)]  # K already split
    assert tiles.launches(512, 3072, 3072, "w2x256", 1, 132) == [(0, 48, 1)]   # under one wave
    assert tiles.launches(2048, 2112 * 8, 3072, "w2x256", 1, 132) == [(0, 1056, 1)]  # full waves only
    assert tiles.launches(512, 128 * 100, 3072, "w2x256", 1, 132) == [(0, 200, 1)]  # last wave more than half full
    assert tiles.launches(512, 9216, 256, "w2x256", 1, 132) == [(0, 144, 1)]  # K too short to split
    assert tiles.launches(16, 64 * 538, 3072, "w16", 1, 132) == [(0, 528, 1), (528, 10, 2)]  # 16 tokens: split <= 2
    assert all(split_fits(name, tiles.max_split(name)) for name in {**tiles.WG_CONFIGS, **tiles.WG8_CONFIGS})
    for M, N, K, name in [(2048, 3072, 3072, "w2x256"), (200, 6400 - 40, 1000, "w64"), (300, 8960, 8192, "f128")]:
        bn, bm = tiles.dims(name)[:2]
        runs = tiles.launches(M, N, K, name, 1, 132)
        assert len(runs) == 2 and runs[1][2] > 1 and runs[1][1] * runs[1][2] <= 132 * tiles.WG_CONFIGS.get(
            name, tiles.WG8_CONFIGS.get(name))[3]
        assert [t0 for t0, _, _ in runs] == [0, runs[0][1]] and sum(n for _, n, _ in runs) == -(-N // bn) * -(-M // bm)


@pytest.mark.parametrize("wgmma", [False, True])
def test_gemv_heuristic_takes_every_small_problem(wgmma):
    """Untuned shapes at M <= 16: a GEMV tile that takes the problem (K split over a cluster on Hopper when X's
    rows are long), else, for K too long for it (off Hopper: X's rows too long for one CTA), an mma.sync tile."""
    for M in (1, 2, 7, 8, 9, 16):
        for K in (1, 100, 129, 1000, 4000, 8192, 20000, 70000):
            name, cs = tiles.pick(M, 77, K, wgmma=wgmma)
            if tiles.gemv_tile(name):
                assert gemv_fits(name, cs, M, K) and cs in ((1, 2, 4, 8) if wgmma else (1,))
            else:
                assert name in tiles.CONFIGS and (K > 8192 or not wgmma and M * K * 2 > 200 * 1024)
    assert tiles.gemv_tile("v2x4m1c3") == (2, 4, 1, 3, 0) and tiles.gemv_tile("v2x4m1c3s") == (2, 4, 1, 3, 1)
    assert tiles.gemv_tile("w64") is None and tiles.gemv_tile("v2x4m3c1") is None


def test_sweep_gemv_candidates_take_their_problems():
    """bench.py --sweep's candidates at M <= 16: GEMV tiles that take the problem (off Hopper: no clusters, and
    mma.sync tiles where X's rows are too long for one CTA)."""
    import bench
    for M in (1, 8, 16):
        for K, N in [(K, N) for _, _, K, N in bench.SHAPES]:
            for wgmma in (False, True):
                cands = bench.candidates(M, N, K, wgmma)
                gemv = [(n, cs) for n, cs in cands if tiles.gemv_tile(n)]
                assert gemv or not wgmma and cands and all(n in tiles.CONFIGS for n, _ in cands)
                assert all(gemv_fits(n, cs, M, K) for n, cs in gemv) and (wgmma or all(cs == 1 for _, cs in cands))

# -----------------------------------------------------------------------------
# CPU: the CUDA sources


def test_cuda_sources_compile():
    """Every wgmma tile (16-bit and fp8; one alpha or one per channel, each bias kind, with and without a cluster)
    and the other kernels compile with NVRTC to sm_90a (mma.sync ones also to sm_80) without a GPU, as do bench.py's
    floor probes. The wgmma tiles must not spill, and ptxas must not serialise their wgmmas (its note C7513: a
    register a wgmma in flight reads is written; wgmma.cu's two register sets exist to avoid it)."""
    lib = nvrtc()
    if lib is None:
        pytest.skip("needs NVRTC (pip install nvidia-cuda-nvrtc-cu12)")
    variants = ((1, True, 0, False), (2, False, 2, True), (1, True, 1, False))  # (cs, bf16, bias kind, avec)
    jobs = [(kind, name, *v, "sm_90a") for kind, names in (("WGMM", tiles.WG_CONFIGS), ("WGMM8", tiles.WG8_CONFIGS))
            for name in names for v in variants]
    jobs += [("TMM", name, 1, True, 0, False, "sm_80") for name in tiles.CONFIGS]
    jobs += [("TMM", "l128", 2, False, 1, True, "sm_90a"), ("TMV", "v1x8m1c3", 1, True, 1, False, "sm_80"),
             ("TMV", "v4x4m2c6", 2, False, 0, True, "sm_90a"), ("TMV", "v2x8m1c3s", 1, True, 1, False, "sm_80"),
             ("TMV", "v3x4m2c8s", 2, True, 0, True, "sm_90a")]
    unreported = []  # configurations whose log has no ptxas report (seen on a GPU machine: an empty log)
    for kind, name, cs, bf16, bias, avec, arch in jobs:
        ok, log = nvrtc_compile(lib, fast.compile.source(kind, name, cs, bf16, bias, avec), arch)
        assert ok, f"{kind} {name}/cs{cs}: {log[:2000]}"
        if kind.startswith("WGMM"):
            assert "C7513" not in log, f"{kind} {name}/cs{cs}: ptxas serialises the wgmmas: {log[:2000]}"
            spills = re.findall(r"(\d+) bytes spill stores", log)
            if not spills and "registers" not in log:
                unreported.append(f"{kind} {name}/cs{cs}")
                continue
            assert set(spills) == {"0"}, f"{kind} {name}/cs{cs} spills: {log[:2000]}"
    for kind, bf16 in (("QUANT8", True), ("QUANT8", False), ("DEQUANT", True)):
        ok, log = nvrtc_compile(lib, fast.compile.source(kind, bf16=bf16), "sm_90a")
        assert ok, f"{kind}: {log[:2000]}"
    import bench  # and the probes of `bench.py --what floors`
    ok, log = nvrtc_compile(lib, bench.FLOOR_SRC, "sm_80")
    assert ok, f"bench.FLOOR_SRC: {log[:2000]}"
    n_wg = sum(kind.startswith("WGMM") for kind, *_ in jobs)
    assert len(unreported) in (0, n_wg), f"ptxas reported on some wgmma configurations but not on {unreported}"
    if unreported:
        pytest.skip(f"all compiled, but this NVRTC printed no ptxas report (spills, C7513) for any of the {n_wg} "
                    "wgmma configurations")

# -----------------------------------------------------------------------------
# GPU: every tile, straight through the launch


def all_configs():
    return list(tiles.CONFIGS) + (list(tiles.WG_CONFIGS) if wgmma_gpu() else [])


@gpu
def test_every_config_poisoned():
    """Each tile config (wgmma ones on Hopper) x cluster split, straight through launch_tile into a NaN-filled
    output; the last shape's M, N, K fill no tile evenly, and it has one alpha per output channel."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(1)
    for (M, K, N), nalpha in [((37, 1000, 200), 1), ((300, 1152, 1152), 1), ((257, 1100, 333), 333)]:
        Kp = fast.padded(N, K)[1]
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        alpha = torch.rand(nalpha, device="cuda", generator=gen) + 0.1
        xp = torch.nn.functional.pad(x, (0, Kp - K))
        codes, ref = tiled(w), reference(x, w, alpha)
        for name in all_configs():
            for cs in (1, 2, 4, 8):
                if name in tiles.WG_CONFIGS and not split_fits(name, cs):  # says so, before compiling anything
                    y = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
                    with pytest.raises(ValueError, match="splits K over at most"):
                        fast.launch.launch_tile(xp, codes, alpha, y, N, K, name, cs)
                    continue
                y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
                fast.launch.launch_tile(xp, codes, alpha, y, N, K, name, cs)
                check(y, ref)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_every_tile_poisoned(dtype):
    """The GEMV kernel (M <= 16): tiles of 1-8 n16-tiles x 2-16 warps, 8 or 16 tokens, K split over 1/2/4 CTAs
    (on Hopper), weights in registers or staged through shared memory, with and without bias, one alpha or one per
    channel, awkward M, N, K (warps with fewer chunks than they hold, or none), straight through launch_tile into
    NaN-filled outputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(11)
    splits = (1, 2, 4) if wgmma_gpu() else (1,)
    for (K, N) in [(1000, 200), (129, 17), (3072, 3072), (8192, 48), (4096, 40)]:  # 4096: 48 KB, the opt-in's edge
        Kp, kc = fast.padded(N, K)[1], fast.padded(N, K)[1] // 128
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        alpha = torch.rand(1, device="cuda", generator=gen) + 0.1
        codes = tiled(w)
        for i, (M, tn, kw, cs) in enumerate([(1, 1, 8, 1), (2, 2, 4, 2), (5, 4, 2, 1), (8, 1, 16, 4), (8, 1, 4, 1),
                                             (9, 2, 8, 1), (13, 1, 4, 2), (16, 4, 4, 1), (16, 1, 2, 4), (3, 3, 4, 2),
                                             (16, 6, 2, 4), (12, 8, 2, 2), (16, 2, 8, 4)]):
            alpha = torch.rand(N if i % 2 else 1, device="cuda", generator=gen) + 0.1
            name = f"v{tn}x{kw}m{1 if M <= 8 else 2}c{math.ceil(math.ceil(kc / cs) / kw)}" + "s" * (i % 3 != 1)
            if cs not in splits or -(-kc // cs) < cs or not gemv_fits(name, cs, M, K):
                continue
            x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
            xp = torch.nn.functional.pad(x, (0, Kp - K))
            for bias in (None, torch.randn(N, device="cuda", generator=gen).to(dtype)):
                ref = reference(x, w, alpha) + (0 if bias is None else bias.float())
                y = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
                fast.launch.launch_tile(xp, codes, alpha, y, N, K, name, cs, bias)
                check(y, ref)
    with pytest.raises(ValueError, match="GEMV tile"):  # a tile that cannot take the problem says so
        fast.matmul(x[:1].repeat(17, 1), codes, alpha, N, K, config=("v1x8m2c8", 1))


def fp8_reference(x, codes, alpha, N, K, bias=None):
    """ternary_matmul_ref(fp8=True) in float32 on the GPU (row-major codes): the same codes, the products summed
    exactly."""
    torch.backends.cuda.matmul.allow_tf32 = False
    return kernel.ternary_matmul_ref(x.float(), codes, alpha, N, K, None if bias is None else bias.float(), fp8=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant8_matches_reference(dtype):
    """The quant8 kernel writes the bytes and scales of the reference (fp8_image of kernel.fp8_codes; rows past M:
    zeros)."""
    if not wgmma_gpu():
        pytest.skip("fp8 activations run on Hopper")
    gen = torch.Generator(device="cuda").manual_seed(13)
    for M, Kp in [(1, 128), (7, 1152), (300, 3072), (513, 8192)]:
        x = (torch.randn(M, Kp, device="cuda", generator=gen) * torch.rand(M, 1, device="cuda", generator=gen) * 10).to(dtype)
        x[M // 2] = 0
        Mp = -(-M // fast.FP8_ROWS) * fast.FP8_ROWS
        q, s = fast.quantize_fp8(x, Mp)
        q_ref, s_ref = kernel.fp8_codes(x)
        assert torch.equal(s, torch.nn.functional.pad(s_ref, (0, Mp - M)))
        assert torch.equal(q, fast.fp8_image(q_ref, Mp))


@gpu
def test_split_last_wave_poisoned():
    """A problem whose last wave tiles.launches runs as a second, K-split launch (shapes made from this GPU's SM
    count), for a 16-bit and an fp8 tile, with bias and one alpha per channel, into a NaN-filled output."""
    if not wgmma_gpu():
        pytest.skip("wgmma tiles run on Hopper")
    sms = fast.gpu(torch.cuda.current_device()).sms
    gen = torch.Generator(device="cuda").manual_seed(16)
    for name, fp8 in (("w2x128", False), ("w64", False), ("f128", True)):
        wgn, bm, _, minb = {**tiles.WG_CONFIGS, **tiles.WG8_CONFIGS}[name]
        N, M, K = 64 * wgn * -(-(sms * minb + 5) // 3) - 40, 3 * bm - 5, 1100  # 3 token tiles, 5+ tiles past a wave
        assert len(tiles.launches(M, fast.padded(N, K)[0], fast.padded(N, K)[1], name, 1, sms)) == 2
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        alpha = torch.rand(N, device="cuda", generator=gen) + 0.1
        bias = torch.randn(N, device="cuda", generator=gen).bfloat16()
        codes = kernel.pack_2bit(w)
        ref = fp8_reference(x, codes, alpha, N, K, bias) if fp8 else reference(x, w, alpha) + bias.float()
        poison_allocator(M * N * 2)
        check(fast.matmul(x, tiled(w), alpha, N, K, bias, fp8, config=(name, 1)), ref)


@gpu
def test_fp8_every_config_poisoned():
    """Each wgmm8 tile x cluster split into a NaN-filled output, with and without bias, against the fp8
    reference (the same e4m3 codes), and the automatic choice through kernel.ternary_matmul; awkward M, K, N
    included (N = 333 with one alpha per channel)."""
    if not wgmma_gpu():
        pytest.skip("fp8 activations run on Hopper")
    gen = torch.Generator(device="cuda").manual_seed(14)
    for (M, K, N) in [(37, 1000, 200), (300, 1152, 1152), (257, 1100, 333), (1, 3072, 3072), (600, 3072, 8192)]:
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        alpha = torch.rand(N if N == 333 else 1, device="cuda", generator=gen) + 0.1  # 333: one per channel
        bias = torch.randn(N, device="cuda", generator=gen).bfloat16()
        codes, t = kernel.pack_2bit(w), tiled(w)
        ref, ref_b = fp8_reference(x, codes, alpha, N, K), fp8_reference(x, codes, alpha, N, K, bias)
        check(kernel.ternary_matmul(x, t, alpha, N, K, fp8=True, tiled=True), ref, tol=1e-2)
        check(kernel.ternary_matmul(x, t, alpha, N, K, fp8=True, tiled=True), reference(x, w, alpha), tol=0.05)
        xq, scales = fast.quantize_fp8(torch.nn.functional.pad(x, (0, fast.padded(N, K)[1] - K)),
                                       -(-M // fast.FP8_ROWS) * fast.FP8_ROWS)
        for name in tiles.WG8_CONFIGS:
            for cs in (1, 2, 4):
                for b, want in ((None, ref), (bias, ref_b)):
                    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
                    fast.launch.launch_tile(xq, t, alpha, y, N, K, name, cs, b, scales)
                    check(y, want, tol=1e-2)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_in_the_epilogue(dtype):
    """bias (in x's dtype or float32) added in every kernel's epilogue: small M, the wgmma/large-M path,
    awkward N, a forced mma.sync config and a forced wgmma one."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    for (M, K, N) in [(3, 1024, 9216), (600, 1152, 1152), (70, 130, 333), (512, 3072, 3072)]:
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        alpha = torch.rand(1, device="cuda", generator=gen) + 0.1
        codes = tiled(w)
        for bias in (torch.randn(N, device="cuda", generator=gen), torch.randn(N, device="cuda", generator=gen).to(dtype)):
            ref = reference(x, w, alpha) + bias.float()
            for config in [None, ("k32", 2)] + [(c, 1) for c in all_configs() if c.startswith("w")][:2]:
                poison_allocator(M * N * 2)
                check(kernel.ternary_matmul(x, codes, alpha, N, K, bias=bias, tiled=True, config=config), ref)
