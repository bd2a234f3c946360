"""
Offline sample quality for the Fashion-MNIST runs: a small-scale proxy for the paper's FID, not ImageNet FID.

    python evaluate.py --train-classifier           # once: trains the feature net, writes assets/fmnist_classifier.pt
    python evaluate.py --ckpt out/ternary/ckpt.pt --num-samples 1000 --cfg-scale 1.5 --num-steps 100 --out results.json
    python evaluate.py --ckpt out/ternary/model.tdit --act fp8   # a pack.py file, fp8 activations in its matmuls
    python evaluate.py --ckpt out/fp/ckpt.pt --ptq  # round-to-nearest ternary PTQ of a full-precision model (Sec. 4)
    python evaluate.py --ckpt out/ternary/ckpt.pt --adaln-stats   # adaLN output magnitudes (Fig. 4)

FID compares Inception-v3 features of generated and real images. Here a small CNN trained on Fashion-MNIST
plays Inception's part, and we report:
  accuracy  - how often the classifier finds the class the sample was conditioned on (conditional fidelity)
  fd        - the Fréchet distance between its penultimate features of the samples and of the 2,000 test images
  floor_fd  - the same distance for an equal number of real *training* images: what a perfect generator scores
              at this sample size (FD is biased upwards for small N, so compare fd against floor_fd, not 0)
  real_acc  - the classifier's accuracy on real test images: the ceiling for `accuracy`
"""

import argparse
import functools
import json
import os
import time

import cli  # before torch: a Ctrl-C while the imports below load ends in one line (cli.py)

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import pack
import quant
import sample
from diffusion import Diffusion
from model import TerDiT

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "fmnist_classifier.pt")


# ------------------------------ The feature network (Inception's stand-in) ------------------------------

class Classifier(nn.Module):
    """3 conv blocks (32 -> 16 -> 8 -> 4 px) + a 128-d feature layer + a linear head, for (N, 1, 32, 32) in [-1, 1]."""

    def __init__(self, width=16, feature_dim=128, num_classes=10):
        super().__init__()
        block = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                                nn.ReLU(), nn.MaxPool2d(2))
        self.convs = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x):  # the penultimate layer: what the Fréchet distance is computed on
        return self.fc(self.convs(x))

    def forward(self, x):
        return self.head(self.features(x))


@functools.lru_cache(maxsize=2)
def real_images(split):
    """The embedded split as (N, 1, 32, 32) tensors in [-1, 1] and labels: exactly what the DiT is trained on."""
    d = data.ArrayDataset(*data.load_embedded(split), image_size=32)
    return d.x, d.y


@torch.no_grad()
def run_classifier(clf, x, batch_size=500):
    """Logits (N, 10) and penultimate features (N, 128), float64 on the CPU."""
    device = next(clf.parameters()).device
    feats = torch.cat([clf.features(xb.to(device).float().clamp(-1, 1)) for xb in x.split(batch_size)])
    return clf.head(feats).double().cpu(), feats.double().cpu()


