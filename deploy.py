"""
The deployed TerDiT: the trained network of model.py with its ternary layers held as 2-bit codes and multiplied by
kernel.py, specialised for bf16 inference and fused where one matmul can do the work of several.

    python -c "import deploy; m = deploy.load_packed('assets/demo.tdit'); print(m)"
    python sample.py --ckpt out/model.tdit --device cuda      # runs load_packed(..., dtype=torch.bfloat16)

model.py is the training model; deployment changes three things, all of them here:

1. Weights. Each ternary linear (TerDiT paper Eq. 2, W_Q = α·W̃) becomes a PackedTernaryLinear: W̃ as the
   row-major codes of a pack.py file (kernel.pack_2bit), α float32, y = x·(α W̃)ᵀ + b in one kernel call.
   finish() hands the codes to kernel.prepare once, on their device: the fast kernels' tile order on a GPU.
2. bf16 inference. load_packed(..., dtype=torch.bfloat16), run without autocast, keeps the residual stream in
   bf16 from input to output. model.py's norms, modulation, gated residual and RoPE go through float32 and back,
   which training needs (autocast switches activations between bf16 and float32) but a bf16 model pays for in
   full passes over its activations; the Inference* modules below compute them with fused ops in x's dtype.
   In float32, or under autocast, they run model.py's formulas, bit for bit (lean() decides).
3. Fusion. adaLN reads only the conditioning c, never the image tokens, so all blocks' modulations come from one
   matmul up front (FusedAdaLN); wq, wk, wv read one input, and so do w1, w3: one matmul each (FusedLinears).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernel
import model
import pack
from kernel import prepare  # by name: finish's argument `kernel` (which kernel to prepare for) hides the module


def _autocast(x):
    """x in autocast's dtype inside an autocast region (the packed layers act like nn.Linear there: the kernel needs
    bf16/fp16), else x."""
    return x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x


# -----------------------------------------------------------------------------
# the ternary layer, packed

class PackedTernaryLinear(nn.Module):
    """y = x · (α W̃)ᵀ + b with W̃ held as 2-bit codes (uint8, kernel.pack_2bit's row-major layout as the file stores
    them, or after finish() whatever kernel.prepare made of them: `tiled` says which) and multiplied through
    kernel.ternary_matmul_op, a custom op, so that torch.compile traces the layer without a break; α and b are
    applied in the kernel's epilogue (one rounding). fp8 (a plain attribute, not in the state dict; set_act sets
    it): x quantised per token to e4m3 first, the kernel's W1.58A8 path."""

    def __init__(self, in_features, out_features, bias, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # K, N
        self.register_buffer("packed", torch.empty(out_features, -(-in_features // 4), dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("alphas", torch.empty(1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.tiled, self.fp8 = False, False

    def forward(self, x):
        return kernel.ternary_matmul_op(_autocast(x), self.packed, self.alphas, self.out_features, self.in_features,
                                        self.bias, fp8=self.fp8, tiled=self.tiled)

    def _apply(self, fn, recurse=True):
        # Module.to/half/bfloat16 cast every floating buffer. uint8 `packed` is safe (integer buffers are never
        # cast), but α must stay float32 and exact: move the original α to wherever `packed` went, uncast.
        alphas = self.alphas
        super()._apply(fn, recurse)
        self.alphas = alphas.to(self.packed.device)
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tiled={self.tiled}, fp8={self.fp8}")


# -----------------------------------------------------------------------------
# fused matmuls: linears stacked along N

def _stack_codes(owner, linears):
    """Stack the linears' codes along N into owner's buffer "packed" (left out of the state dict) and make each
    linear's `packed` a view of its rows, so nothing is stored twice. Row-major codes stack by concatenation, and
    so do the tile-ordered ones of linears whose widths are multiples of kernel.TILE_N (whole tiles, one after
    another); the fused modules take only such linears."""
    owner.register_buffer("packed", torch.cat([m.packed for m in linears]), persistent=False)
    owner.tiled, end = linears[0].tiled, 0
    for m in linears:
        rows = m.packed.shape[0]
        m.packed = owner.packed[end: end + rows]
        end += rows


def _stackable(linears, bias):
    """Packed linears of one input width and one code layout, with (bias=True) or without biases, each width a
    multiple of kernel.TILE_N."""
    return all(isinstance(m, PackedTernaryLinear) and (m.bias is not None) == bias and m.tiled == linears[0].tiled
               and m.in_features == linears[0].in_features and m.out_features % kernel.TILE_N == 0 for m in linears)


class FusedAdaLN(nn.Module):
    """Every block's adaLN (SiLU -> ternary linear -> RMSNorm) in one ternary matmul: the blocks' codes stacked
    into one (depth * 6 * dim, cond_dim) matrix, multiplied with α = 1, then each block's α, bias and RMSNorm
    applied to its slice (elementwise work that torch.compile fuses). One GEMV of depth x the rows instead of
    depth small ones.

    It owns only the stacked codes (a buffer left out of the state dict: checkpoints and files are unchanged);
    each block's `packed` becomes a view of its rows, so nothing is stored twice. α, bias and norm gain are read
    from the blocks at each call, so they are never stale and keep their dtypes (α float32)."""

    def __init__(self, blocks):
        super().__init__()
        self.linears = [b.adaLN_modulation[1] for b in blocks]  # a plain list: the blocks stay their owners
        self.norms = [b.adaLN_modulation[2] for b in blocks]
        if not _stackable(self.linears, bias=True):
            raise ValueError("FusedAdaLN needs every block's adaLN linear packed (PackedTernaryLinear, with bias), "
                             f"of one layout, its width a multiple of {kernel.TILE_N}")
        first = self.linears[0]
        self.in_features, self.width = first.in_features, first.out_features  # cond_dim, 6 * dim
        _stack_codes(self, self.linears)
        self.register_buffer("one", torch.ones(1, device=first.packed.device), persistent=False)

    def forward(self, c):
        """c (N, cond_dim) -> every block's modulation, (N, depth, 6 * dim)."""
        x = _autocast(F.silu(c))
        depth = len(self.linears)
        # never fp8 (set_act leaves adaLN alone): M is the batch, too few rows for 8-bit activations to pay, and
        # these modulations scale and gate every block's residual stream
        y = kernel.ternary_matmul_op(x, self.packed, self.one, depth * self.width, self.in_features, tiled=self.tiled)
        alphas = torch.stack([m.alphas for m in self.linears])  # (depth, 1), float32
        bias = torch.stack([m.bias for m in self.linears])       # (depth, 6 * dim)
        # float32 from the matmul to the norm, even in the bf16 model: these are all blocks' modulations at once,
        # (N, depth, 6 * dim), computed once per step (a handful of ops, not per block), and they scale and gate
        # every block's residual stream, so they get one rounding to the model's dtype, at the end
        y = y.view(-1, depth, self.width).float() * alphas + bias.float()
        if isinstance(self.norms[0], nn.Identity):  # trained without the adaLN RMSNorm
            return y.to(x.dtype)
        gain = torch.stack([n.weight for n in self.norms])     # (depth, 6 * dim)
        return model.rms_norm(y, gain.float(), self.norms[0].eps).to(torch.promote_types(x.dtype, gain.dtype))


class FusedLinears(nn.Module):
    """Packed linears that read one input (attention's wq, wk, wv; SwiGLU's w1, w3) as one ternary matmul: their
    codes stacked along N and their α's spread over the output channels, which the kernel applies in its epilogue
    as it applies one α, so the outputs are what the linears compute one by one. One wide matmul instead of two
    or three narrow ones, and with fp8 activations one quantisation of the input instead of one per linear. It
    owns the stacked codes (a buffer left out of the state dict); each linear's `packed` becomes a view of its
    rows; α and fp8 are read from the linears at each call."""

    def __init__(self, linears):
        super().__init__()
        self.linears = list(linears)  # a plain list: the block stays their owner
        if not self.fits(self.linears):
            raise ValueError("FusedLinears needs packed linears without bias, of one input width and one layout, "
                             f"each output width a multiple of {kernel.TILE_N}")
        self.widths = [m.out_features for m in self.linears]
        _stack_codes(self, self.linears)

    @staticmethod
    def fits(linears):
        """Whether these linears can be fused: packed, no bias, one input width and layout, widths on the tile."""
        return _stackable(linears, bias=False)

    def forward(self, x):
        x = _autocast(x)
        alphas = torch.cat([m.alphas.expand(m.out_features) for m in self.linears])  # (N,) float32
        first = self.linears[0]
        y = kernel.ternary_matmul_op(x, self.packed, alphas, sum(self.widths), first.in_features,
                                     fp8=first.fp8, tiled=self.tiled)
        return y.split(self.widths, -1)


# -----------------------------------------------------------------------------
# bf16 inference: model.py's modules with a specialised forward

def lean(x):
    """True in a 16-bit inference model run without autocast (load_packed(..., dtype=torch.bfloat16)), where x's
    dtype is the model's and the functions below skip float32 round trips. False in float32, and under autocast
    (activations there switch between bf16 and float32), which keep model.py's formulas bit for bit."""
    return x.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(x.device.type)


def rms_norm(x, weight, eps):
    """model.rms_norm; in the 16-bit model (a gain of x's dtype) F.rms_norm, which on CUDA is one fused kernel that
    accumulates in float32 and rounds once to x's dtype, instead of a float32 copy of the (N, T, D) activations,
    five float32 ops on it and a cast back (on a CPU, F.rms_norm runs the reference's formula itself)."""
    if lean(x) and weight.dtype == x.dtype:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return model.rms_norm(x, weight, eps)


def modulate(x, shift, scale):
    """model.modulate; in the 16-bit model one kernel (computes in float32, rounds once) instead of two."""
    if not lean(x):
        return model.modulate(x, shift, scale)
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x, gate, y):
    """model.gated_residual; in the 16-bit model one kernel, float32 inside, one rounding."""
    if not lean(x):
        return model.gated_residual(x, gate, y)
    return torch.addcmul(x, gate.unsqueeze(1), y)


def apply_rope(x, cos, sin):
    """model.apply_rope; in the 16-bit model x * cos + swap(x) * sin, 4 kernels in x's dtype instead of a float32
    copy of q (k), 8 float32 ops and a cast back: 3 roundings instead of 1, still within bf16's precision."""
    if not lean(x):
        return model.apply_rope(x, cos, sin)
    cos, sin = cos[:, None, :], sin[:, None, :]              # (T, 1, hd), against x (N, T, H, hd)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    return x * cos + swapped * sin


class InferenceRMSNorm(model.RMSNorm):
    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class InferenceAttention(model.Attention):
    """model.Attention with wq, wk, wv as one matmul where fuse() could stack them (fused_qkv), and lean RoPE."""
    rope = staticmethod(apply_rope)

    def qkv(self, x):
        return self.fused_qkv(x) if self.fused_qkv is not None else (self.wq(x), self.wk(x), self.wv(x))


class InferenceFeedForward(model.FeedForward):
    """model.FeedForward with w1, w3 as one matmul where fuse() could stack them (fused_w13)."""

    def forward(self, x):
        h1, h3 = self.fused_w13(x) if self.fused_w13 is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(h1) * h3)


class InferenceBlock(model.TerDiTBlock):
    """model.TerDiTBlock taking its modulation from FusedAdaLN (mod), and lean modulate and gated residual."""

    def forward(self, x, c, cos, sin, mod=None):
        mod = self.adaLN_modulation(c) if mod is None else mod  # None: this block's own adaLN, from c
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = gated_residual(x, gate_msa, self.attention(modulate(self.attention_norm(x), shift_msa, scale_msa), cos, sin))
        x = gated_residual(x, gate_mlp, self.feed_forward(modulate(self.ffn_norm(x), shift_mlp, scale_mlp)))
        return x  # (N, T, D)


class InferenceFinalLayer(model.FinalLayer):
    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class InferenceTerDiT(model.TerDiT):
    """model.TerDiT computing every block's modulation up front in one matmul (fused_adaln, a FusedAdaLN). Setting
    fused_adaln to None makes each block compute its own through block.adaLN_modulation (evaluate.py's hooks)."""

    def forward(self, x, t, y, force_drop_ids=None):
        h, c, cos, sin = self.embed(x, t, y, force_drop_ids)
        mods = self.fused_adaln(c).unbind(1) if self.fused_adaln is not None else [None] * len(self.layers)
        for block, mod in zip(self.layers, mods):
            h = block(h, c, cos, sin, mod)
        return self.unpatchify(self.final_layer(h, c), *x.shape[2:])  # (N, out_channels, H, W)

    def compile_blocks(self, **kwargs):
        """model.TerDiT.compile_blocks, and the fused adaLN compiled too."""
        super().compile_blocks(**kwargs)
        if self.fused_adaln is not None:
            self.fused_adaln.compile(**kwargs)
        return self


INFERENCE = {model.RMSNorm: InferenceRMSNorm, model.Attention: InferenceAttention,
             model.FeedForward: InferenceFeedForward, model.TerDiTBlock: InferenceBlock,
             model.FinalLayer: InferenceFinalLayer, model.TerDiT: InferenceTerDiT}


# -----------------------------------------------------------------------------
# putting it together

def specialise(net):
    """Swap a TerDiT's modules for their Inference* twins, in place, nothing fused yet (fused_* None). finish() does
    it for a packed model; any TerDiT can take it (an unpacked bf16 model then runs the same formulas)."""
    for m in net.modules():
        if type(m) in INFERENCE:
            # in place, not rebuilt: the same parameters and buffers (and their sharing), a specialised forward
            m.__class__ = INFERENCE[type(m)]
    net.fused_adaln = None
    for block in net.layers:
        block.attention.fused_qkv = block.feed_forward.fused_w13 = None
    return net


def fuse(net):
    """Give a specialised packed TerDiT its fused matmuls: the one-matmul adaLN of all blocks (fused_adaln) and, in
    each block, wq/wk/wv (fused_qkv) and w1/w3 (fused_w13) where FusedLinears.fits them (else None: the linears
    stay apart). Call it on the model's final device and dtype: a later .to() copies the shared codes apart
    (correct, but stored twice)."""
    if not isinstance(net, InferenceTerDiT):
        raise ValueError("fuse needs a specialised TerDiT: call deploy.finish (or deploy.specialise) on it")
    net.fused_adaln = FusedAdaLN(net.layers)
    for block in net.layers:
        attn, ff = block.attention, block.feed_forward
        qkv, w13 = [attn.wq, attn.wk, attn.wv], [ff.w1, ff.w3]
        attn.fused_qkv = FusedLinears(qkv) if FusedLinears.fits(qkv) else None
        ff.fused_w13 = FusedLinears(w13) if FusedLinears.fits(w13) else None
    return net


def finish(net, kernel=None):
    """A TerDiT whose ternary layers are PackedTernaryLinear, already on its device and dtype, made ready to run:
    every layer's codes prepared for its device (kernel.prepare: the fast kernels' tile order on a GPU with cupy,
    unless kernel="simple"; kernel=None reads TERDIT_KERNEL), the Inference* modules swapped in (specialise),
    and fused (fuse). Returns it in eval mode, without gradients."""
    for m in net.modules():
        if isinstance(m, PackedTernaryLinear):
            m.packed, m.tiled = prepare(m.packed, m.out_features, m.in_features, kernel)
    return fuse(specialise(net)).requires_grad_(False).eval()


def set_act(net, act):
    """Activations of a packed model's token-wise ternary matmuls (attention wq, wk, wv, wo; SwiGLU w1, w2, w3):
    "bf16" (the model's dtype, as loaded) or "fp8" (e4m3 per token, one scale each: kernel.py's W1.58A8 path).
    The adaLN linears, like FusedAdaLN, never take fp8 (FusedAdaLN.forward says why). Returns the model."""
    if act not in ("bf16", "fp8"):
        raise ValueError(f"act must be 'bf16' or 'fp8', got {act!r}")
    for name, m in net.named_modules():
        if isinstance(m, PackedTernaryLinear) and "adaLN" not in name:
            m.fp8 = act == "fp8"
    return net


def load_packed(path, device="cpu", dtype=torch.float32, act="bf16", kernel=None):
    """The deployed TerDiT of a pack.py file (.tdit or .tdit3), in eval mode: its full-precision tensors (embedders,
    norm gains, biases, final layer) in dtype, α float32 and the codes as finish() prepares them on device. act:
    the token-wise ternary matmuls' activations, "bf16" or "fp8" (set_act); kernel: as in finish.

    dtype=torch.bfloat16 is the bf16 inference model sample.py runs on a GPU, without autocast: bf16 from input to
    output (the file stores these tensors in bf16, so nothing is lost). float32 (the default) is for a CPU, or for
    bf16 autocast as training runs."""
    hdr, state = pack.read_packed(path)
    # Build on the meta device (no memory, no init), swap in packed layers, then take every tensor from the file.
    net = model.TerDiT(model.config_from_dict(hdr["config"]), device="meta")
    for name, m in pack.ternary_layers(net):
        net.set_submodule(name, PackedTernaryLinear(m.in_features, m.out_features, m.bias is not None, device="meta"))
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is corrupt (its tensors do not match its config): {err}") from None
    return set_act(finish(net.to(device=device, dtype=dtype), kernel), act)

