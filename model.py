"""
The TerDiT network: a Large-DiT ("DiT_Llama") diffusion transformer whose linear layers are ternary.

    python model.py                # builds every registered size on the meta device and prints its parameters
    python -c "import torch, model; m = model.build_model('tiny'); print(m(torch.randn(2, 3, 32, 32), torch.tensor([1, 500]), torch.tensor([0, 3])).shape)"

References: DiT (Peebles & Xie 2023, facebookresearch/DiT models.py) for the conditioning and adaLN-Zero;
Large-DiT-ImageNet (Alpha-VLLM/LLaMA2-Accessory) for the LLaMA-style block (RMSNorm, RoPE, SwiGLU);
TerDiT (arXiv 2405.14854, Fig. 3) for the ternary layers and the RMSNorm after the adaLN MLP.

Which layers are ternary (as in the reference): attention wq, wk, wv, wo; SwiGLU w1, w2, w3; each block's adaLN
linear. Full precision (as in the reference): the patch embedder, the timestep MLP, the label table and the
final layer. That is 99% of the parameters of the 600M and 4.2B models in 2 bits.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import TernaryLinear


@dataclass
class TerDiTConfig:
    input_size: int = 32        # side of the (latent or pixel) image the DiT sees
    patch_size: int = 2
    in_channels: int = 3        # 3 in pixel space, 4 for sd-vae latents
    dim: int = 384
    depth: int = 12
    n_heads: int = 6
    num_classes: int = 10
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (DiT, reference)
    multiple_of: int = 256      # SwiGLU hidden size is rounded up to a multiple of this (LLaMA, reference)
    norm_eps: float = 1e-5
    qk_norm: bool = True        # LayerNorm on q and k (optional in Large-DiT; on here for QAT stability)
    ternary: bool = True        # False gives the full-precision twin the paper compares against
    adaln_norm: bool = True     # the paper's RMSNorm after the adaLN linear (False = the Fig. 7/8 ablation)
    pos_embed: bool = False     # DiT's fixed 2-D sin-cos position embedding; not in the reference (see below)
    learn_sigma: bool = True    # also predict the variance (2C output channels: ε, then v), as the reference and DiT
    reference_cfg: bool = False  # guide only the first 3 channels (DiT's and the reference's quirk); False: all of ε


def config_from_dict(d):
    """TerDiTConfig from a stored dict (train.py checkpoint, .tdit index), which must name every field and no other:
    a stored config is complete, so a field missing or unknown means another version of this code wrote it."""
    names = {f.name for f in fields(TerDiTConfig)}
    unknown, missing = sorted(set(d) - names), sorted(names - set(d))
    if unknown or missing:
        what = ", ".join([f"unknown field {n}" for n in unknown] + [f"missing field {n}" for n in missing])
        raise ValueError(f"model config written by an older version of this code ({what}): "
                         "regenerate it with train.py / pack.py")
    return TerDiTConfig(**d)


# Sizes: tiny is for CPU tests, XS for the shipped demo (it samples on a laptop CPU); S and B are DiT-S/B widths;
# 600M and 4.2B are the paper's two ImageNet models (DiT_Llama_600M_patch2 and DiT_Llama_3B_patch2 in the reference).
SIZES = {
    "tiny": dict(dim=128, depth=4, n_heads=4),
    "XS": dict(dim=192, depth=6, n_heads=3),
    "S": dict(dim=384, depth=12, n_heads=6),
    "B": dict(dim=768, depth=12, n_heads=12),
    "600M": dict(dim=1536, depth=16, n_heads=32),
    "4.2B": dict(dim=3072, depth=32, n_heads=32),
}


def build_model(size, device=None, **overrides):
    """A TerDiT of a registered size; `overrides` set any other TerDiTConfig field."""
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}': choose one of {', '.join(SIZES)}")
    return TerDiT(TerDiTConfig(**SIZES[size], **overrides), device=device)


def rms_norm(x, weight, eps):
    """LLaMA's RMSNorm over the last dim, with the mean of squares in float32 whatever x's dtype (as the reference)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, device=None):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def modulate(x, shift, scale):
    """x * (1 + scale) + shift, shift and scale (N, D) broadcast over the tokens of x (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual(x, gate, y):
    """x + gate * y, gate (N, D) broadcast over the tokens: adaLN-Zero's gated residual update."""
    return x + gate.unsqueeze(1) * y


