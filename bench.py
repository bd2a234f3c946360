"""
Benchmarks: the fused ternary kernel (kernel.py) against cuBLAS bf16 F.linear on the same ternary values.

    python bench.py --what kernels --out bench_results/kernels_h100.md
    python bench.py --what train --out bench_results/train_h200.md   # train.py's step: MFU, memory, compile
    python bench.py --what kernels --sweep     # first time every candidate tile config / cluster split per row,
                                               # use the fastest, print the table to paste as tiles.TUNED
    python bench.py --what kernels --act fp8 --sweep --m 64,256,512,2048,8192   # fp8 activations: tiles.TUNED8
    python bench.py --what floors --out bench_results/floors_h200.md   # empty launches, L2 -> smem, plain reads

How it times (see /work/.library/device/METHOD.md): every number is the median over --reps replays of a
CUDA graph holding many calls, timed with CUDA events, so launch gaps from Python are gone. Consecutive
calls rotate through enough distinct copies of the weights (--cold-mb, default 120 MB) that nothing is
served from the 50 MB L2 -- as in a real forward pass, where every layer's weights are new. Data is random
(never zeros). TB/s counts the bytes each call must move (packed weights + X + Y); TFLOP/s = 2*M*K*N/t.
"""
import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import statistics

import time
from dataclasses import replace

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

import kernel
import tiles
from diffusion import Diffusion
from model import SIZES, RMSNorm, TerDiT, TerDiTConfig
import quant
from pack import PackedTernaryLinear, fuse, set_act
from quant import TernaryLinear
from sample import CUDAGraphed, inference_context

# (model, layer, K, N): the token-wise linears of TerDiT-600M / 4.2B and DiT-XL, the adaLN GEMVs, and the packed
# model's fused matmuls (pack.FusedLinears: wq, wk, wv and w1, w3 stacked along N)
SHAPES = [
    ("600M", "qkv-proj", 1536, 1536), ("600M", "mlp-up", 1536, 4096), ("600M", "mlp-down", 4096, 1536),
    ("600M", "adaLN", 1024, 9216), ("600M", "wq+wk+wv", 1536, 4608), ("600M", "w1+w3", 1536, 8192),
    ("4.2B", "qkv-proj", 3072, 3072), ("4.2B", "mlp-up", 3072, 8192), ("4.2B", "mlp-down", 8192, 3072),
    ("4.2B", "adaLN", 1024, 18432), ("4.2B", "wq+wk+wv", 3072, 9216), ("4.2B", "w1+w3", 3072, 16384),
    ("DiT-XL", "attn", 1152, 1152),
]
MS = [1, 2, 8, 16, 64, 256, 512, 2048, 8192]


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


