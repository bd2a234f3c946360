"""
The fast kernels' data layouts, in plain torch (any device): the tile order of the 2-bit weight codes and the fp8
image of X that wgmm8 reads. docs/kernel.md derives both from the mma fragments.

    python -m pytest tests/test_fast.py -v       # the layouts checked against their definitions, on the CPU

Tile order. The codes (kernel.pack_2bit: code = trit + 1, 2 bits) are padded with code 1 (trit 0) to (Np, Kp) =
(16*, 128*) and cut into tiles of 16 rows x 128 k, 512 bytes each, tiles row after row (n16-tile outermost, so the
tiles of linears whose widths are multiples of 16 concatenate along N). Within a tile, lane (g = lane/4, t = lane%4)
of a warp gets 16 bytes: 4 words, word w = the m16n8k16 A fragments of k16 steps 2w and 2w+1; word w holds 8 pairs,
pair j its low code at bit 2j and its high code at bit 16 + 2j.
"""

import torch

TILE_N, TILE_K = 16, 128
# view of the padded (Np, Kp) code matrix whose dims are  n = (Tn, r0, g)  and  k = (Ck, w, s1, r1, t, h):
#   Tn n16-tile, r0 upper/lower 8 rows of the A fragment, g = lane/4 | Ck k128-chunk, w word (= pair of k16
#   steps), s1 step within the pair, r1 low/high 8 columns of the fragment, t = lane%4, h pair element.
PERM = (0, 3, 2, 7, 4, 8, 5, 6, 1)  # -> (Tn, Ck, g, t, w | h, s1, r1, r0): the last 4 dims = 16 codes of a word
_UNPERM = tuple(PERM.index(i) for i in range(9))


def padded(N, K):
    """(Np, Kp): N and K rounded up to whole tiles."""
    return -(-N // TILE_N) * TILE_N, -(-K // TILE_K) * TILE_K


def _dims(Np, Kp):
    """The (n, k) dims of the padded code matrix in the order the comment above names them."""
    return Np // 16, 2, 8, Kp // 128, 4, 2, 2, 4, 2


def _bytes(q):
    """Codes (..., 4) in 0..2 -> uint8 (...): code i at bits 2i."""
    return q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)


def _codes(b):
    """uint8 (...) -> codes (..., 4): the inverse of _bytes."""
    return torch.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)


def tile_codes(codes, N, K):
    """Row-major codes (N, ceil(K/4)) uint8 (kernel.pack_2bit) -> the tile order, uint8 (Np, Kp/4), on codes'
    device."""
    if codes.dtype != torch.uint8 or codes.shape != (N, -(-K // 4)):
        raise ValueError(f"codes must be uint8 of shape ({N}, {-(-K // 4)}) for N={N}, K={K}, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    Np, Kp = padded(N, K)
    q = torch.ones(Np, Kp, dtype=torch.uint8, device=codes.device)  # code 1 == trit 0 in the padding
    q[:N, :K] = _codes(codes).view(N, -1)[:, :K]
    return _bytes(q.view(_dims(Np, Kp)).permute(PERM).reshape(-1, 4)).view(Np, Kp // 4)


def untile_codes(tiled, N, K):
    """The inverse of tile_codes: tile order (Np, Kp/4) -> row-major codes (N, ceil(K/4)), padding code 1."""
    Np, Kp = padded(N, K)
    if tiled.dtype != torch.uint8 or tiled.numel() != Np * Kp // 4:
        raise ValueError(f"tiled codes must be uint8 with {Np * Kp // 4} elements for N={N}, K={K}")
    dims = _dims(Np, Kp)
    q = _codes(tiled.reshape(-1)).view(*[dims[i] for i in PERM]).permute(_UNPERM).reshape(Np, Kp)
    rows = torch.ones(N, 4 * -(-K // 4), dtype=torch.uint8, device=tiled.device)
    rows[:, :K] = q[:N, :K]
    return _bytes(rows.view(N, -1, 4))


def fp8_image(q, Mp):
    """Codes q (M, Kp) float8_e4m3fn as wgmm8 reads them: uint8 (Kp/128, Mp, 128); rows >= M zero; in each 16 k,
    k = 8 r1 + 2 t + h sits at byte 4 t + 2 h + r1; the 16-byte piece p of row m at p ^ m % 8."""
    M, Kp = q.shape
    b = torch.zeros(Mp, Kp, dtype=torch.uint8, device=q.device)
    b[:M] = q.view(torch.uint8)
    b = b.view(Mp, Kp // 16, 2, 4, 2).permute(0, 1, 3, 4, 2).reshape(Mp, Kp // 128, 8, 16)
    swz = torch.arange(8, device=q.device) ^ (torch.arange(Mp, device=q.device) % 8)[:, None]  # (Mp, 8), an involution
    b = b.gather(2, swz[:, None, :, None].expand_as(b))
    return b.permute(1, 0, 2, 3).reshape(Kp // 128, Mp, 128)
