"""
Sample a grid of class-conditional images from a TerDiT checkpoint, with classifier-free guidance.

    python sample.py                                   # the shipped demo (packed 2-bit ternary model), on CPU
    python sample.py --ckpt out/ckpt.pt                # a train.py checkpoint (its EMA weights)
    python sample.py --ckpt out/model.tdit --device cuda   # a pack.py file, through the fused 2-bit kernel
    python sample.py --ckpt out/model.tdit --device cuda --act fp8   # its matmuls with fp8 activations (W1.58A8)
    python sample.py --ckpt checkpoints/3B_1180000 --vae /models/sd-vae-ft-ema --classes 89 475 --device cuda
                                                       # an official TerDiT checkpoint folder (Hugging Face
                                                       # lucky-lance/TerDiT); --classes are ImageNet class indices

FID samples, the paper's settings (cfg 1.5, 250 DDPM steps), spread over 8 GPUs, into the .npz that the ADM
evaluation suite (openai/guided-diffusion evaluations/evaluator.py) reads, as DiT's sample_ddp.py writes it:
    torchrun --nproc_per_node=8 sample.py --ckpt out/600M/model.tdit --vae /models/sd-vae-ft-ema \
        --num-fid-samples 50000 --cfg-scale 1.5 --num-steps 250 --method ddpm --out samples_600M.npz
    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples_600M.npz   # FID, sFID, IS, precision, recall
Interrupted? Run the same command again: finished batches (samples_600M.npz.parts/) are kept and skipped.

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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import pack
from diffusion import Diffusion
from model import TerDiT, config_from_dict

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo.tdit")


def load_model(path, device, act="bf16"):
    """A TerDiT in eval mode from a pack.py file, a train.py checkpoint (EMA weights when present), or an official
    TerDiT checkpoint folder (pack.read_reference). On a GPU a pack.py file loads as the lean bf16 model
    (pack.load_packed(..., dtype=torch.bfloat16), run without autocast); everything else loads in float32, to
    run under bf16 autocast on a GPU (inference_context): an unpacked ternary layer recomputes its trits from
    float32 latent weights (quant.ternarize), which bf16 weights would change. act="fp8": a pack.py file's
    token-wise ternary matmuls take fp8 activations (pack.set_act); for any other checkpoint, a ValueError."""
    if act == "fp8" and os.path.exists(path) and not (os.path.isfile(path) and pack.is_packed(path)):
        raise ValueError(f"fp8 activations (--act fp8) need a packed model and '{path}' is not one: make one with "
                         f"`python pack.py --ckpt {path} --out model.tdit`, then pass --ckpt model.tdit")
    if os.path.isdir(path):
        return pack.read_reference(path)[1].to(device)
    what = "pass --ckpt a train.py .pt, a pack.py file or an official TerDiT checkpoint folder"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist: {what}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"'{path}' is empty (0 bytes): {what}")
    if pack.is_packed(path):
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return pack.load_packed(path, device, dtype, act)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own text here is about pickling and weights_only, not about the file
        raise ValueError(f"'{path}' cannot be read as a torch checkpoint (truncated, corrupt or another format): "
                         f"{what}") from None
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


def fid_samples(args, model, runner, vae, device, rank, world):
    """--num-fid-samples: batch b draws its classes (uniform) and noise from a generator seeded by (seed, b), so
    the samples do not depend on the number of processes. Each finished batch goes to <out>.parts/ as uint8
    (N, H, W, 3); a rerun skips those and shares the missing ones out over the ranks. Rank 0 then writes the
    first num_fid_samples of them, in batch order, to <out> as arr_0 (the ADM suite's format)."""
    cfg, B, N = model.config, args.batch_size, args.num_fid_samples
    parts = args.out + ".parts"
    os.makedirs(parts, exist_ok=True)
    path = lambda b: os.path.join(parts, f"{b:06d}.npy")
    missing = [b for b in range(-(-N // B)) if not os.path.exists(path(b))]
    if world > 1:
        dist.barrier()  # every rank has listed the missing batches before any rank writes one
    for k, b in enumerate(missing[rank::world]):
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + b)
        y = torch.randint(0, cfg.num_classes, (B,), generator=gen, device=device)
        x = generate(runner, model, y, args, gen, progress=False)
        with torch.autocast(device.type, enabled=False):  # the VAE decodes in float32, as for a grid
            x = vae.decode(x.float()) if vae else x
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()  # greyscale: 3 equal channels
        arr = (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # DiT's rounding
        with open(path(b) + ".tmp", "wb") as f:  # written aside, then renamed: a kill never leaves half a batch
            np.save(f, arr)
        os.replace(path(b) + ".tmp", path(b))
        if rank == 0:
            print(f"batch {k + 1}/{len(missing[::world])} on each of {world} process(es)", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        arr = np.concatenate([np.load(path(b)) for b in range(-(-N // B))])[:N]
        with open(args.out + ".tmp", "wb") as f:
            np.savez(f, arr_0=arr)
        os.replace(args.out + ".tmp", args.out)
        print(f"wrote {args.out}: {arr.shape} uint8, cfg {args.cfg_scale}, {args.num_steps} {args.method} steps, "
              f"seed {args.seed}, from {args.ckpt} ({len(missing)} of {-(-N // B)} batches sampled by this run)")


def generate(runner, model, y, args, generator, progress):
    cfg = model.config
    return Diffusion().sample(runner, y, (cfg.in_channels, cfg.input_size, cfg.input_size), args.cfg_scale,
                              args.num_steps, args.method, clip_denoised=cfg.in_channels != 4, generator=generator,
                              progress=progress)


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample a grid of class-conditional images from a TerDiT checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=DEMO, help="train.py checkpoint, pack.py file or official TerDiT checkpoint folder; the default is the shipped demo")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class labels, one image each (None: one of each class, up to 10)")
    p.add_argument("--cfg-scale", type=data.number(float, 0, what="a finite number >= 0"), default=4.0,
                   help="classifier-free guidance scale (reference: 4.0; paper's FIDs: 1.5; 1 = off)")
    p.add_argument("--num-steps", type=data.number(int, 1, what="a positive integer"), default=50,
                   help="sampling steps (the reference: 250, with --method ddpm)")
    p.add_argument("--method", default="ddim", choices=["ddpm", "ddim"], help="sampler (DDIM needs fewer steps; the reference: ddpm)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same image)")
    p.add_argument("--reference-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="guide only the first 3 channels, as DiT and the reference (default: as the checkpoint says; "
                        "on for official checkpoints, off for ours)")
    p.add_argument("--vae", default=None, help="local AutoencoderKL folder to decode latents (needed for models trained with --vae)")
    p.add_argument("--device", type=data.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (under torchrun: each rank's GPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="regional torch.compile first (pays off over long runs, not for one grid)")
    p.add_argument("--act", default="bf16", choices=["bf16", "fp8"],
                   help="activations of a packed model's ternary matmuls: bf16, or fp8 (e4m3 per token, one scale "
                        "each; fused kernels on Hopper GPUs, emulated elsewhere)")
    p.add_argument("--num-fid-samples", type=data.number(int, 0, what="an integer >= 0"), default=0,
                   help="instead of a grid: this many samples of random classes, as the ADM suite's .npz at --out "
                        "(paper: 50000); torchrun spreads them over processes; rerun to resume")
    p.add_argument("--batch-size", type=data.number(int, 1, what="a positive integer"), default=32,
                   help="--num-fid-samples: images per batch and process")
    p.add_argument("--out", default="sample.png", help="output PNG (.npz with --num-fid-samples)")
    args = p.parse_args(argv)

    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
    if ddp and not args.num_fid_samples:
        raise ValueError("torchrun is for --num-fid-samples; sample a grid with plain python")
    data.check_output(args.out, [args.ckpt])
    rank, world, device = 0, 1, args.device
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
            torch.cuda.set_device(device)
    model = load_model(args.ckpt, device, args.act)
    cfg = model.config
    if args.reference_cfg is not None:
        cfg.reference_cfg = args.reference_cfg
    classes = args.classes if args.classes is not None else list(range(min(cfg.num_classes, 10)))
    if any(not 0 <= c < cfg.num_classes for c in classes):
        raise ValueError(f"--classes must be in 0..{cfg.num_classes - 1} for this model")
    if cfg.in_channels == 4 and not args.vae:
        raise ValueError("this model works on VAE latents: pass --vae the AutoencoderKL folder it was trained with")
    vae = data.VAE(args.vae, device) if cfg.in_channels == 4 else None

    y = torch.tensor(classes, device=device)
    with inference_context(model):
        runner = CUDAGraphed(model) if device.type == "cuda" else model
        n = args.batch_size if args.num_fid_samples else len(classes)
        if args.compile:
            print(f"compiled in {compile_model(runner, model, n, args.cfg_scale):.1f} s")
        if args.num_fid_samples:
            fid_samples(args, model, runner, vae, device, rank, world)
        else:
            x = generate(runner, model, y, args, torch.Generator(device=device).manual_seed(args.seed), progress=True)
    if ddp:
        dist.destroy_process_group()
    if args.num_fid_samples:
        return
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
