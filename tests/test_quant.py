"""Ternary quantizer and STE (quant.py). Run: python -m pytest tests/test_quant.py -v"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import pytest

from quant import (EPS, TernaryLinear, TernaryLinearFn, TernarySTE, export_ternary, fit_alpha, ternarize,
                   ternary_linear_ref)


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


def _grads(fn, x, w, alpha, bias, g):
    x, w, alpha = (t.detach().clone().requires_grad_() for t in (x, w, alpha))
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(x, w, alpha, bias)
    y.backward(g.to(y.dtype))
    return [y] + [t.grad for t in (x, w, alpha, bias) if t is not None]


@pytest.mark.parametrize("dtype,shape,bias", [(torch.float64, (3, 5, 40), True), (torch.float32, (7, 33), False),
                                              (torch.float32, (2, 9, 24), True)])
def test_lean_function_matches_composed_autograd(dtype, shape, bias):
    """TernaryLinearFn's hand-written backward == autograd through F.linear(x, α·STE(W), b): same numbers."""
    gen = torch.Generator().manual_seed(sum(shape))
    K, N = shape[-1], 24
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    w, alpha = torch.randn(N, K, generator=gen, dtype=dtype), torch.rand(1, generator=gen, dtype=dtype) + 0.1
    b = torch.randn(N, generator=gen, dtype=dtype) if bias else None
    g = torch.randn(*shape[:-1], N, generator=gen, dtype=dtype)
    for new, ref in zip(_grads(TernaryLinearFn.apply, x, w, alpha, b, g), _grads(ternary_linear_ref, x, w, alpha, b, g)):
        torch.testing.assert_close(new, ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_lean_layer_matches_composed_autograd_under_bf16_autocast():
    """As train.py runs it: fp32 latent weights, bf16 autocast. The layer's gradients equal the composed form's."""
    torch.manual_seed(0)
    layer = TernaryLinear(64, 48)
    x, g = torch.randn(4, 16, 64), torch.randn(4, 16, 48)

    def run(forward):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(xx)
        y.backward(g.to(y.dtype))
        return [y, xx.grad, layer.weight.grad, layer.alphas.grad, layer.bias.grad]

    new = run(layer)
    ref = run(lambda xx: ternary_linear_ref(xx, layer.weight, layer.alphas, layer.bias))
    assert new[0].dtype == ref[0].dtype == torch.bfloat16
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lean_layer_keeps_no_copy_of_the_weight_for_backward():
    """Between forward and backward the only weight-sized tensor kept is the latent weight itself (the composed
    form keeps W̃ in fp32 and α·W̃ as well: 6 bytes per parameter under autocast)."""
    layer = TernaryLinear(256, 128)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 256, requires_grad=True)).sum()
    big = [t for t in saved if t.numel() >= layer.weight.numel()]
    assert big and all(t.data_ptr() == layer.weight.data_ptr() for t in big)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ternary_linear_ref(torch.randn(2, 256, requires_grad=True), layer.weight, layer.alphas, layer.bias).sum()
    assert any(t.numel() >= layer.weight.numel() and t.data_ptr() != layer.weight.data_ptr() for t in saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast as train.py runs it)")
def test_lean_layer_matches_composed_autograd_on_cuda():
    torch.manual_seed(0)
    layer = TernaryLinear(1536, 512, device="cuda")
    x, g = torch.randn(8, 256, 1536, device="cuda"), torch.randn(8, 256, 512, device="cuda")
    out = []
    for forward in (layer, lambda xx: ternary_linear_ref(xx, layer.weight, layer.alphas, layer.bias)):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = forward(xx)
        y.backward(g.to(y.dtype))
        out.append([y, xx.grad, layer.weight.grad, layer.alphas.grad, layer.bias.grad])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fit_alpha_is_the_least_squares_scale():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 0.02
    trits, gamma = ternarize(w)
    a = fit_alpha(w)
    err = lambda s: ((w - s * trits) ** 2).sum()
    assert err(a) < err(a * 1.01) and err(a) < err(a * 0.99) and err(a) < err(gamma)
    torch.testing.assert_close(a, w.abs()[trits != 0].mean().reshape(1))  # the mean |w| of the kept entries
