"""
Tests for kernel.py: the row-major 2-bit codes, the PyTorch reference, the readable CUDA kernel, the dispatch and the
custom op. The fast kernels' own tests: tests/test_fast.py.

    python -m pytest tests/test_kernel.py -v

The CPU part always runs (a few seconds; the NVRTC compile check needs pip's nvidia-cuda-nvrtc-cu12). The GPU part
needs CUDA + cupy; it checks the kernels against a float32 reference on the same bf16/fp16-rounded inputs.
"""
import os

import pytest
import torch

import fast
import kernel


def rand_trits(N, K, gen=None, device="cpu"):
    return (torch.randint(0, 3, (N, K), generator=gen) - 1).to(torch.int8).to(device)


def tiled(w):
    """The fast kernels' codes of trits w (N, K): prepare's tile order, on w's device."""
    return fast.tile_codes(kernel.pack_2bit(w), *w.shape)

# -----------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("N,K", [(1, 1), (3, 3), (17, 100), (100, 17), (1, 1000), (200, 72), (16, 128),
                                 (33, 257), (1152, 1152), (1000, 3), (5, 0)])
def test_pack_roundtrip(N, K):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    w = rand_trits(N, K, gen)
    p = kernel.pack_2bit(w)
    assert p.dtype == torch.uint8 and p.shape == (N, -(-K // 4))
    assert torch.equal(kernel.unpack_2bit(p, N, K), w)
    assert torch.equal(kernel.pack_2bit(w), p)  # deterministic
    # padding holds zero-trits (code 1): pack of a zero matrix is all 0b01010101
    assert torch.equal(kernel.pack_2bit(torch.zeros(N, K, dtype=torch.int8)), torch.full_like(p, 0x55))


def test_pack_bit_positions():
    """Row-major, code = trit + 1, byte j of row n holds k = 4j + i at bits 2i..2i+1, padding code 1."""
    assert kernel.pack_2bit(torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)).tolist() == [[0xA4, 0x54]]
    N, K = 7, 29
    w = rand_trits(N, K, torch.Generator().manual_seed(3))
    p = kernel.pack_2bit(w).tolist()
    for n in range(N):
        for k in range(4 * len(p[n])):
            code = (p[n][k // 4] >> 2 * (k % 4)) & 3
            assert code == (w[n, k] + 1 if k < K else 1)


def test_codes_concatenate_along_n():
    """Linears fused along N (FusedLinears, the stacked adaLN): the codes of the stack are the codes concatenated."""
    gen = torch.Generator().manual_seed(4)
    blocks = [rand_trits(n, 200, gen) for n in (48, 16, 33)]
    assert torch.equal(kernel.pack_2bit(torch.cat(blocks)), torch.cat([kernel.pack_2bit(w) for w in blocks]))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        kernel.pack_2bit(torch.full((4, 4), 2, dtype=torch.int8))
    with pytest.raises(ValueError):
        kernel.pack_2bit(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="codes must be uint8 of shape"):
        kernel.unpack_2bit(torch.zeros(10, dtype=torch.uint8), 16, 128)
    with pytest.raises(ValueError, match="codes must be uint8 of shape"):
        kernel.unpack_2bit(torch.zeros(16, 32, dtype=torch.int8), 16, 128)


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
    codes, alpha = kernel.pack_2bit(w), torch.rand(1, generator=gen) + 0.5
    y = kernel.ternary_matmul_op(x, codes, alpha, N, K)
    assert y.shape == (*shape[:-1], N) and y.dtype == x.dtype
    assert torch.equal(y, kernel.ternary_matmul_ref(x, codes, alpha, N, K))
    assert torch.equal(torch.ops.terdit.ternary_matmul(x, codes, alpha, N, K), y)  # registered under its name


def test_bias_matches_reference():
    gen = torch.Generator().manual_seed(7)
    N, K = 33, 130
    w, x = rand_trits(N, K, gen), torch.randn(4, K, generator=gen)
    codes, alpha, b = kernel.pack_2bit(w), torch.rand(1, generator=gen) + 0.5, torch.randn(N, generator=gen)
    want = x.double() @ (alpha.double() * w.double()).t() + b.double()
    torch.testing.assert_close(kernel.ternary_matmul_op(x, codes, alpha, N, K, b).double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        kernel.ternary_matmul(x, codes, alpha, N, K, bias=b[:-1])


def test_per_channel_alpha_is_linears_side_by_side():
    """alpha with one scale per output channel (deploy.FusedLinears) computes what separate per-tensor-alpha
    matmuls compute, concatenated; in bf16 and with fp8 activations; a wrong alpha size is one clear error."""
    gen = torch.Generator().manual_seed(9)
    K, widths = 200, (48, 16, 32)
    ws = [rand_trits(n, K, gen) for n in widths]
    alphas = [torch.rand(1, generator=gen) + 0.5 for _ in widths]
    codes, N = kernel.pack_2bit(torch.cat(ws)), sum(widths)
    avec = torch.cat([a.expand(n) for a, n in zip(alphas, widths)])
    x = torch.randn(5, K, generator=gen)
    for fp8 in (False, True):
        got = kernel.ternary_matmul(x, codes, avec, N, K, fp8=fp8)
        want = torch.cat([kernel.ternary_matmul(x, kernel.pack_2bit(w), a, w.shape[0], K, fp8=fp8)
                          for w, a in zip(ws, alphas)], dim=-1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(kernel.ternary_matmul_op, (x, codes, avec, N, K))
    with pytest.raises(ValueError, match="alpha must hold one scale"):
        kernel.ternary_matmul(x, codes, avec[:-1], N, K)


def test_custom_op_opcheck():
    """Schema, fake (meta) implementation, and tracing by AOTAutograd with dynamic shapes all agree with the op,
    for row-major and tiled codes."""
    gen = torch.Generator().manual_seed(0)
    for shape, N, K in [((3, 100), 17, 100), ((2, 5, 128), 32, 128)]:
        x, w = torch.randn(*shape, generator=gen), rand_trits(N, K, gen)
        codes, alpha = kernel.pack_2bit(w), torch.tensor([0.3])
        torch.library.opcheck(kernel.ternary_matmul_op, (x, codes, alpha, N, K))
        torch.library.opcheck(kernel.ternary_matmul_op, (x, codes, alpha, N, K, torch.randn(N, generator=gen)))
        torch.library.opcheck(kernel.ternary_matmul_op, (x, codes, alpha, N, K, None, True))
        torch.library.opcheck(kernel.ternary_matmul_op, (x, tiled(w), alpha, N, K, None, False, True))


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
    codes = kernel.pack_2bit(w)
    y = kernel.ternary_matmul_op(x, codes, alpha, N, K, b, True)
    assert torch.equal(y, kernel.ternary_matmul_ref(x, codes, alpha, N, K, b, fp8=True))
    want = kernel.ternary_matmul_ref(x, codes, alpha, N, K, b)
    assert ((y - want).norm(dim=-1) <= 0.05 * want.norm(dim=-1)).all()


def test_prepare_off_the_gpu_keeps_the_codes(monkeypatch):
    """On a CPU prepare returns the row-major codes whatever the kernel asked for; a kernel name other than fast or
    simple (argument or TERDIT_KERNEL) and codes of the wrong shape are one clear error."""
    w = rand_trits(20, 130, torch.Generator().manual_seed(1))
    codes = kernel.pack_2bit(w)
    for name in (None, "fast", "simple"):
        got, is_tiled = kernel.prepare(codes, 20, 130, name)
        assert got is codes and not is_tiled
    monkeypatch.setenv("TERDIT_KERNEL", "simple")
    assert kernel.prepare(codes, 20, 130) == (codes, False)
    monkeypatch.setenv("TERDIT_KERNEL", "bogus")
    with pytest.raises(ValueError, match="'fast' or 'simple'"):
        kernel.prepare(codes, 20, 130)
    with pytest.raises(ValueError, match="'fast' or 'simple'"):
        kernel.prepare(codes, 20, 130, "tiled")
    with pytest.raises(ValueError, match="codes must be uint8 of shape"):
        kernel.prepare(codes, 20, 131 + 4, "simple")


def test_tiled_codes_on_the_cpu_run_the_reference():
    """Tiled codes reaching a CPU (a model moved there after prepare) are untiled for the reference: same result;
    a config (a fast tile) with row-major codes is one clear error."""
    gen = torch.Generator().manual_seed(2)
    N, K = 37, 261
    w, x, b = rand_trits(N, K, gen), torch.randn(3, K, generator=gen), torch.randn(N, generator=gen)
    codes, alpha = kernel.pack_2bit(w), torch.rand(N, generator=gen) + 0.5
    for fp8 in (False, True):
        want = kernel.ternary_matmul_ref(x, codes, alpha, N, K, b, fp8)
        assert torch.equal(kernel.ternary_matmul(x, tiled(w), alpha, N, K, b, fp8, tiled=True), want)
        assert torch.equal(kernel.ternary_matmul_op(x, tiled(w), alpha, N, K, b, fp8, True), want)
    with pytest.raises(ValueError, match="needs tiled codes"):
        kernel.ternary_matmul(x, codes, alpha, N, K, config=("k32", 1))


def nvrtc():
    """The NVRTC library (pip's nvidia-cuda-nvrtc-cu12/13, or one on the library path) through ctypes, or None:
    it compiles CUDA C++ to a GPU binary without a GPU (ptxas included), so CI checks the CUDA sources too."""
    import ctypes
    import ctypes.util
    import glob
    try:
        import nvidia.cuda_nvrtc as nv
        paths = sorted(glob.glob(os.path.join(list(nv.__path__)[0], "lib", "libnvrtc.so.*[0-9]")))
    except ImportError:
        paths = []
    found = ctypes.util.find_library("nvrtc")
    for path in paths + ([found] if found else []):  # never CDLL(None): that is the running process itself
        try:
            return ctypes.CDLL(path)
        except OSError:
            pass
    return None


def nvrtc_compile(lib, src, arch):
    """(ok, ptxas log) of compiling src to a cubin for arch with ptxas's -v report."""
    import ctypes
    prog, opts = ctypes.c_void_p(), [b"-std=c++17", f"-arch={arch}".encode(), b"--ptxas-options=-v"]
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"source.cu", 0, None, None) == 0
    ok = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) == 0
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ok, log.value.decode(errors="replace")


def test_nvrtc_lookup_skips_cleanly_without_it(monkeypatch):
    """Without NVRTC (no pip package, none on the library path) nvrtc() says None: the compile tests skip."""
    import builtins
    import ctypes.util
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("nvidia") else real_import(name, *a, **k))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert nvrtc() is None


def test_readable_kernel_compiles():
    """The readable kernel's source compiles with NVRTC, with no header, for bf16 and fp16 X, from sm_75 (Turing)
    to sm_90a, and stays short: at most 50 lines of CUDA."""
    lib = nvrtc()
    if lib is None:
        pytest.skip("needs NVRTC (pip install nvidia-cuda-nvrtc-cu12)")
    assert len(kernel.SOURCE.strip().splitlines()) <= 50 and "#include" not in kernel.SOURCE
    for arch in ("sm_75", "sm_80", "sm_90a"):
        for bf16 in (0, 1):
            ok, log = nvrtc_compile(lib, f"#define BF16 {bf16}\n" + kernel.SOURCE, arch)
            assert ok, f"{arch} bf16={bf16}: {log[:2000]}"

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


def wgmma_gpu():
    return fast.gpu(torch.cuda.current_device()).wgmma


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
def test_readable_kernel_matches_reference(dtype):
    """The readable kernel (row-major codes on CUDA) on awkward shapes (K, N not multiples of 4, 16 or 128, prime M),
    with and without bias, one alpha or one per channel, into poisoned memory."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(21)
    for i, (M, K, N) in enumerate([(1, 1, 1), (2, 3, 5), (7, 130, 17), (13, 1000, 333), (31, 129, 1000),
                                   (97, 1152, 48), (1, 3072, 3072), (257, 72, 200), (3, 8191, 9)]):
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        alpha = torch.rand(N if i % 2 else 1, device="cuda", generator=gen) + 0.1
        codes = kernel.pack_2bit(w)
        assert kernel.prepare(codes, N, K, "simple") == (codes, False)
        for bias in (None, torch.randn(N, device="cuda", generator=gen).to(dtype)):
            poison_allocator(M * N * 4)
            y = kernel.ternary_matmul(x, codes, alpha, N, K, bias)
            assert y.shape == (M, N) and y.dtype == dtype
            check(y, reference(x, w, alpha) + (0 if bias is None else bias.float()), tol=5e-3)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference(dtype):
    """The dispatch with prepare's codes (the fast kernels on this GPU) on every real shape, awkward ones and random
    mixes; at large M every path, whichever the dispatch chose."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = gpu_cases()
    assert len(cases) >= 50
    for (M, K, N) in cases:
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        alpha = torch.rand(1, device="cuda", generator=gen) + 0.1
        poison_allocator(M * N * 2)
        codes, is_tiled = kernel.prepare(kernel.pack_2bit(w), N, K, "fast")
        assert is_tiled
        ref = reference(x, w, alpha)
        y = kernel.ternary_matmul(x, codes, alpha, N, K, tiled=True)
        assert y.shape == (M, N) and y.dtype == dtype
        check(y, ref)
        if M >= 512 and K % 128 == 0 and N % 16 == 0:
            for config in [("dequant", 1), ("l128", 1)] + [("w2x128", 1)] * wgmma_gpu():
                poison_allocator(M * N * 2)
                check(kernel.ternary_matmul(x, codes, alpha, N, K, tiled=True, config=config), ref)


@gpu
def test_prepare_and_dispatch_on_the_gpu(monkeypatch):
    """On CUDA prepare tiles the codes on the GPU (TERDIT_KERNEL=simple keeps them); the fast kernels, the readable
    kernel and the reference agree; fp8 with row-major codes runs the reference."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    N, K, M = 333, 1000, 20
    w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
    x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
    codes, alpha = kernel.pack_2bit(w), torch.tensor([0.3], device="cuda")
    t, is_tiled = kernel.prepare(codes, N, K)
    assert is_tiled and t.is_cuda and torch.equal(t, fast.tile_codes(codes.cpu(), N, K).cuda())
    monkeypatch.setenv("TERDIT_KERNEL", "simple")
    assert kernel.prepare(codes, N, K) == (codes, False)
    ref = reference(x, w, alpha)
    check(kernel.ternary_matmul(x, t, alpha, N, K, tiled=True), ref)
    check(kernel.ternary_matmul(x, codes, alpha, N, K), ref)
    y8 = kernel.ternary_matmul(x, codes, alpha, N, K, fp8=True)
    assert torch.equal(y8, kernel.ternary_matmul_ref(x, codes, alpha, N, K, fp8=True))


@gpu
def test_leading_dims_noncontiguous_and_fallbacks():
    gen = torch.Generator(device="cuda").manual_seed(2)
    N, K = 200, 72
    w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
    codes, alpha = kernel.pack_2bit(w), torch.tensor([0.7], device="cuda")
    big = torch.randn(2, 5, 2 * K, device="cuda", generator=gen).bfloat16()
    x = big[..., ::2]  # non-contiguous (2, 5, K)
    want = reference(x.reshape(-1, K), w, alpha).view(2, 5, N)
    for w_, is_tiled in ((codes, False), (tiled(w), True)):
        y = kernel.ternary_matmul(x, w_, alpha, N, K, tiled=is_tiled)
        assert y.shape == (2, 5, N)
        check(y, want)
        y32 = kernel.ternary_matmul(x.float(), w_, alpha, N, K, tiled=is_tiled)  # fp32: the reference + a warning
        assert y32.dtype == torch.float32
        check(y32, want, tol=1e-5)


@gpu
def test_cuda_graph_capture_replay():
    gen = torch.Generator(device="cuda").manual_seed(3)
    runs = [(False, True), (True, True)] * wgmma_gpu() + [(False, True), (False, False)]  # (fp8, tiled)
    for (M, K, N), (fp8, is_tiled) in [(mkn, r) for mkn in [(4, 3072, 3072), (600, 1152, 1152)] for r in set(runs)]:
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        codes, alpha = tiled(w) if is_tiled else kernel.pack_2bit(w), torch.rand(1, device="cuda", generator=gen) + 0.1
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        f = lambda: kernel.ternary_matmul(x, codes, alpha, N, K, fp8=fp8, tiled=is_tiled)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (compiles) outside the capture
            f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = f()
        x.copy_(torch.randn(M, K, device="cuda", generator=gen))
        alpha.fill_(0.37)  # alpha is read on the device at replay time
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, f())
        check(y, reference(x, w, alpha), tol=0.05 if fp8 else 1e-2)


@gpu
def test_custom_op_compiles_fullgraph_on_cuda():
    """The cupy launch inside the op under torch.compile(fullgraph=True): same values as eager, every path."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    for (M, K, N) in [(2, 1024, 9216), (600, 1152, 1152), (7, 130, 1000)]:  # GEMV, large M, awkward
        w = (torch.randint(0, 3, (N, K), device="cuda", generator=gen) - 1).to(torch.int8)
        alpha = torch.rand(1, device="cuda", generator=gen) + 0.1
        x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
        bias = torch.randn(N, device="cuda", generator=gen).bfloat16()
        for codes, is_tiled in ((tiled(w), True), (kernel.pack_2bit(w), False)):
            f = lambda x: kernel.ternary_matmul_op(x, codes, alpha, N, K, None, False, is_tiled) + bias
            eager, compiled = f(x), torch.compile(f, fullgraph=True)(x)
            assert compiled.dtype == torch.bfloat16
            torch.testing.assert_close(compiled, eager)
