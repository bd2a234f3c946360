"""
Compiling the fast kernels: NVRTC through cupy, once per configuration. A kernel's source is the shared header
common.cuh followed by its family's .cu, with the configuration in front as #defines:

    TMV  gemv.cu    the GEMV, M <= 16 (any GPU from sm_80)       TMM    mma.cu     mma.sync tiles (sm_80)
    WGMM wgmma.cu   wgmma, 16-bit X (sm_90a)                     WGMM8  wgmma.cu   wgmma, fp8 X (sm_90a)
    QUANT8 quant8.cu  X to e4m3 per token, for WGMM8             DEQUANT dequant.cu  codes to a 16-bit matrix

    python -c "import fast; print(fast.compile.source('TMV', 'v1x8m1c3')[:400])"
"""

import functools
import os

import torch

from . import tiles

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILY = {"TMV": "gemv.cu", "TMM": "mma.cu", "WGMM": "wgmma.cu", "WGMM8": "wgmma.cu", "QUANT8": "quant8.cu",
          "DEQUANT": "dequant.cu"}


def _magic_consts(bf16):
    """(PER, MAGIC, SCALES, BIASES) of the LOP3/FMA dequant; exact for codes 0..2 (tested on CPU)."""
    dt, per, magic = (torch.bfloat16, 3, 128.0) if bf16 else (torch.float16, 5, 1024.0)
    bits = lambda v: int(torch.tensor([v], dtype=dt).view(torch.int16).item()) & 0xFFFF
    x2 = lambda v: bits(v) * 0x10001
    return per, x2(magic), [x2(4.0 ** -i) for i in range(5)], [x2(-(magic * 4.0 ** -i + 1)) for i in range(5)]


def _wgmma_source(bm, dt):
    """The wgmma_mma device function for tile width bm and input type dt (bf16, f16: k16; e4m3: k32, which
    takes no transpose flag): one asm statement with bm/2 accumulator operands."""
    n = bm // 2
    d = ", ".join(f"%{i}" for i in range(n))
    a = ", ".join(f"%{n + i}" for i in range(4))
    ops = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    shape, flags = ("k32", "1, 1") if dt == "e4m3" else ("k16", "1, 1, 0")
    return (f"__device__ __forceinline__ void wgmma_mma(float* d, const u32* a, u64 desc) {{\n"
            f'  asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{n + 5}, 0;\\n"\n'
            f'    "wgmma.mma_async.sync.aligned.m64n{bm}{shape}.f32.{dt}.{dt} {{{d}}}, {{{a}}}, %{n + 4}, p, {flags}; }}"\n'
            f'    : {ops}\n'
            f'    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));\n}}\n')


@functools.lru_cache(maxsize=None)
def _read(name):
    with open(os.path.join(HERE, name)) as f:
        return f.read()


def source(kind, name=None, cs=1, bf16=True, bias=0, avec=False):
    """The CUDA source of one configuration: #defines, common.cuh, the family's .cu. kind: TMV, TMM, WGMM, WGMM8,
    QUANT8 or DEQUANT; name: the tile; cs: cluster split of K; bias: 0 none, 1 in the output dtype, 2 float32;
    avec: alpha per output channel instead of one."""
    d = {kind: 1}
    if kind == "QUANT8":
        d.update(IS_BF16=int(bf16))
    elif kind != "DEQUANT":
        per, magic, sc, bi = _magic_consts(bf16)
        d.update(MATMUL=1, CS=cs, PER=per, MAGIC=f"{magic:#x}u", SCALES=",".join(f"{v:#x}u" for v in sc),
                 BIASES=",".join(f"{v:#x}u" for v in bi), DT='"bf16"' if bf16 else '"f16"', IS_BF16=int(bf16),
                 BIAS=bias, AVEC=int(avec), CLUSTER=f"__cluster_dims__(1, 1, {cs})" if cs > 1 else "")
    if kind == "TMM":
        d.update(zip(("WNT", "WMT", "WN", "WM", "WK", "ST", "NACC"), tiles.CONFIGS[name]))
    if kind == "TMV":
        d.update(zip(("TN", "KW", "MT", "CPW", "STAGE"), tiles.gemv_tile(name)))
    if kind in ("WGMM", "WGMM8"):
        d.update(zip(("WGN", "BM", "ST", "MINB"), (tiles.WG_CONFIGS if kind == "WGMM" else tiles.WG8_CONFIGS)[name]))
    src = _read("common.cuh") + _read(FAMILY[kind])
    if kind in ("WGMM", "WGMM8"):
        dt = "e4m3" if kind == "WGMM8" else "bf16" if bf16 else "f16"
        src = src.replace("WGMMA_FN\n", _wgmma_source(d["BM"], dt))
    return "".join(f"#define {k} {v}\n" for k, v in d.items()) + src


def kind_of(name):
    """(kind, kernel function name) of a tile."""
    return (("WGMM", "wgmm") if name in tiles.WG_CONFIGS else ("WGMM8", "wgmm8") if name in tiles.WG8_CONFIGS
            else ("TMV", "tmv") if tiles.gemv_tile(name) else ("TMM", "tmm"))


def _outside_capture():
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fast: call ternary_matmul once eagerly (to compile) before graph capture")


@functools.lru_cache(maxsize=None)
def kernel(name, cs, bf16, bias, avec, device, smem_optin):
    """Compile (NVRTC) and cache one tile configuration for a device (smem_optin: the most dynamic shared memory
    a CTA may opt in to there); must first run outside CUDA-graph capture."""
    import cupy as cp
    _outside_capture()
    kind, fn = kind_of(name)
    options = ("-std=c++17", "-arch=sm_90a") if kind.startswith("WGMM") else ("-std=c++17",)  # wgmma: sm_90a only
    with cp.cuda.Device(device):
        k = cp.RawModule(code=source(kind, name, cs, bf16, bias, avec), options=options).get_function(fn)
        nthr, smem = tiles.dims(name)[2:]  # a GEMV tile's is its most (16 tokens); the launch checks what it uses
        if smem + k.shared_size_bytes > 48 * 1024:  # past 48 KB with the static arrays: opt in
            k.max_dynamic_shared_size_bytes = min(smem, smem_optin - k.shared_size_bytes)
    if k.max_threads_per_block < nthr:
        raise RuntimeError(f"fast: config {name} compiled to {k.num_regs} registers per thread, too many for "
                           f"{nthr} threads per CTA on this GPU")
    return k


@functools.lru_cache(maxsize=None)
def aux_kernel(kind, bf16, device):
    """The DEQUANT (expand codes) or QUANT8 (fp8 activations) kernel, compiled and cached like kernel()."""
    import cupy as cp
    _outside_capture()
    with cp.cuda.Device(device):
        return cp.RawModule(code=source(kind, bf16=bf16), options=("-std=c++17",)).get_function(kind.lower())
