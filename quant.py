"""
Ternary weights and quantization-aware training (QAT), as in TerDiT (arXiv 2405.14854, Sec. 3.1, Eq. 1-2).

    python -c "import torch, quant; l = quant.TernaryLinear(8, 4); print(l(torch.randn(2, 8)))"

How ternary QAT works
---------------------
A ternary layer computes y = x · W_Qᵀ + b with W_Q = α · W̃ and every entry of W̃ in {-1, 0, +1}.
Nothing about the network is ternary at rest: each layer keeps an ordinary full-precision *latent* weight
W, and the optimizer updates W exactly as it would in a normal network. Only the forward pass sees the
quantized version, computed afresh from W at every step (Eq. 1):

    γ = mean(|W|)                                  one scalar for the whole matrix (per tensor)
    W̃ = clamp(round(W / (γ + ε)), -1, 1)           ε = 1e-6 keeps an all-zero W finite

γ is an adaptive threshold: an entry becomes ±1 when |W| > γ/2, else 0. Because it tracks the matrix's own
scale, roughly a third of the entries end up at zero whatever the magnitude of W, so the latent weights are
free to drift in scale without the ternary pattern collapsing to all-zeros or all-ones.

α (`alphas`, one learnable scalar per layer, Eq. 2) puts the scale back: W̃ is dimensionless, and α is what
the layer's output magnitude is learned through. It is trained by ordinary backprop, since W_Q = α·W̃ is
differentiable in α.

Why the straight-through estimator (STE)
----------------------------------------
round() and clamp() have zero gradient almost everywhere, so dL/dW through W̃ would be zero and W could
never move. The STE (Bengio et al. 2013) pretends, in the backward pass only, that W̃ = W: it hands
dL/dW̃ back to W unchanged. The forward pass stays exactly ternary; the latent weights accumulate the small
updates until an entry crosses a threshold and its trit flips. That is the whole trick.

At deployment the latent weights are thrown away: `export_ternary` returns each layer's trits (int8) and α,
which pack.py stores in 2 bits each and kernel.py multiplies without ever expanding them to 16 bits.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6  # ε of Eq. 1, as in the reference


def ternarize(w):
    """Eq. 1: the trits W̃ (same dtype as w, values in {-1, 0, 1}) and the per-tensor scale γ = mean|W|."""
    gamma = w.abs().mean()
    return (w / (gamma + EPS)).round().clamp(-1, 1), gamma


class TernarySTE(torch.autograd.Function):
    """Forward: W -> W̃. Backward: the gradient passes straight through (identity), as in the reference."""

    @staticmethod
    def forward(ctx, w):
        return ternarize(w)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class TernaryLinear(nn.Linear):
    """Drop-in nn.Linear with a ternary forward pass: y = x · (α W̃)ᵀ + b.

    `ternary=False` gives a plain nn.Linear, so one flag turns the whole network into its full-precision twin.
    """

    def __init__(self, in_features, out_features, bias=True, ternary=True, device=None):
        super().__init__(in_features, out_features, bias, device=device)
        self.ternary = ternary
        if ternary:
            # The reference initialises α with torch.randn(1), which can start negative or far off the weights'
            # scale. We start it at γ of nn.Linear's default init (about 0.5/sqrt(in_features)), so W_Q starts
            # at the scale of an ordinary linear layer. A deliberate, documented deviation.
            self.alphas = nn.Parameter(self.weight.detach().abs().mean().reshape(1).clone())

    def forward(self, x):
        if not self.ternary:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.alphas * TernarySTE.apply(self.weight), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", ternary={self.ternary}"


@torch.no_grad()
def export_ternary(layer):
    """A trained TernaryLinear's deployable form: (trits int8 of shape (out, in), α float32 of shape (1,))."""
    if not getattr(layer, "ternary", False):
        raise ValueError(f"export_ternary needs a TernaryLinear with ternary=True, got {layer!r}")
    trits, _ = ternarize(layer.weight.float())
    return trits.to(torch.int8), layer.alphas.detach().float().clone()
