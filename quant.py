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

What a QAT layer costs in memory
--------------------------------
Written as autograd composes it, `F.linear(x, α · STE(W), b)` keeps two extra copies of every weight alive
from forward to backward: W̃ in float32 (for dL/dα) and α·W̃ in bf16 (for dL/dx) - 6 bytes per parameter,
~25 GB at 4.2B, on top of the weights, gradients and Adam state. Both are cheap to rebuild from W, which is
kept anyway, so `TernaryLinearFn` saves only x, W and α and recomputes W̃ in backward (a few reads of W
per step, nothing next to the matmuls). Its backward is the chain rule written out, W_Q = α·W̃:

    dL/dx = g · W_Q          dL/dW_Q = gᵀ · x          dL/dW = α · dL/dW_Q   (STE: dW̃/dW := 1)
    dL/dα = Σ dL/dW_Q ⊙ W̃    dL/db = Σ_tokens g

the same numbers autograd computes for the composed form (tests/test_quant.py checks it). On an H200 this took
the 600M model's eager training step from 41.4 to 38.0 GiB at batch 64 (README, training step); under
torch.compile, as train.py runs on a GPU, it fuses into a few passes: the QAT step costs 0.99-1.04x the FP one.

Starting from a full-precision model (warm-started QAT)
------------------------------------------------------
TerDiT trains from scratch. Later low-bit work (ParetoQ, Continual QAT) trains in full precision first and
switches to QAT for the last part of the budget. The trained FP weights become the latent weights W, and α is
set to the least-squares scale of their trits, α = Σ|W|·|W̃| / Σ|W̃| (the mean |W| of the entries that stay
nonzero; TWN, Li et al. 2016): the α that makes α·W̃ closest to W, so the first ternary forward pass is as near
the FP model's as one α per matrix allows (`fit_alpha`; train.py --init-from, with AdamW fresh or, with
--carry-adam, the FP run's moments).

At deployment the latent weights are thrown away: `export_ternary` returns each layer's trits (int8) and α,
which pack.py stores in 2 bits each and kernel.py multiplies (at small batch without ever expanding them to
16 bits).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6  # ε of Eq. 1, as in the reference


def ternarize(w):
    """Eq. 1: the trits W̃ (same dtype as w, values in {-1, 0, 1}) and the per-tensor scale γ = mean|W|."""
    gamma = w.abs().mean()
    return (w / (gamma + EPS)).round().clamp(-1, 1), gamma


def fit_alpha(w):
    """The least-squares α for w's trits: argmin_α ||w - α·W̃||² = Σ|w|·|W̃| / Σ|W̃| (shape (1,), float32)."""
    trits = ternarize(w.float())[0].abs()
    return ((w.float().abs() * trits).sum() / trits.sum().clamp(min=1)).reshape(1)


class TernarySTE(torch.autograd.Function):
    """Forward: W -> W̃. Backward: the gradient passes straight through (identity), as in the reference."""

    @staticmethod
    def forward(ctx, w):
        return ternarize(w)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def ternary_linear_ref(x, w, alpha, bias=None):
    """The composed form autograd differentiates for us: the plain reference TernaryLinearFn is tested against."""
    return F.linear(x, alpha * TernarySTE.apply(w), bias)


class TernaryLinearFn(torch.autograd.Function):
    """y = x · (α W̃)ᵀ + b with the STE, saving x, W and α only: W̃ is recomputed in backward (see above).

    x arrives in the compute dtype (bf16 under autocast); W and α stay in their own (float32) dtype."""

    @staticmethod
    def forward(ctx, x, w, alpha, bias):
        ctx.save_for_backward(x, w, alpha)
        ctx.bias_dtype = None if bias is None else bias.dtype
        w_q = (alpha * ternarize(w.float())[0]).to(x.dtype)
        return F.linear(x, w_q, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        x, w, alpha = ctx.saved_tensors
        trits = ternarize(w.float())[0]                    # recomputed, not stored
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, N), (M, K)
        grad_x = (g2 @ (alpha * trits).to(g.dtype)).view_as(x) if ctx.needs_input_grad[0] else None
        grad_wq = (g2.t() @ x2).float()                    # dL/dW_Q, (N, K)
        grad_w = (grad_wq * alpha).to(w.dtype)             # STE: straight through the rounding
        grad_alpha = (grad_wq * trits).sum().reshape(1).to(alpha.dtype)
        grad_b = None if ctx.bias_dtype is None else g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_alpha, grad_b


class TernaryLinear(nn.Linear):
    """Drop-in nn.Linear with a ternary forward pass: y = x · (α W̃)ᵀ + b.

    `ternary=False` gives a plain nn.Linear, so one flag turns the whole network into its full-precision twin.
    """

    def __init__(self, in_features, out_features, bias=True, ternary=True, device=None):
        super().__init__(in_features, out_features, bias, device=device)
        self.ternary = ternary
        if ternary:
            # The reference initialises α with torch.randn(1), which can start negative or far off the weights'
            # scale. We set it to γ of nn.Linear's default init (0.5/sqrt(in_features)), so W_Q starts at the scale
            # of an ordinary linear layer. A deliberate, documented deviation. In a TerDiT, initialize_weights then
            # re-initialises the weights (xavier, adaLN zeros) but not α, so α starts at sqrt((in + out) / (6 in))
            # times γ of the xavier weights it scales (0.58 for a square layer). Left so: checkpoints and tests
            # rest on these numerics.
            self.alphas = nn.Parameter(self.weight.detach().abs().mean().reshape(1).clone())

    def forward(self, x):
        if not self.ternary:
            return F.linear(x, self.weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):  # compute where nn.Linear would: in autocast's dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return TernaryLinearFn.apply(x, self.weight, self.alphas, self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", ternary={self.ternary}"


@torch.no_grad()
def export_ternary(layer):
    """A trained TernaryLinear's deployable form: (trits int8 of shape (out, in), α float32 of shape (1,))."""
    if not getattr(layer, "ternary", False):
        raise ValueError(f"export_ternary needs a TernaryLinear with ternary=True, got {layer!r}")
    trits, _ = ternarize(layer.weight.float())
    return trits.to(torch.int8), layer.alphas.detach().float().clone()
