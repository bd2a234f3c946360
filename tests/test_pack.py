"""
Tests for pack.py: the packed files round-trip the ternary weights bit-exactly, the packed model computes what the
trained model computes, and broken files fail with a clear error. Hermetic, CPU, a few seconds.

    python -m pytest tests/test_pack.py -v
"""

import math
import os
import struct
import sys
from dataclasses import asdict

import pytest
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import kernel  # noqa: E402
import model as model_lib  # noqa: E402
import evaluate  # noqa: E402
import pack  # noqa: E402
from quant import export_ternary  # noqa: E402


def _random_tiny(seed, ternary=True, **cfg):
    """A tiny TerDiT with random weights everywhere (zero-init adaLN would make trits and outputs trivial)."""
    torch.manual_seed(seed)
    m = model_lib.build_model("tiny", ternary=ternary, **{"in_channels": 1, **cfg})
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def _checkpoint(path, ternary=True):
    model, ema = _random_tiny(0, ternary), _random_tiny(1, ternary)  # different, so we can tell which was packed
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 1234,
                "model_config": asdict(ema.config), "args": {}}, path)
    return ema


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    ema = _checkpoint(d / "ckpt.pt")
    out = str(d / "tiny.tdit")
    pack.main(["--ckpt", str(d / "ckpt.pt"), "--out", out])
    return ema, out, pack.base3_path(out)


def _ternary_names(m):
    return [name for name, layer in m.named_modules() if isinstance(layer, pack.PackedTernaryLinear)]


@pytest.mark.parametrize("which", [1, 2])
def test_round_trip_bit_exact(packed, which):
    ema, path = packed[0], packed[which]
    loaded = pack.load_packed(path)
    names = _ternary_names(loaded)
    assert len(names) == 4 * 8  # 4 blocks × (wq, wk, wv, wo, w1, w2, w3, adaLN linear)
    for name in names:
        layer, ref = loaded.get_submodule(name), ema.get_submodule(name)
        trits, alpha = export_ternary(ref)
        assert set(trits.unique().tolist()) == {-1, 0, 1}, name  # non-trivial weights
        assert torch.equal(kernel.unpack_2bit(layer.packed, layer.out_features, layer.in_features), trits), name
        assert torch.equal(layer.alphas, alpha), name
    # every full-precision tensor is the bf16 rounding of the original
    ref_sd = ema.state_dict()
    for key, t in loaded.state_dict().items():
        if key.endswith((".packed", ".alphas")):
            continue
        assert t.dtype == torch.float32, key
        assert torch.equal(t, ref_sd[key].to(torch.bfloat16).float()), key
    assert loaded.config == ema.config and not loaded.training
    assert pack.read_header(path)["step"] == 1234


