"""
Tests for deploy.py: the deployed model computes what the trained model computes (float32: model.py's formulas bit
for bit), its fused matmuls equal their parts, it traces as one graph, and its bf16 inference path stays in bf16.
Hermetic, CPU (the GPU-only test skips without CUDA and cupy).

    python -m pytest tests/test_deploy.py -v
"""

import copy
from dataclasses import asdict

import pytest
import torch
from torch._dynamo.utils import counters

import deploy
import evaluate
import kernel
import model as model_lib
import pack
from test_pack import packed, random_tiny  # noqa: F401 (packed: the fixture, a tiny packed model)


def _packed_names(m):
    return [name for name, layer in m.named_modules() if isinstance(layer, deploy.PackedTernaryLinear)]


def _inputs(size=16):
    torch.manual_seed(0)
    return torch.randn(2, 1, size, size), torch.tensor([3, 700]), torch.tensor([1, 10])  # 64 tokens: fast on CPU


@pytest.mark.parametrize("which", [1, 2])
def test_load_packed_holds_the_files_tensors(packed, which):
    ema, path = packed[0], packed[which]
    m = deploy.load_packed(path)
    names = _packed_names(m)
    assert names == [name for name, _ in pack.ternary_layers(ema)]
    state = pack.read_packed(path)[1]
    for name in names:
        layer = m.get_submodule(name)
        assert not layer.tiled and torch.equal(layer.packed, state[f"{name}.packed"]), name  # CPU: row-major codes
        assert layer.alphas.dtype == torch.float32 and torch.equal(layer.alphas, state[f"{name}.alphas"]), name
    for key, t in m.state_dict().items():
        assert torch.equal(t, state[key]), key
    assert m.config == ema.config and not m.training and not any(p.requires_grad for p in m.parameters())
    assert isinstance(m, deploy.InferenceTerDiT) and isinstance(m.fused_adaln, deploy.FusedAdaLN)


