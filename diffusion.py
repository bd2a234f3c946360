"""
Gaussian diffusion as DiT uses it (Ho et al. 2020 "DDPM"; Nichol & Dhariwal 2021 for respacing; Song et al. 2021
"DDIM"): a 1000-step linear β schedule, the ε-prediction loss (with learn_sigma: plus the VLB term that trains
the variance, IDDPM's hybrid loss L_simple + L_vlb, Eq. 16), and two samplers with classifier-free guidance.

    python -c "import torch, model, diffusion; m = model.build_model('tiny').eval(); print(diffusion.Diffusion().sample(m, torch.tensor([0, 1]), (3, 32, 32), num_steps=10).shape)"

DiT's `diffusion/` folder is 1,286 lines; this is the part of it TerDiT uses. Variance: a learn_sigma model
(2C output channels, ε then v) gets IDDPM's learned range, log σ² = frac·log β_t + (1 - frac)·log β̃_t with
frac = (v + 1) / 2 (Eq. 15), in DDPM sampling; DDIM (η = 0) adds no noise and ignores v. A model without it gets
DDPM's fixed "large" variance β_t, as IDDPM/DiT do when learn_sigma is off.
"""

import math

import torch
import torch.nn.functional as F


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    # the tanh approximation of Φ that DiT and IDDPM use (kept so that the loss is theirs)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data x in [-1, 1] quantised to 256 levels (bins of width 2/255) under N(means, e^(2 log_scales));
    the edge bins reach to ±∞ (DDPM's decoder L_0)."""
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1 / 255))
    log = lambda v: torch.log(v.clamp(min=1e-12))
    return torch.where(x < -0.999, log(cdf_plus), torch.where(x > 0.999, log(1 - cdf_min), log(cdf_plus - cdf_min)))


def posterior(ac):
    """For a schedule ᾱ (S,) in float64: ᾱ_{t-1}, β_t, the posterior variance β̃_t, log β̃_t clipped (β̃_0 = 0 takes
    β̃_1, so the log is finite, as IDDPM), and the posterior mean coefficients of x0 and x_t (DDPM Eq. 7)."""
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    betas = 1 - ac / ac_prev
    post_var = betas * (1 - ac_prev) / (1 - ac)
    log_post_var = torch.cat([post_var[1:2], post_var[1:]]).log() if len(ac) > 1 else post_var.log()
    return (ac_prev, betas, post_var, log_post_var, betas * ac_prev.sqrt() / (1 - ac),
            (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac))


def respaced_steps(num_timesteps, num_steps):
    """The `num_steps` of 0..num_timesteps-1 a sampler visits, evenly spaced, both ends included: IDDPM/DiT's
    space_timesteps, which rounds a running sum of the stride with Python's round (half to even). Rounding
    linspace instead differs by one at exact half-way points (N = 21: step 500 where DiT takes 499)."""
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    steps, idx = [], 0.0
    for _ in range(num_steps):
        steps.append(round(idx))
        idx += stride
    return steps


