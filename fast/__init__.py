"""
The fast ternary matmul kernels (CUDA through cupy's NVRTC; any GPU from sm_80, wgmma on Hopper). kernel.py holds
the semantics, a plain PyTorch reference and a short readable kernel; this package makes the same product fast:

    layout.py   the codes permuted into the mma fragments' tile order (tile_codes), the fp8 image of X
    tiles.py    the tile catalogue, the rules that pick a tile, the tuned tables (tuned/<GPU name>.json)
    compile.py  the CUDA sources (common.cuh + gemv.cu, mma.cu, wgmma.cu, quant8.cu, dequant.cu) through NVRTC
    launch.py   tensor maps, launches, fp8 activations, matmul(): the entry point kernel.ternary_matmul calls

The design (layout, tiles, what bounds each regime): docs/kernel.md.

    python bench.py --what kernels --out bench_results/kernels.md      # per layer against cuBLAS (CUDA + cupy)
"""

from . import compile, launch, layout, tiles
from .launch import FP8_ROWS, choose, gpu, matmul, quantize_fp8
from .layout import fp8_image, padded, tile_codes, untile_codes

__all__ = ["compile", "launch", "layout", "tiles", "FP8_ROWS", "choose", "gpu", "matmul", "quantize_fp8", "fp8_image",
           "padded", "tile_codes", "untile_codes"]
