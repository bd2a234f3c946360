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
Not in the paper: start the ternary run from a trained full-precision twin (warm-started QAT), and/or distil it:
    python train.py --fp --out-dir out/fp && python train.py --init-from out/fp/ckpt.pt --teacher out/fp/ckpt.pt
--carry-adam also carries the FP run's AdamW state (fresh by default).

Recipe (DiT and the TerDiT paper): AdamW, lr 1e-4, no weight decay, EMA 0.9999, global batch 256, bf16 autocast
on GPU, gradient clipping at 2 (Large-DiT), and the learning rate divided by 10 late in training (the paper's
ablation shows ternary models need that reduction; it gives no schedule: ours is --lr-drop).
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
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import cli  # before torch: a Ctrl-C while the imports below load ends in one line (cli.py)

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import sample
from diffusion import Diffusion
from model import SIZES, TerDiT, TerDiTConfig, config_from_dict
from quant import TernaryLinear, fit_alpha


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a ternary DiT (TerDiT) with quantization-aware training.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    positive, nonneg = cli.number(int, 1, what="a positive integer"), cli.number(int, 0, what="an integer >= 0")
    fraction = cli.number(float, 0, 1, what="a number in [0, 1]")
    positive_float = cli.number(float, 1e-12, what="a positive number")
    p.add_argument("--size", default="tiny", choices=list(SIZES), help="model size from model.SIZES (paper: 600M, 4.2B)")
    p.add_argument("--data", default=None, help="ImageFolder root (class sub-folders); None: embedded Fashion-MNIST")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder: train on its latents (paper: sd-vae-ft-ema)")
    p.add_argument("--image-size", type=positive, default=32, help="image side in pixels (paper: 256 with --vae)")
    p.add_argument("--fp", action="store_true", help="train the full-precision twin instead of the ternary model")
    p.add_argument("--init-from", default=None, help="warm-started QAT: a full-precision checkpoint (train.py --fp) "
                   "of the same model whose EMA weights start this ternary run, α fitted to them (quant.fit_alpha)")
    p.add_argument("--carry-adam", action="store_true", help="with --init-from: carry the FP run's AdamW moments and "
                   "step count over to the latent weights (the α start fresh); otherwise AdamW starts fresh")
    p.add_argument("--teacher", default=None, help="distillation: a full-precision checkpoint of the same model whose "
                   "EMA output (ε and v) the ternary model also learns to match")
    p.add_argument("--distill-weight", type=positive_float, default=1.0, help="weight of the teacher-matching MSE "
                   "beside the diffusion loss (with --teacher)")
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
    p.add_argument("--seed", type=cli.SEED, default=0, help="random seed")
    p.add_argument("--out-dir", default="out", help="where checkpoints, log.jsonl and sample grids go")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--log-every", type=positive, default=20, help="steps between log lines")
    p.add_argument("--ckpt-every", type=positive, default=200, help="steps between checkpoints (always one at the end)")
    p.add_argument("--sample-every", type=nonneg, default=200,
                   help="steps between sample grids, and one at the end (0: none)")
    p.add_argument("--num-workers", type=nonneg, default=4, help="data loader processes per rank for an ImageFolder (at most one per CPU core)")
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


def truncate_log(path, step):
    """Keep the log lines up to the checkpoint's step: a run that stopped after its checkpoint logged steps that
    the resumed run logs again (and a crash may have cut the last line short)."""
    def step_of(line):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf
    if os.path.exists(path):
        with open(path, "rb") as f:
            keep = [line for line in f if step_of(line) <= step]
        with cli.atomic_write(path) as f:
            f.writelines(keep)


