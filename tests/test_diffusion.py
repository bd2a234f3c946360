"""Noise schedule, loss and samplers (diffusion.py). Run: python -m pytest tests/test_diffusion.py -v"""
from types import SimpleNamespace

import pytest
import torch

from diffusion import Diffusion
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
    m = build_model("tiny", input_size=8, in_channels=1)
    d = Diffusion()
    loss = d.training_loss(m, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert loss.ndim == 0 and 0.5 < loss.item() < 2  # an untrained adaLN-Zero model predicts 0: MSE ≈ E[ε²] = 1
    with pytest.raises(ValueError, match="unknown sampling method"):
        d.sample(m, torch.tensor([0]), (1, 8, 8), method="euler")
    with pytest.raises(ValueError, match="num_steps"):
        d.sample(m, torch.tensor([0]), (1, 8, 8), num_steps=0)
