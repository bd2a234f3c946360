"""
Sample a grid of class-conditional images from a TerDiT checkpoint, with classifier-free guidance; and the one
function that runs the sampler (generate), for train.py's grids, sample_ddp.py's FID samples, evaluate.py, ptq.py
and bench.py.

    python sample.py                                   # the shipped demo (packed 2-bit ternary model), on CPU
    python sample.py --ckpt out/ckpt.pt                # a train.py checkpoint (its EMA weights)
    python sample.py --ckpt out/model.tdit --device cuda   # a pack.py file, through the fused 2-bit kernel
    python sample.py --ckpt out/model.tdit --device cuda --act fp8   # its matmuls with fp8 activations (W1.58A8)
    python sample.py --ckpt checkpoints/3B_1180000 --vae /models/sd-vae-ft-ema --classes 89 475 --device cuda
                                                       # an official TerDiT checkpoint folder (Hugging Face
                                                       # lucky-lance/TerDiT); --classes are ImageNet class indices

For FID: sample_ddp.py writes tens of thousands of samples over many GPUs, with the same model flags.

The model is rebuilt from the config stored in the checkpoint, so no size flags are needed. On a GPU the packed
model runs each denoising step as one CUDA graph replay (the 2-bit kernels are launch-bound at small batch).

--compile adds regional torch.compile (TerDiT.compile_blocks: one block compiled, reused by all): faster steps,
but the compile takes longer than a one-off grid of 50 steps saves, so sample.py does not compile unless asked
(evaluate.py, which samples thousands of steps, compiles by default on CUDA). Nothing compiles on a CPU unless
asked. Compiled code and CUDA graphs compose: the compiled forward is captured into the step's graph as is.
"""

import argparse
import os
import time
from contextlib import nullcontext

import cli  # before torch: a Ctrl-C while the imports below load ends in one line (cli.py)

import torch
import torch.nn.functional as F

import data
import deploy
import official
import pack
from diffusion import Diffusion
from model import TerDiT, config_from_dict

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo.tdit")


def load_model(path, device, act="bf16"):
    """A TerDiT in eval mode from a pack.py file, a train.py checkpoint (EMA weights when present), or an official
    TerDiT checkpoint folder (official.read_reference). On a GPU a pack.py file loads as the deployed bf16 model
    (deploy.load_packed(..., dtype=torch.bfloat16), run without autocast); everything else loads in float32, to
    run under bf16 autocast on a GPU (inference_context): an unpacked ternary layer recomputes its trits from
    float32 latent weights (quant.ternarize), which bf16 weights would change. act="fp8": a pack.py file's
    token-wise ternary matmuls take fp8 activations (deploy.set_act); for any other checkpoint, a ValueError."""
    if act == "fp8" and os.path.exists(path) and not (os.path.isfile(path) and pack.is_packed(path)):
        raise ValueError(f"fp8 activations (--act fp8) need a packed model and '{path}' is not one: make one with "
                         f"`python pack.py --ckpt {path} --out model.tdit`, then pass --ckpt model.tdit")
    if os.path.isdir(path):
        return official.read_reference(path)[1].to(device)
    what = "pass --ckpt a train.py .pt, a pack.py file or an official TerDiT checkpoint folder"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist: {what}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"'{path}' is empty (0 bytes): {what}")
    if pack.is_packed(path):
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return deploy.load_packed(path, device, dtype, act)
    ckpt = cli.load_checkpoint(path, f"'{path}' cannot be read as a torch checkpoint (truncated, corrupt or another "
                                     f"format): {what}")
    try:
        model = TerDiT(config_from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"'{path}' is not a TerDiT checkpoint (train.py .pt or pack.py file): "
                         f"{type(e).__name__} {reason}".rstrip()) from None
    return model.to(device).eval()


def inference_context(model):
    """What to run the model under: bf16 autocast for a float32 model on a GPU; nothing on a CPU (float32), nor
    for a bf16 model, which computes in bf16 by itself without autocast's casts (load_model, on a GPU)."""
    p = next(model.parameters())
    if p.device.type == "cuda" and p.dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class CUDAGraphed:
    """Runs the model's forward pass as a replay of a captured CUDA graph (one per input shape): one launch per
    denoising step instead of hundreds of Python-side kernel launches. Same outputs as the model itself.

    A compiled model (default mode) is captured the same way: the warm-up call compiles, the capture records the
    compiled kernels. mode="reduce-overhead" would not compose: it captures CUDA graphs of its own, per compiled
    region, which cannot nest inside this capture, and the eager parts between the regions would stay launches."""

    def __init__(self, model):
        self.model, self.config, self.graphs = model, model.config, {}

    def _replay(self, fn, key, *args):
        if key not in self.graphs:
            static = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: compiles kernels, allocates workspaces
                fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(*static)
            self.graphs[key] = (static, graph, out)
        static, graph, out = self.graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out  # overwritten by the next replay: use it before calling again

    def __call__(self, x, t, y):
        return self._replay(self.model, ("eps", x.shape), x, t, y)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        return self._replay(lambda *a: self.model.forward_with_cfg(*a, cfg_scale), ("cfg", x.shape, cfg_scale), x, t, y)