def run_config(args, dataset, vae, ckpt_path, log_path, master_process):
    """(model config, checkpoint or None): the checkpoint's with --resume (refusing flags that would change the
    model; the log cut back to its step), else a new one from the flags (refusing a directory a run already used)."""
    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; train without --resume first")
        ckpt, cfg = read_run(ckpt_path, f"cannot resume from {ckpt_path} (resume from another copy, or train without "
                                        f"--resume into another --out-dir): not a readable train.py checkpoint")
        if ckpt["step"] >= args.max_steps:
            raise ValueError(f"--resume: {ckpt_path} is at step {ckpt['step']} and --max-steps is {args.max_steps}: "
                             f"nothing to do; pass a larger --max-steps to train on")
        for k in SHAPING:
            if k in ckpt.get("args", {}) and ckpt["args"][k] != getattr(args, k):
                flag = "--" + k.replace("_", "-")
                raise ValueError(f"--resume: {flag} {getattr(args, k)} conflicts with the checkpoint's {ckpt['args'][k]}: "
                                 f"resume with the flags of the run that wrote {ckpt_path}")
        for k in ("init_from", "carry_adam"):  # how the run began, kept in every checkpoint (evaluate.py reports it)
            setattr(args, k, ckpt.get("args", {}).get(k) or getattr(args, k))
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


def setup_distributed():
    """(ddp, rank, world, device), the nanoGPT way: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain
    `python train.py` is one process, on the GPU if there is one."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if 0 < gpus <= local:  # before the process group: a rank without a GPU would leave the others hanging
        raise ValueError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes per node but "
                         f"this machine has {gpus} GPU(s): use --nproc_per_node={gpus}, or CUDA_VISIBLE_DEVICES= to "
                         f"train on the CPU")
    dist.init_process_group("nccl" if gpus else "gloo")
    device = torch.device(f"cuda:{local}" if gpus else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def batch_split(args, world):
    """(micro, accum): the global batch = world processes × accum micro-steps × micro images."""
    G = args.global_batch_size
    if G % world:
        raise ValueError(f"--global-batch-size {G} is not divisible by the {world} processes")
    micro = args.micro_batch_size or G // world
    if (G // world) % micro:
        raise ValueError(f"each rank's share of the batch ({G // world}) is not a multiple of --micro-batch-size {micro}")
    return micro, G // world // micro


def read_run(path, unreadable):
    """(checkpoint, model config) of a train.py checkpoint, checksum verified; anything else is the ValueError
    `unreadable` (one line)."""
    ckpt = cli.load_checkpoint(path, unreadable)
    try:
        return ckpt, config_from_dict(ckpt["model_config"])
    except Exception as e:
        raise ValueError(f"{unreadable} ({type(e).__name__})") from None


def fp_checkpoint(path, cfg, flag, keep=("ema",)):
    """The parts `keep` of a full-precision train.py checkpoint of the model cfg describes (--init-from,
    --teacher); the rest is let go (at 4.2B each part is 17 GB of host memory)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such checkpoint file")
    ckpt, theirs = read_run(path, f"{flag} {path} is not a readable train.py checkpoint")
    theirs = asdict(theirs)
    if theirs["ternary"]:
        raise ValueError(f"{flag} {path} holds a ternary model: give a full-precision one (trained with --fp)")
    for k, v in asdict(cfg).items():
        if k != "ternary" and theirs[k] != v:
            raise ValueError(f"{flag} {path} has {k} = {theirs[k]} where this run has {v}: train with the flags "
                             f"of the run that wrote it (--size, --image-size, --pos-embed, --no-adaln-norm, --data)")
    return {k: ckpt[k] for k in keep}


