"""Noise schedule, loss and samplers (diffusion.py). Run: python -m pytest tests/test_diffusion.py -v"""
from types import SimpleNamespace

import math

import pytest
import torch

from diffusion import Diffusion, discretized_gaussian_log_likelihood, normal_kl, respaced_steps
from model import build_model


class Oracle:
    """The exact ε-predictor for data that is a single point x*: ε = (x_t - sqrt(ᾱ_t) x*) / sqrt(1 - ᾱ_t).
    A sampler with any wrong coefficient does not land on x*."""

    def __init__(self, target, diffusion):
        self.target, self.ac = target, diffusion.alphas_cumprod.float()
        self.config = SimpleNamespace(num_classes=10)

    def __call__(self, x, t, y):
        a = self.ac[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()

    def forward_with_cfg(self, x, t, y, cfg_scale):
        return self(x, t, y)  # the oracle is unconditional: guidance changes nothing


def test_schedule_is_dits_linear_schedule():
    d = Diffusion()
    betas = 1 - d.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), d.alphas_cumprod[:-1]])
    torch.testing.assert_close(betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    assert (d.alphas_cumprod.diff() < 0).all() and d.alphas_cumprod[-1] < 1e-4


def test_q_sample_moments():
    d = Diffusion()
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    xt = d.q_sample(x0, torch.full((20000,), 300), torch.randn_like(x0))
    a = d.alphas_cumprod[300].item()
    assert abs(xt.mean().item() - 0.5 * a ** 0.5) < 0.02
    assert abs(xt.var().item() - (1 - a)) < 0.03


@pytest.mark.parametrize("method,steps", [("ddpm", 250), ("ddim", 50), ("ddim", 1000), ("ddpm", 20)])
def test_samplers_land_on_the_data_point(method, steps):
    d = Diffusion()
    target = torch.rand(1, 2, 4, 4) * 1.6 - 0.8
    x = d.sample(Oracle(target, d), torch.tensor([1, 2, 3]), (2, 4, 4), cfg_scale=3.0, num_steps=steps, method=method,
                 generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 2, 4, 4)
    torch.testing.assert_close(x, target.expand_as(x), atol=2e-3, rtol=0)


def test_sampling_is_seeded_and_cfg_free_path_works():
    torch.manual_seed(0)
    m = build_model("tiny", input_size=8, in_channels=1).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d, y = Diffusion(), torch.tensor([0, 7])
    run = lambda seed, cfg: d.sample(m, y, (1, 8, 8), cfg_scale=cfg, num_steps=8,
                                     generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1, 4.0), run(1, 4.0))
    assert not torch.equal(run(1, 4.0), run(2, 4.0))
    assert run(1, 1.0).shape == (2, 1, 8, 8)


def test_loss_and_bad_arguments():
    m = build_model("tiny", input_size=8, in_channels=1, learn_sigma=False)
    d = Diffusion()
    loss = d.training_loss(m, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert loss.ndim == 0 and 0.5 < loss.item() < 2  # an untrained adaLN-Zero model predicts 0: MSE ≈ E[ε²] = 1
    with pytest.raises(ValueError, match="unknown sampling method"):
        d.sample(m, torch.tensor([0]), (1, 8, 8), method="euler")
    with pytest.raises(ValueError, match="num_steps"):
        d.sample(m, torch.tensor([0]), (1, 8, 8), num_steps=0)


def test_normal_kl_closed_form():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    p, q = torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))


def test_discretized_gaussian_log_likelihood_closed_form():
    # bins of width 2/255 around x, open-ended at ±1: log of exact Φ differences. DiT's tanh approximation of Φ is
    # good to ~1e-4 absolute, so the logs agree to ~1e-3 where the bin holds a fair probability
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.99, -0.49, 0.01, 0.3, 0.98], dtype=torch.float64)
    log_scale = torch.full_like(x, math.log(0.02))
    cdf = lambda z: torch.special.ndtr((z - mean) / 0.02)
    exact = torch.stack([cdf(x + 1 / 255)[0].log(), (cdf(x + 1 / 255) - cdf(x - 1 / 255))[1],
                         (cdf(x + 1 / 255) - cdf(x - 1 / 255))[2], (cdf(x + 1 / 255) - cdf(x - 1 / 255))[3],
                         (1 - cdf(x - 1 / 255))[4].log()])
    exact[1:4] = exact[1:4].log()
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, mean, log_scale), exact, atol=2e-3, rtol=1e-3)