def test_specialised_float32_model_is_the_training_model():
    """The Inference* modules in float32, and under autocast, run model.py's formulas: bit for bit the same."""
    m = random_tiny(3)
    d = deploy.specialise(copy.deepcopy(m))
    assert isinstance(d.layers[0], deploy.InferenceBlock) and isinstance(d.layers[0].ffn_norm, deploy.InferenceRMSNorm)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(d(x, t, y), m(x, t, y))
        assert torch.equal(d.forward_with_cfg(x, t, y, 4.0), m.forward_with_cfg(x, t, y, 4.0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(d(x, t, y), m(x, t, y))


def test_packed_forward_matches_unpacked(packed):
    """finish() on a CPU keeps float32: the packed model computes the trained model's output (with the tensors the
    file rounds to bf16), to float32 rounding (the fused matmuls sum and scale in another order)."""
    ema, path2, path3 = packed
    ref = random_tiny(1)  # the EMA model, its full-precision tensors rounded to bf16 as the file stores them
    ternary = {f"{name}.{p}" for name, _ in pack.ternary_layers(ref) for p in ("weight", "alphas")}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name not in ternary:
                p.copy_(p.to(torch.bfloat16).float())
    x, t, y = _inputs()
    with torch.no_grad():
        expected = ref(x, t, y)
        assert expected.abs().mean() > 1e-3  # the test would be vacuous on an all-zero output
        for path in (path2, path3):
            loaded = deploy.load_packed(path)
            got = loaded(x, t, y)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        # what sample.py calls: classifier-free guidance on the packed model
        torch.testing.assert_close(loaded.forward_with_cfg(x, t, y, 4.0), ref.forward_with_cfg(x, t, y, 4.0),
                                   rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_to_dtype_keeps_codes_and_alpha(packed):
    m = deploy.load_packed(packed[1]).to(torch.bfloat16)
    layer = m.get_submodule(_packed_names(m)[0])
    assert layer.packed.dtype == torch.uint8 and layer.alphas.dtype == torch.float32
    assert m.x_embedder.weight.dtype == torch.bfloat16


def test_autocast_like_nn_linear(packed):
    # a float32 model run under bf16 autocast: a packed layer must compute in bf16 like nn.Linear does
    m = deploy.load_packed(packed[1])
    layer = m.get_submodule(_packed_names(m)[-1])  # an adaLN linear: has a bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, layer.in_features)).dtype == torch.bfloat16


def test_fp8_activations_close_to_bf16_and_adaln_untouched(packed):
    # act="fp8": attention and MLP quantise their inputs per token to e4m3 (on a CPU the kernel's reference,
    # which emulates the fused kernels' numerics); the adaLN linears and the fused adaLN keep the model's dtype
    m, m8 = deploy.load_packed(packed[1]), deploy.load_packed(packed[1], act="fp8")
    names = _packed_names(m8)
    assert [n for n in names if m8.get_submodule(n).fp8] == [n for n in names if "adaLN" not in n]
    assert len([n for n in names if "adaLN" not in n]) == 4 * 7 and not any(m.get_submodule(n).fp8 for n in names)
    assert m8.state_dict().keys() == m.state_dict().keys()  # a plain attribute: files and state dicts unchanged
    x, t, y = _inputs()
    with torch.no_grad():
        c = torch.randn(2, m.fused_adaln.in_features)
        assert torch.equal(m8.fused_adaln(c), m.fused_adaln(c))
        want, got = m(x, t, y), m8(x, t, y)
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-4 < rel < 5e-2, rel  # e4m3 rounds each activation by up to 2^-4 of itself: not equal (here ~0.3%)
    with pytest.raises(ValueError, match="act must be 'bf16' or 'fp8', got 'bad'"):
        deploy.load_packed(packed[1], act="bad")


def test_file_of_another_config_is_corrupt(packed, tmp_path):
    ema = packed[0]
    path = str(tmp_path / "m.tdit")
    pack.write_packed(path, {**asdict(ema.config), "dim": 64}, 0, pack.encode(ema), trits_per_byte=4)
    with pytest.raises(ValueError, match="corrupt .its tensors do not match its config"):
        deploy.load_packed(path)


# -----------------------------------------------------------------------------
# the fused matmuls

def _packed_model(tmp_path, **cfg):
    """A tiny packed model with random weights, through the file format as load_packed builds it."""
    ema = random_tiny(2, **cfg)
    path = str(tmp_path / "f.tdit")
    pack.write_packed(path, asdict(ema.config), 0, pack.encode(ema), trits_per_byte=4)
    return deploy.load_packed(path)


def test_stacked_codes_are_concatenated_codes():
    gen = torch.Generator().manual_seed(0)
    blocks = [(torch.randint(0, 3, (48, 100), generator=gen) - 1).to(torch.int8) for _ in range(3)]  # 6*dim rows
    assert torch.equal(kernel.pack_2bit(torch.cat(blocks)), torch.cat([kernel.pack_2bit(w) for w in blocks]))


@pytest.mark.skipif(not torch.cuda.is_available() or getattr(kernel, "cp", None) is None, reason="needs CUDA and cupy")
def test_prepared_codes_stack_by_concatenation_on_gpu():
    """The fast kernels' tile order (kernel.prepare) keeps whole kernel.TILE_N-row tiles together, so the prepared
    codes of linears whose widths are multiples of TILE_N stack by concatenation, as the fused modules do."""
    gen = torch.Generator().manual_seed(0)
    widths, K = [kernel.TILE_N * 3, kernel.TILE_N, kernel.TILE_N * 5], 200
    trits = [(torch.randint(0, 3, (n, K), generator=gen) - 1).to(torch.int8).cuda() for n in widths]
    whole, tiled = kernel.prepare(kernel.pack_2bit(torch.cat(trits)), sum(widths), K)
    parts = [kernel.prepare(kernel.pack_2bit(t), n, K)[0] for t, n in zip(trits, widths)]
    assert tiled and torch.equal(whole, torch.cat(parts))


@pytest.mark.parametrize("adaln_norm", [True, False])
def test_fused_adaln_equals_per_block(tmp_path, adaln_norm):
    m = _packed_model(tmp_path, adaln_norm=adaln_norm)
    assert m.layers[1].adaLN_modulation[1].packed.data_ptr() == m.fused_adaln.packed[6 * 128:].data_ptr()  # a view
    assert not any(k.startswith("fused_adaln") for k in m.state_dict())  # the file's tensors, nothing more
    c = torch.randn(3, 128)
    fused = m.fused_adaln(c)
    assert fused.shape == (3, 4, 6 * 128)
    per_block = torch.stack([b.adaLN_modulation(c) for b in m.layers], dim=1)
    torch.testing.assert_close(fused, per_block, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on a GPU: bf16 matmuls, within bf16 rounding
        fused, per_block = m.fused_adaln(c), torch.stack([b.adaLN_modulation(c) for b in m.layers], dim=1)
    assert fused.dtype == per_block.dtype
    torch.testing.assert_close(fused.float(), per_block.float(), rtol=2e-2, atol=2e-2)
    x, t, y = _inputs()
    out = m(x, t, y)
    m.fused_adaln = None  # each block its own adaLN (what evaluate.adaln_stats does)
    torch.testing.assert_close(out, m(x, t, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["bf16", "fp8"])
def test_fused_linears_equal_the_linears(packed, act):
    """wq/wk/wv and w1/w3 as one matmul each (deploy.FusedLinears, one alpha per output channel): the linears'
    codes become views of the stacked ones, the state dict gains nothing, and the model computes what its linears
    compute one by one (with fp8 activations too: one quantisation of the shared input, the same codes)."""
    m = deploy.load_packed(packed[1], act=act)
    attn, ff = m.layers[0].attention, m.layers[0].feed_forward
    assert attn.wk.packed.data_ptr() == attn.fused_qkv.packed[attn.wq.out_features:].data_ptr()
    assert ff.w3.packed.data_ptr() == ff.fused_w13.packed[ff.w1.out_features:].data_ptr()
    assert not any("fused" in k for k in m.state_dict())
    x, t, y = _inputs()
    with torch.no_grad():
        out = m(x, t, y)
        for b in m.layers:
            b.attention.fused_qkv = b.feed_forward.fused_w13 = None
        torch.testing.assert_close(out, m(x, t, y), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="FusedLinears needs packed linears without bias, of one input width"):
        deploy.FusedLinears([attn.wq, ff.w2])


def test_fuse_skips_widths_off_the_tile(tmp_path):
    """A width that is not a multiple of kernel.TILE_N rows (dim 72 here) cannot start a linear's codes on a tile of
    the stack: deploy.fuse leaves wq/wk/wv apart, still fuses w1/w3 (hidden 256), and the model computes the same
    either way."""
    torch.manual_seed(5)  # not a registered size: a checkpoint's stored config may hold any width
    m = model_lib.TerDiT(model_lib.TerDiTConfig(**{**model_lib.SIZES["tiny"], "dim": 72, "in_channels": 1})).eval()
    with torch.no_grad():
        for q in m.parameters():
            q.normal_(0, 0.1)
    pack.write_packed(str(tmp_path / "m.tdit"), asdict(m.config), 1, pack.encode(m), trits_per_byte=4)
    p = deploy.load_packed(str(tmp_path / "m.tdit"))
    assert all(b.attention.fused_qkv is None and b.feed_forward.fused_w13 is not None for b in p.layers)
    x, t, y = _inputs()
    with torch.no_grad():
        out = p(x, t, y)
        for b in p.layers:
            b.feed_forward.fused_w13 = None
        torch.testing.assert_close(out, p(x, t, y), rtol=1e-5, atol=1e-6)


def test_fuse_needs_a_specialised_model(packed):
    with pytest.raises(ValueError, match="fuse needs a specialised TerDiT"):
        deploy.fuse(random_tiny(0))


def test_adaln_stats_of_a_packed_model(packed):
    m = deploy.load_packed(packed[1])
    rows = evaluate.adaln_stats(m, torch.randn(2, 1, 32, 32), torch.arange(2), timesteps=(10, 900))
    assert len(rows) == 2 * len(m.layers) and m.fused_adaln is not None  # hooks saw every block; fused path back


# -----------------------------------------------------------------------------
# torch.compile

def test_packed_model_traces_as_one_graph(packed):
    m = deploy.load_packed(packed[1])
    x, t, y = _inputs()
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(x, t, y)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # inductor on 2 CPU cores: ~30 s
        torch.testing.assert_close(compiled(x, t, y), m(x, t, y), rtol=0, atol=0)


def test_bf16_block_traces_as_one_graph(packed):
    """The bf16 inference block (lean formulas, fused matmuls) is one graph: what compile_blocks compiles on a GPU."""
    m = deploy.load_packed(packed[1], dtype=torch.bfloat16)
    x, mod, cos, sin = _block_inputs(m, torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(m.layers[0])(x, None, cos, sin, mod)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_regional_compile_compiles_one_block(packed):
    """Inductor (as on a GPU) compiles one block and the fused adaLN; every other block reuses the block's graph."""
    m = deploy.load_packed(packed[1])
    x, t, y = _inputs()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = m(x, t, y)
        m.compile_blocks()
        torch.testing.assert_close(m(x, t, y), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m(x, t, y), want, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]


# -----------------------------------------------------------------------------
# the bf16 inference model (load_packed(..., dtype=torch.bfloat16)): what sample.py runs on a GPU

class _CountConversions(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, over the aten ops run under it (after autograd and autocast), the dtype conversions (aten._to_copy:
    what .to(dtype), .float(), .type_as and autocast's casts issue) and the ops whose output is a float32 tensor
    of at least `big` elements (activations held in float32; not a norm's per-token statistics). Each is a full
    pass over an activation tensor.

    Ops inside F.rms_norm are left out: on a CPU it decomposes into the reference's float32 formula (two casts,
    five float32 ops), on CUDA it is one fused kernel (aten._fused_rms_norm); the CPU cannot count that one."""

    def __init__(self, big):
        super().__init__()
        self.big, self.conversions, self.float32_ops, self.in_rms_norm = big, 0, 0, False
        outer = self

        class Skip(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is not torch.nn.functional.rms_norm:
                    return func(*args, **(kwargs or {}))
                outer.in_rms_norm = True
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    outer.in_rms_norm = False

        self.skip = Skip()

    def __enter__(self):
        self.skip.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.skip.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_rms_norm:
            self.conversions += func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to)
            self.float32_ops += any(isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.numel() >= self.big
                                    for o in (out if isinstance(out, (tuple, list)) else [out]))
        return out


def _block_inputs(m, dtype):
    """(x, mod, cos, sin) for one block of m, as InferenceTerDiT.forward hands them over, x and mod in dtype."""
    torch.manual_seed(0)
    hd = m.config.dim // m.config.n_heads
    x = torch.randn(2, 64, m.config.dim).to(dtype)
    mod = m.fused_adaln(torch.randn(2, m.fused_adaln.in_features)).unbind(1)[0].to(dtype)
    return x, mod, *model_lib.rope(64, hd, "cpu", dtype=dtype)


def test_bf16_model_is_bf16_but_alpha_and_codes(packed):
    m = deploy.load_packed(packed[1], dtype=torch.bfloat16)
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        if name.endswith(".packed"):
            assert t.dtype == torch.uint8, name
        elif name.endswith(".alphas") or name.endswith(".one"):  # α exact; the fused matmuls' α = 1
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
    ref = deploy.load_packed(packed[1])
    for (name, a), b in zip(m.state_dict().items(), ref.state_dict().values()):  # the file's values, unrounded
        assert torch.equal(a.float(), b.float()), name


def test_bf16_model_matches_autocast(packed):
    # the bf16 model (no autocast) computes what the float32 model computes under bf16 autocast, within bf16
    # rounding: the same bf16 matmuls, but bf16 activations between them instead of float32 ones
    m16, m32 = deploy.load_packed(packed[1], dtype=torch.bfloat16), deploy.load_packed(packed[1])
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([1, 250, 600, 999]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        out16 = m16(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out32 = m32(x, t, y).float()
        exact = m32(x, t, y)  # float32 throughout
    assert out16.dtype == torch.bfloat16
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(out16, exact) < 2e-2 and rel(out32, exact) < 2e-2
    assert rel(out16, out32) < 2e-2
    with torch.no_grad():  # and with CFG, as the sampler calls it (float32 noise in): 4x the differences
        assert rel(m16.forward_with_cfg(x, t, y, 4.0), m32.forward_with_cfg(x, t, y, 4.0)) < 8e-2


def test_bf16_block_has_no_dtype_round_trips(packed):
    # one block's forward: the float32 model under bf16 autocast converts activations back and forth and keeps
    # the residual stream, norms, modulation and gating in float32; the bf16 model has no conversion and no
    # float32 activation outside F.rms_norm (one fused kernel on CUDA)
    counts = {}
    for name, dtype, autocast in [("fp32+autocast", torch.float32, True), ("bf16", torch.bfloat16, False)]:
        m = deploy.load_packed(packed[1], dtype=dtype)
        x, mod, cos, sin = _block_inputs(m, dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                _CountConversions(big=x.numel()) as c:
            out = m.layers[0](x, None, cos, sin, mod)
        counts[name] = dict(conversions=c.conversions, float32_ops=c.float32_ops)
    assert out.dtype == torch.bfloat16
    print(f"one block's forward: {counts}")
    assert counts["bf16"] == dict(conversions=0, float32_ops=0), counts
    assert counts["fp32+autocast"]["conversions"] >= 5 and counts["fp32+autocast"]["float32_ops"] >= 10, counts


def test_bf16_formulas_are_the_fused_ones():
    """The bf16 specialisations compute model.py's formulas within bf16 rounding, with the fused ops in x's dtype;
    in float32 they are model.py's, bit for bit."""
    torch.manual_seed(0)
    x, a, b = torch.randn(2, 8, 16), torch.randn(2, 16), torch.randn(2, 16)
    y, w = torch.randn(2, 8, 16), 1 + 0.1 * torch.randn(16)
    q, (cos, sin) = torch.randn(2, 8, 2, 16), model_lib.rope(8, 16, "cpu")
    pairs = [(deploy.modulate, model_lib.modulate, (x, a, b)),
             (deploy.gated_residual, model_lib.gated_residual, (x, a, y)),
             (deploy.rms_norm, model_lib.rms_norm, (x, w, 1e-5)),
             (deploy.apply_rope, model_lib.apply_rope, (q, cos, sin))]
    for fast, slow, args in pairs:
        assert torch.equal(fast(*args), slow(*args)), fast.__name__
        args16 = [v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for v in args]
        got, want = fast(*args16), slow(*[v.float() if isinstance(v, torch.Tensor) else v for v in args16])
        assert got.dtype == torch.bfloat16, fast.__name__
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