def rope(T, head_dim, device, theta=10000.0, dtype=torch.float32):
    """The rotary tables for apply_rope, each (T, head_dim), in dtype: cos of each pair's angle twice, and its sin
    with the sign the pair's first element takes, (-sin, sin). 1-D RoPE over the flattened token index. The
    angles are computed in float32 (t * freq loses too much in bf16), then rounded once to dtype."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), freqs)  # (T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    return (torch.stack([cos, cos], -1).flatten(-2).to(dtype),   # (T, hd): c0, c0, c1, c1, ...
            torch.stack([-sin, sin], -1).flatten(-2).to(dtype))  # (T, hd): -s0, s0, -s1, s1, ...


def sincos_pos_embed(dim, h, w, device):
    """DiT's fixed 2-D sin-cos position embedding (MAE), (h*w, dim): dim/2 channels encode the row, dim/2 the column.

    Not in the reference, whose only position signal is the 1-D RoPE, which is relative: a token cannot tell where
    in the image it sits. On ImageNet with long training that works; on our short small-scale runs it left
    garments smeared into streaks, so the study (README) trains with --pos-embed and shows the difference."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    out = [torch.outer(pos.flatten(), omega) for pos in (rows, cols)]  # 2 x (T, D/4)
    return torch.cat([f(a) for a in out for f in (torch.sin, torch.cos)], dim=1)  # (T, D)


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x0, x1) of x (N, T, H, hd) by the angles of rope()'s tables: the reference's complex
    multiply in real arithmetic, (x0 cos - x1 sin, x0 sin + x1 cos)."""
    cos, sin = cos[:, None, :], sin[:, None, :]            # (T, 1, hd)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # in float32, each (N, T, H, hd/2)
    cos, sin = cos[..., ::2], sin[..., 1::2]               # each (T, 1, hd/2): cos and sin of each pair's angle
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (256) -> MLP -> the conditioning width. Full precision."""

    def __init__(self, hidden_size, frequency_embedding_size=256, device=None):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, device=device), nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, device=device))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row num_classes is the null class; training drops labels to it for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob, device=None):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size, device=device)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y, force_drop_ids=None):
        if force_drop_ids is not None:  # the training loop draws the drops itself (reproducible across GPUs)
            y = torch.where(force_drop_ids, self.num_classes, y)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


#################################################################################
#                                 Core TerDiT Model                             #
#################################################################################

