"""
FID samples from a TerDiT checkpoint, spread over GPUs with torchrun, into the .npz that the ADM evaluation suite
(openai/guided-diffusion evaluations/evaluator.py) reads, as DiT's sample_ddp.py writes it. The defaults are the
paper's FID settings: 50,000 samples of uniformly drawn classes, CFG 1.5, 250 DDPM steps. For a grid of images
of chosen classes, and for what each model flag does, see sample.py.

    torchrun --nproc_per_node=8 sample_ddp.py --ckpt out/600M/model.tdit --vae /models/sd-vae-ft-ema \
        --out samples_600M.npz
    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples_600M.npz   # FID, sFID, IS, precision, recall
    python sample_ddp.py --ckpt out/ckpt.pt --num-fid-samples 1000 --out fid.npz   # one process (CPU or GPU)

Interrupted? Run the same command again: finished batches (samples_600M.npz.parts/) are kept and skipped.
"""

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist

import cli
import sample


def fid_samples(args, model, runner, vae, device, rank, world):
    """Batch b draws its classes (uniform) and noise from a generator seeded by (seed, b), so the samples do not
    depend on the number of processes. Each finished batch goes to <out>.parts/ as uint8 (N, H, W, 3); a rerun
    skips those and shares the missing ones out over the ranks. Rank 0 then writes the first num_fid_samples of
    them, in batch order, to <out> as arr_0 (the ADM suite's format)."""
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
        x = sample.generate(model, y, args.cfg_scale, args.num_steps, args.method, gen, runner)
        with torch.autocast(device.type, enabled=False):  # the VAE decodes in float32, as for a grid
            x = vae.decode(x.float()) if vae else x
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()  # greyscale: 3 equal channels
        arr = (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # DiT's rounding
        with cli.atomic_write(path(b)) as f:  # a kill never leaves half a batch
            np.save(f, arr)
        if rank == 0:
            print(f"batch {k + 1}/{len(missing[::world])} on each of {world} process(es)", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        arr = np.concatenate([np.load(path(b)) for b in range(-(-N // B))])[:N]
        with cli.atomic_write(args.out) as f:
            np.savez(f, arr_0=arr)
        print(f"wrote {args.out}: {arr.shape} uint8, cfg {args.cfg_scale}, {args.num_steps} {args.method} steps, "
              f"seed {args.seed}, from {args.ckpt} ({len(missing)} of {-(-N // B)} batches sampled by this run)")


def main(argv=None):
    p = argparse.ArgumentParser(description="FID samples from a TerDiT checkpoint, as the ADM suite's .npz.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="train.py checkpoint, pack.py file or official TerDiT checkpoint folder")
    p.add_argument("--num-fid-samples", type=cli.number(int, 1, what="a positive integer"), default=50_000,
                   help="samples of random classes (paper: 50000)")
    p.add_argument("--batch-size", type=cli.number(int, 1, what="a positive integer"), default=32,
                   help="images per batch and process")
    sample.add_model_args(p, cfg_scale=1.5, num_steps=250, method="ddpm")
    p.add_argument("--out", default="samples.npz", help="output .npz (its batches go to <out>.parts/ first)")
    args = p.parse_args(argv)

    cli.check_output(args.out, [args.ckpt])
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
    rank, world, device = 0, 1, args.device
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
            torch.cuda.set_device(device)
    model, vae = sample.load(args, device)
    with sample.inference_context(model):
        runner = sample.CUDAGraphed(model) if device.type == "cuda" else model
        if args.compile:
            print(f"compiled in {sample.compile_model(runner, model, args.batch_size, args.cfg_scale):.1f} s")
        fid_samples(args, model, runner, vae, device, rank, world)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
