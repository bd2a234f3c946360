"""
Post-training quantization of the full-precision twin (train.py --fp) to W8A8 or W4A8, fake-quantized, beside
TerDiT's ternary QAT: a round-to-nearest (RTN) baseline and PTQ4DiT (Wu et al., arXiv 2405.16005, NeurIPS 2024):
Channel-wise Salience Balancing (CSB) with Spearman's ρ-guided Salience Calibration (SSC). Checked against the
authors' code, github.com/adreamwu/PTQ4DiT (files named below; "their" = that repository).

    python ptq.py --ckpt out/fp/ckpt.pt --wbits 4 --abits 8 --quant ptq4dit --num-calib 8 --num-calib-steps 25 \
        --num-samples 1000 --cfg-scale 1.5 --num-steps 50 --method ddim --seed 0 --out results/ptq_w4a8_ptq4dit.json

--quant picks the quantizer (rtn or ptq4dit); --method, as in sample.py and evaluate.py, the sampler (ddpm, ddim).

Which layers: the ones TerDiT makes ternary, i.e. every block's attention wq, wk, wv, wo, SwiGLU w1, w2, w3 and
adaLN linear, so that the table compares like with like. (Their QuantModel, quant/quant_model.py, wraps every
nn.Linear/Conv of DiT, the patch embedder, timestep MLP and final layer included, and also quantizes the
attention matmuls' inputs q, k, v and softmax (--sm_abit); here those stay full precision, as in TerDiT.)

Quantizers (their quant/quant_layer.py, UniformAffineQuantizer; fake: values on the grid, arithmetic in float):
  both     asymmetric: Δ = (hi - lo) / (2^b - 1), z = round(-lo / Δ), X̂ = Δ · (clamp(round(X / Δ) + z, 0, 2^b - 1) - z)
  weights  per output channel (quant_sample.py: channel_wise=True, symmetric not set, so asymmetric)
  acts     per tensor, static; the range of each layer's input is set by one forward pass of the whole
           calibration set through the model quantized so far (upstream layers already quantized), as their
           quantizers initialise themselves on the first quantized forward pass (quant_sample.py)
  ranges   ptq4dit: their scale_method 'mse': of the percentile ranges [q(1-p), q(p)], p in 0.999, 0.9999,
           0.99999, the one with the least squared error (per row for weights, per tensor for activations);
           rtn: min and max (their 'max', which quant_sample.py uses for --resume), widened to hold 0

Calibration set (their get_calibration_set.py and quant/utils.py get_train_samples): the FP model's own
sampler (the evaluation's sampler, steps and CFG; another seed, theirs is 1 too) is run on --num-calib images,
and its inputs (x_t, t, y), the null-label half of the CFG batch included, are kept at the sampling steps
0, k, 2k, ... (k = num_steps // num_calib_steps, the first num_calib_steps of them). Theirs keeps 4 rows per
timestep (2 images, each with its null twin, n_per_t = 4 in quant_sample.py) for CSB, SSC and the ranges;
here all rows of --num-calib images (default 8: 16 rows a timestep, 400 in all), in one forward pass.

CSB (paper Sec. 4.1; their models.py, Attention.forward and Mlp.forward): for a linear layer XW, per input
channel j, s(W_j) = max over output channels |W_ij| and s(X_j) = max over tokens |X_j|; the balance
b_j = (s(X_j) / (s(W_j) + 1e-8))^½ divides the input and multiplies the weight's column, X W = (X / b)(W b)ᵀ,
so both saliences meet at their geometric mean (s(X_j) s(W_j))^½. Like theirs, b is not folded into the layer
before (their README lists that re-parameterisation as not released): it is an explicit per-channel scale.
Balanced, as theirs: the attention input (their fused qkv; here wq, wk, wv share one b from the max over all
three weights), the attention output projection (proj; here wo) and the MLP input (fc1; here SwiGLU's w1 and
w3 share one b). Not balanced, as theirs: the MLP's second layer (fc2; here w2) and the adaLN linear.

SSC (paper Sec. 4.2; their models.py): s(X) is not one max over the calibration set but a weighted sum of
per-sample saliences: for every calibration row r (one image at one timestep, max over its tokens),
ρ_r = Spearman's ρ between s(X^(r)) and s(W) over the channels (scipy.stats.spearmanr in theirs; here the
Pearson correlation of ranks, ties broken by order), η = softmax(-ρ) over the rows, s(X_j) = Σ_r η_r s(X_j^(r)):
rows whose activation salience runs against the weight salience (complementary) weigh most.

Not implemented: block-wise reconstruction (their --recon: AdaRound on the weights' rounding and learned
activation step sizes, block by block over the calibration set, 20000 iterations a block by default,
quant/block_recon.py); attention-matmul and embedder/final-layer quantization (above); integer kernels (this is
fake quantization: it measures quality, not speed or memory). Under CUDA's bf16 autocast the grid values are
rounded once more to bf16, as the FP twin's weights are.
"""

