"""
Gaussian diffusion as DiT uses it (Ho et al. 2020 "DDPM"; Nichol & Dhariwal 2021 for respacing; Song et al. 2021
"DDIM"): a 1000-step linear β schedule, the ε-prediction loss, and two samplers with classifier-free guidance.

    python -c "import torch, model, diffusion; m = model.build_model('tiny').eval(); print(diffusion.Diffusion().sample(m, torch.tensor([0, 1]), (3, 32, 32), num_steps=10).shape)"

DiT's `diffusion/` folder is 1,286 lines; this is the part of it TerDiT uses. Left out: the learned variance
(DiT's learn_sigma and its hybrid VLB loss): the model predicts ε only and sampling uses DDPM's fixed "large"
variance β_t, which is what IDDPM/DiT do when learn_sigma is off.
"""

import torch
import torch.nn.functional as F


class Diffusion:
    def __init__(self, num_timesteps=1000):
        # DiT's "linear" schedule: β from 1e-4 to 0.02 over 1000 steps (Ho et al. 2020), in float64 for accuracy
        self.num_timesteps = num_timesteps
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # ᾱ_t

    def q_sample(self, x0, t, noise):
        """Eq. 4 of DDPM: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
        a = self.alphas_cumprod.to(x0.device)[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_loss(self, model, x0, y, t=None, noise=None, force_drop_ids=None):
        """The simple loss of DDPM (Eq. 14): MSE between the true and the predicted noise at a uniform random t.
        t, noise and the label drops may be drawn by the caller (train.py does, to be reproducible)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, y, force_drop_ids).float(), noise.float())

    @torch.no_grad()
    def sample(self, model, y, shape, cfg_scale=4.0, num_steps=250, method="ddpm", clip_denoised=True,
               generator=None, progress=False):
        """Class-conditional samples x0 of `shape` (C, H, W) for labels y (N,), guided with `cfg_scale`.

        Timestep respacing (IDDPM): the sampler visits `num_steps` of the 1000 training timesteps, evenly
        spaced, and uses the β's implied by ᾱ at those steps. DDPM is stochastic; DDIM (η = 0) is deterministic
        given the starting noise. cfg_scale = 1 turns guidance off (and halves the work).
        """
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampling method '{method}': use ddpm or ddim")
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be in 1..{self.num_timesteps}, got {num_steps}")
        device = y.device
        steps = torch.linspace(0, self.num_timesteps - 1, num_steps, dtype=torch.float64).round().long()
        ac = self.alphas_cumprod[steps]                                # ᾱ at the visited steps, (S,)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        betas = 1 - ac / ac_prev                                        # respaced β, (S,)
        post_var = betas * (1 - ac_prev) / (1 - ac)                     # posterior variance β̃ (DDPM Eq. 7)
        # "fixed large" variance: β_t, with the first entry set to β̃_1 so the log is finite (IDDPM)
        var = torch.cat([post_var[1:2], betas[1:]]) if num_steps > 1 else post_var
        coef_x0 = betas * ac_prev.sqrt() / (1 - ac)                     # posterior mean coefficients (Eq. 7)
        coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)

        guided = cfg_scale != 1.0
        n = y.shape[0]
        x = torch.randn(n, *shape, generator=generator, device=device)
        if guided:  # the second half of the batch carries the null class (index num_classes)
            x = torch.cat([x, x])
            y = torch.cat([y, torch.full_like(y, model.config.num_classes)])
        f32 = lambda v, i: v[i].float().item()
        for i in (_progress(range(num_steps - 1, -1, -1)) if progress else range(num_steps - 1, -1, -1)):
            t = torch.full((x.shape[0],), int(steps[i]), device=device)
            eps = model.forward_with_cfg(x, t, y, cfg_scale) if guided else model(x, t, y)
            eps = eps.float()
            x0 = (x - (1 - f32(ac, i)) ** 0.5 * eps) / f32(ac, i) ** 0.5
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            if method == "ddim":  # η = 0: ε re-derived from the (clipped) x0, then a deterministic step
                eps = (x - f32(ac, i) ** 0.5 * x0) / (1 - f32(ac, i)) ** 0.5
                x = f32(ac_prev, i) ** 0.5 * x0 + (1 - f32(ac_prev, i)) ** 0.5 * eps
            else:
                x = f32(coef_x0, i) * x0 + f32(coef_xt, i) * x
                if i > 0:
                    noise = torch.randn(x.shape[0] // (2 if guided else 1), *shape, generator=generator, device=device)
                    x = x + f32(var, i) ** 0.5 * (torch.cat([noise, noise]) if guided else noise)
        return x[:n]


def _progress(it):
    """A one-line progress counter on stderr, so long sampling loops show they are alive."""
    import sys
    total = len(it)
    for k, v in enumerate(it):
        if k % max(1, total // 20) == 0 or k == total - 1:
            print(f"\rsampling step {k + 1}/{total}", end="" if k < total - 1 else "\n", file=sys.stderr, flush=True)
        yield v