@torch.no_grad()
def warm_start(model, weights):
    """Warm-started QAT: the FP weights become the latent weights, and each ternary layer's α the least-squares
    scale of their trits (quant.py), so the first forward pass is the FP model ternarised."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.endswith(".alphas") for k in missing):
        raise ValueError(f"--init-from: the checkpoint's tensors do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for m in model.modules():
        if isinstance(m, TernaryLinear) and m.ternary:
            m.alphas.copy_(fit_alpha(m.weight))


def fp_sources(args, cfg):
    """(warm start, teacher weights): the EMA weights (and, with --carry-adam, the AdamW state) of --init-from,
    unless resuming, and the EMA weights of --teacher; None where not asked. A file both name is read once."""
    if args.fp and (args.init_from or args.teacher):
        raise ValueError("--init-from and --teacher start or guide a ternary run from a full-precision one: drop --fp")
    if args.carry_adam and not args.init_from:
        raise ValueError("--carry-adam carries the AdamW state of the --init-from checkpoint: give --init-from too")
    init = fp_checkpoint(args.init_from, cfg, "--init-from", ("ema", "opt") if args.carry_adam else ("ema",)) \
        if args.init_from and not args.resume else None
    teacher = None
    if args.teacher:
        same = init is not None and args.teacher == args.init_from
        teacher = (init if same else fp_checkpoint(args.teacher, cfg, "--teacher"))["ema"]
    return init, teacher


def carry_adam(model, opt, fp_opt, fsdp):
    """--carry-adam: the FP run's AdamW moments and step count go on with the latent weights they belong to (they
    share names); the α, which the FP model does not have, start with fresh state. The hyperparameters stay this
    run's. The moments are the FP run's raw weights', the latent weights its EMA: close late in a run."""
    params = dict(model.named_parameters())
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    state = {"state": {n: s for n, s in fp_opt["state"].items() if n in params},
             "param_groups": [{**group, "params": list(params)}]}
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=fsdp, strict=False))
    for n, p in params.items():  # FSDP's loader gives every parameter a state, one zero-gradient step old: the
        if n not in fp_opt["state"]:  # α's would start at step 1, not 0, unlike in one process
            opt.state.pop(p, None)


def build_teacher(weights, cfg, device, compiled):
    """The frozen full-precision model a ternary student is distilled from (one full copy per rank)."""
    teacher = TerDiT(TerDiTConfig(**{**asdict(cfg), "ternary": False}), device=device)
    teacher.load_state_dict(weights)
    teacher.requires_grad_(False).eval()
    if compiled:
        teacher.compile_blocks()
    return teacher


def build_model(cfg, args, device, init=None):
    """(model, EMA copy, compiled?): the same initial weights on every rank (seeded: FSDP shards them without a
    broadcast), built in place on the device (a 4.2B model initialises in seconds on a GPU); warm-started from
    the full-precision weights init where given."""
    torch.manual_seed(args.seed)
    model = TerDiT(cfg, device=device)
    if init is not None:
        warm_start(model, init)
    ema = copy.deepcopy(model).requires_grad_(False)
    compiled = device.type == "cuda" and not args.no_compile
    if compiled:  # after the deepcopy: the EMA samples eagerly (a few grids per run: compiling it does not pay)
        model.compile_blocks()  # regional: one block compiled, reused by all (model.py)
    if args.fsdp:
        shard(model, ema, device)
    return model, ema, compiled


def shard(model, ema, device):
    """FSDP2: one all-gather per block in forward and backward, a reduce-scatter of its gradients. On GPU the
    gathered weights are bf16 (half the traffic; autocast would cast them anyway) and gradients are reduced in
    fp32; the sharded latent weights, Adam state and EMA stay fp32. The quantizer then sees bf16-rounded latent
    weights, so a trit at the γ/2 threshold can differ from a DDP run's."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for m in (model, ema):
        for block in m.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(m, mp_policy=mp)
    register_fsdp_forward_method(ema, "forward_with_cfg")  # sampling enters through it, not __call__


def load_checkpoint(model, ema, opt, ckpt, fsdp):
    """Checkpoints hold full (unsharded) tensors, so any world size or mode can resume any run. Returns the step."""
    into = StateDictOptions(full_state_dict=fsdp)
    set_model_state_dict(model, ckpt["model"], options=into)
    set_model_state_dict(ema, ckpt["ema"], options=into)
    set_optimizer_state_dict(model, opt, ckpt["opt"], options=into)
    return ckpt["step"]


def save_checkpoint(model, ema, opt, meta, path, master_process):
    """Every rank calls this (gathering the full tensors is a collective); rank 0 receives them on the CPU and
    writes them atomically: a crash mid-write never replaces the last good checkpoint. The checkpoint carries a
    checksum of its contents (cli.checksum), which every loader verifies: torch.load does not notice a flipped bit."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=full), "ema": get_model_state_dict(ema, options=full),
             "opt": get_optimizer_state_dict(model, opt, options=full)}
    if master_process:
        ckpt = {**state, **meta}
        with cli.atomic_write(path) as f:
            torch.save({**ckpt, "checksum": cli.checksum(ckpt)}, f)