def bench_kernels(args):
    dev = torch.device("cuda")
    fp8 = args.act == "fp8"  # the ternary x fp8 path: quant8 + wgmm8 timed together (and quant8 alone)
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=dev).manual_seed(0)
    Ms = [int(m) for m in args.m.split(",")]
    rows, sweep = [], []
    sms, wgmma, _ = kernel._gpu(dev.index or 0)
    for model, layer, K, N in SHAPES:
        if fp8 and layer == "adaLN":  # the model never runs adaLN with fp8 activations (pack.set_act)
            continue
        w = (torch.randint(0, 3, (N, K), device=dev, generator=gen) - 1).to(torch.int8)
        alpha = torch.rand(1, device=dev, generator=gen) + 0.5
        packed = kernel.pack_2bit(w)
        wb = (alpha * w.float()).bfloat16()  # cuBLAS gets the same ternary values, dequantised to bf16
        # distinct copies, so that each call of a graph reads weights that are not in L2
        P = [packed.clone() for _ in range(math.ceil(args.cold_mb * 1e6 / packed.numel()))]
        Wb = [wb.clone() for _ in range(max(2, math.ceil(args.cold_mb * 1e6 / (2 * wb.numel()))))]
        for M in Ms:
            x = torch.randn(M, K, device=dev, generator=gen).bfloat16()
            # fp8: against the same e4m3 codes summed in float32 (the quantisation's own error is evaluate.py's)
            ref = kernel.ternary_matmul_ref(x.float(), packed, alpha, N, K, fp8=True) if fp8 else F.linear(x.float(), wb.float())
            flops, nbytes = 2 * M * K * N, packed.numel() + 2 * M * K + 2 * M * N
            est = max(2.0, flops / 300e12 * 1e6, nbytes / 2e12 * 1e6)  # rough us per call, to size the graph
            n = int(min(200, max(10, args.graph_us / est)))
            if args.sweep and M != 2:  # time every candidate config; the fastest goes into tiles.TUNED(8)
                best = None
                for name, cs in candidates8(M, K) if fp8 else candidates(M, N, K, wgmma):
                    yc = kernel.ternary_matmul(x, packed, alpha, N, K, config=(name, cs), fp8=fp8)
                    e = ((yc.float() - ref).norm() / ref.norm()).item()
                    t = time_graph(lambda i: kernel.ternary_matmul(x, P[i % len(P)], alpha, N, K, config=(name, cs),
                                                                   fp8=fp8), n, max(5, args.reps // 2))
                    sweep.append(dict(K=K, N=N, M=M, config=f"{name}/cs{cs}", us=t, rel_err=e))
                    print(f"    sweep {name:5s} cs{cs}: {t:8.2f} us  err {e:.1e}", flush=True)
                    if e >= 1e-2:
                        print(f"    WRONG: config {name}/cs{cs} at M={M} K={K} N={N}: rel err {e}")
                    elif best is None or t < best[0]:
                        best = (t, (name, cs))
                if best:
                    (tiles.TUNED8 if fp8 else tiles.TUNED).setdefault((K, N), {})[M] = best[1]
            y = kernel.ternary_matmul(x, packed, alpha, N, K, fp8=fp8)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            tk = time_graph(lambda i: kernel.ternary_matmul(x, P[i % len(P)], alpha, N, K, fp8=fp8), n, args.reps)
            chosen = tiles.pick8(M, N, K, sms) if fp8 else tiles.pick(M, N, K, sms, wgmma)  # the dispatch's choice
            tc = time_graph(lambda i: F.linear(x, Wb[i % len(Wb)]), n, args.reps)
            r = dict(model=model, layer=layer, K=K, N=N, M=M, kernel_us=tk, cublas_us=tc, speedup=tc / tk,
                     TBps=nbytes / tk / 1e6, TFLOPs=flops / tk / 1e6, cublas_TFLOPs=flops / tc / 1e6,
                     rel_err=err, config="dequant+cuBLAS" if chosen[0] == "dequant" else "%s/cs%d" % chosen)
            if fp8:  # the share of quant8 in that time
                Mp = -(-M // kernel.FP8_ROWS) * kernel.FP8_ROWS
                r["quant_us"] = time_graph(lambda i: kernel.quantize_fp8(x, Mp), n, args.reps)
                r["config"] += f" (quant8 {r['quant_us']:.1f} us)"
            rows.append(r)
            print("| %-6s %-8s | %5d x %5d | %5d | %8.2f | %8.2f | %5.2fx | %5.2f | %6.1f | %s | err %.1e" % (
                model, layer, K, N, M, tk, tc, tc / tk, r["TBps"], r["TFLOPs"], r["config"], err), flush=True)
            assert err < 1e-2, f"kernel wrong at M={M} K={K} N={N}: rel err {err}"
        del P, Wb
        torch.cuda.empty_cache()
    return rows, sweep


def markdown(rows, title):
    out = [f"## {title}", "", "| model | layer | K | N | M | ternary us | cuBLAS us | speed-up | TB/s "
           "| TFLOP/s | cuBLAS TFLOP/s | path |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| {model} | {layer} | {K} | {N} | {M} | {kernel_us:.2f} | {cublas_us:.2f} | {speedup:.2f}x | "
                   "{TBps:.2f} | {TFLOPs:.1f} | {cublas_TFLOPs:.1f} | {config} |".format(**r))
    return "\n".join(out) + "\n"


# -----------------------------------------------------------------------------
# the floors under the small-M kernels: how long a launch of nothing takes in a graph, how fast an SM pulls the same
# L2-resident bytes into shared memory (what the GEMV does with X's rows), and a plain read of a layer's packed codes

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
    ternary kernel at M = 1 on the same layers (cold weights as in --what kernels)."""
    dev, gen = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0)
    mod = kernel.cp.RawModule(code=FLOOR_SRC)
    ingest, readw = mod.get_function("ingest"), mod.get_function("readw")
    ingest.max_dynamic_shared_size_bytes = 96 * 1024
    sms = kernel._gpu(0).sms
    X = torch.randn(sms * 96 * 1024 // 4, device=dev, generator=gen)  # 96 KB per SM, stays in L2
    out = torch.empty(4 * sms, device=dev)
    stream = lambda: kernel._stream(torch.cuda.current_stream().cuda_stream, 0)
    u64, i32 = kernel.cp.uint64, kernel.cp.int32
    rows, md = [], ["## Floors: launches, L2 -> shared memory, plain reads of the codes", "",
                    "| probe | CTAs | KB per CTA | us per launch |", "|---|---|---|---|"]
    for kb, distinct in ((0, 0), (24, 0), (48, 0), (96, 0), (96, 1)):
        for g in (1, sms // 2, sms, 2 * sms):
            if distinct and g > sms:
                continue
            t = time_graph(lambda i: ingest((g,), (256,), (u64(X.data_ptr()), i32(kb * 64), i32(distinct),
                                                           u64(out.data_ptr())), shared_mem=kb * 1024, stream=stream()),
                           200, args.reps)
            probe = "empty launch" if kb == 0 else "ingest, " + ("each CTA its own bytes" if distinct else "same bytes")
            rows.append(dict(probe=probe, ctas=g, kb=kb, us=t))
            md.append(f"| {probe} | {g} | {kb} | {t:.2f} |")
    md += ["", "| layer | K | N | packed MB | plain read us | ternary M=1 us | ternary / read |",
           "|---|---|---|---|---|---|---|"]
    for model, layer, K, N in SHAPES:
        w = (torch.randint(0, 3, (N, K), device=dev, generator=gen) - 1).to(torch.int8)
        packed, alpha = kernel.pack_2bit(w), torch.rand(1, device=dev, generator=gen) + 0.5
        P = [packed.clone() for _ in range(math.ceil(args.cold_mb * 1e6 / packed.numel()))]
        x = torch.randn(1, K, device=dev, generator=gen).bfloat16()
        n16 = packed.numel() // 16
        tr = time_graph(lambda i: readw((-(-n16 // 1024),), (256,), (u64(P[i % len(P)].data_ptr()), i32(n16),
                                                                    u64(out.data_ptr())), stream=stream()),
                        200, args.reps)
        tk = time_graph(lambda i: kernel.ternary_matmul(x, P[i % len(P)], alpha, N, K), 200, args.reps)
        rows.append(dict(model=model, layer=layer, K=K, N=N, mb=packed.numel() / 1e6, read_us=tr, kernel_us=tk))
        md.append(f"| {model} {layer} | {K} | {N} | {packed.numel() / 1e6:.2f} | {tr:.2f} | {tk:.2f} | {tk / tr:.2f} |")
        del P
    return rows, "\n".join(md) + "\n"


# -----------------------------------------------------------------------------
# end to end: one denoising step and a 250-step CFG sample, packed 2-bit model vs bf16 model, each eager and
# compiled (regional torch.compile, default mode), each step one CUDA-graph replay

def random_pair(size, dev, gen):
    """The same random ternary TerDiT (ImageNet-256 config: 32x32x4 latents, 1000 classes) twice: as a packed
    model (PackedTernaryLinear, fused kernel) and as a plain bf16 model whose linears hold alpha * trits. Both
    run in bf16 without autocast: the packed one is the lean model sample.py runs on a GPU
    (pack.load_packed(..., dtype=torch.bfloat16): bf16 tensors, float32 α, model.lean() true inside)."""
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
        bf = bf.to(torch.bfloat16).eval()
        packed = TerDiT(cfg, device="meta")
        for name, (codes, alpha) in ternary.items():
            src = bf.get_submodule(name)
            layer = PackedTernaryLinear(src.in_features, src.out_features, src.bias is not None, codes.shape, device=dev)
            layer.packed.copy_(codes)
            layer.alphas.copy_(alpha)
            if src.bias is not None:
                layer.bias = torch.nn.Parameter(src.bias.detach().clone())
            packed.set_submodule(name, layer)
        rest = {k: v for k, v in bf.state_dict().items() if k.rsplit(".", 1)[0] not in ternary}
        packed.load_state_dict(rest, strict=False, assign=True)
    lean = {n: t.dtype for n, t in packed.state_dict().items() if not n.endswith((".packed", ".alphas"))}
    assert set(lean.values()) == {torch.bfloat16}, "the packed row must be the lean bf16 model"
    return fuse(packed.eval()), bf


def nbytes(model):
    """Bytes of the model's tensors, each storage once (the blocks' adaLN codes are views of the fused ones)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def ternary_kernel_ms(events):
    """(GPU ms of all kernels, of those inside the ternary matmuls) over profiler events. Inside = launched under
    the op terdit::ternary_matmul: the fused `tmm`, `wgmm` or `quant8` + `wgmm8` kernels, or `dequant` and its cuBLAS
    gemm. If the profiler did not tie the kernels to the op, falls back to kernel names (the dequant path's gemm then
    counts as outside)."""
    events = list(events)
    total = sum(e.device_time_total for e in events if e.device_type == DeviceType.CUDA)
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name == "terdit::ternary_matmul"
           and not (e.cpu_parent and e.cpu_parent.name == e.name)]
    inside = sum(e.device_time_total for e in ops)
    if inside == 0:
        names = ("tmm", "wgmm", "quant8", "wgmm8", "dequant")
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
        Diffusion().sample(runner, y, (4, 32, 32), cfg_scale=4.0, num_steps=steps, method="ddpm", clip_denoised=False,
                           generator=torch.Generator(device="cuda").manual_seed(0))
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
    batches = [int(b) for b in args.batches.split(",")]
    for compiled in (False, True):
        if compiled:
            model.compile_blocks()
        for batch in batches:
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
    for size in args.sizes.split(","):
        gen = torch.Generator(device=dev).manual_seed(0)
        packed, bf = random_pair(size, dev, gen)
        set_act(packed, args.act)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--what", default="kernels", choices=["kernels", "floors", "model", "train", "all"],
                   help="kernels: per-layer vs cuBLAS; model: end-to-end sampling; train: QAT step time")
    p.add_argument("--sizes", default="600M,4.2B", help="model sizes for --what model")
    p.add_argument("--steps", type=int, default=250, help="sampling steps for --what model")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (images, before CFG) for --what model")
    p.add_argument("--train-runs", default=",".join(TRAIN_RUNS), help="size:batch[:compiled] runs for --what train")
    p.add_argument("--train-steps", type=int, default=15, help="timed steps per training run (median taken)")
    p.add_argument("--out", default="bench_results/kernels.md", help="markdown output (a .json beside it)")
    p.add_argument("--m", default=",".join(map(str, MS)), help="comma-separated token counts M")
    p.add_argument("--reps", type=int, default=15, help="graph replays per timing (median taken)")
    p.add_argument("--graph-us", type=float, default=1500.0, help="approximate GPU time of one graph replay")
    p.add_argument("--cold-mb", type=float, default=120.0, help="MB of distinct weights rotated per shape")
    p.add_argument("--sweep", action="store_true", help="also time every candidate tile config")
    p.add_argument("--act", default="bf16", choices=["bf16", "fp8"],
                   help="activations of the ternary matmuls (--what kernels, and the packed model of --what "
                        "model): bf16, or fp8 (e4m3 per token, Hopper)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench.py times GPU kernels and needs CUDA (and cupy for the fused kernel)")
    gpu = torch.cuda.get_device_name()
    print(f"device: {gpu}, torch {torch.__version__}, cupy {getattr(kernel.cp, '__version__', None)}")
    md, results = f"# Benchmarks on {gpu}\n\n", {"device": gpu}
    if args.what in ("kernels", "all"):
        rows, sweep = bench_kernels(args)
        acts = "fp8 activations (quant8 + wgmm8)" if args.act == "fp8" else "bf16 activations"
        md += markdown(rows, f"Ternary kernel, {acts}, vs cuBLAS bf16 F.linear (cold weights, CUDA graphs)")
        tuned = tiles.TUNED8 if args.act == "fp8" else tiles.TUNED
        results.update(kernels=rows, sweep=sweep, tuned={f"{k[0]}x{k[1]}": v for k, v in tuned.items()})
        if args.sweep:
            print("TUNED8 =" if args.act == "fp8" else "TUNED =", tuned)
    if args.what in ("floors", "all"):
        rows, table = bench_floors(args)
        md += "\n" + table
        results.update(floors=rows)
    if args.what in ("model", "all"):
        rows, table = bench_model(args)
        md += "\n" + table
        results.update(model=rows)
    if args.what in ("train", "all"):
        rows, table = bench_train(args)
        md += "\n" + table
        results.update(train=rows)
    print("\n" + md)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