def compile_model(runner, model, n, cfg_scale):
    """Regional torch.compile of the model, compiled now by one pass at the sampler's shapes (n images, CFG
    doubling the batch) rather than in the first step; through runner, so a CUDAGraphed runner also captures
    that step's graph. Call it inside the sampler's inference_context: autocast is part of what compiled code
    is specialised to. Returns the seconds it took."""
    cfg, device = model.config, next(model.parameters()).device
    batch = 2 * n if cfg_scale != 1.0 else n
    x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    t, y = torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    model.compile_blocks()
    t0 = time.perf_counter()
    with torch.no_grad():  # as the sampler: grad mode is part of what compiled code is specialised to, too
        runner.forward_with_cfg(x, t, y, cfg_scale) if cfg_scale != 1.0 else runner(x, t, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def generate(model, y, cfg_scale=4.0, num_steps=50, method="ddim", generator=None, runner=None, progress=False):
    """Samples (N, C, H, W) of model for the class labels y (N,): diffusion.Diffusion().sample at the model's
    shape, with cfg_scale (1: no guidance), num_steps of method (ddpm or ddim), the starting noise and DDPM's
    noise drawn from generator. Pixel models' x0 predictions are clipped to [-1, 1] at every step, latents' are
    not (as DiT). runner: what the sampler calls in the model's place (a CUDAGraphed model, a recorder); it has
    the model's __call__ and forward_with_cfg. Run it inside inference_context(model)."""
    cfg = model.config
    return Diffusion().sample(runner or model, y, (cfg.in_channels, cfg.input_size, cfg.input_size), cfg_scale,
                              num_steps, method, clip_denoised=cfg.in_channels != 4, generator=generator,
                              progress=progress)


def add_model_args(p, cfg_scale, num_steps, method):
    """The flags that pick the model and the sampler, shared with sample_ddp.py (defaults differ: a grid vs FID)."""
    p.add_argument("--cfg-scale", type=cli.number(float, 0, what="a finite number >= 0"), default=cfg_scale,
                   help="classifier-free guidance scale (reference: 4.0; paper's FIDs: 1.5; 1 = off)")
    p.add_argument("--num-steps", type=cli.number(int, 1, what="a positive integer"), default=num_steps,
                   help="sampling steps (the reference: 250, with --method ddpm)")
    p.add_argument("--method", default=method, choices=["ddpm", "ddim"],
                   help="sampler (DDIM needs fewer steps; the reference: ddpm)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="random seed (same seed, same images)")
    p.add_argument("--reference-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="guide only the first 3 channels, as DiT and the reference (default: as the checkpoint says; "
                        "on for official checkpoints, off for ours)")
    p.add_argument("--vae", default=None, help="local AutoencoderKL folder to decode latents (needed for models trained with --vae)")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (under torchrun: each rank's GPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="regional torch.compile first (pays off over long runs, not for one grid)")
    p.add_argument("--act", default="bf16", choices=["bf16", "fp8"],
                   help="activations of a packed model's ternary matmuls: bf16, or fp8 (e4m3 per token, one scale "
                        "each; fused kernels on Hopper GPUs, emulated elsewhere)")


def load(args, device):
    """(model, VAE or None) for the flags of add_model_args; the VAE decodes the samples of a latent model."""
    model = load_model(args.ckpt, device, args.act)
    if args.reference_cfg is not None:
        model.config.reference_cfg = args.reference_cfg
    if model.config.in_channels == 4 and not args.vae:
        raise ValueError("this model works on VAE latents: pass --vae the AutoencoderKL folder it was trained with")
    if model.config.in_channels != 4 and args.vae:
        raise ValueError(f"--vae is for models of VAE latents, and this one makes {model.config.in_channels}-channel "
                         f"images itself: leave --vae out")
    return model, (data.VAE(args.vae, device) if model.config.in_channels == 4 else None)


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample a grid of class-conditional images from a TerDiT checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=DEMO, help="train.py checkpoint, pack.py file or official TerDiT checkpoint folder; the default is the shipped demo")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class labels, one image each (None: one of each class, up to 10)")
    add_model_args(p, cfg_scale=4.0, num_steps=50, method="ddim")
    p.add_argument("--out", default="sample.png", help="output PNG")
    args = p.parse_args(argv)

    if int(os.environ.get("RANK", -1)) != -1:
        raise ValueError("torchrun is for sample_ddp.py (FID samples); sample a grid with plain python")
    cli.check_output(args.out, [args.ckpt])
    model, vae = load(args, args.device)
    classes = args.classes if args.classes is not None else list(range(min(model.config.num_classes, 10)))
    if any(not 0 <= c < model.config.num_classes for c in classes):
        raise ValueError(f"--classes must be in 0..{model.config.num_classes - 1} for this model")

    y = torch.tensor(classes, device=args.device)
    with inference_context(model):
        runner = CUDAGraphed(model) if args.device.type == "cuda" else model
        if args.compile:
            print(f"compiled in {compile_model(runner, model, len(classes), args.cfg_scale):.1f} s")
        x = generate(model, y, args.cfg_scale, args.num_steps, args.method,
                     torch.Generator(device=args.device).manual_seed(args.seed), runner, progress=True)
    x = vae.decode(x) if vae else x
    if not torch.isfinite(x).all():
        raise ValueError(f"the samples are not finite (NaN/inf) with --cfg-scale {args.cfg_scale}: nothing written; "
                         f"check the checkpoint (a diverged run?) or lower --cfg-scale")
    # small images (Fashion-MNIST is 32 px) upscaled by whole pixels to >= 128 px, rows of up to 10 (one per class)
    x = F.interpolate(x.float(), scale_factor=max(1, -(-128 // x.shape[-1])), mode="nearest")
    data.save_grid(x, args.out, nrow=min(len(classes), 10))
    print(f"wrote {args.out}: {len(classes)} images, cfg {args.cfg_scale}, {args.num_steps} {args.method} steps, "
          f"seed {args.seed}, from {args.ckpt}")


if __name__ == "__main__":
    cli.run(main)
