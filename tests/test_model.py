"""The TerDiT network (model.py). Run: python -m pytest tests/test_model.py -v"""
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

from model import RMSNorm, TerDiTConfig, build_model, config_from_dict, sincos_pos_embed
from quant import TernaryLinear


def tiny(**kw):
    torch.manual_seed(0)
    return build_model("tiny", input_size=16, in_channels=1, **kw)


def randomize_(m):
    with torch.no_grad():  # leave adaLN-Zero behind, so every path of the block is exercised
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_forward_shapes():
    m = tiny().eval()
    x = torch.randn(3, 1, 16, 16)
    out = m(x, torch.tensor([0, 10, 999]), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 2, 16, 16) and torch.isfinite(out).all()  # learn_sigma: ε and v
    assert tiny(learn_sigma=False)(x, torch.tensor([0, 10, 999]), torch.tensor([0, 5, 9])).shape == x.shape


def test_config_from_dict_is_strict():
    cfg = TerDiTConfig(dim=64, depth=2, n_heads=2, in_channels=1)
    assert config_from_dict(asdict(cfg)) == cfg
    old = {k: v for k, v in asdict(cfg).items() if k != "learn_sigma"}  # written before a field existed
    dropped = {**asdict(cfg), "patch_layout": "ppc"}  # a field this code no longer has
    for d, what in [(old, "missing field learn_sigma"), (dropped, "unknown field patch_layout")]:
        with pytest.raises(ValueError) as err:
            config_from_dict(d)
        msg = str(err.value)
        assert what in msg and "older version of this code" in msg and "regenerate it with train.py / pack.py" in msg
        assert len(msg.splitlines()) == 1


def test_patchify_takes_the_references_layout():
    x = torch.randn(2, 4, 8, 8)
    x[0, 1, 0, 1] = 7.0  # one marked value: where it lands in the first token tells the layout
    m = build_model("tiny", input_size=8, in_channels=4)
    assert m.patchify(x)[0, 0].tolist().index(7.0) == 1 * 4 + 0 * 2 + 1  # (C, p, p): c=1, i=0, j=1


def test_patchify_roundtrip():
    m = tiny(learn_sigma=False)
    x = torch.randn(2, 1, 16, 16)
    assert m.patchify(x).shape == (2, 64, 4)  # (N, T, p²C)
    assert torch.equal(m.unpatchify(m.patchify(x), 16, 16), x)


def test_forward_with_cfg_doubles_the_batch():
    m = randomize_(tiny()).eval()
    x = torch.randn(2, 1, 16, 16)
    xx, t = torch.cat([x, torch.randn_like(x)]), torch.tensor([500, 20, 500, 20])
    y = torch.tensor([3, 4, 10, 10])  # second half: the null class
    out = m.forward_with_cfg(xx, t, y, cfg_scale=4.0)
    assert out.shape == (4, 2, 16, 16)
    assert torch.equal(out[:2], out[2:])  # both halves carry the guided prediction
    cond, uncond = m(x, t[:2], y[:2]), m(x, t[:2], y[2:])
    torch.testing.assert_close(out[:2, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:2, 1:], cond[:, 1:], rtol=1e-4, atol=1e-5)  # v: the conditional one, unguided
    # cfg_scale 1 is the plain conditional prediction
    torch.testing.assert_close(m.forward_with_cfg(xx, t, y, 1.0)[:2], cond, rtol=1e-4, atol=1e-5)


def test_reference_cfg_guides_the_first_3_channels():
    torch.manual_seed(0)
    m = randomize_(build_model("tiny", input_size=8, in_channels=4, reference_cfg=True)).eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([3, 10])
    out = m.forward_with_cfg(torch.cat([x, x]), t, y, cfg_scale=4.0)[:1]
    cond, uncond = m(x, t[:1], y[:1]), m(x, t[:1], y[1:])
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], rtol=1e-4, atol=1e-5)  # ε's 4th channel and v unguided


def test_adaln_rmsnorm_switch():
    on, off = tiny(), tiny(adaln_norm=False)
    assert isinstance(on.layers[0].adaLN_modulation[2], RMSNorm)
    assert isinstance(off.layers[0].adaLN_modulation[2], nn.Identity)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if "adaLN_modulation.2" not in k})
    randomize_(on)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if "adaLN_modulation.2" not in k})
    c = torch.randn(2, 128)
    a, b = on.layers[0].adaLN_modulation(c), off.layers[0].adaLN_modulation(c)
    g = on.layers[0].adaLN_modulation[2].weight
    torch.testing.assert_close((a / g).pow(2).mean(-1), torch.ones(2), rtol=1e-3, atol=1e-3)  # unit RMS, then gain
    assert not torch.allclose(a, b)


def test_pos_embed_tells_rows_and_columns_apart():
    pe = sincos_pos_embed(64, 4, 5, "cpu").view(4, 5, 64)  # (rows, cols, D)
    row_half, col_half = pe[..., :32], pe[..., 32:]
    assert torch.equal(row_half, row_half[:, :1].expand_as(row_half))  # the row half is constant along a row
    assert torch.equal(col_half, col_half[:1].expand_as(col_half))    # the column half down a column
    assert torch.cdist(pe.view(20, 64), pe.view(20, 64)).add(torch.eye(20)).min() > 0.1  # every token distinct
    on, off = tiny(pos_embed=True), tiny()
    off.load_state_dict(on.state_dict())  # a fixed function of the grid: no parameters, same checkpoint keys
    randomize_(on), off.load_state_dict(on.state_dict())
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 500]), torch.tensor([1, 2])
    assert not torch.allclose(on(x, t, y), off(x, t, y))


def test_which_layers_are_ternary():
    m = tiny()
    ternary = {n for n, mod in m.named_modules() if isinstance(mod, TernaryLinear) and mod.ternary}
    assert {n.split(".")[-1] for n in ternary} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3", "1"}
    assert len(ternary) == 8 * m.config.depth
    # the reference keeps these in full precision
    for mod in (m.x_embedder, m.t_embedder.mlp[0], m.final_layer.linear, m.final_layer.adaLN_modulation[1]):
        assert type(mod) is nn.Linear
    fp = tiny(ternary=False)
    assert not any(getattr(mod, "ternary", False) for mod in fp.modules())


@pytest.mark.parametrize("size,paper", [("600M", 0.60e9), ("4.2B", 4.2e9)])
def test_paper_sizes_parameter_counts(size, paper):
    m = build_model(size, device="meta", in_channels=4, num_classes=1000)  # ImageNet 256: 32×32×4 latents
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - paper) / paper < 0.05, f"{size}: {n / 1e9:.3f}B parameters"
    assert m.config.dim == {"600M": 1536, "4.2B": 3072}[size]


def test_bad_input_and_unknown_size():
    with pytest.raises(ValueError, match="unknown size 'XL'"):
        build_model("XL")
    with pytest.raises(ValueError, match="does not fit"):
        tiny()(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_qat_backward_reaches_every_parameter():
    m = randomize_(tiny())
    m(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([1, 2])).pow(2).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # only the null-class and unused label rows of the table may have no gradient
    assert missing == [] or missing == ["y_embedder.embedding_table.weight"], missing
