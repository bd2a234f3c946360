"""
FID samples from a TerDiT checkpoint, spread over GPUs with torchrun, into the .npz that the ADM evaluation suite
(openai/guided-diffusion evaluations/evaluator.py) reads, as DiT's sample_ddp.py writes it. The defaults are the
paper's FID settings: 50,000 samples of uniformly drawn classes, CFG 1.5, 250 DDPM steps. For a grid of images
of chosen classes, and for what each model flag does, see sample.py.

    torchrun --nproc_per_node=8 sample_ddp.py --ckpt out/600M/model.tdit --vae /models/sd-vae-ft-ema \
        --out samples_600M.npz
    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples_600M.npz   # FID, sFID, IS, precision, recall
    python sample_ddp.py --ckpt out/ckpt.pt --num-fid-samples 1000 --out fid.npz   # one process (CPU or GPU)

Interrupted? Run the same command again: finished batches (samples_600M.npz.parts/) are kept and skipped. They
are kept for that checkpoint and those settings only: samples_600M.npz.parts/fingerprint.json holds a hash of the
checkpoint's content and every setting that shapes a sample; another command into the same --out is refused
(--force deletes the old batches and starts over).
"""

import argparse
import hashlib
import json
import os

import cli  # before torch: a Ctrl-C while the imports below load ends in one line (cli.py)

import numpy as np
import torch
import torch.distributed as dist

import sample


def content_hash(path):
    """sha256 of a file, or of the files in a folder (an official checkpoint, a VAE), read in 16 MB pieces."""
    h = hashlib.sha256()
    files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
    for name in filter(os.path.isfile, files):
        with open(name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(args, model):
    """What the samples in <out>.parts/ depend on: the checkpoint's (and VAE's) content, the sampler's settings,
    the batch size and seed (batch b is drawn from seed and b), the model's classes and shape. Not the number
    of samples, processes or the device: those do not change what batch b holds."""
    cfg = model.config
    return dict(ckpt_sha256=content_hash(args.ckpt), vae_sha256=content_hash(args.vae) if args.vae else None,
                cfg_scale=args.cfg_scale, num_steps=args.num_steps, method=args.method, seed=args.seed,
                batch_size=args.batch_size, reference_cfg=cfg.reference_cfg, act=args.act,
                num_classes=cfg.num_classes, shape=[cfg.in_channels, cfg.input_size, cfg.input_size])


def claim_parts(parts, mine, force):
    """Make parts/ the folder of this command's batches: new, or of the same fingerprint, or emptied with force.
    Batches of another fingerprint (or of none: an older version of this script) are refused in one line."""
    os.makedirs(parts, exist_ok=True)
    stamp, theirs = os.path.join(parts, "fingerprint.json"), None
    if os.path.exists(stamp):
        with open(stamp) as f:
            theirs = json.load(f)
    batches = [f for f in os.listdir(parts) if f.endswith(".npy")]
    if batches and theirs != mine and not force:
        diff = [f"{k} {str(theirs.get(k))[:12]} there, {str(v)[:12]} now" for k, v in mine.items()
                if theirs.get(k) != v] if theirs else ["no fingerprint there"]
        raise ValueError(f"{parts} holds batches of another checkpoint or other settings ({'; '.join(diff)}): "
                         f"pass --force to delete them and start over, or choose another --out")
    if force or theirs != mine:
        for f in batches:
            os.remove(os.path.join(parts, f))
        with cli.atomic_write(stamp) as f:
            f.write(json.dumps(mine, indent=1).encode())


def fid_samples(args, model, runner, vae, device, rank, world):
    """Batch b draws its classes (uniform) and noise from a generator seeded by (seed, b), so the samples do not
    depend on the number of processes. Each finished batch goes to <out>.parts/ as uint8 (N, H, W, 3); a rerun
    of the same command (claim_parts) skips those and shares the missing ones out over the ranks. Rank 0 then
    writes the first num_fid_samples of them, in batch order, to <out> as arr_0 (the ADM suite's format)."""
    cfg, B, N = model.config, args.batch_size, args.num_fid_samples
    parts, error = args.out + ".parts", [None]
    if rank == 0:  # one process hashes the checkpoint and claims the folder; the others learn the outcome
        try:
            claim_parts(parts, fingerprint(args, model), args.force)
        except (OSError, ValueError) as e:
            error = [e]
    if world > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]
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
        if len(arr) != N:  # never fewer samples than asked
            raise ValueError(f"{parts} holds {len(arr)} samples where {N} were asked: pass --force to sample "
                             f"them again")
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
    p.add_argument("--force", action="store_true",
                   help="delete the batches in <out>.parts/ and start over (what a folder of batches of another "
                        "checkpoint or other settings needs)")
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
