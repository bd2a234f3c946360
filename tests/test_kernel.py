"""
Tests for kernel.py: the 2-bit packing and the fused ternary matmul against plain-PyTorch references.

    python -m pytest tests/test_kernel.py -v

The CPU part always runs (a few seconds). The GPU part needs CUDA + cupy; it checks the fused kernel
against a float32 reference on the same bf16/fp16-rounded inputs, with the output poisoned (NaN) first.
"""
import math
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernel  # noqa: E402
import tiles  # noqa: E402


def rand_trits(N, K, gen=None, device="cpu"):
    return (torch.randint(0, 3, (N, K), generator=gen) - 1).to(torch.int8).to(device)

# -----------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("N,K", [(1, 1), (3, 3), (17, 100), (100, 17), (1, 1000), (200, 72), (16, 128),
                                 (33, 257), (1152, 1152), (1000, 3)])
def test_pack_roundtrip(N, K):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    w = rand_trits(N, K, gen)
    p = kernel.pack_2bit(w)
    Np, Kp = kernel._padded(N, K)
    assert p.dtype == torch.uint8 and p.shape == (Np, Kp // 4)
    assert torch.equal(kernel.unpack_2bit(p, N, K), w)
    assert torch.equal(kernel.pack_2bit(w), p)  # deterministic
    # padding holds zero-trits (code 1): pack of a zero matrix is all 0b01010101
    assert torch.equal(kernel.pack_2bit(torch.zeros(N, K, dtype=torch.int8)), torch.full_like(p, 0x55))


def test_pack_layout_is_the_fragment_order():
    """The layout both kernels (and the dequant kernel) rely on, decoded from the bytes as the docstring says:
    word (Tn, Ck, g, t, w) holds pair p = (s1, r1, r0) at bits 2p (low code) and 16 + 2p (high code), for row
    16 Tn + 8 r0 + g and columns k, k + 1, k = 128 Ck + 32 w + 16 s1 + 8 r1 + 2 t (k in natural order)."""
    N, K = 32, 256
    w = rand_trits(N, K, torch.Generator().manual_seed(5))
    words = kernel.pack_2bit(w).contiguous().view(torch.int32).flatten().tolist()
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


def test_older_tile_order_roundtrip():
    gen = torch.Generator().manual_seed(6)
    for N, K in [(48, 200), (17, 257)]:
        w = rand_trits(N, K, gen)
        v1 = kernel.pack_2bit(w, perm=kernel._PERM_V1)
        assert not torch.equal(v1, kernel.pack_2bit(w))
        assert torch.equal(kernel.unpack_2bit(v1, N, K, perm=kernel._PERM_V1), w)


def test_weight_tensor_map_addresses_the_packed_tiles(monkeypatch):
    """The wgmma kernels read a CTA's weight tiles through _w_map, one copy per stage: element (word, chunk c,
    tile t) of that map must be the packing's 512 bytes of tile t (16 channels) x chunk c (128 k), and the copy's
    box the CTA's consecutive tiles of one chunk. Checked by packing trits that are nonzero only in one such block."""
    calls = []
    monkeypatch.setattr(kernel, "_encode_tiled", lambda: lambda *a: calls.append(a) or 0)
    N, K, t, c = 70, 500, 2, 3  # 5 tiles x 4 chunks (padded), block (t, c) = channels 32..47, k 384..499
    nt16, kc = kernel._padded(N, K)[0] // 16, kernel._padded(N, K)[1] // 128
    kernel._w_map.__wrapped__(0x1000, nt16, kc, 8)
    (_, dtype, rank, _, dims, strides, box, step, *_), = calls
    assert (dtype, rank, list(dims), list(box), list(step)) == (2, 3, [128, kc, nt16], [128, 1, 8], [1, 1, 1])
    w = torch.zeros(N, K, dtype=torch.int8)
    w[16 * t:16 * t + 16, 128 * c:] = rand_trits(16, K - 128 * c, torch.Generator().manual_seed(7)) | 1  # all +-1
    diff = (kernel.pack_2bit(w) != kernel.pack_2bit(torch.zeros_like(w))).view(-1).view(torch.uint8)
    changed = diff.nonzero().view(-1)
    start = c * strides[0] + t * strides[1]  # bytes, as the copy engine walks the map
    assert changed.min() >= start and changed.max() < start + 4 * dims[0] and len(changed) > 256


def split_fits(name, cs):
    """A wgmma tile's K split: each CTA of the cluster sum stores whole groups of 8 tokens (kernel.cu's assert)."""
    return tiles.dims(name)[1] // 8 % cs == 0


def gemv_fits(name, cs, M, K):
    """A GEMV tile takes the problem: M tokens, K in its warps' registers, X's rows in shared memory."""
    tn, kw, mt, cpw, _ = tiles.gemv_tile(name)
    kcz = -(-K // 128 // cs)
    return M <= 8 * mt and kcz <= kw * cpw and tiles.gemv_smem(name, M, kcz) <= 227 * 1024


def test_dispatch_names_only_existing_tiles():
    """Every TUNED / TUNED8 entry names a tile that exists (a GEMV tile: one that takes the shape), and off Hopper
    pick never returns a wgmma tile or a cluster split."""
    tile = lambda name: name in tiles.CONFIGS or name in tiles.WG_CONFIGS or tiles.gemv_tile(name) is not None
    for (K, N), by_m in tiles.TUNED.items():
        assert all(tile(name) for name, _ in by_m.values())
        assert all(gemv_fits(name, cs, M, K) for M, (name, cs) in by_m.items() if tiles.gemv_tile(name))
        for M in (1, 2, 9, 16, 17, 64, 100, 512, 5000, 20000):
            name, cs = tiles.pick(M, N, K, wgmma=False)
            assert (name in tiles.CONFIGS or name == "dequant" or tiles.gemv_tile(name)) and cs == 1
            name, cs = tiles.pick(M, N, K, wgmma=True)
            assert tile(name) and cs in (1, 2, 4, 8)
            assert M <= tiles.GEMV_MAX_M or not tiles.gemv_tile(name)  # up to 16 tokens: a GEMV tile or w16
            if tiles.gemv_tile(name):
                assert gemv_fits(name, cs, M, K)
            elif name in tiles.WG_CONFIGS:
                assert split_fits(name, cs)
    for M, N, K in [(1, 17, 100), (70, 333, 1100), (4096, 5000, 640)]:  # untuned shapes: the heuristic
        assert tile(tiles.pick(M, N, K, wgmma=True)[0])
        assert tiles.pick8(M, N, K)[0] in tiles.WG8_CONFIGS
    for (K, N), by_m in tiles.TUNED8.items():  # fp8 activations: wgmm8 tiles only
        assert all(name in tiles.WG8_CONFIGS and cs in (1, 2, 4, 8) for name, cs in by_m.values())


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


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        kernel.pack_2bit(torch.full((4, 4), 2, dtype=torch.int8))
    with pytest.raises(ValueError):
        kernel.unpack_2bit(torch.zeros(10, dtype=torch.uint8), 16, 128)


@pytest.mark.parametrize("shape,N,K", [((5, 72), 200, 72), ((2, 3, 100), 17, 100), ((1, 1152), 1152, 1152)])
def test_cpu_matmul_matches_float64(shape, N, K):
    gen = torch.Generator().manual_seed(0)
    w = rand_trits(N, K, gen)
    x = torch.randn(*shape, generator=gen)
    alpha = torch.rand(1, generator=gen) + 0.5
    want = (x.double() @ (alpha.double() * w.double()).t())
    y = kernel.ternary_matmul(x, kernel.pack_2bit(w), alpha, N, K)
    assert y.shape == (*shape[:-1], N) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
    y64 = kernel.ternary_matmul(x.double(), kernel.pack_2bit(w), alpha, N, K)
    torch.testing.assert_close(y64, want, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError):
        kernel.ternary_matmul(x[..., :-1], kernel.pack_2bit(w), alpha, N, K)

@pytest.mark.parametrize("shape,N,K", [((5, 72), 200, 72), ((2, 3, 100), 17, 100), ((4, 257), 33, 257),
                                       ((1, 2, 3, 128), 48, 128), ((0, 130), 20, 130)])
def test_custom_op_matches_reference(shape, N, K):
    gen = torch.Generator().manual_seed(K)
    w, x = rand_trits(N, K, gen), torch.randn(*shape, generator=gen)
    packed, alpha = kernel.pack_2bit(w), torch.rand(1, generator=gen) + 0.5
    y = kernel.ternary_matmul_op(x, packed, alpha, N, K)
    assert y.shape == (*shape[:-1], N) and y.dtype == x.dtype
    assert torch.equal(y, kernel.ternary_matmul_ref(x, packed, alpha, N, K))
    assert torch.equal(torch.ops.terdit.ternary_matmul(x, packed, alpha, N, K), y)  # registered under its name


def test_bias_matches_reference():
    gen = torch.Generator().manual_seed(7)
    N, K = 33, 130
    w, x = rand_trits(N, K, gen), torch.randn(4, K, generator=gen)
    packed, alpha, b = kernel.pack_2bit(w), torch.rand(1, generator=gen) + 0.5, torch.randn(N, generator=gen)
    want = x.double() @ (alpha.double() * w.double()).t() + b.double()
    torch.testing.assert_close(kernel.ternary_matmul_op(x, packed, alpha, N, K, b).double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        kernel.ternary_matmul(x, packed, alpha, N, K, bias=b[:-1])


def test_per_channel_alpha_is_linears_side_by_side():
    """alpha with one scale per output channel (pack.FusedLinears) computes what separate per-tensor-alpha
    matmuls compute, concatenated; in bf16 and with fp8 activations; a wrong alpha size is one clear error."""
    gen = torch.Generator().manual_seed(9)
    K, widths = 200, (48, 16, 32)
    ws = [rand_trits(n, K, gen) for n in widths]
    alphas = [torch.rand(1, generator=gen) + 0.5 for _ in widths]
    packed, N = kernel.pack_2bit(torch.cat(ws)), sum(widths)
    avec = torch.cat([a.expand(n) for a, n in zip(alphas, widths)])
    x = torch.randn(5, K, generator=gen)
    for fp8 in (False, True):
        got = kernel.ternary_matmul(x, packed, avec, N, K, fp8=fp8)
        want = torch.cat([kernel.ternary_matmul(x, kernel.pack_2bit(w), a, w.shape[0], K, fp8=fp8)
                          for w, a in zip(ws, alphas)], dim=-1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(kernel.ternary_matmul_op, (x, packed, avec, N, K))
    with pytest.raises(ValueError, match="alpha must hold one scale"):
        kernel.ternary_matmul(x, packed, avec[:-1], N, K)


def test_custom_op_opcheck():
    """Schema, fake (meta) implementation, and tracing by AOTAutograd with dynamic shapes all agree with the op."""
    gen = torch.Generator().manual_seed(0)
    for shape, N, K in [((3, 100), 17, 100), ((2, 5, 128), 32, 128)]:
        x, w = torch.randn(*shape, generator=gen), rand_trits(N, K, gen)
        torch.library.opcheck(kernel.ternary_matmul_op, (x, kernel.pack_2bit(w), torch.tensor([0.3]), N, K))
        torch.library.opcheck(kernel.ternary_matmul_op, (x, kernel.pack_2bit(w), torch.tensor([0.3]), N, K,
                                                         torch.randn(N, generator=gen)))
        torch.library.opcheck(kernel.ternary_matmul_op, (x, kernel.pack_2bit(w), torch.tensor([0.3]), N, K, None, True))


def test_fp8_codes_and_reference():
    """Per-token e4m3: x ~ s * q within e4m3's 3 mantissa bits; zero rows stay zero; on a CPU the fp8 matmul is
    the reference, close to the unquantised result."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 300, generator=gen) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0
    q, s = kernel.fp8_codes(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6,)
    back = q.float() * s[:, None]
    assert torch.equal(back[2], torch.zeros(300)) and s[2] == 0
    assert ((back - x).abs() <= x.abs() / 16 + s[:, None] * 2 ** -9).all()   # half an ulp of 3 bits, or subnormal
    assert torch.equal(q.float().abs().amax(-1)[[0, 1, 3, 4, 5]], torch.full((5,), 448.0))
    N, K = 50, 300
    w, alpha, b = rand_trits(N, K, gen), torch.rand(1, generator=gen) + 0.5, torch.randn(N, generator=gen)
    packed = kernel.pack_2bit(w)
    y = kernel.ternary_matmul_op(x, packed, alpha, N, K, b, True)
    assert torch.equal(y, kernel.ternary_matmul_ref(x, packed, alpha, N, K, b, fp8=True))
    want = kernel.ternary_matmul_ref(x, packed, alpha, N, K, b)
    assert ((y - want).norm(dim=-1) <= 0.05 * want.norm(dim=-1)).all()


def test_fp8_image_layout():
    """fp8_image puts code (m, k) where kernel.cu's dequant8 expects it: chunk k // 128, row m, 16-byte piece
    p = k % 128 // 16 at p ^ m % 8, and within the piece k = 8 r1 + 2 t + h at byte 4 t + 2 h + r1."""
    gen = torch.Generator().manual_seed(12)
    M, Kp, Mp = 11, 256, 16
    q = (torch.randn(M, Kp, generator=gen) * 50).to(torch.float8_e4m3fn)
    img = kernel.fp8_image(q, Mp)
    assert img.shape == (Kp // 128, Mp, 128) and img.dtype == torch.uint8
    assert torch.equal(img[:, M:], torch.zeros_like(img[:, M:]))
    codes = q.view(torch.uint8)
    for m in range(M):
        for k in range(Kp):
            c, p, r1, t, h = k // 128, k % 128 // 16, k % 16 // 8, k % 8 // 2, k % 2
            assert img[c, m, 16 * (p ^ m % 8) + 4 * t + 2 * h + r1] == codes[m, k]


def test_fp8_dequant8_bytes_meet_the_image():
    """A Python model of kernel.cu's dequant8 (its two PRMTs) on packed words: the e4m3 byte at each k32 fragment
    position decodes to the trit whose X value fp8_image puts at that position, so wgmma pairs the right k."""
    def prmt(x, s):  # __byte_perm(x, 0, s), selectors < 8 (no sign mode)
        return sum(((x >> (8 * ((s >> (4 * i)) & 7))) & 0xFF if (s >> (4 * i)) & 7 < 4 else 0) << (8 * i)
                   for i in range(4))

    def dequant8(q):  # a[0..3]: (q, 0x20), (q >> 2, 0x20), (q, 0x31), (q >> 2, 0x31)
        return [prmt(0x003800B8, prmt(v, sel) & 0x3333) for sel in (0x20, 0x31) for v in (q, q >> 2)]

    gen = torch.Generator().manual_seed(15)
    w = rand_trits(16, 128, gen)  # one tile
    words = kernel.pack_2bit(w).reshape(-1).view(torch.int32).tolist()  # lane-major: lane * 4 + word
    # position in row 0's 128-byte chunk of fp8_image (row 0: no swizzle) -> k, from an image of the bytes k
    pos_k = kernel.fp8_image(torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).view(1, 128), 8)[0, 0]
    decode = {0xB8: -1, 0x00: 0, 0x38: 1}
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for wd in range(4):
            a0, a1, a2, a3 = dequant8(words[lane * 4 + wd] & 0xFFFFFFFF)
            for reg, row, half in ((a0, g, 0), (a1, g + 8, 0), (a2, g, 16), (a3, g + 8, 16)):
                for j in range(4):
                    pos = 32 * wd + half + 4 * t + j  # the fragment's k position within the chunk
                    assert decode[(reg >> (8 * j)) & 0xFF] == w[row, int(pos_k[pos])]

def _nvrtc():
    """The NVRTC library (pip's nvidia-cuda-nvrtc-cu12/13, or one on the library path) through ctypes, or None:
    it compiles CUDA C++ to a GPU binary without a GPU (ptxas included), so CI checks kernel.cu too."""
    import ctypes
    import ctypes.util
    import glob
    try:
        import nvidia.cuda_nvrtc as nv
        paths = sorted(glob.glob(os.path.join(list(nv.__path__)[0], "lib", "libnvrtc.so.*[0-9]")))
    except ImportError:
        paths = []
    for path in paths + [ctypes.util.find_library("nvrtc")]:
        try:
            return ctypes.CDLL(path)
        except (OSError, TypeError):
            pass
    return None


def nvrtc_compile(lib, src, arch):
    """(ok, ptxas log) of compiling src to a cubin for arch with ptxas's -v report."""
    import ctypes
    prog, opts = ctypes.c_void_p(), [b"-std=c++17", f"-arch={arch}".encode(), b"--ptxas-options=-v"]
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None) == 0
    ok = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) == 0
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ok, log.value.decode(errors="replace")


def test_cuda_sources_compile():
    """Every wgmma tile (16-bit and fp8; one alpha or one per channel, each bias kind, with and without a cluster)
    and the other kernels compile with NVRTC to sm_90a (mma.sync ones also to sm_80) without a GPU, as do bench.py's
    floor probes. The wgmma tiles must not spill, and ptxas must not serialise their wgmmas (its note C7513: a
    register a wgmma in flight reads is written; kernel.cu's two register sets exist to avoid it)."""
    lib = _nvrtc()
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
        ok, log = nvrtc_compile(lib, kernel._source(kind, name, cs, bf16, bias, avec), arch)
        assert ok, f"{kind} {name}/cs{cs}: {log[:2000]}"
        if kind.startswith("WGMM"):
            assert "C7513" not in log, f"{kind} {name}/cs{cs}: ptxas serialises the wgmmas: {log[:2000]}"
            spills = re.findall(r"(\d+) bytes spill stores", log)
            if not spills and "registers" not in log:
                unreported.append(f"{kind} {name}/cs{cs}")
                continue
            assert set(spills) == {"0"}, f"{kind} {name}/cs{cs} spills: {log[:2000]}"
    for kind, bf16 in (("QUANT8", True), ("QUANT8", False), ("DEQUANT", True)):
        ok, log = nvrtc_compile(lib, kernel._source(kind, bf16=bf16), "sm_90a")
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
# GPU


gpu = pytest.mark.skipif(not torch.cuda.is_available() or kernel.cp is None, reason="needs CUDA and cupy")
REAL = [(1536, 1536), (1536, 4096), (4096, 1536), (1024, 9216), (3072, 3072), (3072, 8192), (8192, 3072),
        (1024, 18432), (1152, 1152)]  # (K, N)
AWK_KN = [(72, 200), (200, 72), (1000, 1000), (1, 3), (17, 33), (130, 1000), (1152, 100)]
MS = [1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 64, 65, 100, 333, 513, 1000, 2048, 8192]


def gpu_cases():
    g = torch.Generator().manual_seed(1234)
    cases = [(M, K, N) for (K, N) in REAL for M in (1, 16, 333)]           # every real shape
    cases += [(M, K, N) for (K, N) in AWK_KN for M in (1, 7, 100, 513)]    # awkward K, N
    for _ in range(20):                                                    # random mixes
        M = MS[torch.randint(len(MS), (1,), generator=g).item()]
        K, N = (REAL + AWK_KN)[torch.randint(len(REAL) + len(AWK_KN), (1,), generator=g).item()]
        cases.append((M, K, N))
    cases += [(8192, 3072, 3072), (8192, 1024, 18432), (2048, 8192, 3072), (8192, 72, 200)]
    return cases


def all_configs():
    wg = torch.cuda.is_available() and kernel._gpu(torch.cuda.current_device()).wgmma
    return list(tiles.CONFIGS) + (list(tiles.WG_CONFIGS) if wg else [])


def reference(x, w, alpha):
    """float32 reference on the same (bf16/fp16-rounded) inputs, no TF32."""
    return (x.float() @ w.float().t()) * alpha


def check(y, ref, tol=1e-2):
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = (y.float() - ref).norm() / ref.norm().clamp_min(1e-30)
    assert err < tol, f"relative error {err:.2e}"


def poison_allocator(nbytes):
    """Fill and free a block so that the next torch.empty of that size likely gets NaN garbage."""
    torch.empty(nbytes // 2 + 1, dtype=torch.float16, device="cuda").fill_(float("nan"))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = gpu_cases()
    assert len(cases) >= 50
    for (M, K, N) in cases:
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        alpha = torch.rand(1, device="cuda", generator=gen) + 0.1
        poison_allocator(M * N * 2)
        packed, ref = kernel.pack_2bit(w), reference(x, w, alpha)
        y = kernel.ternary_matmul(x, packed, alpha, N, K)
        assert y.shape == (M, N) and y.dtype == dtype
        check(y, ref)
        if M >= 512 and K % 128 == 0 and N % 16 == 0:  # large M: every path, whichever the dispatch chose
            for config in [("dequant", 1), ("l128", 1)] + [("w2x128", 1)] * ("w2x128" in all_configs()):
                poison_allocator(M * N * 2)
                check(kernel.ternary_matmul(x, packed, alpha, N, K, config=config), ref)


@gpu
def test_every_config_poisoned():
    """Each tile config (wgmma ones on Hopper) x cluster split, straight through _launch into a NaN-filled
    output; the last shape's M, N, K fill no tile evenly, and it has one alpha per output channel."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(1)
    for (M, K, N), nalpha in [((37, 1000, 200), 1), ((300, 1152, 1152), 1), ((257, 1100, 333), 333)]:
        Kp = kernel._padded(N, K)[1]
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        alpha = torch.rand(nalpha, device="cuda", generator=gen) + 0.1
        xp = torch.nn.functional.pad(x, (0, Kp - K))
        packed, ref = kernel.pack_2bit(w), reference(x, w, alpha)
        for name in all_configs():
            for cs in (1, 2, 4, 8):
                if name in tiles.WG_CONFIGS and not split_fits(name, cs):  # says so, before compiling anything
                    y = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
                    with pytest.raises(ValueError, match="splits K over at most"):
                        kernel._launch(xp, packed, alpha, y, N, K, name, cs)
                    continue
                y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
                kernel._launch(xp, packed, alpha, y, N, K, name, cs)
                check(y, ref)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_every_tile_poisoned(dtype):
    """The GEMV kernel (M <= 16): tiles of 1-8 n16-tiles x 2-16 warps, 8 or 16 tokens, K split over 1/2/4 CTAs
    (on Hopper), weights in registers or staged through shared memory, with and without bias, one alpha or one per
    channel, awkward M, N, K (warps with fewer chunks than they hold, or none), straight through _launch into
    NaN-filled outputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(11)
    splits = (1, 2, 4) if kernel._gpu(torch.cuda.current_device()).wgmma else (1,)
    for (K, N) in [(1000, 200), (129, 17), (3072, 3072), (8192, 48), (4096, 40)]:  # 4096: 48 KB, the opt-in's edge
        Kp, kc = kernel._padded(N, K)[1], kernel._padded(N, K)[1] // 128
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        alpha = torch.rand(1, device="cuda", generator=gen) + 0.1
        packed = kernel.pack_2bit(w)
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
                kernel._launch(xp, packed, alpha, y, N, K, name, cs, bias)
                check(y, ref)
    with pytest.raises(ValueError, match="GEMV tile"):  # a tile that cannot take the problem says so
        kernel.ternary_matmul(x[:1].repeat(17, 1), packed, alpha, N, K, config=("v1x8m2c8", 1))


def fp8_reference(x, packed, alpha, N, K, bias=None):
    """ternary_matmul_ref(fp8=True) in float32 on the GPU: the same codes, the products summed exactly."""
    torch.backends.cuda.matmul.allow_tf32 = False
    return kernel.ternary_matmul_ref(x.float(), packed, alpha, N, K, None if bias is None else bias.float(), fp8=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant8_matches_reference(dtype):
    """The quant8 kernel writes the reference's bytes and scales (rows past M: zeros)."""
    if not kernel._gpu(torch.cuda.current_device()).wgmma:
        pytest.skip("fp8 activations run on Hopper")
    gen = torch.Generator(device="cuda").manual_seed(13)
    for M, Kp in [(1, 128), (7, 1152), (300, 3072), (513, 8192)]:
        x = (torch.randn(M, Kp, device="cuda", generator=gen) * torch.rand(M, 1, device="cuda", generator=gen) * 10).to(dtype)
        x[M // 2] = 0
        Mp = -(-M // kernel.FP8_ROWS) * kernel.FP8_ROWS
        q, s = kernel.quantize_fp8(x, Mp)
        q_ref, s_ref = kernel.quantize_fp8_ref(x, Mp)
        assert torch.equal(s, s_ref)
        assert torch.equal(q, q_ref)


@gpu
def test_split_last_wave_poisoned():
    """A problem whose last wave tiles.launches runs as a second, K-split launch (shapes made from this GPU's SM
    count), for a 16-bit and an fp8 tile, with bias and one alpha per channel, into a NaN-filled output."""
    sms, wgmma, _ = kernel._gpu(torch.cuda.current_device())
    if not wgmma:
        pytest.skip("wgmma tiles run on Hopper")
    gen = torch.Generator(device="cuda").manual_seed(16)
    for name, fp8 in (("w2x128", False), ("w64", False), ("f128", True)):
        wgn, bm, _, minb = {**tiles.WG_CONFIGS, **tiles.WG8_CONFIGS}[name]
        N, M, K = 64 * wgn * -(-(sms * minb + 5) // 3) - 40, 3 * bm - 5, 1100  # 3 token tiles, 5+ tiles past a wave
        assert len(tiles.launches(M, kernel._padded(N, K)[0], kernel._padded(N, K)[1], name, 1, sms)) == 2
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        alpha = torch.rand(N, device="cuda", generator=gen) + 0.1
        bias = torch.randn(N, device="cuda", generator=gen).bfloat16()
        packed = kernel.pack_2bit(w)
        ref = fp8_reference(x, packed, alpha, N, K, bias) if fp8 else reference(x, w, alpha) + bias.float()
        poison_allocator(M * N * 2)
        check(kernel.ternary_matmul(x, packed, alpha, N, K, bias, config=(name, 1), fp8=fp8), ref)


@gpu
def test_fp8_every_config_poisoned():
    """Each wgmm8 tile x cluster split into a NaN-filled output, with and without bias, against the fp8
    reference (the same e4m3 codes), and the automatic choice through ternary_matmul; awkward M, K, N included
    (N = 333 with one alpha per channel)."""
    if not kernel._gpu(torch.cuda.current_device()).wgmma:
        pytest.skip("fp8 activations run on Hopper")
    gen = torch.Generator(device="cuda").manual_seed(14)
    for (M, K, N) in [(37, 1000, 200), (300, 1152, 1152), (257, 1100, 333), (1, 3072, 3072), (600, 3072, 8192)]:
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        alpha = torch.rand(N if N == 333 else 1, device="cuda", generator=gen) + 0.1  # 333: one per channel
        bias = torch.randn(N, device="cuda", generator=gen).bfloat16()
        packed = kernel.pack_2bit(w)
        ref, ref_b = fp8_reference(x, packed, alpha, N, K), fp8_reference(x, packed, alpha, N, K, bias)
        check(kernel.ternary_matmul(x, packed, alpha, N, K, fp8=True), ref, tol=1e-2)
        check(kernel.ternary_matmul(x, packed, alpha, N, K, fp8=True), reference(x, w, alpha), tol=0.05)  # vs bf16
        xq, scales = kernel.quantize_fp8(torch.nn.functional.pad(x, (0, kernel._padded(N, K)[1] - K)),
                                         -(-M // kernel.FP8_ROWS) * kernel.FP8_ROWS)
        for name in tiles.WG8_CONFIGS:
            for cs in (1, 2, 4):
                for b, want in ((None, ref), (bias, ref_b)):
                    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
                    kernel._launch(xq, packed, alpha, y, N, K, name, cs, b, scales)
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
        packed = kernel.pack_2bit(w)
        for bias in (torch.randn(N, device="cuda", generator=gen), torch.randn(N, device="cuda", generator=gen).to(dtype)):
            ref = reference(x, w, alpha) + bias.float()
            for config in [None, ("k32", 2)] + [(c, 1) for c in all_configs() if c.startswith("w")][:2]:
                poison_allocator(M * N * 2)
                check(kernel.ternary_matmul(x, packed, alpha, N, K, bias=bias, config=config), ref)


@gpu
def test_leading_dims_noncontiguous_and_fallbacks():
    gen = torch.Generator(device="cuda").manual_seed(2)
    N, K = 200, 72
    w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
    packed, alpha = kernel.pack_2bit(w), torch.tensor([0.7], device="cuda")
    big = torch.randn(2, 5, 2 * K, device="cuda", generator=gen).bfloat16()
    x = big[..., ::2]  # non-contiguous (2, 5, K)
    y = kernel.ternary_matmul(x, packed, alpha, N, K)
    assert y.shape == (2, 5, N)
    check(y, reference(x.reshape(-1, K), w, alpha).view(2, 5, N))
    y32 = kernel.ternary_matmul(x.float(), packed, alpha, N, K)  # fp32: reference path + one-time warning
    assert y32.dtype == torch.float32
    check(y32, reference(x.reshape(-1, K), w, alpha).view(2, 5, N), tol=1e-5)


@gpu
def test_cuda_graph_capture_replay():
    gen = torch.Generator(device="cuda").manual_seed(3)
    fp8s = (False, True) if kernel._gpu(torch.cuda.current_device()).wgmma else (False,)
    for (M, K, N), fp8 in [(mkn, f) for mkn in [(4, 3072, 3072), (600, 1152, 1152)] for f in fp8s]:
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        packed, alpha = kernel.pack_2bit(w), torch.rand(1, device="cuda", generator=gen) + 0.1
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (compiles) outside the capture
            kernel.ternary_matmul(x, packed, alpha, N, K, fp8=fp8)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = kernel.ternary_matmul(x, packed, alpha, N, K, fp8=fp8)
        x.copy_(torch.randn(M, K, device="cuda", generator=gen))
        alpha.fill_(0.37)  # alpha is read on the device at replay time
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        eager = kernel.ternary_matmul(x, packed, alpha, N, K, fp8=fp8)
        assert torch.equal(y, eager)
        check(y, reference(x, w, alpha), tol=0.05 if fp8 else 1e-2)


@gpu
def test_custom_op_compiles_fullgraph_on_cuda():
    """The cupy launch inside the op under torch.compile(fullgraph=True): same values as eager, both paths."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    for (M, K, N) in [(2, 1024, 9216), (600, 1152, 1152), (7, 130, 1000)]:  # fused kernel, dequant + cuBLAS, awkward
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        packed, alpha = kernel.pack_2bit(w), torch.rand(1, device="cuda", generator=gen) + 0.1
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        bias = torch.randn(N, device="cuda", generator=gen).bfloat16()
        f = lambda x: kernel.ternary_matmul_op(x, packed, alpha, N, K) + bias
        eager, compiled = f(x), torch.compile(f, fullgraph=True)(x)
        assert compiled.dtype == torch.bfloat16
        torch.testing.assert_close(compiled, eager)