class Fixed(torch.nn.Module):
    """A 'model' whose output is a given tensor (ε channels, then v), whatever the input: gradients land on it."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, x, t, y, force_drop_ids=None):
        return self.out


def test_hybrid_loss_is_mse_plus_vlb_by_hand():
    d, g = Diffusion(), torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (3, 2, 4, 4), generator=g) / 127.5 - 1).double()
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 600])  # the decoder term and two KL terms
    out = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64) * 0.5
    model = Fixed(out.clone())
    loss = d.training_loss(model, x0.float(), None, t, noise.float())
    # by hand, in float64, from the definitions (DDPM Eqs. 6-7, IDDPM Eq. 15)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    vlb = []
    for n, s in enumerate(t.tolist()):
        a, a_prev, b = ac[s], ac[s - 1] if s > 0 else torch.tensor(1.0, dtype=torch.float64), betas[s]
        xt = a.sqrt() * x0[n] + (1 - a).sqrt() * noise[n]
        post_mean = lambda x_0: (a_prev.sqrt() * b * x_0 + (1 - b).sqrt() * (1 - a_prev) * xt) / (1 - a)
        post_var = lambda k: betas[k] * (1 - (ac[k - 1] if k > 0 else 1.0)) / (1 - ac[k])
        log_small = math.log(post_var(max(s, 1)))  # β̃_0 = 0: IDDPM uses β̃_1 there
        frac = (out[n, 2:] + 1) / 2
        log_var = frac * b.log() + (1 - frac) * log_small
        mean = post_mean((xt - (1 - a).sqrt() * out[n, :2]) / a.sqrt())
        if s == 0:
            term = -discretized_gaussian_log_likelihood(x0[n], mean, 0.5 * log_var)
        else:
            term = normal_kl(post_mean(x0[n]), torch.full_like(mean, log_small), mean, log_var)
        vlb.append(term.mean() / math.log(2))
    mse = ((out[:, :2] - noise) ** 2).mean()
    torch.testing.assert_close(loss.double(), mse + torch.stack(vlb).mean(), rtol=1e-4, atol=1e-5)
    # the VLB trains only v: the ε channels' gradient is the MSE's alone
    loss.backward()
    torch.testing.assert_close(model.out.grad[:, :2].double(), 2 * (out[:, :2] - noise) / noise.numel(),
                               rtol=1e-4, atol=1e-7)
    assert model.out.grad[:, 2:].abs().sum() > 0


class WithV(torch.nn.Module):
    """A fixed-variance model plus a constant v channel per input channel: a learn_sigma model with chosen v."""

    def __init__(self, model, v):
        super().__init__()
        self.model, self.v, self.config = model, v, model.config

    def forward(self, x, t, y):
        eps = self.model(x, t, y)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


def test_learned_variance_extremes_reproduce_the_fixed_samplers():
    torch.manual_seed(0)
    m = build_model("tiny", input_size=8, in_channels=1, learn_sigma=False).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d, y, steps = Diffusion(), torch.tensor([0, 7]), 10
    run = lambda net, method="ddpm": d.sample(net, y, (1, 8, 8), cfg_scale=1.0, num_steps=steps, method=method,
                                              generator=torch.Generator().manual_seed(3))
    # v = 1 is "fixed large" (β_t), the sampler used without learn_sigma
    torch.testing.assert_close(run(WithV(m, 1.0)), run(m), rtol=1e-5, atol=1e-5)
    # DDIM ignores the variance
    assert torch.equal(run(WithV(m, 0.3), "ddim"), run(m, "ddim"))
    # v = -1 is "fixed small" (β̃_t): a plain DDPM loop with that variance, written out here
    ac = d.alphas_cumprod[torch.linspace(0, 999, steps, dtype=torch.float64).round().long()]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 8, 8, generator=g)
    with torch.no_grad():
        for i in range(steps - 1, -1, -1):
            a, a_prev = ac[i].item(), ac[i - 1].item() if i > 0 else 1.0
            b = 1 - a / a_prev
            x0 = ((x - (1 - a) ** 0.5 * m(x, torch.full((2,), int(round(i * 999 / (steps - 1)))), y)) / a ** 0.5)
            x = (a_prev ** 0.5 * b * x0.clamp(-1, 1) + (1 - b) ** 0.5 * (1 - a_prev) * x) / (1 - a)
            if i > 0:
                x = x + (b * (1 - a_prev) / (1 - a)) ** 0.5 * torch.randn(2, 1, 8, 8, generator=g)
    torch.testing.assert_close(run(WithV(m, -1.0)), x, rtol=1e-4, atol=1e-4)
    # in between, the samples differ
    assert not torch.allclose(run(WithV(m, 0.0)), run(m), atol=1e-3)


class Recorder(Oracle):
    """An oracle that notes the timesteps it is asked about."""

    def __call__(self, x, t, y):
        self.seen = getattr(self, "seen", []) + [int(t[0])]
        return super().__call__(x, t, y)


def test_respacing_is_dits():
    # written out from DiT's respace.space_timesteps(1000, [N]) (a running sum of the stride, Python's round)
    dit = {21: [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 499, 549, 599, 649, 699, 749, 799, 849, 899, 949, 999],
           7: [0, 166, 333, 500, 666, 832, 999], 2: [0, 999], 1: [0]}
    d = Diffusion()
    for n, steps in dit.items():
        oracle = Recorder(torch.zeros(1, 2, 2), d)
        d.sample(oracle, torch.tensor([0]), (1, 2, 2), cfg_scale=1.0, num_steps=n, method="ddim")
        assert oracle.seen == steps[::-1], n
    # the defaults (50, 100, 250) are where rounding the running sum and rounding linspace agree
    for n in (50, 100, 250, 1000):
        assert respaced_steps(1000, n) == torch.linspace(0, 999, n, dtype=torch.float64).round().long().tolist()


def test_vlb_takes_its_coefficients_from_float64_tables():
    # at t <= 10, 1 - ᾱ_t ~ 1e-4: coefficients derived from a float32 ᾱ are off by up to ~1e-4 relative (DiT reads
    # them from float64 tables). v = -1 leaves only the mean's term in the KL, which is where they act.
    d, g, t = Diffusion(), torch.Generator().manual_seed(0), torch.arange(11)
    x0 = (torch.randint(0, 256, (11, 4, 16, 16), generator=g) / 127.5 - 1).double()
    noise = torch.randn(11, 4, 16, 16, generator=g, dtype=torch.float64)
    eps = noise + 0.03 * torch.randn(11, 4, 16, 16, generator=g, dtype=torch.float64)  # a good ε-predictor
    v = -torch.ones_like(eps)
    # DiT's formulas in float64: _predict_xstart_from_eps, q_posterior_mean_variance, _vb_terms_bpd
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    log_post_var = torch.cat([post_var[1:2], post_var[1:]]).log()
    at = lambda a: a[t].view(-1, 1, 1, 1)
    post_mean = lambda x_0, x_t: at(betas * ac_prev.sqrt() / (1 - ac)) * x_0 + \
        at((1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)) * x_t
    x_t = at(ac.sqrt()) * x0 + at((1 - ac).sqrt()) * noise
    mean = post_mean(at((1 / ac).sqrt()) * x_t - at((1 / ac - 1).sqrt()) * eps, x_t)
    kl = normal_kl(post_mean(x0, x_t), at(log_post_var), mean, at(log_post_var)).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * at(log_post_var)).flatten(1).mean(1)
    want = torch.where(t == 0, nll, kl) / math.log(2)
    got = d.vlb_terms(x0.float(), x_t.float(), t, eps.float(), v.float()).double()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)  # float32 from ᾱ: 1.5e-4 at t = 1
    # and x_t itself (q_sample) from the float64 square roots
    torch.testing.assert_close(d.q_sample(x0.float(), t, noise.float()).double(), x_t, rtol=0, atol=1e-6)


def test_distillation_term_matches_the_teachers_whole_output():
    torch.manual_seed(0)
    student = build_model("tiny", input_size=8, in_channels=1)
    teacher = build_model("tiny", input_size=8, in_channels=1, ternary=False)
    with torch.no_grad():
        for p in [*student.parameters(), *teacher.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    d, g = Diffusion(), torch.Generator().manual_seed(0)
    x0, y, t = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 10, 500, 999])
    noise, drop = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([False, True, False, False])
    plain = d.training_loss(student, x0, y, t, noise, drop)
    distilled = d.training_loss(student, x0, y, t, noise, drop, teacher=teacher, distill_weight=0.5)
    x_t = d.q_sample(x0, t, noise)
    match = ((student(x_t, t, y, drop) - teacher(x_t, t, y, drop)) ** 2).mean()  # ε and v channels alike
    torch.testing.assert_close(distilled, plain + 0.5 * match)
    assert match > 1e-4
    # a teacher equal to the student adds nothing, and no gradient reaches the teacher
    assert torch.equal(d.training_loss(student, x0, y, t, noise, drop, teacher=student), plain)
    distilled.backward()
    assert all(p.grad is None for p in teacher.parameters())
