"""
Benchmarks of the ternary matmul kernels, the packed model end to end, loading a packed file, and train.py's step.
The kernels (fast/, and kernel.py's readable one) are timed against cuBLAS bf16 F.linear on the same ternary values.

    python bench.py --what kernels --out bench_results/kernels_h100.md   # per layer: fast, readable, cuBLAS
    python bench.py --what kernels --sweep     # first time every candidate tile / cluster split per row, use the
                                               # fastest, and write them to fast/tuned/<GPU name>.json
    python bench.py --what kernels --act fp8 --sweep --m 64,256,512,2048,8192   # the same for fp8 activations
    python bench.py --what floors --out bench_results/floors_h200.md   # empty launches, L2 -> smem, plain reads
    python bench.py --what model --out bench_results/model_h200.md     # sampling, packed vs bf16
    python bench.py --what load --out bench_results/load_h200.md       # deploy.load_packed of a random 4.2B file
    python bench.py --what train --out bench_results/train_h200.md     # train.py's step: MFU, memory, compile

How it times: every kernel number is the median over --reps replays of a CUDA graph holding many calls, timed with
CUDA events, so launch gaps from Python are gone. Consecutive calls rotate through enough distinct copies of the
weights (--cold-mb, default 120 MB) that nothing is served from the L2 cache (50-60 MB on an H100/H200) -- as in a
real forward pass, where every layer's weights are new. Data is random (never zeros). TB/s counts the bytes each
call must move (2-bit weights + X + Y); TFLOP/s = 2*M*K*N/t. Every output (.md and .json) records when, at which
commit, by which command and on which GPU it was measured.
"""
import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

import cli  # before torch: a Ctrl-C while the imports below load ends in one line (cli.py)

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

import deploy
import fast
import kernel
import pack
import quant
from diffusion import Diffusion
from fast import tiles
from model import SIZES, RMSNorm, TerDiT, TerDiTConfig
from quant import TernaryLinear
from sample import CUDAGraphed, generate, inference_context

# (model, layer, K, N): the token-wise linears of TerDiT-600M / 4.2B and DiT-XL, the adaLN GEMVs, and the packed
# model's fused matmuls (deploy.FusedLinears: wq, wk, wv and w1, w3 stacked along N)
SHAPES = [
    ("600M", "qkv-proj", 1536, 1536), ("600M", "mlp-up", 1536, 4096), ("600M", "mlp-down", 4096, 1536),
    ("600M", "adaLN", 1024, 9216), ("600M", "wq+wk+wv", 1536, 4608), ("600M", "w1+w3", 1536, 8192),
    ("4.2B", "qkv-proj", 3072, 3072), ("4.2B", "mlp-up", 3072, 8192), ("4.2B", "mlp-down", 8192, 3072),
    ("4.2B", "adaLN", 1024, 18432), ("4.2B", "wq+wk+wv", 3072, 9216), ("4.2B", "w1+w3", 3072, 16384),
    ("DiT-XL", "attn", 1152, 1152),
]
MS = [1, 2, 8, 16, 64, 256, 512, 2048, 8192]


def provenance(argv):
    """When, at which commit, by which command and on which GPU a result was measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("GIT_COMMIT", "unknown")
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit,
                command=shlex.join(["python", "bench.py", *argv]), gpu=torch.cuda.get_device_name())


def time_graph(fn, n_calls, reps):
    """Median us per call of fn(i), i = 0..n_calls-1, captured in one CUDA graph and replayed reps times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (compiles kernels, creates cuBLAS handles)
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            fn(i)
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_calls)
    del g
    return statistics.median(times)

# -----------------------------------------------------------------------------
# the kernels, layer by layer


def gemv_candidates(M, N, K):
    """GEMV tiles for --sweep at M <= 16: TN n16-tiles x KW warps per CTA, each warp just enough chunks for its share
    of K (split over CS CTAs), weights loaded into registers or staged through shared memory, while shared memory
    holds X's rows (and the staged chunks) and there are at least ~60 CTAs."""
    kc, mt, out = math.ceil(K / 128), 1 if M <= 8 else 2, []
    for tn, kw, cs, stage in itertools.product((1, 2, 3, 4, 6, 8), (2, 4, 8, 16), (1, 2, 4), ("", "s")):
        kcz = math.ceil(kc / cs)
        name = f"v{tn}x{kw}m{mt}c{math.ceil(kcz / kw)}{stage}"
        if (4 <= tn * kw <= 16 and math.ceil(kcz / kw) <= 8 and (cs == 1 or kcz >= 2) and math.ceil(N / (16 * tn)) * cs >= 60
                and tiles.gemv_smem(name, M, kcz) <= 200 * 1024):
            out.append((name, cs))
    return out


