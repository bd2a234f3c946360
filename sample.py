"""
Sample a grid of class-conditional images from a TerDiT checkpoint, with classifier-free guidance.

    python sample.py                                   # the shipped demo (packed 2-bit ternary model), on CPU
    python sample.py --ckpt out/ckpt.pt                # a train.py checkpoint (its EMA weights)
    python sample.py --ckpt out/model.tdit --device cuda   # a pack.py file, through the fused 2-bit kernel

The model is rebuilt from the config stored in the checkpoint, so no size flags are needed. On a GPU the packed
model runs each denoising step as one CUDA graph replay (the 2-bit kernels are launch-bound at small batch).

--compile adds regional torch.compile (TerDiT.compile_blocks: one block compiled, reused by all): faster steps,
but the compile takes longer than a one-off grid of 50 steps saves, so sample.py does not compile unless asked
(evaluate.py, which samples thousands of steps, compiles by default on CUDA). Nothing compiles on a CPU unless
asked. Compiled code and CUDA graphs compose: the compiled forward is captured into the step's graph as is.
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
import pack
from diffusion import Diffusion
from model import TerDiT, TerDiTConfig

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo.tdit")


def load_model(path, device):
    """A TerDiT in eval mode from a pack.py file or a train.py checkpoint (EMA weights when present)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist: pass --ckpt a train.py .pt or a pack.py file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"'{path}' is empty (0 bytes): pass --ckpt a train.py .pt or a pack.py file")
    if pack.is_packed(path):
        return pack.load_packed(path, device)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own text here is about pickling and weights_only, not about the file
        raise ValueError(f"'{path}' cannot be read as a torch checkpoint (truncated, corrupt or another format): "
                         f"pass --ckpt a train.py .pt or a pack.py file") from None
    try:
        model = TerDiT(TerDiTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"'{path}' is not a TerDiT checkpoint (train.py .pt or pack.py file): "
                         f"{type(e).__name__} {reason}".rstrip()) from None
    return model.to(device).eval()


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
    that step's graph. Call it inside the sampler's autocast context: autocast is part of what compiled code
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample a grid of class-conditional images from a TerDiT checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=DEMO, help="train.py checkpoint or pack.py file; the default is the shipped demo")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class labels, one image each (None: one of each class, up to 10)")
    p.add_argument("--cfg-scale", type=data.number(float, 0, what="a finite number >= 0"), default=4.0,
                   help="classifier-free guidance scale (reference: 4.0; 1 = off)")
    p.add_argument("--num-steps", type=data.number(int, 1, what="a positive integer"), default=50,
                   help="sampling steps (the reference: 250, with --method ddpm)")
    p.add_argument("--method", default="ddim", choices=["ddpm", "ddim"], help="sampler (DDIM needs fewer steps; the reference: ddpm)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same image)")
    p.add_argument("--vae", default=None, help="local AutoencoderKL folder to decode latents (needed for models trained with --vae)")
    p.add_argument("--device", type=data.device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="regional torch.compile first (pays off over long runs, not for one grid)")
    p.add_argument("--out", default="sample.png", help="output PNG")
    args = p.parse_args(argv)

    data.check_output(args.out, [args.ckpt])
    device = args.device
    model = load_model(args.ckpt, device)
    cfg = model.config
    classes = args.classes if args.classes is not None else list(range(min(cfg.num_classes, 10)))
    if any(not 0 <= c < cfg.num_classes for c in classes):
        raise ValueError(f"--classes must be in 0..{cfg.num_classes - 1} for this model")
    latent = cfg.in_channels == 4
    if latent and not args.vae:
        raise ValueError("this model works on VAE latents: pass --vae the AutoencoderKL folder it was trained with")
    vae = data.VAE(args.vae, device) if latent else None

    y = torch.tensor(classes, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        runner = CUDAGraphed(model) if device.type == "cuda" else model
        if args.compile:
            print(f"compiled in {compile_model(runner, model, len(classes), args.cfg_scale):.1f} s")
        x = Diffusion().sample(runner, y, (cfg.in_channels, cfg.input_size, cfg.input_size), args.cfg_scale,
                               args.num_steps, args.method, clip_denoised=not latent,
                               generator=torch.Generator(device=device).manual_seed(args.seed), progress=True)
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
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