def step_inputs(x, y, step, args, cfg, share, vae, diffusion):
    """This rank's (x, y, t, noise, drop) for a step. Every random draw comes from a generator seeded by
    (seed, step) over the global batch, of which the rank takes its share: see the docstring at the top."""
    G, C, H = args.global_batch_size, cfg.in_channels, cfg.input_size
    gen, device = torch.Generator().manual_seed(args.seed * 1_000_003 + step), x.device
    mine = lambda v: v[share].to(device)
    t = mine(torch.randint(0, diffusion.num_timesteps, (G,), generator=gen))
    noise = mine(torch.randn(G, C, H, H, generator=gen))
    flip = mine(torch.rand(G, generator=gen) < 0.5)
    drop = mine(torch.rand(G, generator=gen) < cfg.class_dropout_prob)  # label dropped: the CFG null class
    vae_noise = mine(torch.randn(G, C, H, H, generator=gen)) if vae else None  # the latent's posterior draw
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # horizontal flip augmentation (DiT)
    return (vae.encode(x, vae_noise) if vae else x), y, t, noise, drop


def train_step(model, opt, loss_fn, inputs, lr, accum, grad_clip, autocast):
    """One optimizer step of quantization-aware training on inputs (x, y, t, noise, drop), in accum micro-steps;
    returns the step's loss. The QAT is inside the model: each TernaryLinear ternarizes its latent weights in the
    forward pass and lets the gradient through to them unchanged (straight-through estimator, quant.py)."""
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    micro, loss_sum = len(inputs[0]) // accum, 0
    for m in range(accum):
        if isinstance(model, DDP):  # all-reduce gradients only on the last micro-step (FSDP reduces each one:
            model.require_backward_grad_sync = m == accum - 1  # unsharded gradients would undo its savings)
        with autocast:
            loss = loss_fn(model, *(v[m * micro:(m + 1) * micro] for v in inputs)) / accum
        loss.backward()
        loss_sum += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum


@torch.no_grad()
def update_ema(ema, model, decay):
    # one fused pass over all tensors (a Python loop of lerp_ launches ~200 kernels per step at 600M); under FSDP
    # on the local shards (model and EMA are sharded alike), not through DTensor's per-op dispatch
    local = lambda ps: [p.to_local() if hasattr(p, "to_local") else p for p in ps]
    torch._foreach_lerp_(local(ema.parameters()), local(p.detach() for p in model.parameters()), 1 - decay)


