"""Ternary quantizer and STE (quant.py). Run: python -m pytest tests/test_quant.py -v"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import EPS, TernaryLinear, TernarySTE, export_ternary, ternarize


def test_ternarize_matches_eq1():
    w = torch.randn(64, 48, dtype=torch.float64) * 0.05
    trits, gamma = ternarize(w)
    assert torch.allclose(gamma, w.abs().mean())
    assert torch.equal(trits, torch.clamp(torch.round(w / (w.abs().mean() + EPS)), -1, 1))
    assert set(trits.unique().tolist()) == {-1.0, 0.0, 1.0}


def test_layer_weights_are_minus_alpha_zero_alpha():
    layer = TernaryLinear(40, 24)
    with torch.no_grad():
        layer.weight.normal_()
        layer.alphas.fill_(0.37)
    w_q = layer.alphas * TernarySTE.apply(layer.weight)
    assert set(w_q.unique().tolist()) == {-0.37, 0.0, 0.37} or torch.allclose(
        w_q.unique(), torch.tensor([-0.37, 0.0, 0.37]))
    # the forward pass is exactly F.linear with those weights (checked in float64)
    x = torch.randn(5, 40)
    ref = F.linear(x.double(), w_q.double(), layer.bias.double())
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_ste_gradient_is_identity():
    w = torch.randn(32, 16, requires_grad=True)
    g = torch.randn(32, 16)
    (TernarySTE.apply(w) * g).sum().backward()
    assert torch.equal(w.grad, g)  # exactly what the identity's gradient would be


def test_alpha_and_latent_weights_receive_gradients():
    layer = TernaryLinear(16, 8)
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    assert layer.alphas.grad is not None and layer.alphas.grad.abs().item() > 0
    assert layer.weight.grad.abs().sum() > 0


def test_alpha_init_is_gamma_of_default_init():
    torch.manual_seed(0)
    layer = TernaryLinear(256, 64)
    assert layer.alphas.shape == (1,)
    assert torch.allclose(layer.alphas, layer.weight.abs().mean().reshape(1))


def test_full_precision_switch_is_plain_linear():
    fp = TernaryLinear(12, 6, ternary=False)
    assert not hasattr(fp, "alphas")
    ref = nn.Linear(12, 6)
    ref.load_state_dict(fp.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(fp(x), ref(x))


def test_export_ternary():
    layer = TernaryLinear(30, 20)
    trits, alpha = export_ternary(layer)
    assert trits.dtype == torch.int8 and trits.shape == (20, 30)
    assert set(trits.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(trits.float(), ternarize(layer.weight.detach())[0])
    assert torch.equal(alpha, layer.alphas.detach())
