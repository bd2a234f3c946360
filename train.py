"""
Train a ternary DiT (TerDiT) from scratch with quantization-aware training, on one CPU/GPU or many GPUs (DDP).

CPU or one GPU, no arguments: a tiny ternary model on the embedded Fashion-MNIST, a few minutes on a laptop CPU:
    python train.py
The paper's 600M model on ImageNet latents, 8 GPUs (sd-vae-ft-ema in a local folder, ImageNet in class folders):
    torchrun --standalone --nproc_per_node=8 train.py --size 600M --data /data/imagenet/train --vae /models/sd-vae-ft-ema \
        --image-size 256 --global-batch-size 256 --max-steps 400000 --out-dir out/600M
Resume after a crash or a stop: the same command plus --resume. SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (what
clusters send before preemption or a time limit) end the run after the current step with a checkpoint and exit
code 128 + the signal's number (143, 130, 138). A run directory belongs to one run: <out-dir>/lock.
The 4.2B model does not fit DDP on 80 GB GPUs (fp32 weights, gradients, Adam and EMA: ~85 GB per GPU); add --fsdp
to shard them over the GPUs.

Recipe (DiT and the TerDiT paper): AdamW, lr 1e-4, no weight decay, EMA 0.9999, global batch 256, bf16 autocast
on GPU, gradient clipping at 2 (Large-DiT), and the learning rate divided by 10 late in training (the paper's
ablation shows ternary models need that reduction; it gives no schedule, so where is ours: --lr-drop).
The defaults of --size, --global-batch-size and --max-steps are small so that `python train.py` runs on a CPU.

Reproducibility: every random draw of a step (which images, t, noise, flips, label drops) comes from a generator
seeded by (seed, step) over the *global* batch, and each rank takes its slice. So 1 process and N processes with
the same global batch compute the same step, and a resumed run continues exactly where the first one stopped.
"""

import argparse
import copy
import functools
import json
import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from diffusion import Diffusion
from model import SIZES, TerDiT, TerDiTConfig, config_from_dict


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a ternary DiT (TerDiT) with quantization-aware training.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    positive, nonneg = data.number(int, 1, what="a positive integer"), data.number(int, 0, what="an integer >= 0")
    fraction = data.number(float, 0, 1, what="a number in [0, 1]")
    positive_float = data.number(float, 1e-12, what="a positive number")
    p.add_argument("--size", default="tiny", choices=list(SIZES), help="model size from model.SIZES (paper: 600M, 4.2B)")
    p.add_argument("--data", default=None, help="ImageFolder root (class sub-folders); None: embedded Fashion-MNIST")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder: train on its latents (paper: sd-vae-ft-ema)")
    p.add_argument("--image-size", type=positive, default=32, help="image side in pixels (paper: 256 with --vae)")
    p.add_argument("--fp", action="store_true", help="train the full-precision twin instead of the ternary model")
    p.add_argument("--no-adaln-norm", action="store_true", help="drop the RMSNorm after the adaLN linear (paper's ablation)")
    p.add_argument("--pos-embed", action="store_true", help="add DiT's 2-D sin-cos position embedding (not in the reference; the demo uses it)")
    p.add_argument("--fsdp", action="store_true", help="with torchrun: shard weights, gradients, Adam state and EMA over the ranks (FSDP2) instead of DDP")
    p.add_argument("--no-compile", action="store_true", help="run the blocks eagerly on CUDA (otherwise torch.compile them; CPU never compiles)")
    p.add_argument("--global-batch-size", type=positive, default=32, help="images per optimizer step over all ranks (paper: 256)")
    p.add_argument("--micro-batch-size", type=positive, default=None, help="images per forward pass per rank (None: all of the rank's share)")
    p.add_argument("--max-steps", type=positive, default=400, help="optimizer steps to train for")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (DiT, TerDiT: 1e-4)")
    p.add_argument("--lr-drop", type=fraction, default=0.75, help="fraction of --max-steps after which the lr is divided by 10")
    p.add_argument("--grad-clip", type=positive_float, default=2.0, help="max global gradient norm (Large-DiT: 2.0)")
    p.add_argument("--ema-decay", type=fraction, default=0.9999, help="EMA decay (DiT: 0.9999), warmed up as min(decay, (1+s)/(10+s))")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out-dir", default="out", help="where checkpoints, log.jsonl and sample grids go")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--log-every", type=positive, default=20, help="steps between log lines")
    p.add_argument("--ckpt-every", type=positive, default=200, help="steps between checkpoints (always one at the end)")
    p.add_argument("--sample-every", type=nonneg, default=200, help="steps between sample grids (0: only at the end)")
    p.add_argument("--num-workers", type=nonneg, default=4, help="data loader processes per rank for an ImageFolder")
    return p.parse_args(argv)