class Progress:
    """The log: every line the mean loss since the last one (all-reduced over the ranks, as nanoGPT), steps/s,
    images/s, peak GPU memory and ETA, also appended to log.jsonl by rank 0. A mean loss above DIVERGED (or NaN)
    stops the run before it writes a checkpoint."""

    def __init__(self, args, device, step, log_path, ckpt_path, master_process):
        self.args, self.device, self.start_step, self.log_path, self.ckpt_path, self.master_process = \
            args, device, step, log_path, ckpt_path, master_process
        self.loss_sum, self.count = torch.zeros((), device=device), 0
        self.t0 = self.t_log = time.time()

    def log(self, *a):
        if self.master_process:
            print(*a)

    def untimed(self, since):
        """Leave the time since `since` (a sample grid: not training) out of the next line's steps/s."""
        self.t_log += time.time() - since

    def add(self, loss, step, compiled):
        self.loss_sum += loss
        self.count += 1
        if step == self.start_step + 1:  # the first step compiles the blocks (and warms up cuBLAS, NCCL, the allocator)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.log(f"first step took {time.time() - self.t0:.1f} s{' (including torch.compile)' if compiled else ''}")

    def report(self, step, lr):
        args = self.args
        if dist.is_initialized():
            dist.all_reduce(self.loss_sum, op=dist.ReduceOp.AVG)
        mean_loss = self.loss_sum.item() / self.count  # note: a CPU-GPU sync point, only every log_every steps
        if not mean_loss <= DIVERGED:  # also NaN
            raise FloatingPointError(f"loss is {mean_loss:.4g} at step {step}, the run diverged: stopping without "
                                     f"writing a checkpoint (the last good one is {self.ckpt_path}); try a lower --lr")
        sps = self.count / (time.time() - self.t_log)
        eta = (args.max_steps - step) * (time.time() - self.t0) / (step - self.start_step)
        mem = f" | peak {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB" \
            if self.device.type == "cuda" else ""
        self.log(f"step {step}/{args.max_steps} | loss {mean_loss:.4f} | lr {lr:.1e} | {sps:.2f} steps/s | "
                 f"{sps * args.global_batch_size:.0f} img/s{mem} | eta {eta / 60:.1f} min")
        if self.master_process:
            try:  # appended, not rewritten (a torn last line is cut at --resume: truncate_log)
                with open(self.log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": mean_loss, "lr": lr, "steps_per_s": sps}) + "\n")
            except OSError as e:  # a full disk: name the file in the one line of cli.run
                raise OSError(e.errno, e.strerror, self.log_path) from None
        self.loss_sum.zero_()
        self.count, self.t_log = 0, time.time()


@torch.no_grad()
def sample_grid(ema, vae, device, path, autocast, save):
    """16 images of the EMA model, classes 0, 1, 2, ... in turn: 50 DDIM steps, CFG 4, seed 0 (sample.py's)."""
    y = torch.arange(16, device=device) % ema.config.num_classes
    with autocast:
        x = sample.generate(ema.eval(), y, cfg_scale=4.0, num_steps=50, method="ddim",
                            generator=torch.Generator(device=device).manual_seed(0))
    if save:
        data.save_grid(vae.decode(x) if vae else x, path, nrow=8)


def final_checks(model, device, ddp, world, log):
    """The end-of-run report: peak GPU memory of every rank and, under DDP, that the replicas are identical."""
    peak = ""
    if device.type == "cuda":
        mems = [torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)]
        if ddp:
            mine, mems = mems[0], [torch.empty_like(mems[0]) for _ in range(world)]
            dist.all_gather(mems, mine)
        peak = f", peak GPU memory per rank {', '.join(f'{m.item():.2f}' for m in mems)} GiB"
    if isinstance(model, DDP):  # DDP keeps replicas identical by construction; check it (one checksum per tensor)
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        log(f"weights identical on all {world} ranks: {'yes' if torch.equal(lo, hi) else 'NO'}")
    return peak


def main(argv=None):
    args = get_args(argv)
    # under torchrun only rank 0 takes the lock; if it cannot, it exits non-zero and torchrun stops the others
    with cli.run_dir_lock(args.out_dir) if int(os.environ.get("RANK", 0)) == 0 else nullcontext(), \
            cli.StopSignal() as stop:
        train(args, stop)