def candidates(M, N, K, wgmma):
    """Tile configs worth trying for --sweep (any config is correct for any M; these are the plausible ones)."""
    gemv = [(n, cs) for n, cs in gemv_candidates(M, N, K) if wgmma or cs == 1] if M <= tiles.GEMV_MAX_M else []
    if gemv:  # clusters: Hopper; from 9 tokens the 16-token wgmma tile too
        return gemv + [(n, cs) for n in ("w16", "w16s4") for cs in (1, 2, 4, 8)
                       if wgmma and M > 8 and cs <= min(tiles.max_split(n), math.ceil(K / 128))]
    names = (["s32", "k32", "m64", "k64"] if M <= 64 else ["m64", "k64", "l128", "x256"] if M <= 512 else ["l128", "x256"])
    if wgmma and M >= 64:  # on Hopper the wgmma tiles replace the large mma.sync ones
        names = names[:2] * (M == 64) + [n for n in tiles.WG_CONFIGS if 64 <= tiles.WG_CONFIGS[n][1] <= max(64, 2 * M)]
    splits = [1] if not wgmma else [1, 2] if M > 512 else [1, 2, 4, 8]  # clusters: Hopper
    dequant = [("dequant", 1)] if M >= 512 else []  # expand + cuBLAS
    return [(n, cs) for n in names for cs in splits if cs <= math.ceil(K / 128)] + dequant


def candidates8(M, K):
    """wgmm8 tiles x cluster splits for --sweep --act fp8."""
    splits = [1, 2] if M > 512 else [1, 2, 4]
    return [(n, cs) for n in tiles.WG8_CONFIGS for cs in splits if cs <= math.ceil(K / 128)
            and tiles.WG8_CONFIGS[n][1] <= max(64, 2 * M)]


def sweep_row(x, P, alpha, N, K, ref, fp8, n, reps, log):
    """Time every candidate tile on one row (P: cold copies of the tiled codes): the fastest correct one, or None."""
    wgmma, best = fast.gpu(x.device.index).wgmma, None
    for name, cs in candidates8(x.shape[0], K) if fp8 else candidates(x.shape[0], N, K, wgmma):
        yc = kernel.ternary_matmul(x, P[0], alpha, N, K, fp8=fp8, tiled=True, config=(name, cs))
        e = ((yc.float() - ref).norm() / ref.norm()).item()
        t = time_graph(lambda i: kernel.ternary_matmul(x, P[i % len(P)], alpha, N, K, fp8=fp8, tiled=True,
                                                       config=(name, cs)), n, reps)
        log.append(dict(K=K, N=N, M=x.shape[0], config=f"{name}/cs{cs}", us=t, rel_err=e))
        print(f"    sweep {name:5s} cs{cs}: {t:8.2f} us  err {e:.1e}", flush=True)
        if e >= 1e-2:
            print(f"    WRONG: config {name}/cs{cs} at M={x.shape[0]} K={K} N={N}: rel err {e}")
        elif best is None or t < best[0]:
            best = (t, (name, cs))
    return best and best[1]