def train_classifier(epochs=5, batch_size=256, lr=2e-3, seed=0, path=ASSET):
    torch.manual_seed(seed)
    (x, y), (xt, yt) = real_images("train"), real_images("test")
    clf, t0 = Classifier().to(memory_format=torch.channels_last), time.time()  # channels_last: ~2x faster on CPU
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    for epoch in range(epochs):
        clf.train()
        perm = torch.randperm(len(x))
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size: (i + 1) * batch_size]
            xb = x[idx].contiguous(memory_format=torch.channels_last)
            xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(-1), xb)  # augmentation: random h-flips
            loss = F.cross_entropy(clf(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = (run_classifier(clf.eval(), xt)[0].argmax(1) == yt).float().mean().item()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
    info = dict(test_acc=acc, epochs=epochs, seed=seed, train_seconds=round(time.time() - t0, 1),
                width=16, feature_dim=128, image_size=32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with cli.atomic_write(path) as f:
        torch.save({"state_dict": clf.to(memory_format=torch.contiguous_format).state_dict(), "info": info}, f)
    print(f"saved {path} ({os.path.getsize(path) / 1e6:.2f} MB): test accuracy {acc:.4f}")
    return clf


def load_classifier(path=ASSET, device="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no classifier at '{path}': run `python evaluate.py --train-classifier` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    clf = Classifier(ckpt["info"]["width"], ckpt["info"]["feature_dim"])
    clf.load_state_dict(ckpt["state_dict"])
    return clf.to(device).eval()


# ------------------------------ Fréchet distance ------------------------------

def feature_stats(feats):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64 (unbiased, as numpy.cov)."""
    f = feats.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, s1, mu2, s2):
    """d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)   (Fréchet 1957; Heusel et al. 2017, FID).

    tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½): S1 S2 has the same eigenvalues as the symmetric PSD S1^½ S2 S1^½,
    so eigvalsh of the latter gives the trace without scipy.linalg.sqrtm (nor its complex round-off)."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    w, v = torch.linalg.eigh(s1)
    r1 = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^½, the symmetric square root
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean).item()


def feature_fd(f1, f2):
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ------------------------------ Post-training quantization and adaLN stats ------------------------------

@torch.no_grad()
def ptq_ternary(model):
    """Round-to-nearest ternary PTQ: every TernaryLinear's W becomes α·W̃, W̃ = ternarize(W) (Eq. 1), with the
    least-squares α = <W, W̃> / <W̃, W̃> (the best per-tensor scale RTN can have). Biases stay full precision,
    as in TerDiT; the embedders and the final layer (plain nn.Linear) are left alone."""
    if model.config.ternary:  # a QAT-trained or packed model: nothing left to quantize
        raise ValueError("ptq_ternary needs a full-precision checkpoint (train.py --fp); this one is already ternary")
    for m in model.modules():
        if isinstance(m, quant.TernaryLinear):
            w = m.weight.double()
            wt = quant.ternarize(w)[0]
            alpha = (w * wt).sum() / (wt * wt).sum().clamp(min=1e-12)
            m.weight.copy_((alpha * wt).to(m.weight.dtype))
    return model


def _stats(v):
    v = v.detach().double().abs()
    return dict(mean_abs=v.mean().item(), max_abs=v.max().item(), rms=v.square().mean().sqrt().item())


@torch.no_grad()
def adaln_stats(model, x0, y, timesteps=(50, 250, 500, 750, 950), seed=0):
    """Magnitudes of each block's adaLN linear output and of its RMSNorm output (None when trained without it),
    over a forward pass at each timestep, via forward hooks. (adaLN sees only c = t_emb + y_emb, not the image.)"""
    diff, g = Diffusion(), torch.Generator(x0.device).manual_seed(seed)
    rows, current, hooks = [], {}, []
    fused = getattr(model, "fused_adaln", None)  # a packed model's fused adaLN (deploy.py) would bypass the hooks:
    if fused is not None:                       # without it every block computes its own through adaLN_modulation
        model.fused_adaln = None
    for i, block in enumerate(model.layers):
        for stage, k in (("linear", 1), ("norm", 2)):
            if not isinstance(block.adaLN_modulation[k], nn.Identity):
                hook = lambda mod, inp, out, i=i, stage=stage: current.__setitem__((i, stage), _stats(out))
                hooks.append(block.adaLN_modulation[k].register_forward_hook(hook))
    try:
        for t in timesteps:
            tt = torch.full((len(x0),), t, device=x0.device)
            noise = torch.randn(x0.shape, generator=g, device=x0.device)
            current.clear()
            model(diff.q_sample(x0, tt, noise), tt, y)
            rows += [dict(t=t, block=i, linear=current[(i, "linear")], norm=current.get((i, "norm")))
                     for i in range(len(model.layers))]
    finally:
        for h in hooks:
            h.remove()
        if fused is not None:
            model.fused_adaln = fused
    return rows


def print_adaln_table(rows):
    print(f"{'block':>5} {'t':>4} | {'linear: mean|x|':>15} {'max|x|':>9} {'rms':>9} | "
          f"{'norm: mean|x|':>13} {'max|x|':>9} {'rms':>9}")
    for r in sorted(rows, key=lambda r: (r["block"], r["t"])):
        lin, nrm = r["linear"], r["norm"]
        left = f"{lin['mean_abs']:15.4g} {lin['max_abs']:9.4g} {lin['rms']:9.4g}"
        right = f"{nrm['mean_abs']:13.4g} {nrm['max_abs']:9.4g} {nrm['rms']:9.4g}" if nrm else "  (no RMSNorm)"
        print(f"{r['block']:5d} {r['t']:4d} | {left} | {right}")


# ------------------------------ Evaluation ------------------------------

@torch.no_grad()
def generate(model, n, cfg_scale, num_steps, method, batch_size, seed, device, compile=None):
    """n samples with balanced labels i % 10, as (n, 1, 32, 32) greyscale in [-1, 1] on the CPU; compile: regional
    torch.compile first (sample.compile_model; None: on with CUDA, off on a CPU)."""
    if compile is None:
        compile = torch.device(device).type == "cuda"
    g = torch.Generator(device).manual_seed(seed)
    y = torch.arange(n, device=device) % model.config.num_classes
    # as sample.py: bf16 (a packed model in bf16, else float32 under bf16 autocast), each step one CUDA graph replay
    runner = sample.CUDAGraphed(model) if torch.device(device).type == "cuda" else model
    with sample.inference_context(model):
        if compile:
            print(f"compiled in {sample.compile_model(runner, model, min(batch_size, n), cfg_scale):.1f} s")
        out = [sample.generate(model, yb, cfg_scale, num_steps, method, g, runner, progress=True).float().cpu()
               for yb in y.split(batch_size)]
    if (x := torch.cat(out)).shape[1] not in (1, 3):
        raise ValueError(f"evaluate.py scores pixel images; this model makes {x.shape[1]}-channel (latent?) samples")
    x = x.mean(1, keepdim=True)  # RGB -> grey; a no-op for 1 channel
    if x.shape[-1] != 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1), y.cpu()