def train(args, stop_signal):
    ddp, rank, world, device = setup_distributed()
    master_process = rank == 0
    samples = master_process or args.fsdp  # ranks that sample grids: all of them when FSDP shards the EMA
    log = print if master_process else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    micro, accum = batch_split(args, world)

    # data (and, in latent mode, the VAE that turns images into the DiT's 4-channel latents), model, optimizer
    dataset = data.load_dataset(args.data, args.image_size)
    vae = data.VAE(args.vae, device) if args.vae else None
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    cfg, ckpt = run_config(args, dataset, vae, ckpt_path, log_path, master_process)
    if args.fsdp and not ddp:
        raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node=N")
    init, teacher = fp_sources(args, cfg)
    raw_model, ema, compiled = build_model(cfg, args, device, init["ema"] if init else None)
    if teacher is not None:
        teacher = build_teacher(teacher, cfg, device, compiled)
    torch.manual_seed(args.seed + rank)
    opt = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=0, fused=device.type == "cuda")
    step = load_checkpoint(raw_model, ema, opt, ckpt, args.fsdp) if args.resume else 0
    if args.resume:
        log(f"resumed from {ckpt_path} at step {step}")
    elif init is not None and args.carry_adam:
        carry_adam(raw_model, opt, init["opt"], args.fsdp)
    del init
    del ckpt
    model = raw_model
    if ddp and not args.fsdp:
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no second copy, no copy-in)
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    log(f"TerDiT-{args.size} ({'ternary' if cfg.ternary else 'full precision'}, adaLN RMSNorm "
        f"{'on' if cfg.adaln_norm else 'off'}): {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M "
        f"parameters, {len(dataset)} images, {world} process(es) on {device.type}{' (FSDP)' if args.fsdp else ''}"
        f"{', compiled' if compiled else ''}, global batch {args.global_batch_size} = {world} x {accum} x {micro}"
        f"{f', warm-started from {args.init_from}' if args.init_from and not args.resume else ''}"
        f"{' with its AdamW state' if args.carry_adam and not args.resume else ''}"
        f"{f', distilled from {args.teacher}' if args.teacher else ''}")

    G = args.global_batch_size
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=GlobalBatches(len(dataset), G, rank, world, args.seed, step, args.max_steps),
        pin_memory=device.type == "cuda", num_workers=0 if args.data is None else data.workers(args.num_workers, log))
    share = slice(rank * (G // world), (rank + 1) * (G // world))
    diffusion, progress, stopped = Diffusion(), Progress(args, device, step, log_path, ckpt_path, master_process), 0
    loss_fn = functools.partial(diffusion.training_loss, teacher=teacher, distill_weight=args.distill_weight)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        inputs = step_inputs(x, y, step, args, cfg, share, vae, diffusion)
        lr = args.lr * (0.1 if step >= args.lr_drop * args.max_steps else 1.0)
        loss = train_step(model, opt, loss_fn, inputs, lr, accum, args.grad_clip, autocast)
        update_ema(ema, raw_model, min(args.ema_decay, (1 + step) / (10 + step)))
        step += 1
        progress.add(loss, step, compiled)

        stopped = stop_signal()  # the signal all ranks agree to stop for (0: go on)
        last = step == args.max_steps or stopped
        ckpt_now = step % args.ckpt_every == 0 or last
        if step % args.log_every == 0 or ckpt_now:
            progress.report(step, lr)
        if ckpt_now:
            save_checkpoint(raw_model, ema, opt, {"step": step, "model_config": asdict(cfg), "args": vars(args)},
                            ckpt_path, master_process)
        if stopped:
            break
        if samples and args.sample_every and (last or step % args.sample_every == 0):
            t = time.time()
            sample_grid(ema, vae, device, os.path.join(args.out_dir, f"samples_{step:07d}.png"), autocast,
                        save=master_process)
            progress.untimed(since=t)

    peak = final_checks(model, device, ddp, world, log)
    if stopped:
        log(f"stopped by {signal.Signals(stopped).name} at step {step}: checkpoint {ckpt_path}; to continue, run "
            f"the same command with --resume (exit code {128 + stopped})")
    else:
        log(f"done: {step} steps in {(time.time() - progress.t0) / 60:.1f} min{peak}, checkpoint {ckpt_path}")
    if ddp:
        stop_signal.drain()
        del model  # DDP's reducer must go before its process group (else teardown can hang under gloo)
        dist.destroy_process_group()
    if stopped:
        sys.exit(128 + stopped)


if __name__ == "__main__":
    cli.run(main)