class GlobalBatches(torch.utils.data.Sampler):
    """Yields, for each step, this rank's slice of the global batch: a fresh permutation per epoch, seeded."""

    def __init__(self, n, global_batch, rank, world, seed, start_step, max_steps):
        self.n, self.G, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.start_step, self.max_steps = start_step, max_steps

    @functools.lru_cache(maxsize=2)
    def perm(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def indices(self, step):
        pos = step * self.G + torch.arange(self.G)
        epochs, pos = pos // self.n, pos % self.n
        idx = torch.stack([self.perm(int(e))[p] for e, p in zip(epochs, pos)])
        share = self.G // self.world
        return idx[self.rank * share:(self.rank + 1) * share].tolist()

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            yield self.indices(step)

    def __len__(self):
        return self.max_steps - self.start_step


SHAPING = ("size", "image_size", "fp", "no_adaln_norm", "pos_embed")  # flags that fix the model a checkpoint holds
DIVERGED = 10.0  # mean ε-MSE above which a run has blown up: a model that outputs zeros scores 1


@contextmanager
def run_dir_lock(out_dir):
    """Own out_dir for the run: <out_dir>/lock holds "PID host", created atomically (O_EXCL), so a second run
    into the same directory is refused. A lock of a process that is gone (same host) is stale and taken over.
    The lock goes at exit, and so does the directory if this run created it and left it empty."""
    created = not os.path.isdir(out_dir)
    path, host = os.path.join(out_dir, "lock"), socket.gethostname()
    while True:
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if not os.path.isfile(path):  # out_dir is a file
                raise ValueError(f"--out-dir {out_dir} is not a directory: choose another --out-dir") from None
            with open(path) as f:
                pid, _, owner = f.read().strip().partition(" ")
            if not (pid.isdigit() and owner == host and not pid_alive(int(pid))):
                raise FileExistsError(f"{out_dir} is in use by another run (PID {pid or '?'} on {owner or '?'}): wait "
                                      f"for it, or choose another --out-dir (delete {path} if that run is gone)") from None
            print(f"warning: taking over the stale lock {path} (PID {pid} is no longer running)")
            os.remove(path)
        except (PermissionError, NotADirectoryError) as e:
            raise ValueError(f"cannot write to --out-dir {out_dir} ({e.strerror}): choose another --out-dir") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {host}")
    try:
        yield
    finally:
        os.remove(path)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def truncate_log(path, step):
    """Keep the log lines up to the checkpoint's step: a run that stopped after its checkpoint logged steps that
    the resumed run logs again (and a crash may have cut the last line short)."""
    def step_of(line):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if step_of(line) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


class StopSignal:
    """SIGTERM, SIGINT and SIGUSR1 set a flag; the loop ends after the step it is in (a second signal interrupts
    at once). Under DDP each rank's flag is all-reduced (MAX) asynchronously over a CPU (gloo) group and read one
    step later: every rank stops at the same step, and no step waits for the GPU or the other ranks."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __enter__(self):
        self.signum, self.work, self.group = 0, None, None
        self.previous = [signal.signal(s, self.handler) for s in self.SIGNALS]
        return self

    def handler(self, signum, frame):
        if self.signum:
            signal.default_int_handler(signum, frame)
        self.signum = signum

    def __call__(self):
        """The signal number all ranks stop for after this step (0: go on)."""
        if not dist.is_initialized():
            return self.signum
        self.group = self.group or dist.new_group(backend="gloo")
        agreed = 0
        if self.work is not None:
            self.work.wait()
            agreed = int(self.flag.item())
        self.flag = torch.tensor([self.signum])
        self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def drain(self):
        if self.work is not None:
            self.work.wait()  # every rank issued the same all-reduces: none is left in flight at teardown

    def __exit__(self, *exc):
        for s, h in zip(self.SIGNALS, self.previous):
            signal.signal(s, h)


def save_checkpoint(obj, path):
    """Write to a temp file, then rename: a crash mid-write never replaces the last good checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def update_ema(ema, model, decay):
    # one fused pass over all tensors (a Python loop of lerp_ launches ~200 kernels per step at 600M); under FSDP
    # on the local shards (model and EMA are sharded alike), not through DTensor's per-op dispatch
    local = lambda ps: [p.to_local() if hasattr(p, "to_local") else p for p in ps]
    torch._foreach_lerp_(local(ema.parameters()), local(p.detach() for p in model.parameters()), 1 - decay)


@torch.no_grad()
def sample_grid(ema, cfg, vae, device, path, autocast, save):
    y = torch.arange(16, device=device) % cfg.num_classes
    with autocast:
        x = Diffusion().sample(ema.eval(), y, (cfg.in_channels, cfg.input_size, cfg.input_size), cfg_scale=4.0,
                               num_steps=50, method="ddim", clip_denoised=vae is None,
                               generator=torch.Generator(device=device).manual_seed(0))
    if save:
        data.save_grid(vae.decode(x) if vae else x, path, nrow=8)


def run_config(args, dataset, vae, ckpt_path, log_path, master_process):
    """(model config, checkpoint or None): the checkpoint's with --resume (refusing flags that would change the
    model; the log cut back to its step), else a new one from the flags (refusing a directory a run already used)."""
    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; train without --resume first")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            cfg = config_from_dict(ckpt["model_config"])
        except Exception as e:
            raise ValueError(f"cannot resume from {ckpt_path}: not a readable train.py checkpoint ({e})") from None
        for k in SHAPING:
            if k in ckpt.get("args", {}) and ckpt["args"][k] != getattr(args, k):
                flag = "--" + k.replace("_", "-")
                raise ValueError(f"--resume: {flag} {getattr(args, k)} conflicts with the checkpoint's {ckpt['args'][k]}: "
                                 f"resume with the flags of the run that wrote {ckpt_path}")
        if master_process:
            truncate_log(log_path, ckpt["step"])
    else:
        if os.path.exists(ckpt_path):
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out-dir")
        if os.path.exists(log_path):
            raise FileExistsError(f"{log_path} exists from a run that wrote no checkpoint: delete it, or choose "
                                  f"another --out-dir")
        cfg = TerDiTConfig(**SIZES[args.size], input_size=args.image_size // 8 if vae else args.image_size,
                           in_channels=4 if vae else dataset.channels, num_classes=len(dataset.class_names),
                           ternary=not args.fp, adaln_norm=not args.no_adaln_norm, pos_embed=args.pos_embed)
    return cfg, ckpt


def main(argv=None):
    args = get_args(argv)
    # under torchrun only rank 0 takes the lock; if it cannot, it exits non-zero and torchrun stops the others
    with run_dir_lock(args.out_dir) if int(os.environ.get("RANK", 0)) == 0 else nullcontext(), StopSignal() as stop:
        train(args, stop)


def train(args, stop_signal):
    # DDP the nanoGPT way: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain `python train.py` runs one process
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    master_process = rank == 0
    samples = master_process or args.fsdp  # ranks that sample grids: all of them when FSDP shards the EMA
    log = print if master_process else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    G = args.global_batch_size
    if G % world:
        raise ValueError(f"--global-batch-size {G} is not divisible by the {world} processes")
    micro = args.micro_batch_size or G // world
    if (G // world) % micro:
        raise ValueError(f"each rank's share of the batch ({G // world}) is not a multiple of --micro-batch-size {micro}")
    accum = G // world // micro

    # data (and, in latent mode, the VAE that turns images into the DiT's 4-channel latents)
    dataset = data.load_dataset(args.data, args.image_size)
    vae = data.VAE(args.vae, device) if args.vae else None
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    cfg, ckpt = run_config(args, dataset, vae, ckpt_path, log_path, master_process)
    if args.fsdp and not ddp:
        raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node=N")
    torch.manual_seed(args.seed)  # the same initial weights on every rank: FSDP shards them without a broadcast
    model = TerDiT(cfg, device=device)  # built in place: a 4.2B model initialises in seconds on a GPU
    ema = copy.deepcopy(model).requires_grad_(False)
    compile_ = device.type == "cuda" and not args.no_compile
    if compile_:  # after the deepcopy: the EMA samples eagerly (a few grids per run: compiling it does not pay)
        model.compile_blocks()  # regional: one block compiled, reused by all (model.py)
    if args.fsdp:  # FSDP2: one all-gather per block in forward and backward, a reduce-scatter of its gradients.
        # On GPU the gathered weights are bf16 (half the traffic; autocast would cast them anyway) and gradients
        # are reduced in fp32; the sharded latent weights, Adam state and EMA stay fp32. The quantizer then sees
        # bf16-rounded latent weights, so a trit at the γ/2 threshold can differ from a DDP run's.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for m in (model, ema):
            for block in m.layers:
                fully_shard(block, mp_policy=mp)
            fully_shard(m, mp_policy=mp)
        register_fsdp_forward_method(ema, "forward_with_cfg")  # sampling enters through it, not __call__
    torch.manual_seed(args.seed + rank)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, fused=device.type == "cuda")
    step = 0
    if args.resume:  # checkpoints hold full (unsharded) tensors, so any world size or mode can resume any run
        into = StateDictOptions(full_state_dict=args.fsdp)
        set_model_state_dict(model, ckpt["model"], options=into)
        set_model_state_dict(ema, ckpt["ema"], options=into)
        set_optimizer_state_dict(model, opt, ckpt["opt"], options=into)
        step = ckpt["step"]
        log(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    raw_model = model
    if ddp and not args.fsdp:
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no second copy, no copy-in)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    diffusion = Diffusion()
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"TerDiT-{args.size} ({'ternary' if cfg.ternary else 'full precision'}, adaLN RMSNorm "
        f"{'on' if cfg.adaln_norm else 'off'}): {n_params / 1e6:.2f}M parameters, {len(dataset)} images, "
        f"{world} process(es) on {device.type}{' (FSDP)' if args.fsdp else ''}{', compiled' if compile_ else ''}, "
        f"global batch {G} = {world} x {accum} x {micro}")

    sampler = GlobalBatches(len(dataset), G, rank, world, args.seed, step, args.max_steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, pin_memory=device.type == "cuda",
                                         num_workers=0 if args.data is None else args.num_workers)
    C, H = cfg.in_channels, cfg.input_size
    share = slice(rank * (G // world), (rank + 1) * (G // world))
    loss_sum, loss_count = torch.zeros((), device=device), 0
    t0 = t_log = time.time()
    start_step = step
    stopped = 0
    for x, y in loader:
        # this step's random draws, over the global batch, from a generator seeded by (seed, step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        t = torch.randint(0, diffusion.num_timesteps, (G,), generator=gen)[share].to(device)
        noise = torch.randn(G, C, H, H, generator=gen)[share].to(device)
        flip = (torch.rand(G, generator=gen) < 0.5)[share].to(device)
        drop = (torch.rand(G, generator=gen) < cfg.class_dropout_prob)[share].to(device)
        vae_noise = torch.randn(G, C, H, H, generator=gen)[share].to(device) if vae else None  # the latent's draw
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # horizontal flip augmentation (DiT)
        if vae:
            x = vae.encode(x, vae_noise)
        lr = args.lr * (0.1 if step >= args.lr_drop * args.max_steps else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        for m in range(accum):
            mb = slice(m * micro, (m + 1) * micro)
            if ddp and not args.fsdp:  # all-reduce gradients only on the last micro-step (FSDP reduces each one:
                model.require_backward_grad_sync = m == accum - 1  # unsharded gradients would undo its savings)
            with autocast:
                loss = diffusion.training_loss(model, x[mb], y[mb], t[mb], noise[mb], drop[mb]) / accum
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, raw_model, min(args.ema_decay, (1 + step) / (10 + step)))
        step += 1
        loss_count += 1
        if step == start_step + 1:  # the first step compiles the blocks (and warms up cuBLAS, NCCL, the allocator)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            log(f"first step took {time.time() - t0:.1f} s{' (including torch.compile)' if compile_ else ''}")

        stopped = stop_signal()
        last = step == args.max_steps or stopped
        ckpt_now = step % args.ckpt_every == 0 or last
        if step % args.log_every == 0 or ckpt_now:
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            mean_loss = loss_sum.item() / loss_count  # note: a CPU-GPU sync point, only every log_every steps
            if not mean_loss <= DIVERGED:  # also NaN
                raise FloatingPointError(f"loss is {mean_loss:.4g} at step {step}, the run diverged: stopping without "
                                         f"writing a checkpoint (the last good one is {ckpt_path}); try a lower --lr")
            dt = time.time() - t_log
            sps = loss_count / dt
            eta = (args.max_steps - step) * (time.time() - t0) / (step - start_step)
            mem = f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
            log(f"step {step}/{args.max_steps} | loss {mean_loss:.4f} | lr {lr:.1e} | {sps:.2f} steps/s | "
                f"{sps * G:.0f} img/s{mem} | eta {eta / 60:.1f} min")
            if master_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": mean_loss, "lr": lr, "steps_per_s": sps}) + "\n")
            loss_sum.zero_()
            loss_count, t_log = 0, time.time()
        if ckpt_now:  # every rank calls these (they are collectives); rank 0 receives the full tensors on CPU
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = {"model": get_model_state_dict(raw_model, options=full), "ema": get_model_state_dict(ema, options=full),
                     "opt": get_optimizer_state_dict(raw_model, opt, options=full)}
            if master_process:
                save_checkpoint({**state, "step": step, "model_config": asdict(cfg), "args": vars(args)}, ckpt_path)
            del state
        if stopped:
            break
        if samples and (last or (args.sample_every and step % args.sample_every == 0)):
            sample_grid(ema, cfg, vae, device, os.path.join(args.out_dir, f"samples_{step:07d}.png"), autocast,
                        save=master_process)
    peak = ""
    if device.type == "cuda":
        mems = [torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)]
        if ddp:
            mine, mems = mems[0], [torch.empty_like(mems[0]) for _ in range(world)]
            dist.all_gather(mems, mine)
        peak = f", peak GPU memory per rank {', '.join(f'{m.item():.2f}' for m in mems)} GiB"
    if stopped:
        log(f"stopped by {signal.Signals(stopped).name} at step {step}: checkpoint {ckpt_path}; to continue, run "
            f"the same command with --resume (exit code {128 + stopped})")
    else:
        log(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min{peak}, checkpoint {ckpt_path}")
    if ddp and not args.fsdp:  # DDP keeps replicas identical by construction; check it (one checksum per tensor)
        sums = torch.stack([p.detach().double().sum() for p in raw_model.parameters()])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        log(f"weights identical on all {world} ranks: {'yes' if torch.equal(lo, hi) else 'NO'}")
    if ddp:
        stop_signal.drain()
        del model  # DDP's reducer must go before its process group (else teardown can hang under gloo)
        dist.destroy_process_group()
    if stopped:
        sys.exit(128 + stopped)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError, ImportError) as e:
        # bad input gets one line; worker exceptions arrive with a traceback in their text, keep its last line
        sys.exit(f"error: {str(e).strip().splitlines()[-1]}")