class Attention(nn.Module):
    def __init__(self, dim, n_heads, qk_norm, ternary, device=None):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq, self.wk, self.wv, self.wo = (TernaryLinear(dim, dim, bias=False, ternary=ternary, device=device)
                                              for _ in range(4))
        # qk-norm as in Large-DiT: LayerNorm over all heads at once, before the heads are split
        self.q_norm = nn.LayerNorm(dim, device=device) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim, device=device) if qk_norm else nn.Identity()

    rope = staticmethod(apply_rope)  # (the deployed model swaps in a bf16 form: deploy.py)

    def qkv(self, x):
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, cos, sin):
        N, T, D = x.shape
        q, k, v = self.qkv(x)
        q = self.q_norm(q).view(N, T, self.n_heads, self.head_dim)  # (N, T, H, hd)
        k = self.k_norm(k).view(N, T, self.n_heads, self.head_dim)
        v = v.view(N, T, self.n_heads, self.head_dim)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (N, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(N, T, D))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden = 2/3 * 4 * dim rounded up to multiple_of (LLaMA, reference)."""

    def __init__(self, dim, multiple_of, ternary, device=None):
        super().__init__()
        hidden = int(2 * 4 * dim / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = TernaryLinear(dim, hidden, bias=False, ternary=ternary, device=device)
        self.w2 = TernaryLinear(hidden, dim, bias=False, ternary=ternary, device=device)
        self.w3 = TernaryLinear(dim, hidden, bias=False, ternary=ternary, device=device)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TerDiTBlock(nn.Module):
    """Large-DiT block with adaLN-Zero conditioning; the adaLN MLP ends in the paper's RMSNorm (Fig. 3A)."""

    def __init__(self, cfg, cond_dim, device=None):
        super().__init__()
        dim = cfg.dim
        self.attention_norm = RMSNorm(dim, eps=cfg.norm_eps, device=device)
        self.attention = Attention(dim, cfg.n_heads, cfg.qk_norm, cfg.ternary, device=device)
        self.ffn_norm = RMSNorm(dim, eps=cfg.norm_eps, device=device)
        self.feed_forward = FeedForward(dim, cfg.multiple_of, cfg.ternary, device=device)
        # A ternary linear's outputs are sums of ±α over cond_dim inputs, far larger than a trained FP layer's
        # (Fig. 4); the RMSNorm brings them back to unit scale before they scale and gate the residual stream.
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            TernaryLinear(cond_dim, 6 * dim, bias=True, ternary=cfg.ternary, device=device),
            RMSNorm(6 * dim, eps=cfg.norm_eps, device=device) if cfg.adaln_norm else nn.Identity())

    def forward(self, x, c, cos, sin):
        # shift, scale and gate for attention and MLP, (N, dim) each, from the conditioning c (N, cond_dim) alone
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = gated_residual(x, gate_msa, self.attention(modulate(self.attention_norm(x), shift_msa, scale_msa), cos, sin))
        x = gated_residual(x, gate_mlp, self.feed_forward(modulate(self.ffn_norm(x), shift_mlp, scale_mlp)))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) + adaLN shift/scale + linear to patches. Full precision, as in the reference."""

    def __init__(self, dim, cond_dim, patch_size, out_channels, device=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, device=device)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, device=device)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim, device=device))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TerDiT(nn.Module):
    """Predicts the noise ε of x_t and, with learn_sigma, the variance interpolation v (IDDPM Eq. 15): the output
    has out_channels = 2 * in_channels (ε first, then v), else in_channels."""

    def __init__(self, config, device=None):
        super().__init__()
        self.config = cfg = config
        cond_dim = min(cfg.dim, 1024)  # the reference caps the conditioning width at 1024
        p, C = cfg.patch_size, cfg.in_channels
        self.out_channels = 2 * C if cfg.learn_sigma else C
        self.x_embedder = nn.Linear(p * p * C, cfg.dim, device=device)
        self.t_embedder = TimestepEmbedder(cond_dim, device=device)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cond_dim, cfg.class_dropout_prob, device=device)
        self.layers = nn.ModuleList(TerDiTBlock(cfg, cond_dim, device=device) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.dim, cond_dim, p, self.out_channels, device=device)
        if device is None or torch.device(device).type != "meta":
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        # Large-DiT's init: xavier everywhere, N(0, 0.02) embedders, and adaLN-Zero (zeroed modulation and output)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.layers:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def compile_blocks(self, **kwargs):
        """Regional compilation: torch.compile each block, not the whole model. The blocks run the same code on
        tensors of the same shapes, so Dynamo traces one block and Inductor compiles it once; every other block
        reuses that graph (compile time of one block, not depth). The first forward pass compiles; kwargs go to
        torch.compile."""
        for block in self.layers:
            block.compile(**kwargs)
        return self

    def patchify(self, x):
        N, C, H, W = x.shape
        p = self.config.patch_size
        x = x.view(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p), as the reference
        return x.reshape(N, (H // p) * (W // p), p * p * C)  # (N, T, p²C)

    def unpatchify(self, x, H, W):
        # (p, p, C) within a token, not patchify's (C, p, p): the reference code patchifies as (C, p, p) but
        # unpatchifies as (p, p, C) (Large-DiT's unpatchify is DiT's 'nhwpqc'), and so does this model;
        # tests/test_official.py checks it against the reference's forward
        N, p, C = x.shape[0], self.config.patch_size, self.out_channels
        x = x.view(N, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, H/p, p, W/p, p)
        return x.reshape(N, C, H, W)

    def embed(self, x, t, y, force_drop_ids=None):
        """The blocks' inputs: the tokens h (N, T, D), the conditioning c (N, cond_dim) and the RoPE tables."""
        N, C, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p or C != self.config.in_channels:
            raise ValueError(f"input of shape {tuple(x.shape)} does not fit this model "
                             f"({self.config.in_channels} channels, sides divisible by {p})")
        # the model's own dtype from here on: float32 (training, under autocast), or bf16 for a bf16 inference
        # model (deploy.load_packed(..., dtype=torch.bfloat16)), whose residual stream then stays bf16 throughout
        dtype = self.x_embedder.weight.dtype
        h = self.x_embedder(self.patchify(x.to(dtype)))  # (N, T, D)
        if self.config.pos_embed:
            h = h + sincos_pos_embed(self.config.dim, H // p, W // p, x.device).to(h.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)  # (N, cond_dim)
        cos, sin = rope(h.shape[1], self.config.dim // self.config.n_heads, x.device, dtype=dtype)
        return h, c, cos, sin

    def forward(self, x, t, y, force_drop_ids=None):
        """x: (N, C, H, W) noisy input, t: (N,) timesteps, y: (N,) labels -> ε (N, C, H, W), or ε and v
        concatenated, (N, 2C, H, W), with learn_sigma."""
        h, c, cos, sin = self.embed(x, t, y, force_drop_ids)
        for block in self.layers:
            h = block(h, c, cos, sin)
        return self.unpatchify(self.final_layer(h, c), *x.shape[2:])  # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance as in DiT: the first half of the batch carries the class labels, the second
        half the null class; both halves get the same x. The standard form guides all of ε; DiT and the reference
        guide only the first 3 channels (a quirk kept for reproducing their FID: config.reference_cfg). The other
        channels (and v) are the conditional half's, as in DiT; the sampler keeps only the first half."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        g = 3 if self.config.reference_cfg else self.config.in_channels
        cond, uncond = out.chunk(2, dim=0)
        half_out = torch.cat([uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)
        return torch.cat([half_out, half_out], dim=0)


if __name__ == "__main__":
    for name in SIZES:
        m = build_model(name, device="meta")
        print(f"{name:>5}: {sum(p.numel() for p in m.parameters()) / 1e6:9.1f}M parameters, {m.config}")