def score(x, y, clf, seed=0):
    """All four numbers for generated images x (N, 1, 32, 32) in [-1, 1] and their intended labels y."""
    (xt, yt), (xr, _) = real_images("test"), real_images("train")
    logits, feats = run_classifier(clf, x)
    real_logits, real_feats = run_classifier(clf, xt)
    subset = torch.randperm(len(xr), generator=torch.Generator().manual_seed(seed))[: len(x)]
    per_class = [(logits.argmax(1)[y == c] == c).float().mean().item() for c in range(10)]
    return dict(accuracy=(logits.argmax(1) == y).float().mean().item(), fd=feature_fd(feats, real_feats),
                floor_fd=feature_fd(run_classifier(clf, xr[subset])[1], real_feats),
                real_acc=(real_logits.argmax(1) == yt).float().mean().item(), per_class_accuracy=per_class)


def print_score(result, size_key):
    """One line: the four numbers of score() and the model's size (ptq.py prints the same line)."""
    print(" ".join(f"{k}={result[k]:.4g}" for k in ("accuracy", "fd", "floor_fd", "real_acc")) +
          f" {size_key}={result[size_key]}")


def recipe(path):
    """What a train.py run added to training from scratch: "from scratch", or "warm start", "carried AdamW" and
    "teacher" (--init-from, --carry-adam, --teacher) joined by " + " (plot.py --study draws each recipe apart).
    None where the file does not say: a packed file, an official folder, a checkpoint without train.py's args."""
    if os.path.isdir(path) or pack.is_packed(path):
        return None
    args = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("args")  # mmap: no tensor read
    if args is None:
        return None
    parts = [name for name, flag in (("warm start", "init_from"), ("carried AdamW", "carry_adam"),
                                     ("teacher", "teacher")) if args.get(flag)]
    return " + ".join(parts) or "from scratch"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    positive = cli.number(int, 1, what="a positive integer")
    p.add_argument("--train-classifier", action="store_true", help="train and save assets/fmnist_classifier.pt")
    p.add_argument("--epochs", type=positive, default=5, help="classifier training epochs")
    p.add_argument("--ckpt", help="training checkpoint (.pt) or packed model (.tdit)")
    p.add_argument("--num-samples", type=positive, default=1000, help="images to generate (--adaln-stats: to feed, ≤ 64)")
    p.add_argument("--cfg-scale", type=cli.number(float, 0, what="a finite number >= 0"), default=1.5,
                   help="guidance scale (the paper's FID setting: 1.5)")
    p.add_argument("--num-steps", type=positive, default=100, help="sampling steps")
    p.add_argument("--method", default="ddim", choices=["ddpm", "ddim"], help="sampler")
    p.add_argument("--batch-size", type=positive, default=500, help="images sampled at once")
    p.add_argument("--seed", type=cli.SEED, default=0, help="random seed")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="regional torch.compile before sampling (None: on with CUDA, off on a CPU)")
    p.add_argument("--act", default="bf16", choices=["bf16", "fp8"],
                   help="activations of a packed model's ternary matmuls: bf16, or fp8 (e4m3 per token, one scale "
                        "each; fused kernels on Hopper GPUs, emulated elsewhere)")
    p.add_argument("--ptq", action="store_true", help="round-to-nearest ternary PTQ of a full-precision checkpoint")
    p.add_argument("--adaln-stats", action="store_true", help="report adaLN output magnitudes instead of sampling")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.out:
        cli.check_output(args.out, [args.ckpt] if args.ckpt else [])

    if args.train_classifier:
        train_classifier(epochs=args.epochs, seed=args.seed)
    if not args.ckpt:
        return None if args.train_classifier else p.error("pass --ckpt (or --train-classifier)")
    model = sample.load_model(args.ckpt, args.device, args.act)
    params = sum(p.numel() for p in TerDiT(model.config, device="meta").parameters())  # packed or not
    result = dict(ckpt=args.ckpt, ckpt_bytes=os.path.getsize(args.ckpt), ternary=model.config.ternary, ptq=args.ptq,
                  act=args.act, params=params, recipe=recipe(args.ckpt))
    if args.ptq:
        ptq_ternary(model)
    if args.adaln_stats:
        xt, yt = real_images("test")
        cfg = model.config
        n = min(args.num_samples, 64)
        x0 = (xt[:n].expand(-1, cfg.in_channels, -1, -1) if cfg.input_size == 32 and cfg.in_channels in (1, 3)
              else torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size)).to(args.device)
        result["adaln_stats"] = adaln_stats(model, x0, yt[:n].to(args.device), seed=args.seed)
        result["adaln_norm"] = cfg.adaln_norm
        print_adaln_table(result["adaln_stats"])
    else:
        t0 = time.time()
        x, y = generate(model, args.num_samples, args.cfg_scale, args.num_steps, args.method, args.batch_size,
                        args.seed, args.device, args.compile)
        keys = ("num_samples", "cfg_scale", "num_steps", "method", "seed")
        result.update({k: getattr(args, k) for k in keys}, device=str(args.device),
                      sample_seconds=round(time.time() - t0, 1))
        result.update(score(x, y, load_classifier(), seed=args.seed))
        print_score(result, "ckpt_bytes")
    if args.out:
        with cli.atomic_write(args.out) as f:
            f.write(json.dumps(result, indent=1).encode())
        print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
