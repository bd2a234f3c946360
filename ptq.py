"""
Post-training quantization of the full-precision twin (train.py --fp) to W8A8 or W4A8, fake-quantized, beside
TerDiT's ternary QAT: round-to-nearest (RTN) baselines and PTQ4DiT's Channel-wise Salience Balancing (CSB) with
Spearman's ρ-guided Salience Calibration (SSC) (Wu et al., arXiv 2405.16005, NeurIPS 2024; adreamwu/PTQ4DiT).

    python ptq.py --ckpt out/fp/ckpt.pt --wbits 4 --abits 8 --method ptq4dit --num-steps 50 --sampler ddim \
        --num-calib-steps 25 --out results/ptq_w4a8_ptq4dit.json

Which layers: the ones TerDiT makes ternary, i.e. every block's attention wq, wk, wv, wo, SwiGLU w1, w2, w3 and
adaLN linear (PTQ4DiT quantizes the linear layers of the DiT blocks). The patch embedder, timestep MLP, label
table and final layer stay full precision, as they do in TerDiT, so the table compares like with like.

Quantizers (fake: values rounded to the grid, arithmetic in float):
  weights      per output channel, symmetric:  s_i = max_j |W_ij| / (2^(b-1) - 1),  Ŵ = s · clamp(round(W / s))
  activations  per tensor, asymmetric, static: s = (max - min) / (2^b - 1), z = round(-min / s),
               X̂ = s · (clamp(round(X / s) + z, 0, 2^b - 1) - z), min and max from the calibration set

Calibration set (PTQ4DiT's get_calibration_set.py): the FP model's own sampler (the evaluation's sampler, steps
and CFG, another seed) is run, and its inputs (x_t, t, y) are kept at --num-calib-steps timesteps spread evenly
over the trajectory. Forward hooks then record each quantized layer's per-input-channel min and max per timestep.

CSB (paper Sec. 4.1): for a linear layer XW with input channels j, salience s(X_j) = max|X_j| and
s(W_j) = max|W_j| (Eq. 3); both are brought to their geometric mean (s(X_j) s(W_j))^½ (Eq. 4) by the diagonal
balancing matrices B^X = diag(s(W_j)/s(X_j))^½ and B^W = (B^X)^-1 (Eq. 5), so XW = (X B^X)(B^W W) (Eq. 6)
exactly. Here that is b_j = (s(X_j) / s(W_j))^½, X' = X / b, W' = W · b, the exponent ½ as the paper.
The activation side X / b is kept as an explicit per-channel scale inside the quantized layer (the simplest
honest option; PTQ4DiT folds it into the preceding adaLN modulation or linear layer, which this file does not).
Each of the 8 layers gets its own b, even wq, wk, wv (and w1, w3), which share an input: DiT's fused qkv has
one b, as folding would need; with the scale kept inside each layer, separate b's are allowed.

SSC (paper Sec. 4.2): activation salience varies with the timestep; for each calibration timestep t,
ρ_t = Spearman's ρ between s(X^(t)) and s(W) over the channels (Eq. 7); timesteps where the two saliences are
least correlated (most complementary) weigh most: η_t = exp(-ρ_t) / Σ_τ exp(-ρ_τ) (Eq. 8); CSB then uses
s(X_j) = Σ_t η_t s(X_j^(t)) (Eq. 9). (Formulas and equation numbers are our reading of the paper; the exponent ½
and η's form were not checked against the paper's text or its code, which was not at hand: check them first.)

Not implemented: block-wise reconstruction (PTQ4DiT's --recon, BRECQ/Q-Diffusion style), quantization of the
attention matmuls (q·kᵀ and softmax·v, PTQ4DiT's --sm_abit), folding B^X into the preceding layer, and
integer kernels (this is fake quantization: it measures quality, not speed or memory), percentile ranges
(activation ranges are min/max). Under CUDA's bf16 autocast the grid values are rounded once more to bf16.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
from diffusion import Diffusion

BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.1")


def target_layers(model):
    """{name: linear} of the layers TerDiT makes ternary: the 8 linear layers of every block."""
    return {f"layers.{i}.{n}": block.get_submodule(n) for i, block in enumerate(model.layers) for n in BLOCK_LINEARS}


# ------------------------------ Quantizers ------------------------------

def quantize_weight(w, bits):
    """Per-output-channel symmetric round-to-nearest: every row on its own grid s_i · {-q..q}, q = 2^(bits-1) - 1."""
    q = 2 ** (bits - 1) - 1
    s = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / q  # an all-zero row (adaLN-Zero) stays zero
    return (w / s).round().clamp(-q, q) * s


def act_qparams(lo, hi, bits):
    """Scale and zero point of a per-tensor asymmetric quantizer covering [lo, hi] (widened to hold 0, so that
    zero padding and exact zeros stay exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    s = max((hi - lo) / (2 ** bits - 1), 1e-12)
    return s, float(round(-lo / s))


def fake_quant_act(x, s, z, bits):
    return ((x / s).round() + z).clamp(0, 2 ** bits - 1).sub(z) * s


class QuantLinear(nn.Module):
    """y = Q_a(x / b) · Q_w(W · b)ᵀ + bias: a linear layer with fake-quantized weights (once, here) and input
    activations (a static scale from calibration). b: CSB's per-input-channel balance, or None. bits None: that
    side stays full precision (what the tests use to check that CSB alone changes nothing)."""

    def __init__(self, linear, wbits, abits, lo=0.0, hi=0.0, balance=None):
        super().__init__()
        w = linear.weight.detach().double()
        if balance is not None:
            w = w * balance.double()  # W' = W · diag(b), column j times b_j
        w = quantize_weight(w, wbits) if wbits else w
        self.register_buffer("weight", w.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("inv_balance", None if balance is None else (1 / balance.double()).to(linear.weight.dtype))
        self.wbits, self.abits = wbits, abits
        self.s, self.z = act_qparams(lo, hi, abits) if abits else (1.0, 0.0)

    def forward(self, x):
        xq = x.double() if x.dtype == torch.float64 else x.float()  # quantize in float32 (float64 in tests)
        if self.inv_balance is not None:
            xq = xq * self.inv_balance.to(xq.dtype)
        if self.abits:
            xq = fake_quant_act(xq, self.s, self.z, self.abits)
        return F.linear(xq.to(x.dtype), self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, wbits={self.wbits}, abits={self.abits}, " \
               f"csb={self.inv_balance is not None}"


# ------------------------------ Calibration ------------------------------

@torch.no_grad()
def calibration_set(model, n, cfg_scale, num_steps, num_calib_steps, method, seed, device):
    """[(x_t, t, y)] that the FP model's own sampler feeds it at num_calib_steps of its num_steps timesteps, evenly
    spread from the first (t = 999) to the last (t = 0): PTQ4DiT's get_calibration_set.py, which keeps them all.
    With guidance the batch is doubled (class, then null labels), as the model sees it when sampling."""
    keep = set(torch.linspace(0, num_steps - 1, num_calib_steps).round().long().tolist())
    recorded = []

    class Recorder:  # stands in for the model inside Diffusion.sample and keeps the chosen inputs
        config = model.config

        def _keep(self, x, t, y):  # the k-th call is sampling step k
            recorded.append((x.clone(), t.clone(), y.clone()) if len(recorded) in keep else None)

        def __call__(self, x, t, y):
            self._keep(x, t, y)
            return model(x, t, y)

        def forward_with_cfg(self, x, t, y, s):
            self._keep(x, t, y)
            return model.forward_with_cfg(x, t, y, s)

    cfg = model.config
    g = torch.Generator(device).manual_seed(seed)
    y = torch.arange(n, device=device) % cfg.num_classes
    Diffusion().sample(Recorder(), y, (cfg.in_channels, cfg.input_size, cfg.input_size), cfg_scale, num_steps,
                       method, generator=g)
    return [r for r in recorded if r is not None]


@torch.no_grad()
def channel_stats(model, calib, batch_size):
    """{layer name: (lo, hi)}: per calibration timestep, per input channel, the min and max of the layer's input
    over all calibration tokens, each (S, C_in), from forward pre-hooks."""
    layers, stats, hooks = target_layers(model), {}, []
    for name, layer in layers.items():
        def hook(mod, inp, name=name):
            x = inp[0].detach().float().flatten(0, -2)
            lo, hi = stats.setdefault(name, ([], []))
            if len(lo) == step[0]:  # first chunk at this timestep
                lo.append(x.amin(0)), hi.append(x.amax(0))
            else:
                lo[-1], hi[-1] = torch.minimum(lo[-1], x.amin(0)), torch.maximum(hi[-1], x.amax(0))
        hooks.append(layer.register_forward_pre_hook(hook))
    step = [0]
    try:
        for x, t, y in calib:
            for xb, tb, yb in zip(x.split(batch_size), t.split(batch_size), y.split(batch_size)):
                model(xb, tb, yb)
            step[0] += 1
    finally:
        for h in hooks:
            h.remove()
    return {name: (torch.stack(lo).cpu(), torch.stack(hi).cpu()) for name, (lo, hi) in stats.items()}


# ------------------------------ CSB and SSC ------------------------------

def spearman(a, b):
    """Spearman's ρ of two vectors: the Pearson correlation of their ranks (ties broken by order, not averaged;
    salience values are continuous, so ties are rare)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum().item() / max((ra.square().sum() * rb.square().sum()).sqrt().item(), 1e-300)


def ssc_weights(rho):
    """η_t = exp(-ρ_t) / Σ_τ exp(-ρ_τ) (Eq. 8): the less activation and weight salience agree at t, the more t weighs."""
    return torch.softmax(-torch.as_tensor(rho, dtype=torch.float64), 0)


def ssc_salience(sx_t, sw):
    """SSC: the activation salience (C_in,) that CSB balances, from the per-timestep salience sx_t (S, C_in) and
    the weight salience sw (C_in,): ρ_t (Eq. 7), η_t (Eq. 8), s(X_j) = Σ_t η_t s(X_j^(t)) (Eq. 9). Also the ρ_t."""
    rho = [spearman(s, sw) for s in sx_t]
    return (ssc_weights(rho)[:, None] * sx_t.double()).sum(0), rho


def balance(act_salience, weight_salience):
    """CSB's b_j = (s(X_j) / s(W_j))^½ (Eqs. 4-5); X / b and W · b both have salience (s(X_j) s(W_j))^½. A channel
    that is never active or has no weight is left alone (b = 1)."""
    sx, sw = act_salience.double(), weight_salience.double()
    ok = (sx > 0) & (sw > 0)
    return torch.where(ok, (sx / torch.where(ok, sw, 1.0)).sqrt(), 1.0)


@torch.no_grad()
def quantize(model, stats, wbits, abits, method):
    """Replace the target layers of model by QuantLinear, in place. method: rtn (no balancing), csb (balance with
    the salience over all timesteps, max), ptq4dit (CSB with the SSC-weighted salience). Returns {layer: ρ_t list}
    for ptq4dit (what SSC saw), else {}."""
    if method not in ("rtn", "csb", "ptq4dit"):
        raise ValueError(f"unknown method '{method}': use rtn, csb or ptq4dit")
    report = {}
    for name, layer in target_layers(model).items():
        lo, hi = stats[name]                                   # (S, C_in) each
        b = None
        if method != "rtn":
            sx_t = torch.maximum(lo.abs(), hi.abs()).double()  # s(X^(t)_j), (S, C_in) (Eq. 3, per timestep)
            sw = layer.weight.detach().abs().amax(0).double().cpu()  # s(W_j): max over output channels (Eq. 3)
            if method == "ptq4dit":
                sx, report[name] = ssc_salience(sx_t, sw)
            else:
                sx = sx_t.amax(0)
            b = balance(sx, sw)
        # the static activation range is that of the balanced input X / b (b > 0 keeps min and max apart)
        scale = 1.0 if b is None else b.float()[None]
        a_lo, a_hi = (lo / scale).min().item(), (hi / scale).max().item()
        q = QuantLinear(layer, wbits, abits, a_lo, a_hi, None if b is None else b.to(layer.weight.device))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return report


def weight_bytes(model, wbits):
    """Deployed size of the weights: quantized layers at wbits plus an fp32 scale per output channel (and a CSB
    balance per input channel); every other parameter and buffer at 4 bytes."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight.numel() * wbits / 8 + 4 * m.weight.shape[0] + (4 * m.weight.shape[1] if
                                                                            m.inv_balance is not None else 0)
            total += 0 if m.bias is None else 4 * m.bias.numel()
        else:
            total += 4 * sum(p.numel() for p in m.parameters(recurse=False))
    return int(total)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    positive = data.number(int, 1, what="a positive integer")
    p.add_argument("--ckpt", required=True, help="full-precision training checkpoint (train.py --fp)")
    p.add_argument("--wbits", type=data.number(int, 2, 8, what="an integer in 2..8"), default=8, help="weight bits")
    p.add_argument("--abits", type=data.number(int, 2, 16, what="an integer in 2..16"), default=8,
                   help="activation bits")
    p.add_argument("--method", default="ptq4dit", choices=["rtn", "csb", "ptq4dit"],
                   help="rtn: round-to-nearest; csb: balancing without SSC; ptq4dit: CSB with SSC")
    p.add_argument("--num-calib", type=positive, default=64, help="images in the calibration trajectories")
    p.add_argument("--num-calib-steps", type=positive, default=25,
                   help="timesteps kept from each calibration trajectory, evenly spread (at most --num-steps)")
    p.add_argument("--calib-seed", type=int, default=1, help="seed of the calibration trajectories (not --seed: "
                                                              "calibrating on the evaluation's own noise would flatter)")
    p.add_argument("--num-samples", type=positive, default=1000, help="images to generate for the score")
    p.add_argument("--cfg-scale", type=data.number(float, 0, what="a finite number >= 0"), default=1.5,
                   help="guidance scale, for calibration and evaluation (evaluate.py's default)")
    p.add_argument("--num-steps", type=data.number(int, 1, 1000, what="an integer in 1..1000"), default=100,
                   help="sampling steps, for calibration and evaluation")
    p.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"], help="sampler (evaluate.py's --method)")
    p.add_argument("--batch-size", type=positive, default=500, help="images sampled at once")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (as evaluate.py's --seed)")
    p.add_argument("--device", type=data.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="regional torch.compile before sampling (None: on with CUDA, off on a CPU)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.num_calib_steps > args.num_steps:
        p.error(f"--num-calib-steps {args.num_calib_steps} is more than --num-steps {args.num_steps}")
    if args.out:
        data.check_output(args.out, [args.ckpt])

    import sample
    model = sample.load_model(args.ckpt, args.device)
    if model.config.ternary:
        raise ValueError("ptq.py quantizes a full-precision model; this checkpoint is ternary "
                         "(train the full-precision twin with train.py --fp)")
    t0 = time.time()
    calib = calibration_set(model, args.num_calib, args.cfg_scale, args.num_steps, args.num_calib_steps,
                            args.sampler, args.calib_seed, args.device)
    stats = channel_stats(model, calib, 2 * args.batch_size)
    rho = quantize(model, stats, args.wbits, args.abits, args.method)
    calib_seconds = round(time.time() - t0, 1)
    print(f"{args.method} W{args.wbits}A{args.abits}: {len(stats)} layers "
          f"calibrated on {len(calib)} timesteps x {args.num_calib} images in {calib_seconds} s")
    result = dict(ckpt=args.ckpt, method=args.method, wbits=args.wbits, abits=args.abits,
                  num_calib=args.num_calib, num_calib_steps=args.num_calib_steps, calib_seed=args.calib_seed,
                  calib_seconds=calib_seconds, weight_bytes=weight_bytes(model, args.wbits),
                  mean_rho=(sum(sum(r) / len(r) for r in rho.values()) / len(rho)) if rho else None)

    t0 = time.time()
    compile = args.compile if args.compile is not None else torch.device(args.device).type == "cuda"
    x, y = evaluate.generate(model, args.num_samples, args.cfg_scale, args.num_steps, args.sampler, args.batch_size,
                             args.seed, args.device, compile)
    result.update(num_samples=args.num_samples, cfg_scale=args.cfg_scale, num_steps=args.num_steps,
                  sampler=args.sampler, seed=args.seed, device=str(args.device),
                  sample_seconds=round(time.time() - t0, 1))
    result.update(evaluate.score(x, y, evaluate.load_classifier(), seed=args.seed))
    evaluate.print_score(result, "weight_bytes")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
