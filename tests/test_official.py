"""
Tests for official.py: a tiny checkpoint folder in the official TerDiT layout, written here from the layout as the
reference states it (not with official.py's code), imports into a TerDiT that computes the reference's forward
(written out below with F.linear), packs, samples, and anything else is refused with one line. Hermetic, CPU.

    python -m pytest tests/test_official.py -v
"""

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

import deploy
import model as model_lib
import official
import pack
import sample


def _hqq_pack(trits):
    """trits (out, in) -> uint8 (out/4, in): codes trit+1; byte row i holds rows i, i+q, i+2q, i+3q (q = out/4)
    in bits 7-6, 5-4, 3-2, 1-0."""
    c = (trits + 1).to(torch.uint8)
    q = c.shape[0] // 4
    return (c[:q] << 6) | (c[q:2 * q] << 4) | (c[2 * q:3 * q] << 2) | c[3 * q:]


def _official_folder(folder, dim=64, depth=2, hidden=256):
    """An official-layout folder of a tiny DiT_Llama (dim 64, 2 layers, 2 heads, 64 px: 8×8×4 latents); returns
    the plain weights (ternary layers as α·W̃) for the direct computation below."""
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
    assert [official.REFERENCE_LABELS[c] for c in (0, 1, 10, 89, 100, 999)] == [names.index(s) for s in
                                                                            ("0", "1", "10", "89", "100", "999")]
    assert official.REFERENCE_LABELS[89] == 878 and official.REFERENCE_LABELS[2] == 112


def test_official_checkpoint_imports_exactly(tmp_path, monkeypatch):
    w = _official_folder(tmp_path)
    with pytest.raises(ValueError, match="only DiT_Llama_600M_patch2, DiT_Llama_3B_patch2"):
        official.read_reference(str(tmp_path))  # the real map knows only the paper's two models: one clear line
    monkeypatch.setitem(model_lib.SIZES, "test", dict(dim=64, depth=2, n_heads=2))
    monkeypatch.setitem(official.REFERENCE_MODELS, "DiT_Llama_tiny_patch2", "test")
    config, m = official.read_reference(str(tmp_path))
    assert config["learn_sigma"] and config["reference_cfg"] and model_lib.config_from_dict(config) == m.config
    assert (config["input_size"], config["in_channels"], config["num_classes"]) == (8, 4, 1000)
    torch.manual_seed(0)
    x, t, classes = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([89, 0, 1000])  # 1000: null
    labels = torch.tensor([878, 0, 1000])  # the reference's labels of ImageNet classes 89 and 0
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, classes), _reference_forward(w, x, t, labels), rtol=1e-4, atol=1e-5)


def test_official_checkpoint_packs_samples_and_refuses_others(tmp_path, monkeypatch):
    _official_folder(tmp_path)
    monkeypatch.setitem(model_lib.SIZES, "test", dict(dim=64, depth=2, n_heads=2))
    monkeypatch.setitem(official.REFERENCE_MODELS, "DiT_Llama_tiny_patch2", "test")
    out = str(tmp_path / "ref.tdit")
    pack.main(["--ckpt", str(tmp_path), "--out", out])
    packed, m = deploy.load_packed(out), sample.load_model(str(tmp_path), "cpu")
    assert packed.config == m.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([89, 3])
    with torch.no_grad():  # the file holds the full-precision tensors in bf16
        torch.testing.assert_close(packed(x, t, y), m(x, t, y), rtol=0.05, atol=0.02)
    torch.save(argparse.Namespace(model="DiT_Llama_7B_patch2", image_size=256, num_classes=1000, qk_norm=True),
               tmp_path / "model_args.pth")
    with pytest.raises(ValueError, match="holds DiT_Llama_7B_patch2 at 256 px with 1000 classes: only"):
        official.read_reference(str(tmp_path))
    with pytest.raises(ValueError, match="not an official TerDiT checkpoint folder"):
        official.read_reference(str(tmp_path / "nothing"))


def test_unpack_hqq_2bit_inverts_the_layout():
    trits = torch.randint(-1, 2, (12, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(official.unpack_hqq_2bit(_hqq_pack(trits)), trits.to(torch.int8))


def test_weights_missing_tensors_are_named_in_one_line(tmp_path, monkeypatch):
    """Issue 30: a folder whose weights lack expected tensors ended in a KeyError traceback (sample.py, pack.py)."""
    _official_folder(tmp_path)
    monkeypatch.setitem(model_lib.SIZES, "test", dict(dim=64, depth=2, n_heads=2))
    monkeypatch.setitem(official.REFERENCE_MODELS, "DiT_Llama_tiny_patch2", "test")
    weights = tmp_path / official.REFERENCE_WEIGHTS
    state = torch.load(weights, weights_only=True)
    for k in ("y_embedder.embedding_table.weight", "layers.1.feed_forward.w2.weight"):
        del state[k]
    torch.save(state, weights)
    for load in (lambda: pack.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "m.tdit")]),
                 lambda: sample.main(["--ckpt", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "s.png")])):
        with pytest.raises(ValueError) as err:
            load()
        msg = str(err.value)
        assert "its weights lack 2 of DiT_Llama_tiny_patch2's tensors" in msg and len(msg.splitlines()) == 1
        assert "y_embedder.embedding_table.weight" in msg and "layers.1.feed_forward.w2.weight" in msg
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".tdit", ".tdit3", ".png"))]