def bench_kernels(args):
    """(rows, sweep log, the sweep's choices {(K, N): {M: (tile, CS)}}): per layer shape and M, the fast kernels as
    the model calls them (tiled codes; the choice of tile as the dispatch makes it, or --sweep's), cuBLAS bf16, and
    up to M = --readable-m the readable kernel of kernel.py (row-major codes)."""
    dev = torch.device("cuda")
    fp8 = args.act == "fp8"  # the ternary x fp8 path: quant8 + wgmm8 timed together (and quant8 alone)
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, log, found = [], [], {}
    for model, layer, K, N in SHAPES:
        if fp8 and layer == "adaLN":  # the model never runs adaLN with fp8 activations (deploy.set_act)
            continue
        w = (torch.randint(0, 3, (N, K), device=dev, generator=gen) - 1).to(torch.int8)
        alpha = torch.rand(1, device=dev, generator=gen) + 0.5
        codes = kernel.pack_2bit(w)
        wb = (alpha * w.float()).bfloat16()  # cuBLAS gets the same ternary values, dequantised to bf16
        # distinct copies, so that each call of a graph reads weights that are not in L2
        P = [fast.tile_codes(codes, N, K) for _ in range(math.ceil(args.cold_mb * 1e6 / codes.numel()))]
        R = [codes.clone() for _ in P] if not fp8 and min(args.m) <= args.readable_m else []
        Wb = [wb.clone() for _ in range(max(2, math.ceil(args.cold_mb * 1e6 / (2 * wb.numel()))))]
        for M in args.m:
            x = torch.randn(M, K, device=dev, generator=gen).bfloat16()
            # fp8: against the same e4m3 codes summed in float32 (the quantisation's own error is evaluate.py's)
            ref = kernel.ternary_matmul_ref(x.float(), codes, alpha, N, K, fp8=True) if fp8 else F.linear(x.float(), wb.float())
            flops, nbytes = 2 * M * K * N, codes.numel() + 2 * M * K + 2 * M * N
            est = max(2.0, flops / 300e12 * 1e6, nbytes / 2e12 * 1e6)  # rough us per call, to size the graph
            n = int(min(200, max(10, args.graph_us / est)))
            config = None
            if args.sweep and M != 2:  # time every candidate; the fastest goes into fast/tuned/<GPU>.json
                config = sweep_row(x, P, alpha, N, K, ref, fp8, n, max(5, args.reps // 2), log)
                if config:
                    found.setdefault((K, N), {})[M] = config
            run = lambda i: kernel.ternary_matmul(x, P[i % len(P)], alpha, N, K, fp8=fp8, tiled=True, config=config)
            y = run(0)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            tk, tc = time_graph(run, n, args.reps), time_graph(lambda i: F.linear(x, Wb[i % len(Wb)]), n, args.reps)
            chosen = config or fast.choose(M, N, K, dev.index or 0, fp8)  # the dispatch's choice
            r = dict(model=model, layer=layer, K=K, N=N, M=M, kernel_us=tk, cublas_us=tc, speedup=tc / tk,
                     TBps=nbytes / tk / 1e6, TFLOPs=flops / tk / 1e6, cublas_TFLOPs=flops / tc / 1e6,
                     rel_err=err, config="dequant+cuBLAS" if chosen[0] == "dequant" else "%s/cs%d" % chosen)
            if R and M <= args.readable_m:  # the readable kernel: few calls, it is slow
                simple = lambda i: kernel.ternary_matmul(x, R[i % len(R)], alpha, N, K)
                r["readable_err"] = ((simple(0).float() - ref).norm() / ref.norm()).item()
                r["readable_us"] = time_graph(simple, 10, 5)
            if fp8:  # the share of quant8 in that time
                Mp = -(-M // fast.FP8_ROWS) * fast.FP8_ROWS
                xp = F.pad(x, (0, fast.padded(N, K)[1] - K))
                r["quant_us"] = time_graph(lambda i: fast.quantize_fp8(xp, Mp), n, args.reps)
                r["config"] += f" (quant8 {r['quant_us']:.1f} us)"
            rows.append(r)
            print("| %-6s %-8s | %5d x %5d | %5d | %8.2f | %8.2f | %5.2fx | %5.2f | %6.1f | %s | err %.1e%s" % (
                model, layer, K, N, M, tk, tc, tc / tk, r["TBps"], r["TFLOPs"], r["config"], err,
                f" | readable {r['readable_us']:.1f} us" if "readable_us" in r else ""), flush=True)
            assert err < 1e-2 and r.get("readable_err", 0) < 1e-2, f"kernel wrong at M={M} K={K} N={N}: {r}"
        del P, R, Wb
        torch.cuda.empty_cache()
    return rows, log, found


def markdown(rows, title):
    out = [f"## {title}", "", "| model | layer | K | N | M | ternary us | cuBLAS us | speed-up | TB/s "
           "| TFLOP/s | cuBLAS TFLOP/s | path | readable kernel us |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        readable = f"{r['readable_us']:.1f}" if "readable_us" in r else ""
        out.append("| {model} | {layer} | {K} | {N} | {M} | {kernel_us:.2f} | {cublas_us:.2f} | {speedup:.2f}x | "
                   "{TBps:.2f} | {TFLOPs:.1f} | {cublas_TFLOPs:.1f} | {config} | ".format(**r) + readable + " |")
    return "\n".join(out) + "\n"


# -----------------------------------------------------------------------------
# the floors under the small-M kernels: how long a launch of nothing takes in a graph, how fast an SM pulls the same
# L2-resident bytes into shared memory (what the GEMV does with X's rows), and a plain read of a layer's codes

FLOOR_SRC = r"""
extern "C" __global__ void __launch_bounds__(256) ingest(const uint4* __restrict__ X, int n16, int distinct,
                                                        float* out) {
  extern __shared__ uint4 s[];  // each CTA copies n16 16-byte pieces into shared memory, as tmv copies X's rows
  const uint4* src = X + (distinct ? (size_t)blockIdx.x * n16 : 0);
  unsigned base;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(base) : "l"(s));
  for (int i = threadIdx.x; i < n16; i += 256)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(base + i * 16), "l"(src + i));
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0 && n16 > 0) out[blockIdx.x] = __uint_as_float(s[n16 - 1].x);
}
extern "C" __global__ void __launch_bounds__(256) readw(const uint4* __restrict__ W, int n16, unsigned* out) {
  unsigned acc = 0;  // 4 16-byte loads per thread, all issued first (as tmv's weight loads), xor-ed together
  uint4 v[4];
  for (int j = 0; j < 4; j++) {
    const int i = (blockIdx.x * 4 + j) * 256 + threadIdx.x;
    v[j] = i < n16 ? W[i] : make_uint4(0, 0, 0, 0);
  }
  for (int j = 0; j < 4; j++) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  if (acc == 0x9e3779b9u) out[0] = acc;  // never (almost): keeps the loads
}
"""


def bench_floors(args):
    """(rows, markdown): graph-timed launches of the ingest and readw probes (FLOOR_SRC) and, beside them, the
    fast kernels at M = 1 on the same layers (cold weights as in --what kernels)."""
    cp = fast.launch.cp
    dev, gen = torch.device("cuda", torch.cuda.current_device()), torch.Generator(device="cuda").manual_seed(0)
    mod = cp.RawModule(code=FLOOR_SRC)
    ingest, readw = mod.get_function("ingest"), mod.get_function("readw")
    ingest.max_dynamic_shared_size_bytes = 96 * 1024
    sms = fast.gpu(dev.index).sms
    X = torch.randn(sms * 96 * 1024 // 4, device=dev, generator=gen)  # 96 KB per SM, stays in L2
    out = torch.empty(4 * sms, device=dev)
    u64, i32 = cp.uint64, cp.int32
    rows, md = [], ["## Floors: launches, L2 -> shared memory, plain reads of the codes", "",
                    "| probe | CTAs | KB per CTA | us per launch |", "|---|---|---|---|"]
    for kb, distinct in ((0, 0), (24, 0), (48, 0), (96, 0), (96, 1)):
        for g in (1, sms // 2, sms, 2 * sms):
            if distinct and g > sms:
                continue
            t = time_graph(lambda i: ingest((g,), (256,), (u64(X.data_ptr()), i32(kb * 64), i32(distinct),
                                                           u64(out.data_ptr())), shared_mem=kb * 1024,
                                            stream=fast.launch.stream(dev)), 200, args.reps)
            probe = "empty launch" if kb == 0 else "ingest, " + ("each CTA its own bytes" if distinct else "same bytes")
            rows.append(dict(probe=probe, ctas=g, kb=kb, us=t))
            md.append(f"| {probe} | {g} | {kb} | {t:.2f} |")
    md += ["", "| layer | K | N | 2-bit MB | plain read us | ternary M=1 us | ternary / read |",
           "|---|---|---|---|---|---|---|"]
    for model, layer, K, N in SHAPES:
        w = (torch.randint(0, 3, (N, K), device=dev, generator=gen) - 1).to(torch.int8)
        codes, alpha = fast.tile_codes(kernel.pack_2bit(w), N, K), torch.rand(1, device=dev, generator=gen) + 0.5
        P = [codes.clone() for _ in range(math.ceil(args.cold_mb * 1e6 / codes.numel()))]
        x = torch.randn(1, K, device=dev, generator=gen).bfloat16()
        n16 = codes.numel() // 16
        tr = time_graph(lambda i: readw((-(-n16 // 1024),), (256,), (u64(P[i % len(P)].data_ptr()), i32(n16),
                                                                    u64(out.data_ptr())),
                                        stream=fast.launch.stream(dev)), 200, args.reps)
        tk = time_graph(lambda i: kernel.ternary_matmul(x, P[i % len(P)], alpha, N, K, tiled=True), 200, args.reps)
        rows.append(dict(model=model, layer=layer, K=K, N=N, mb=codes.numel() / 1e6, read_us=tr, kernel_us=tk))
        md.append(f"| {model} {layer} | {K} | {N} | {codes.numel() / 1e6:.2f} | {tr:.2f} | {tk:.2f} | {tk / tr:.2f} |")
        del P
    return rows, "\n".join(md) + "\n"


# -----------------------------------------------------------------------------
# end to end: one denoising step and a 250-step CFG sample, packed 2-bit model vs bf16 model, each eager and
# compiled (regional torch.compile, default mode), each step one CUDA-graph replay

def random_pair(size, dev, gen, kernel_name=None):
    """The same random ternary TerDiT (ImageNet-256 config: 32x32x4 latents, 1000 classes) twice, both bf16 without
    autocast as sample.py runs them on a GPU: as the deployed model (deploy.PackedTernaryLinear given the codes,
    then deploy.finish: the codes prepared for the kernel named (None: TERDIT_KERNEL), fused) and as a plain bf16
    model whose linears hold alpha * trits, specialised for bf16 inference the same way (deploy.specialise)."""
    cfg = TerDiTConfig(**SIZES[size], in_channels=4, num_classes=1000)
    bf = TerDiT(replace(cfg, ternary=False), device="meta").to_empty(device=dev)
    ternary = {}
    with torch.no_grad():
        for name, p in bf.named_parameters():
            p.normal_(0, 0.02, generator=gen)
        for name, m in bf.named_modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1)
            if isinstance(m, TernaryLinear):  # the layers TerDiT makes ternary
                trits = (torch.randint(0, 3, m.weight.shape, device=dev, generator=gen) - 1).to(torch.int8)
                alpha = torch.full((1,), m.in_features ** -0.5, device=dev)
                m.weight.copy_(alpha * trits)
                ternary[name] = (kernel.pack_2bit(trits), alpha)
        bf = deploy.specialise(bf.to(torch.bfloat16)).eval()
        packed = TerDiT(cfg, device="meta")
        for name, (codes, alpha) in ternary.items():
            src = bf.get_submodule(name)
            layer = deploy.PackedTernaryLinear(src.in_features, src.out_features, src.bias is not None, device=dev)
            layer.packed.copy_(codes)
            layer.alphas.copy_(alpha)
            if src.bias is not None:
                layer.bias = torch.nn.Parameter(src.bias.detach().clone())
            packed.set_submodule(name, layer)
        rest = {k: v for k, v in bf.state_dict().items() if k.rsplit(".", 1)[0] not in ternary}
        packed.load_state_dict(rest, strict=False, assign=True)
    dtypes = {t.dtype for n, t in packed.state_dict().items() if not n.endswith((".packed", ".alphas"))}
    assert dtypes == {torch.bfloat16}, "the packed row must be the bf16 inference model"
    return deploy.finish(packed, kernel_name), bf


def nbytes(model):
    """Bytes of the model's tensors, each storage once (the blocks' adaLN codes are views of the fused ones)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def ternary_kernel_ms(events):
    """(GPU ms of all kernels, of those inside the ternary matmuls) over profiler events. Inside = launched under
    the op terdit::ternary_matmul: the fast `tmv`, `tmm`, `wgmm` or `quant8` + `wgmm8` kernels, `dequant` and its
    cuBLAS gemm, or the readable `ternary_matmul`. If the profiler did not tie the kernels to the op, falls back to
    kernel names (the dequant path's gemm then counts as outside)."""
    events = list(events)
    total = sum(e.device_time_total for e in events if e.device_type == DeviceType.CUDA)
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name == "terdit::ternary_matmul"
           and not (e.cpu_parent and e.cpu_parent.name == e.name)]
    inside = sum(e.device_time_total for e in ops)
    if inside == 0:
        names = ("tmv", "tmm", "wgmm", "quant8", "wgmm8", "dequant", "ternary_matmul")
        print(f"    (profiler: no kernels tied to terdit::ternary_matmul; counting {'/'.join(names)} by name)")
        inside = sum(e.device_time_total for e in events if e.device_type == DeviceType.CUDA and e.name in names)
    return total / 1e3, inside / 1e3


def bench_one_model(model, steps, batch, packed, reps=20):
    """One model at one batch size (CFG doubles it: M = 2 * batch * 256 tokens per linear): ms per denoising step
    (median of CUDA-graph replays), s of the first call (compile + capture), s for a full `steps`-step sample, peak
    GiB, and for a packed model the kernel ms per step and the ms inside the ternary matmuls (torch.profiler on
    plain calls, not replays: same kernels)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    x = torch.randn(2 * batch, 4, 32, 32, device="cuda", dtype=torch.bfloat16, generator=gen)
    t, yy = torch.full((2 * batch,), 500, device="cuda"), torch.cat([y, torch.full_like(y, 1000)])
    runner = CUDAGraphed(model)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner.forward_with_cfg(x, t, yy, 4.0)  # warm-up (compiles, if compiled) and capture
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        runner.forward_with_cfg(x, t, yy, 4.0)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with inference_context(model):  # nothing: both models are bf16 (the sampler's float32 x is cast at the embedder)
        generate(model, y, 4.0, steps, "ddpm", torch.Generator(device="cuda").manual_seed(0), runner)
    torch.cuda.synchronize()
    r = dict(step_ms=statistics.median(times), first_s=first, sample_s=time.perf_counter() - t0,
             peak_GiB=torch.cuda.max_memory_allocated() / 2**30)
    del runner
    if packed:
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model.forward_with_cfg(x, t, yy, 4.0)
            torch.cuda.synchronize()
        gpu_ms, ternary_ms = ternary_kernel_ms(prof.events())
        r.update(gpu_ms=gpu_ms / 3, outside_ms=(gpu_ms - ternary_ms) / 3)
    return r


def bench_variants(model, name, packed, args):
    """Rows for one model: eager at every batch size, then compiled (regional, default mode) at every batch size.
    Dynamo's caches are reset before each compiled row, so its first call is a cold compile of static shapes."""
    rows = []
    for compiled in (False, True):
        if compiled:
            model.compile_blocks()
        for batch in args.batches:
            torch._dynamo.reset()
            with torch.no_grad():
                r = dict(model=f"{name} {'compiled' if compiled else 'eager'}", batch=batch,
                         **bench_one_model(model, args.steps, batch, packed))
            print(r, flush=True)
            rows.append(r)
    return rows


def model_tables(rows, sizes, steps, act):
    """The markdown of bench_model: a timing table (speed-up against the faster bf16 variant at the same size and
    batch) and a weights table."""
    out = [f"## End to end: CFG, random ternary weights, packed model with {act} activations, each step one "
           "CUDA-graph replay; compiled = regional torch.compile (default mode), first call = compile (cold) + capture",
           "",
           f"| size | batch | model | step ms | vs best bf16 | {steps}-step sample s | peak GiB | first call s | "
           "kernel ms/step | outside ternary matmuls ms (share) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min(o["step_ms"] for o in rows if o["size"] == r["size"] and o["batch"] == r["batch"]
                   and o["model"].startswith("bf16"))
        outside = (f"{r['gpu_ms']:.2f} | {r['outside_ms']:.2f} ({r['outside_ms'] / r['gpu_ms']:.0%})" if "gpu_ms" in r
                   else "| ")
        out.append(f"| {r['size']} | {r['batch']} | {r['model']} | {r['step_ms']:.2f} | {best / r['step_ms']:.2f}x | "
                   f"{r['sample_s']:.2f} | {r['peak_GiB']:.2f} | {r['first_s']:.1f} | {outside} |")
    out += ["", "| size | params | packed weights MB | bf16 weights MB | rel. diff packed vs bf16 |", "|---|---|---|---|---|"]
    for s in sizes:
        out.append("| {size} | {params_B:.2f}B | {packed_MB:.0f} | {bf16_MB:.0f} | {rel_err:.1e} |".format(**s))
    return "\n".join(out) + "\n"


def bench_model(args):
    inductor_config.fx_graph_cache = False  # every compile cold, as a user's first run
    dev, rows, sizes = torch.device("cuda"), [], []
    for size in args.sizes:
        gen = torch.Generator(device=dev).manual_seed(0)
        packed, bf = random_pair(size, dev, gen)
        deploy.set_act(packed, args.act)
        x = torch.randn(2, 4, 32, 32, device=dev, dtype=torch.bfloat16, generator=gen)
        t, y = torch.tensor([500, 500], device=dev), torch.tensor([3, 1000], device=dev)
        with torch.no_grad():
            a, b = packed(x, t, y).float(), bf(x, t, y).float()
        sizes.append(dict(size=size, params_B=sum(p.numel() for p in bf.parameters()) / 1e9,
                          rel_err=((a - b).norm() / b.norm()).item(), bf16_MB=nbytes(bf) / 1e6,
                          packed_MB=nbytes(packed) / 1e6))
        del bf
        rows += [dict(size=size, **r) for r in bench_variants(packed, "packed", True, args)]
        del packed
        bf = random_pair(size, dev, torch.Generator(device=dev).manual_seed(0))[1]
        rows += [dict(size=size, **r) for r in bench_variants(bf, "bf16", False, args)]
        del bf
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return dict(rows=rows, sizes=sizes), model_tables(rows, sizes, args.steps, args.act)


# -----------------------------------------------------------------------------
# loading: deploy.load_packed of a packed file onto the GPU, as sample.py loads one (bf16)

def random_packed_file(size, path, gen):
    """Write a pack.py file (2-bit) of a random TerDiT of a size: random trits, α and bf16 tensors (never zeros)."""
    cfg = TerDiTConfig(**SIZES[size], in_channels=4, num_classes=1000)
    net = TerDiT(cfg, device="meta")
    ternary = {f"{name}.weight" for name, _ in pack.ternary_layers(net)}
    encoded = []
    for key, t in net.state_dict().items():
        if key in ternary:
            trits = (torch.randint(0, 3, t.shape, device=gen.device, generator=gen) - 1).to(torch.int8).cpu()
            encoded.append((key[: -len("weight")] + "packed", "trits", list(t.shape), trits))
        elif key.endswith(".alphas"):
            encoded.append((key, "float32", list(t.shape), torch.rand(t.shape, device=gen.device, generator=gen).cpu() + 0.5))
        else:
            encoded.append((key, "bfloat16", list(t.shape),
                            torch.randn(t.shape, device=gen.device, generator=gen).to(torch.bfloat16).cpu()))
    return pack.write_packed(path, asdict(cfg), 0, encoded, 4)


def bench_load(args):
    """(row, markdown): seconds deploy.load_packed(path, "cuda", torch.bfloat16) takes for a random packed file of
    --load-size, median of 3 after one warm-up, the file in a temporary folder (the OS's page cache warm)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "random.tdit")
        t0 = time.perf_counter()
        nbytes_file = random_packed_file(args.load_size, path, torch.Generator(device="cuda").manual_seed(0))
        print(f"wrote a random {args.load_size} file of {nbytes_file / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            net = deploy.load_packed(path, "cuda", torch.bfloat16)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del net
            torch.cuda.empty_cache()
    row = dict(size=args.load_size, file_MB=nbytes_file / 1e6, load_s=statistics.median(times[1:]), all_s=times)
    md = ["## Loading a packed file: deploy.load_packed(path, 'cuda', torch.bfloat16), random weights", "",
          "| size | file MB | load s (median of 3, after a warm-up) | every run s |", "|---|---|---|---|",
          f"| {row['size']} | {row['file_MB']:.0f} | {row['load_s']:.2f} | {', '.join(f'{t:.2f}' for t in times)} |"]
    return row, "\n".join(md) + "\n"


# -----------------------------------------------------------------------------
# training: train.py's step (forward + loss, backward, grad clip, fused AdamW, EMA) in the ImageNet-256 latent
# shape, ternary QAT vs the full-precision twin, eager vs compiled as train.py compiles (block by block)

TRAIN_RUNS = ["600M:64", "4.2B:16", "4.2B:32:compiled"]  # size:batch[:compiled = no eager rows], one GPU
PEAK_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM (datasheet): MFU's denominator


def kernel_category(name):
    """Coarse bucket of a CUDA kernel name, to say where a training step's time goes."""
    n = name.lower()
    for key, cat in (("flash", "attention"), ("fmha", "attention"), ("cudnn", "attention"), ("adam", "optimizer"),
                     ("multi_tensor", "optimizer"), ("foreach", "optimizer"), ("nvjet", "matmul"), ("gemm", "matmul"),
                     ("xmma", "matmul"), ("cutlass", "matmul"), ("triton", "fused elementwise (inductor)"),
                     ("reduce", "reductions / norms"), ("norm", "reductions / norms"), ("elementwise", "elementwise (eager)"),
                     ("copy", "copies / casts"), ("memcpy", "copies / casts"), ("memset", "copies / casts")):
        if key in n:
            return cat
    return "other"


def profile_step(step, n=3):
    """ms of CUDA kernel time per step by category (torch.profiler over n steps)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    cats, kernels = {}, []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.device_type.name == "CUDA":
            c = kernel_category(e.key)
            cats[c] = cats.get(c, 0.0) + t / 1e3 / n
            kernels.append((t / 1e3 / n, e.key[:90]))
    return dict(sorted(cats.items(), key=lambda kv: -kv[1])), sorted(kernels, reverse=True)[:15]


@contextlib.contextmanager
def swap(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def bench_train(args):
    import train  # train.py's own EMA update
    dev, rows = torch.device("cuda"), []
    runs = [(r.split(":")[0], int(r.split(":")[1]), r.endswith(":compiled")) for r in args.train_runs.split(",")]
    for size, batch, compiled_only in runs:
        for ternary in (True, False):
            first = (size, batch) == runs[0][:2] and ternary and not compiled_only  # reference rows, once: composed
            # quantizer (before lean QAT), whole-model compile
            for mode in (() if compiled_only else ("eager",)) + (("eager, composed QAT",) if first else ()) + ("compiled",) + \
                    (("compiled whole model",) if first else ()):
                torch.manual_seed(0)
                held_GiB = torch.cuda.memory_allocated() / 2**30  # left over from earlier rows: should be ~0
                cfg = TerDiTConfig(**SIZES[size], in_channels=4, num_classes=1000, ternary=ternary)
                model = TerDiT(cfg, device=dev)
                ema = TerDiT(cfg, device="meta").to_empty(device=dev).requires_grad_(False)
                ema.load_state_dict(model.state_dict())
                if mode == "compiled":
                    model.compile_blocks()
                forward = torch.compile(model) if mode == "compiled whole model" else model
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)
                gen = torch.Generator(device=dev).manual_seed(0)
                x = torch.randn(batch, 4, 32, 32, device=dev, generator=gen)
                y = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
                t = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
                noise = torch.randn(batch, 4, 32, 32, device=dev, generator=gen)
                diffusion = Diffusion()

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        if mode == "eager, composed QAT":  # F.linear(x, α·STE(W), b): autograd keeps W̃ and α·W̃
                            with swap(quant.TernaryLinearFn, "apply", quant.ternary_linear_ref):
                                loss = diffusion.training_loss(forward, x, y, t, noise)
                        else:
                            loss = diffusion.training_loss(forward, x, y, t, noise)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    train.update_ema(ema, model, 0.9999)

                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()  # compiles
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                for _ in range(3):
                    step()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(args.train_steps):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    step()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b))
                ms = statistics.median(times)
                n_params = sum(p.numel() for p in model.parameters())
                r = dict(size=size, batch=batch, ternary=ternary, mode=mode, step_ms=ms, img_s=batch / ms * 1e3,
                         mfu=6 * n_params * 256 * batch / (ms / 1e3) / (PEAK_TFLOPS * 1e12),
                         peak_GiB=torch.cuda.max_memory_allocated() / 2**30, first_step_s=first_s,
                         spread_ms=max(times) - min(times), params_B=n_params / 1e9,
                         graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"], held_before_GiB=held_GiB)
                if mode != "eager" and ternary:
                    r["profile_ms"], r["top_kernels_ms"] = profile_step(step)
                print(r, flush=True)
                rows.append(r)
                del model, ema, forward, opt, step
                gc.collect()  # the step closure and the models form reference cycles: free them before the next row
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                torch.cuda.empty_cache()
    md = ["## Training step: train.py's step (fwd + loss, bwd, clip 2, fused AdamW, EMA), 4x32x32 latents, "
          "1000 classes, bf16 autocast", "",
          "| size | batch | weights | mode | ms/step | img/s | MFU | peak GiB | first step s | QAT / FP | graphs |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp = next((f["step_ms"] for f in rows if (f["size"], f["batch"], f["mode"]) == (r["size"], r["batch"], r["mode"])
                   and not f["ternary"]), None)
        md.append("| {size} | {batch} | {w} | {mode} | {step_ms:.1f} | {img_s:.0f} | {m:.1f}% | {peak_GiB:.1f} | "
                  "{first_step_s:.1f} | {q} | {graphs} |".format(w="ternary" if r["ternary"] else "full precision", m=100 * r["mfu"],
                                                      q=f"{r['step_ms'] / fp:.2f}x" if r["ternary"] and fp else "", **r))
    for r in rows:
        if "profile_ms" in r:
            md.append(f"\nkernel time per step, {r['size']} ternary {r['mode']} (ms): " +
                      ", ".join(f"{k} {v:.1f}" for k, v in r["profile_ms"].items()))
    return rows, "\n".join(md) + "\n"


def comma_list(cast, what):
    """argparse type: a comma-separated list of values, each checked by cli.number or a choice."""
    def parse(text):
        return [cast(v) for v in text.split(",")]
    parse.__name__ = what
    return parse


def size_name(text):
    if text not in SIZES:
        raise argparse.ArgumentTypeError(f"unknown size {text!r}: choose from {', '.join(SIZES)}")
    return text


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--what", default="kernels", choices=["kernels", "floors", "model", "load", "train", "all"],
                   help="kernels: per layer vs cuBLAS; floors: launch and copy floors; model: end-to-end sampling; "
                        "load: load_packed of a random file; train: QAT step time")
    positive = cli.number(int, 1, what="a positive integer")
    p.add_argument("--sizes", type=comma_list(size_name, "sizes"), default="600M,4.2B", help="model sizes for --what model")
    p.add_argument("--load-size", type=size_name, default="4.2B", help="model size of the random file of --what load")
    p.add_argument("--steps", type=positive, default=250, help="sampling steps for --what model")
    p.add_argument("--batches", type=comma_list(positive, "batches"), default="1,8",
                   help="comma-separated batch sizes (images, before CFG) for --what model")
    p.add_argument("--train-runs", default=",".join(TRAIN_RUNS), help="size:batch[:compiled] runs for --what train")
    p.add_argument("--train-steps", type=positive, default=15, help="timed steps per training run (median taken)")
    p.add_argument("--out", default="bench_results/kernels.md", help="markdown output (a .json beside it)")
    p.add_argument("--m", type=comma_list(positive, "token counts"), default=",".join(map(str, MS)),
                   help="comma-separated token counts M for --what kernels")
    p.add_argument("--readable-m", type=cli.number(int, 0, what="an integer >= 0"), default=16,
                   help="--what kernels times kernel.py's readable kernel too, up to this M (0: never)")
    p.add_argument("--reps", type=positive, default=15, help="graph replays per timing (median taken)")
    p.add_argument("--graph-us", type=cli.number(float, 1, what="a number >= 1"), default=1500.0,
                   help="approximate GPU time of one graph replay")
    p.add_argument("--cold-mb", type=cli.number(float, 1, what="a number >= 1"), default=120.0,
                   help="MB of distinct weights rotated per shape")
    p.add_argument("--sweep", action="store_true",
                   help="--what kernels: also time every candidate tile; the fastest go to fast/tuned/<GPU>.json")
    p.add_argument("--act", default="bf16", choices=["bf16", "fp8"],
                   help="activations of the ternary matmuls (--what kernels, and the packed model of --what "
                        "model): bf16, or fp8 (e4m3 per token, Hopper)")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available() or fast.launch.cp is None:
        raise SystemExit("error: bench.py times GPU kernels and needs CUDA and cupy")
    cli.check_output(args.out)
    prov = provenance(argv)
    print(f"{prov['gpu']}, torch {torch.__version__}, cupy {fast.launch.cp.__version__}, commit {prov['commit']}")
    md = (f"# Benchmarks on {prov['gpu']}\n\nmeasured {prov['date']} at commit {prov['commit']} by "
          f"`{prov['command']}`\n\n")
    results = {"provenance": prov, "device": prov["gpu"]}
    if args.what in ("kernels", "all"):
        rows, log, found = bench_kernels(args)
        acts = "fp8 activations (quant8 + wgmm8)" if args.act == "fp8" else "bf16 activations"
        md += markdown(rows, f"Ternary kernels, {acts}, vs cuBLAS bf16 F.linear (cold weights, CUDA graphs)")
        results.update(kernels=rows, sweep=log)
        if args.sweep and found:
            sweep = {k: prov[k] for k in ("date", "commit", "command")}
            g = fast.gpu(torch.cuda.current_device())
            path = tiles.save_tuned(prov["gpu"], args.act, found, sweep, g.sms, g.wgmma)
            print(f"wrote the fastest tiles of {sum(map(len, found.values()))} rows to {path}")
    for what, bench in (("floors", bench_floors), ("model", bench_model), ("load", bench_load), ("train", bench_train)):
        if args.what in (what, "all"):
            rows, table = bench(args)
            md += "\n" + table
            results[what] = rows
    print("\n" + md)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with cli.atomic_write(args.out) as f:
        f.write(md.encode())
    with cli.atomic_write(os.path.splitext(args.out)[0] + ".json") as f:
        f.write(json.dumps(results, indent=1).encode())


if __name__ == "__main__":
    cli.run(main)