import argparse
import json
import time

import cli  # before torch: a Ctrl-C while the imports below load ends in one line (cli.py)

import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import sample

BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.1")
# CSB's groups in a block: the layers of a group read the same input and share one balance (their fused qkv, proj
# and fc1, models.py); w2 (their fc2) and the adaLN linear are not balanced
CSB_GROUPS = (("attention.wq", "attention.wk", "attention.wv"), ("attention.wo",), ("feed_forward.w1", "feed_forward.w3"))
PERCENTILES = (0.999, 0.9999, 0.99999)  # their UniformAffineQuantizer's 'mse' search (quant/quant_layer.py)


def target_layers(model):
    """{name: linear} of the layers TerDiT makes ternary: the 8 linear layers of every block."""
    return {f"layers.{i}.{n}": block.get_submodule(n) for i, block in enumerate(model.layers) for n in BLOCK_LINEARS}


# ------------------------------ Quantizers ------------------------------

def qparams(lo, hi, bits):
    """Step Δ and zero point z of the asymmetric grid over [lo, hi] (tensors broadcast; their init_quantization_scale,
    Δ at least 1e-8 as theirs, so an all-zero row stays zero)."""
    delta = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-8)
    return delta, (-lo / delta).round()


def fake_quant(x, delta, z, bits):
    """X̂ = Δ · (clamp(round(X / Δ) + z, 0, 2^b - 1) - z)."""
    return ((x / delta).round() + z).clamp(0, 2 ** bits - 1).sub(z) * delta


def quantile(x, q):
    """torch.quantile(x, q, dim=-1) (linear interpolation) from the tail that holds it (topk): no full sort and
    no 16M-element limit."""
    n = x.shape[-1]
    pos = q * (n - 1)
    i = int(pos)
    j = min(i + 1, n - 1)
    if q >= 0.5:  # the n - i largest, descending: sorted[k] = top[n - 1 - k]
        top = x.topk(n - i, -1).values
        a, b = top[..., n - 1 - i], top[..., n - 1 - j]
    else:         # the j + 1 smallest, ascending
        bottom = x.topk(j + 1, -1, largest=False).values
        a, b = bottom[..., i], bottom[..., j]
    return a + (pos - i) * (b - a)


def search_range(x, bits, ranges):
    """(lo, hi) along the last axis of x: 'max' the min and max, widened to hold 0; 'mse' the percentile range of
    least squared quantization error (their scale_method 'mse')."""
    if ranges == "max":
        return x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    best = None
    for p in PERCENTILES:
        lo, hi = quantile(x, 1 - p), quantile(x, p)
        err = (fake_quant(x, *qparams(lo[..., None], hi[..., None], bits), bits) - x).square().mean(-1)
        if best is None:
            best = (err, lo, hi)
        else:
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, lo, best[1]), torch.where(better, hi, best[2]))
    return best[1], best[2]