def learned_log_variance(v, log_beta, log_post_var):
    """IDDPM Eq. 15: interpolate between the log variances β_t ("fixed large", v = 1) and β̃_t ("fixed small", v = -1)."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_post_var


class Diffusion:
    def __init__(self, num_timesteps=1000):
        # DiT's "linear" schedule: β from 1e-4 to 0.02 over 1000 steps (Ho et al. 2020), in float64 for accuracy
        self.num_timesteps = num_timesteps
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
        ac = self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # ᾱ_t
        _, self.betas, _, self.log_post_var, self.coef_x0, self.coef_xt = posterior(ac)
        # the square roots from float64 ᾱ, rounded to float32 only when used (as DiT's tables): 1 - ᾱ_t is ~1e-4
        # at small t, so taking it from a float32 ᾱ would lose ~4 of float32's 7 digits there
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = (1 / ac).sqrt(), (1 / ac - 1).sqrt()

    def _at(self, v, t, x):
        """Entries t of a float64 schedule v, as float32 shaped to broadcast over x."""
        return v.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """Eq. 4 of DDPM: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
        return self._at(self.sqrt_ac, t, x0) * x0 + self._at(self.sqrt_1m_ac, t, x0) * noise

    def training_loss(self, model, x0, y, t=None, noise=None, force_drop_ids=None, teacher=None,
                      distill_weight=1.0):
        """The simple loss of DDPM (Eq. 14): MSE between the true and the predicted noise at a uniform random t.
        A learn_sigma model adds the VLB term of its variance (IDDPM's hybrid loss, as DiT's training_losses):
        the KL between the true posterior q(x_{t-1} | x_t, x0) and the model's p(x_{t-1} | x_t), in bits per
        dimension, with the predicted ε detached so that only v learns from it (the mean learns from the MSE).
        t, noise and the label drops may be drawn by the caller (train.py does, to be reproducible).

        With a teacher (a frozen full-precision model: distillation, not in TerDiT), the student also matches the
        teacher's whole output, ε and v, on the same noisy input and labels: + distill_weight · MSE(out, teacher)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, y, force_drop_ids).float()
        C = x0.shape[1]
        loss = F.mse_loss(out[:, :C], noise.float())
        if out.shape[1] > C:
            loss = loss + self.vlb_terms(x0.float(), x_t.float(), t, out[:, :C].detach(), out[:, C:]).mean()
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x_t, t, y, force_drop_ids).float()
            loss = loss + distill_weight * F.mse_loss(out, target)
        return loss

    def vlb_terms(self, x0, x_t, t, eps, v):
        """Per-sample L_t of the VLB in bits per dimension (IDDPM; DiT's _vb_terms_bpd, unclipped x0): KL(q || p)
        for t > 0, the discretised decoder NLL -log p(x0 | x1) for t = 0. DiT's "rescaled" factor
        num_timesteps / 1000 is 1 here (training always uses the 1000 steps)."""
        at = lambda s: self._at(s, t, x0)
        true_mean = at(self.coef_x0) * x0 + at(self.coef_xt) * x_t
        pred_x0 = at(self.sqrt_recip_ac) * x_t - at(self.sqrt_recipm1_ac) * eps
        mean = at(self.coef_x0) * pred_x0 + at(self.coef_xt) * x_t
        log_var = learned_log_variance(v, at(self.betas).log(), at(self.log_post_var))
        kl = normal_kl(true_mean, at(self.log_post_var), mean, log_var).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

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
        steps = torch.tensor(respaced_steps(self.num_timesteps, num_steps))
        ac = self.alphas_cumprod[steps]                                # ᾱ at the visited steps, (S,)
        ac_prev, betas, post_var, log_post_var, coef_x0, coef_xt = posterior(ac)  # respaced
        # "fixed large" variance: β_t, with the first entry set to β̃_1 so the log is finite (IDDPM)
        var = torch.cat([post_var[1:2], betas[1:]]) if num_steps > 1 else post_var

        guided = cfg_scale != 1.0
        n = y.shape[0]
        x = torch.randn(n, *shape, generator=generator, device=device)
        if guided:  # the second half of the batch carries the null class (index num_classes)
            x = torch.cat([x, x])
            y = torch.cat([y, torch.full_like(y, model.config.num_classes)])
        f32 = lambda v, i: v[i].float().item()
        for i in (_progress(range(num_steps - 1, -1, -1)) if progress else range(num_steps - 1, -1, -1)):
            t = torch.full((x.shape[0],), int(steps[i]), device=device)
            out = (model.forward_with_cfg(x, t, y, cfg_scale) if guided else model(x, t, y)).float()
            eps, v = out[:, :shape[0]], out[:, shape[0]:]  # v: empty unless the model learns its variance
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
                    std = (0.5 * learned_log_variance(v, math.log(f32(betas, i)), f32(log_post_var, i))).exp() \
                        if v.shape[1] else f32(var, i) ** 0.5
                    x = x + std * (torch.cat([noise, noise]) if guided else noise)
        return x[:n]


def _progress(it):
    """A one-line progress counter on stderr, so long sampling loops show they are alive."""
    import sys
    total = len(it)
    for k, v in enumerate(it):
        if k % max(1, total // 20) == 0 or k == total - 1:
            print(f"\rsampling step {k + 1}/{total}", end="" if k < total - 1 else "\n", file=sys.stderr, flush=True)
        yield v