def test_forward_matches_unpacked(packed):
    ema, path2, path3 = packed
    # the reference: the trained EMA model with its full-precision tensors rounded to bf16, as the file stores them
    ref = _random_tiny(1)
    ternary = {f"{name}.{p}" for name, _ in pack._ternary_layers(ref) for p in ("weight", "alphas")}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name not in ternary:
                p.copy_(p.to(torch.bfloat16).float())
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])  # 64 tokens: fast on CPU
    with torch.no_grad():
        expected = ref(x, t, y)
        assert expected.abs().mean() > 1e-3  # the test would be vacuous on an all-zero output
        for path in (path2, path3):
            loaded = pack.load_packed(path)
            got = loaded(x, t, y)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        # what sample.py calls: classifier-free guidance on the packed model
        torch.testing.assert_close(loaded.forward_with_cfg(x, t, y, 4.0), ref.forward_with_cfg(x, t, y, 4.0),
                                   rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_to_dtype_keeps_codes_and_alpha(packed):
    m = pack.load_packed(packed[1]).to(torch.bfloat16)
    layer = m.get_submodule(_ternary_names(m)[0])
    assert layer.packed.dtype == torch.uint8 and layer.alphas.dtype == torch.float32
    assert m.x_embedder.weight.dtype == torch.bfloat16


def test_autocast_like_nn_linear(packed):
    # sample.py runs float32 weights under bf16 autocast: a packed layer must compute in bf16 like nn.Linear does
    m = pack.load_packed(packed[1])
    layer = m.get_submodule(_ternary_names(m)[-1])  # an adaLN linear: has a bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, layer.in_features)).dtype == torch.bfloat16


def test_fp8_activations_close_to_bf16_and_adaln_untouched(packed):
    # act="fp8": attention and MLP quantise their inputs per token to e4m3 (on a CPU the kernel's reference,
    # which emulates the fused kernels' numerics); the adaLN linears and the fused adaLN keep the model's dtype
    m, m8 = pack.load_packed(packed[1]), pack.load_packed(packed[1], act="fp8")
    names = _ternary_names(m8)
    assert [n for n in names if m8.get_submodule(n).fp8] == [n for n in names if "adaLN" not in n]
    assert len([n for n in names if "adaLN" not in n]) == 4 * 7 and not any(m.get_submodule(n).fp8 for n in names)
    assert m8.state_dict().keys() == m.state_dict().keys()  # a plain attribute: files and state dicts unchanged
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        c = torch.randn(2, m.fused_adaln.in_features)
        assert torch.equal(m8.fused_adaln(c), m.fused_adaln(c))
        want, got = m(x, t, y), m8(x, t, y)
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-4 < rel < 5e-2, rel  # e4m3 rounds each activation by up to 2^-4 of itself: not equal (here ~0.3%)
    with pytest.raises(ValueError, match="act must be 'bf16' or 'fp8', got 'bad'"):
        pack.load_packed(packed[1], act="bad")


def test_is_packed(packed, tmp_path):
    assert pack.is_packed(packed[1]) and pack.is_packed(packed[2])
    (tmp_path / "x.pt").write_bytes(b"PK")
    assert not pack.is_packed(tmp_path / "x.pt")


def test_base3_is_smaller(packed):
    assert os.path.getsize(packed[2]) < os.path.getsize(packed[1])


def test_changed_kernel_layout(packed, monkeypatch):
    monkeypatch.setattr(pack, "_layout_probe", lambda: -1)  # as if kernel.pack_2bit's tile order had changed
    with pytest.raises(ValueError, match="tile order"):
        pack.load_packed(packed[1])
    pack.load_packed(packed[2])  # the base-3 file does not depend on the kernel's layout


def test_base3_codec():
    trits = torch.randint(-1, 2, (7, 13), dtype=torch.int8)  # 91 trits: exercises the padding
    assert torch.equal(pack.unpack_base3(pack.pack_base3(trits), 7, 13), trits)


def _corrupted(path, tmp_path, edit):
    data = bytearray(open(path, "rb").read())
    data = edit(data)
    bad = tmp_path / "bad.tdit"
    bad.write_bytes(bytes(data))
    return str(bad)


@pytest.mark.parametrize("which", [1, 2])
def test_truncated(packed, tmp_path, which):
    with pytest.raises(ValueError, match="truncated"):
        pack.load_packed(_corrupted(packed[which], tmp_path, lambda d: d[:-100]))


def test_wrong_magic(packed, tmp_path):
    def edit(d):
        d[0] ^= 0xFF
        return d
    with pytest.raises(ValueError, match="not a TerDiT packed file"):
        pack.load_packed(_corrupted(packed[1], tmp_path, edit))


def test_unknown_version(packed, tmp_path):
    def edit(d):
        d[4:8] = struct.pack("<I", 99)
        return d
    with pytest.raises(ValueError, match="version 99"):
        pack.read_header(_corrupted(packed[1], tmp_path, edit))


@pytest.mark.parametrize("where", ["data", "index"])
def test_corrupt(packed, tmp_path, where):
    def edit(d):
        d[-1 if where == "data" else d.index(b'"offset": 1024') + 13] ^= 0x01  # a data bit; offset 1024 -> 1025
        return d
    with pytest.raises(ValueError, match="corrupt"):
        pack.load_packed(_corrupted(packed[2], tmp_path, edit))


def test_refuses_full_precision_and_non_checkpoints(tmp_path):
    _checkpoint(tmp_path / "fp.pt", ternary=False)
    with pytest.raises(SystemExit, match="full-precision"):
        pack.main(["--ckpt", str(tmp_path / "fp.pt"), "--out", str(tmp_path / "fp.tdit")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: .* not a readable torch checkpoint"):
        pack.main(["--ckpt", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "junk.tdit")])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a TerDiT training checkpoint"):
        pack.main(["--ckpt", str(tmp_path / "other.pt"), "--out", str(tmp_path / "other.tdit")])


# -----------------------------------------------------------------------------
# the fused adaLN and torch.compile

def _packed_model(tmp_path, **cfg):
    """A tiny packed model with random weights, through the file format as load_packed builds it."""
    ema = _random_tiny(2, **cfg)
    path = str(tmp_path / "f.tdit")
    pack.write_packed(path, asdict(ema.config), 0, pack._encode(ema), trits_per_byte=4)
    return pack.load_packed(path)


def test_stacked_codes_are_concatenated_codes():
    gen = torch.Generator().manual_seed(0)
    blocks = [(torch.randint(0, 3, (48, 100), generator=gen) - 1).to(torch.int8) for _ in range(3)]  # 6*dim rows
    assert torch.equal(kernel.pack_2bit(torch.cat(blocks)), torch.cat([kernel.pack_2bit(w) for w in blocks]))


@pytest.mark.parametrize("adaln_norm", [True, False])
def test_fused_adaln_equals_per_block(tmp_path, adaln_norm):
    m = _packed_model(tmp_path, adaln_norm=adaln_norm)
    assert m.layers[1].adaLN_modulation[1].packed.data_ptr() == m.fused_adaln.packed[6 * 128:].data_ptr()  # a view
    assert not any(k.startswith("fused_adaln") for k in m.state_dict())  # the file's tensors, nothing more
    c = torch.randn(3, 128)
    fused = m.fused_adaln(c)
    assert fused.shape == (3, 4, 6 * 128)
    per_block = torch.stack([b.modulation(c) for b in m.layers], dim=1)
    torch.testing.assert_close(fused, per_block, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on a GPU: bf16 matmuls, within bf16 rounding
        fused, per_block = m.fused_adaln(c), torch.stack([b.modulation(c) for b in m.layers], dim=1)
    assert fused.dtype == per_block.dtype
    torch.testing.assert_close(fused.float(), per_block.float(), rtol=2e-2, atol=2e-2)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    out = m(x, t, y)
    m.fused_adaln = None  # the per-block path: what a packed model computed before the fused one
    torch.testing.assert_close(out, m(x, t, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["bf16", "fp8"])
def test_fused_linears_equal_the_linears(packed, act):
    """wq/wk/wv and w1/w3 as one matmul each (pack.FusedLinears, one alpha per output channel): the linears' codes
    become views of the stacked ones, the state dict gains nothing, and the model computes what its linears
    compute one by one (with fp8 activations too: one quantisation of the shared input, the same codes)."""
    m = pack.load_packed(packed[1], act=act)
    attn, ff = m.layers[0].attention, m.layers[0].feed_forward
    assert attn.wk.packed.data_ptr() == attn.fused_qkv.packed[attn.wq.out_features:].data_ptr()
    assert ff.w3.packed.data_ptr() == ff.fused_w13.packed[ff.w1.out_features:].data_ptr()
    assert not any("fused" in k for k in m.state_dict())
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        out = m(x, t, y)
        for b in m.layers:
            b.attention.fused_qkv = b.feed_forward.fused_w13 = None
        torch.testing.assert_close(out, m(x, t, y), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="FusedLinears needs packed linears without bias, of one input width"):
        pack.FusedLinears([attn.wq, ff.w2])


def test_fuse_skips_widths_off_the_tile(tmp_path):
    """A width that is not a multiple of 16 rows (dim 72 here) cannot start a linear's codes on a tile of the stack:
    pack.fuse leaves wq/wk/wv apart, still fuses w1/w3 (hidden 256), and the model computes the same either way."""
    torch.manual_seed(5)  # not a registered size: a checkpoint's stored config may hold any width
    m = model_lib.TerDiT(model_lib.TerDiTConfig(**{**model_lib.SIZES["tiny"], "dim": 72, "in_channels": 1})).eval()
    with torch.no_grad():
        for q in m.parameters():
            q.normal_(0, 0.1)
    torch.save({"model": m.state_dict(), "ema": m.state_dict(), "opt": {}, "step": 1, "model_config": asdict(m.config),
                "args": {}}, tmp_path / "ckpt.pt")
    pack.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "m.tdit")])
    p = pack.load_packed(str(tmp_path / "m.tdit"))
    assert all(b.attention.fused_qkv is None and b.feed_forward.fused_w13 is not None for b in p.layers)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        out = p(x, t, y)
        for b in p.layers:
            b.feed_forward.fused_w13 = None
        torch.testing.assert_close(out, p(x, t, y), rtol=1e-5, atol=1e-6)


def test_adaln_stats_of_a_packed_model(packed):
    m = pack.load_packed(packed[1])
    rows = evaluate.adaln_stats(m, torch.randn(2, 1, 32, 32), torch.arange(2), timesteps=(10, 900))
    assert len(rows) == 2 * len(m.layers) and m.fused_adaln is not None  # hooks saw every block; fused path back


def test_packed_model_traces_as_one_graph(packed):
    m = pack.load_packed(packed[1])
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(x, t, y)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # inductor on 2 CPU cores: ~30 s
        torch.testing.assert_close(compiled(x, t, y), m(x, t, y), rtol=0, atol=0)


def test_regional_compile_compiles_one_block(packed):
    """Inductor (as on a GPU) compiles one block and the fused adaLN; every other block reuses the block's graph."""
    m = pack.load_packed(packed[1])
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = m(x, t, y)
        m.compile_blocks()
        torch.testing.assert_close(m(x, t, y), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m(x, t, y), want, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]


# -----------------------------------------------------------------------------
# official checkpoints: a tiny one written here from the layout as the issue states it, not with pack.py's code

def _hqq_pack(trits):
    """trits (out, in) -> uint8 (out/4, in): codes trit+1; byte row i holds rows i, i+q, i+2q, i+3q (q = out/4)
    in bits 7-6, 5-4, 3-2, 1-0."""
    c = (trits + 1).to(torch.uint8)
    q = c.shape[0] // 4
    return (c[:q] << 6) | (c[q:2 * q] << 4) | (c[2 * q:3 * q] << 2) | c[3 * q:]


def _official_folder(folder, dim=64, depth=2, hidden=256):
    """An official-layout folder of a tiny DiT_Llama (dim 64, 2 layers, 2 heads, 64 px: 8×8×4 latents); returns
    the plain weights (ternary layers as α·W̃) for the direct computation below."""
    import argparse
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    plain, state = {}, {}

    def linear(key, out, inp, bias=True, ternary=False):
        if ternary:
            trits = torch.randint(-1, 2, (out, inp), generator=g)
            alpha = torch.rand(1, generator=g) * 0.1 + 0.02
            state[key + ".weight"], state[key + ".alphas"] = _hqq_pack(trits), alpha
            plain[key + ".weight"] = alpha * trits.float()
        else:
            state[key + ".weight"] = plain[key + ".weight"] = r(out, inp)
        if bias:
            state[key + ".bias"] = plain[key + ".bias"] = r(out)

    linear("x_embedder", dim, 16)
    linear("t_embedder.mlp.0", dim, 256)
    linear("t_embedder.mlp.2", dim, dim)
    state["y_embedder.embedding_table.weight"] = plain["y_embedder.embedding_table.weight"] = r(1001, dim)
    for i in range(depth):
        b = f"layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            linear(b + "attention." + w, dim, dim, bias=False, ternary=True)
        for n in ("q_norm", "k_norm"):
            state[b + f"attention.{n}.weight"], state[b + f"attention.{n}.bias"] = 1 + r(dim), r(dim)
        linear(b + "feed_forward.w1", hidden, dim, bias=False, ternary=True)
        linear(b + "feed_forward.w2", dim, hidden, bias=False, ternary=True)
        linear(b + "feed_forward.w3", hidden, dim, bias=False, ternary=True)
        for n in ("attention_norm", "ffn_norm"):
            state[b + n + ".weight"] = 1 + r(dim)
        linear(b + "adaLN_modulation.1", 6 * dim, dim, ternary=True)
        state[b + "adaLN_modulation.2.weight"] = 1 + r(6 * dim)
    linear("final_layer.linear", 2 * 2 * 8, dim)  # p² · 2C: learned sigma
    linear("final_layer.adaLN_modulation.1", 2 * dim, dim)
    plain.update({k: v for k, v in state.items() if k not in plain})
    torch.save(argparse.Namespace(model="DiT_Llama_tiny_patch2", image_size=64, num_classes=1000, qk_norm=True, vae="ema"),
               os.path.join(folder, "model_args.pth"))
    torch.save(state, os.path.join(folder, "consolidated_ema_ternary.00-of-01.pth"))
    return plain


def _reference_forward(w, x, t, label, n_heads=2, depth=2):
    """DiT_Llama's forward written out with F.linear on the plain weights: patchify (C, p, p), RMSNorm, qk-norm,
    complex RoPE, SwiGLU, adaLN with its RMSNorm, unpatchify (p, p, C) to 2C channels."""
    import torch.nn.functional as F
    lin = lambda k, v: F.linear(v, w[k + ".weight"], w.get(k + ".bias"))
    rms = lambda v, g: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    N, C, H, W = x.shape
    h = x.view(N, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(N, -1, C * 4)
    h = lin("x_embedder", h)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    args = t[:, None].float() * freqs
    c = lin("t_embedder.mlp.2", F.silu(lin("t_embedder.mlp.0", torch.cat([args.cos(), args.sin()], -1))))
    c = c + w["y_embedder.embedding_table.weight"][label]
    T, D = h.shape[1], h.shape[2]
    hd = D // n_heads
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), 1 / 10000 ** (torch.arange(0, hd, 2).float() / hd)))
    rope = lambda v: torch.view_as_real(torch.view_as_complex(v.reshape(N, T, n_heads, hd // 2, 2)) * cis[:, None]).flatten(3)
    for i in range(depth):
        b = f"layers.{i}."
        mod = rms(lin(b + "adaLN_modulation.1", F.silu(c)), w[b + "adaLN_modulation.2.weight"])
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, 1))
        a = rms(h, w[b + "attention_norm.weight"]) * (1 + sc1) + sh1
        ln = lambda n, v: F.layer_norm(v, (D,), w[b + f"attention.{n}.weight"], w[b + f"attention.{n}.bias"])
        q = rope(ln("q_norm", lin(b + "attention.wq", a)))
        k = rope(ln("k_norm", lin(b + "attention.wk", a)))
        v = lin(b + "attention.wv", a).view(N, T, n_heads, hd)
        att = torch.softmax(torch.einsum("nthd,nshd->nhts", q, k) / hd ** 0.5, -1)
        h = h + g1 * lin(b + "attention.wo", torch.einsum("nhts,nshd->nthd", att, v).reshape(N, T, D))
        f = rms(h, w[b + "ffn_norm.weight"]) * (1 + sc2) + sh2
        h = h + g2 * lin(b + "feed_forward.w2", F.silu(lin(b + "feed_forward.w1", f)) * lin(b + "feed_forward.w3", f))
    sh, sc = lin("final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, 1)
    out = lin("final_layer.linear", F.layer_norm(h, (D,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None])
    return out.view(N, H // 2, W // 2, 2, 2, 2 * C).permute(0, 5, 1, 3, 2, 4).reshape(N, 2 * C, H, W)


def test_reference_labels_sort_as_strings():
    names = sorted(str(i) for i in range(1000))  # the reference's ImageFolder: folder "k" is ImageNet class k
    assert [pack.REFERENCE_LABELS[c] for c in (0, 1, 10, 89, 100, 999)] == [names.index(s) for s in
                                                                            ("0", "1", "10", "89", "100", "999")]
    assert pack.REFERENCE_LABELS[89] == 878 and pack.REFERENCE_LABELS[2] == 112


def test_official_checkpoint_imports_exactly(tmp_path, monkeypatch):
    w = _official_folder(tmp_path)
    with pytest.raises(ValueError, match="only DiT_Llama_600M_patch2, DiT_Llama_3B_patch2"):
        pack.read_reference(str(tmp_path))  # the real map knows only the paper's two models: one clear line
    monkeypatch.setitem(model_lib.SIZES, "test", dict(dim=64, depth=2, n_heads=2))
    monkeypatch.setitem(pack.REFERENCE_MODELS, "DiT_Llama_tiny_patch2", "test")
    config, m = pack.read_reference(str(tmp_path))
    assert config["learn_sigma"] and config["patch_layout"] == "cpp" and config["reference_cfg"]
    assert (config["input_size"], config["in_channels"], config["num_classes"]) == (8, 4, 1000)
    torch.manual_seed(0)
    x, t, classes = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([89, 0, 1000])  # 1000: null
    labels = torch.tensor([878, 0, 1000])  # the reference's labels of ImageNet classes 89 and 0
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, classes), _reference_forward(w, x, t, labels), rtol=1e-4, atol=1e-5)


def test_official_checkpoint_packs_samples_and_refuses_others(tmp_path, monkeypatch):
    import sample
    _official_folder(tmp_path)
    monkeypatch.setitem(model_lib.SIZES, "test", dict(dim=64, depth=2, n_heads=2))
    monkeypatch.setitem(pack.REFERENCE_MODELS, "DiT_Llama_tiny_patch2", "test")
    out = str(tmp_path / "ref.tdit")
    pack.main(["--ckpt", str(tmp_path), "--out", out])
    packed, m = pack.load_packed(out), sample.load_model(str(tmp_path), "cpu")
    assert packed.config == m.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([89, 3])
    with torch.no_grad():  # the file holds the full-precision tensors in bf16
        torch.testing.assert_close(packed(x, t, y), m(x, t, y), rtol=0.05, atol=0.02)
    import argparse
    torch.save(argparse.Namespace(model="DiT_Llama_7B_patch2", image_size=256, num_classes=1000, qk_norm=True),
               tmp_path / "model_args.pth")
    with pytest.raises(ValueError, match="holds DiT_Llama_7B_patch2 at 256 px with 1000 classes: only"):
        pack.read_reference(str(tmp_path))
    with pytest.raises(ValueError, match="not an official TerDiT checkpoint folder"):
        pack.read_reference(str(tmp_path / "nothing"))


def test_legacy_packed_file_rewritten_in_the_reference_layout(tmp_path):
    m = _random_tiny(0, in_channels=4, input_size=8, learn_sigma=False, patch_layout="ppc")
    legacy = {k: v for k, v in asdict(m.config).items() if k not in model_lib.LEGACY}  # as written before them
    old, new = str(tmp_path / "old.tdit"), str(tmp_path / "new.tdit")
    pack.write_packed(old, legacy, 7, pack._encode(m), trits_per_byte=4)
    pack.main(["--ckpt", old, "--out", new])
    hdr = pack.read_header(new)
    assert hdr["config"]["patch_layout"] == "cpp" and hdr["step"] == 7
    a, b = pack.load_packed(old), pack.load_packed(new)
    assert a.config.patch_layout == "ppc"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(b(x, t, y), a(x, t, y), rtol=1e-5, atol=1e-5)
    for name in ("layers.0.attention.wq.packed", "final_layer.linear.weight"):  # all but the patch embedder: as is
        assert torch.equal(pack.read_packed(new)[1][name], pack.read_packed(old)[1][name])


def test_older_tile_order_converted_on_load(tmp_path, monkeypatch):
    """A 2-bit file of the tile order before the wgmma kernel loads into the same model, and pack.py rewrites it."""
    m = _random_tiny(1)
    old, new, cur = str(tmp_path / "v1.tdit"), str(tmp_path / "new.tdit"), str(tmp_path / "cur.tdit")
    pack.write_packed(cur, asdict(m.config), 3, pack._encode(m), trits_per_byte=4)
    pack_now = kernel.pack_2bit
    with monkeypatch.context() as mp:  # what the older kernel.py wrote
        mp.setattr(kernel, "pack_2bit", lambda t: pack_now(t, perm=kernel._PERM_V1))
        pack.write_packed(old, asdict(m.config), 3, pack._encode(m), trits_per_byte=4)
    assert pack.read_header(old)["pack_2bit_probe"] == pack.V1_PROBE != pack.read_header(cur)["pack_2bit_probe"]
    a, b = pack.read_packed(old)[1], pack.read_packed(cur)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pack.main(["--ckpt", old, "--out", new])
    assert pack.read_header(new)["pack_2bit_probe"] == pack.read_header(cur)["pack_2bit_probe"]


# -----------------------------------------------------------------------------
# the lean bf16 inference model (load_packed(..., dtype=torch.bfloat16)): what sample.py runs on a GPU

class _CountConversions(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, over the aten ops run under it (after autograd and autocast), the dtype conversions (aten._to_copy:
    what .to(dtype), .float(), .type_as and autocast's casts issue) and the ops whose output is a float32 tensor
    of at least `big` elements (activations held in float32; not a norm's per-token statistics). Each is a full pass over an activation tensor.

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
    """(x, mod, cos, sin) for one block of m, as TerDiT.forward hands them over, x and mod in dtype."""
    torch.manual_seed(0)
    hd = m.config.dim // m.config.n_heads
    x = torch.randn(2, 64, m.config.dim).to(dtype)
    mod = m.fused_adaln(torch.randn(2, m.fused_adaln.in_features)).unbind(1)[0].to(dtype)
    return x, mod, *model_lib.rope(64, hd, "cpu", dtype=dtype)


def test_bf16_model_is_bf16_but_alpha_and_codes(packed):
    m = pack.load_packed(packed[1], dtype=torch.bfloat16)
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        if name.endswith(".packed"):
            assert t.dtype == torch.uint8, name
        elif name.endswith(".alphas") or name.endswith(".one"):  # α exact; the fused matmuls' α = 1
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
    ref = pack.load_packed(packed[1])
    for (name, a), b in zip(m.state_dict().items(), ref.state_dict().values()):  # the file's values, unrounded
        assert torch.equal(a.float(), b.float()), name


def test_bf16_model_matches_autocast(packed):
    # the lean bf16 model (no autocast) computes what the float32 model computes under bf16 autocast, within
    # bf16 rounding: the same bf16 matmuls, but bf16 activations between them instead of float32 ones
    m16, m32 = pack.load_packed(packed[1], dtype=torch.bfloat16), pack.load_packed(packed[1])
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
    # one block's forward: the float32 model under bf16 autocast (how sample.py ran on a GPU before) converts
    # activations back and forth and keeps the residual stream, norms, modulation and gating in float32; the
    # lean bf16 model has no conversion and no float32 activation outside F.rms_norm (one fused kernel on CUDA)
    counts = {}
    for name, dtype, autocast in [("fp32+autocast", torch.float32, True), ("bf16 lean", torch.bfloat16, False)]:
        m = pack.load_packed(packed[1], dtype=dtype)
        x, mod, cos, sin = _block_inputs(m, dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                _CountConversions(big=x.numel()) as c:
            out = m.layers[0](x, None, cos, sin, mod)
        counts[name] = dict(conversions=c.conversions, float32_ops=c.float32_ops)
    assert out.dtype == torch.bfloat16
    print(f"one block's forward: {counts}")
    assert counts["bf16 lean"] == dict(conversions=0, float32_ops=0), counts
    assert counts["fp32+autocast"]["conversions"] >= 5 and counts["fp32+autocast"]["float32_ops"] >= 10, counts