def quantize_weight(w, bits, ranges="max"):
    """Per output channel (row), asymmetric: every row on its own grid."""
    lo, hi = search_range(w, bits, ranges)
    return fake_quant(w, *qparams(lo[:, None], hi[:, None], bits), bits)


class QuantLinear(nn.Module):
    """y = Q_a(x / b) · Q_w(W · b)ᵀ + bias: a linear layer with fake-quantized weights (once, here) and input
    activations. b: CSB's per-input-channel balance, or None. The activation grid is set from the first input this
    layer sees (the calibration pass); bits None: that side stays full precision (what the tests use to check that
    CSB alone changes nothing)."""

    def __init__(self, linear, wbits, abits, balance=None, ranges="max"):
        super().__init__()
        w = linear.weight.detach().double()
        if balance is not None:
            w = w * balance.double()  # W' = W · diag(b), column j times b_j
        w = quantize_weight(w, wbits, ranges) if wbits else w
        self.register_buffer("weight", w.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("balance", balance)  # shared by the layers of a CSB group
        self.wbits, self.abits, self.ranges = wbits, abits, ranges
        self.act = None  # (Δ, z) as floats once calibrated

    def forward(self, x):
        xq = x.double() if x.dtype == torch.float64 else x.float()  # quantize in float32 (float64 in tests)
        if self.balance is not None:
            xq = xq / self.balance.to(xq.dtype)  # X' = X / b
        if self.abits:
            if self.act is None:  # calibration: the whole calibration set's input to this layer, one tensor
                lo, hi = search_range(xq.flatten()[None], self.abits, self.ranges)
                self.act = tuple(float(v) for v in qparams(lo, hi, self.abits))
            xq = fake_quant(xq, *self.act, self.abits)
        return F.linear(xq.to(x.dtype), self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, wbits={self.wbits}, abits={self.abits}, " \
               f"ranges={self.ranges}, csb={self.balance is not None}"


# ------------------------------ Calibration ------------------------------

def calib_steps(num_steps, num_calib_steps):
    """The sampling steps kept: 0, k, 2k, ... with k = num_steps // num_calib_steps, the first num_calib_steps
    (their get_train_samples and quant_sample.py)."""
    return list(range(0, num_steps, num_steps // num_calib_steps))[:num_calib_steps]


@torch.no_grad()
def calibration_set(model, n, cfg_scale, num_steps, num_calib_steps, method, seed, device):
    """[(x_t, t, y)] that the FP model's own sampler feeds it at calib_steps() of its num_steps: their
    get_calibration_set.py. With guidance the batch is doubled (class, then null labels), as the model sees it."""
    keep = set(calib_steps(num_steps, num_calib_steps))
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

    y = torch.arange(n, device=device) % model.config.num_classes
    sample.generate(model, y, cfg_scale, num_steps, method, torch.Generator(device).manual_seed(seed), Recorder())
    return [r for r in recorded if r is not None]


@torch.no_grad()
def sample_salience(model, calib, names, batch_size):
    """{layer name: (R, C_in)}: for every calibration row (an image at a timestep), the max over its tokens of
    |input| per channel (their x.abs().max(1)), from forward pre-hooks on the FP model."""
    layers, out, hooks = target_layers(model), {n: [] for n in names}, []
    for name in names:
        hooks.append(layers[name].register_forward_pre_hook(
            lambda mod, inp, name=name: out[name].append(inp[0].detach().abs().float().flatten(1, -2).amax(1).cpu())))
    try:
        for x, t, y in calib:
            for xb, tb, yb in zip(x.split(batch_size), t.split(batch_size), y.split(batch_size)):
                model(xb, tb, yb)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in out.items()}


# ------------------------------ CSB and SSC ------------------------------

def spearman(a, b):
    """Spearman's ρ of two vectors: the Pearson correlation of their ranks (ties broken by order, not averaged as
    scipy's; salience values are continuous, so ties are rare)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum().item() / max((ra.square().sum() * rb.square().sum()).sqrt().item(), 1e-300)


def ssc_weights(rho):
    """η = softmax(-ρ) (their tau_softmax, models.py; the paper's Eq. 8): the less activation and weight salience
    agree in a row, the more it weighs."""
    return torch.softmax(-torch.as_tensor(rho, dtype=torch.float64), 0)


def ssc_salience(sx_r, sw):
    """SSC: the activation salience (C_in,) that CSB balances, from per-row saliences sx_r (R, C_in) and the weight
    salience sw (C_in,): ρ_r, η = softmax(-ρ), s(X_j) = Σ_r η_r s(X_j^(r)). Also the ρ_r."""
    rho = [spearman(s, sw) for s in sx_r]
    return (ssc_weights(rho)[:, None] * sx_r.double()).sum(0), rho


def balance(act_salience, weight_salience):
    """CSB's b_j = (s(X_j) / (s(W_j) + 1e-8))^½ (their models.py; the paper's Eqs. 4-5): X / b and W · b both
    have salience ≈ (s(X_j) s(W_j))^½. A channel never active (s(X_j) = 0, where theirs would divide by 0) is left
    alone (b = 1)."""
    sx, sw = act_salience.double(), weight_salience.double()
    return torch.where(sx > 0, (sx / (sw + 1e-8)).sqrt(), 1.0)


@torch.no_grad()
def quantize(model, calib, wbits, abits, quant, batch_size=1000):
    """Replace the target layers of model by QuantLinear, in place, and calibrate their activation grids on calib.
    quant: rtn (min/max ranges, no balancing) or ptq4dit (CSB with SSC, percentile-MSE ranges). Returns
    {group leader: ρ_r list} for ptq4dit (what SSC saw), else {}."""
    if quant not in ("rtn", "ptq4dit"):
        raise ValueError(f"unknown quantizer '{quant}': use rtn or ptq4dit")
    layers, balances, report = target_layers(model), {}, {}
    if quant == "ptq4dit":
        groups = [[f"layers.{i}.{n}" for n in g] for i in range(len(model.layers)) for g in CSB_GROUPS]
        sx_r = sample_salience(model, calib, [g[0] for g in groups], batch_size)
        for g in groups:
            sw = torch.cat([layers[n].weight.detach() for n in g]).abs().amax(0).double().cpu()  # max over outputs
            sx, report[g[0]] = ssc_salience(sx_r[g[0]], sw)
            b = balance(sx, sw).to(layers[g[0]].weight)  # one tensor for the group
            balances.update((n, b) for n in g)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(layer, wbits, abits, balances.get(name),
                                                                "mse" if quant == "ptq4dit" else "max"))
    if abits:  # one forward pass of the whole calibration set: each layer's activation grid, in order
        model(*(torch.cat(v) for v in zip(*calib)))
    return report


def weight_bytes(model, wbits):
    """Deployed size of the weights: quantized layers at wbits plus an fp32 step and an 8-bit zero point per output
    channel (and CSB's fp32 balance per input channel, once per group); every other parameter at 4 bytes."""
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight.numel() * wbits / 8 + 5 * m.weight.shape[0]
            total += 0 if m.bias is None else 4 * m.bias.numel()
            if m.balance is not None and m.balance.data_ptr() not in seen:
                seen.add(m.balance.data_ptr())
                total += 4 * m.balance.numel()
        else:
            total += 4 * sum(p.numel() for p in m.parameters(recurse=False))
    return int(total)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    positive = cli.number(int, 1, what="a positive integer")
    p.add_argument("--ckpt", required=True, help="full-precision training checkpoint (train.py --fp)")
    p.add_argument("--wbits", type=cli.number(int, 2, 8, what="an integer in 2..8"), default=8, help="weight bits")
    p.add_argument("--abits", type=cli.number(int, 2, 16, what="an integer in 2..16"), default=8,
                   help="activation bits")
    p.add_argument("--quant", default="ptq4dit", choices=["rtn", "ptq4dit"],
                   help="rtn: round-to-nearest on min/max ranges; ptq4dit: CSB with SSC, percentile-MSE ranges")
    p.add_argument("--num-calib", type=positive, default=8,
                   help="images in the calibration trajectories (each also with its null label: 2 rows a timestep)")
    p.add_argument("--num-calib-steps", type=positive, default=25,
                   help="sampling steps kept from each trajectory: 0, k, 2k, ... with k = num_steps // this "
                        "(at most --num-steps)")
    p.add_argument("--calib-seed", type=cli.SEED, default=1, help="seed of the calibration trajectories (not "
                   "--seed: calibrating on the evaluation's own noise would flatter)")
    p.add_argument("--num-samples", type=positive, default=1000, help="images to generate for the score")
    p.add_argument("--cfg-scale", type=cli.number(float, 0, what="a finite number >= 0"), default=1.5,
                   help="guidance scale, for calibration and evaluation (evaluate.py's default)")
    p.add_argument("--num-steps", type=cli.number(int, 1, 1000, what="an integer in 1..1000"), default=100,
                   help="sampling steps, for calibration and evaluation")
    p.add_argument("--method", default="ddim", choices=["ddpm", "ddim"], help="sampler, for calibration and evaluation")
    p.add_argument("--batch-size", type=positive, default=500, help="images sampled at once")
    p.add_argument("--seed", type=cli.SEED, default=0, help="evaluation seed (as evaluate.py's --seed)")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="regional torch.compile before sampling (None: on with CUDA, off on a CPU)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.num_calib_steps > args.num_steps:
        p.error(f"--num-calib-steps {args.num_calib_steps} is more than --num-steps {args.num_steps}")
    if args.out:
        cli.check_output(args.out, [args.ckpt])

    model = sample.load_model(args.ckpt, args.device)
    if model.config.ternary:
        raise ValueError("ptq.py quantizes a full-precision model; this checkpoint is ternary "
                         "(train the full-precision twin with train.py --fp)")
    t0 = time.time()
    calib = calibration_set(model, args.num_calib, args.cfg_scale, args.num_steps, args.num_calib_steps,
                            args.method, args.calib_seed, args.device)
    rho = quantize(model, calib, args.wbits, args.abits, args.quant, 2 * args.batch_size)
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    calib_seconds = round(time.time() - t0, 1)
    print(f"{args.quant} W{args.wbits}A{args.abits}: {len(target_layers(model))} layers calibrated on "
          f"{len(calib)} timesteps x {2 * args.num_calib} rows in {calib_seconds} s")
    result = dict(ckpt=args.ckpt, quant=args.quant, wbits=args.wbits, abits=args.abits,
                  num_calib=args.num_calib, num_calib_steps=args.num_calib_steps, calib_seed=args.calib_seed,
                  calib_seconds=calib_seconds, weight_bytes=weight_bytes(model, args.wbits),
                  mean_rho=(sum(sum(r) / len(r) for r in rho.values()) / len(rho)) if rho else None)

    t0 = time.time()
    x, y = evaluate.generate(model, args.num_samples, args.cfg_scale, args.num_steps, args.method, args.batch_size,
                             args.seed, args.device, args.compile)
    result.update(num_samples=args.num_samples, cfg_scale=args.cfg_scale, num_steps=args.num_steps,
                  method=args.method, seed=args.seed, device=str(args.device),
                  sample_seconds=round(time.time() - t0, 1))
    result.update(evaluate.score(x, y, evaluate.load_classifier(), seed=args.seed))
    evaluate.print_score(result, "weight_bytes")
    if args.out:
        with cli.atomic_write(args.out) as f:
            f.write(json.dumps(result, indent=1).encode())
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    cli.run(main)
