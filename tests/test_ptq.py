"""Tests of ptq.py: the quantizers, CSB's exactness, SSC's weights, a calibrated W4A8 model, the CLI. CPU, tiny model
with random weights, no training.

    python -m pytest tests/test_ptq.py -q
"""
import copy
import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

import model as model_lib
import ptq


def tiny_fp(seed=0):
    """A tiny full-precision TerDiT (1 channel, 32 px, 10 classes: what the shipped classifier scores) with random
    weights everywhere, adaLN and final layer included (their zero init would make the function trivial)."""
    torch.manual_seed(seed)
    m = model_lib.build_model("tiny", ternary=False, in_channels=1, pos_embed=True).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def calibrated():
    m = tiny_fp()
    calib = ptq.calibration_set(m, n=3, cfg_scale=1.5, num_steps=8, num_calib_steps=4, method="ddim", seed=1,
                                device="cpu")
    return m, calib


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(4, 1, 32, 32, generator=g, dtype=dtype), torch.tensor([3, 250, 600, 999]),
            torch.tensor([0, 4, 9, 10]))  # 10: the null class


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("ranges", ["max", "mse"])
def test_weight_quantizer_round_trips_representable_values(bits, ranges):
    g = torch.Generator().manual_seed(0)
    n = 2 ** bits
    k = torch.randint(0, n, (16, 300), generator=g).double()
    k[:, 0], k[:, 1] = 0, n - 1                                       # each row reaches both ends of its grid
    z = torch.randint(1, n - 1, (16, 1), generator=g).double()        # zero point inside: the grid holds 0
    s = 2.0 ** -torch.randint(2, 9, (16, 1), generator=g).double()   # powers of two: (k - z)·s is exact
    w = (k - z) * s
    if ranges == "mse":  # the percentile search may clip rows; the widest range keeps every point
        w[:, 2:12] = w[:, :1]  # repeat both ends often enough that every percentile reaches them
        w[:, 12:22] = w[:, 1:2]
    assert torch.equal(ptq.quantize_weight(w, bits, ranges), w)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_quantizer_round_trips_representable_values(bits):
    s0, z0 = 2.0 ** -5, 3
    lo, hi = torch.tensor(-z0 * s0), torch.tensor((2 ** bits - 1 - z0) * s0)
    s, z = ptq.qparams(lo, hi, bits)
    assert (s.item(), z.item()) == (s0, z0)
    x = (torch.arange(2 ** bits, dtype=torch.float64) - z0) * s0  # every point of the grid
    assert torch.equal(ptq.fake_quant(x, s, z, bits), x)
    assert torch.equal(ptq.fake_quant(x, *ptq.qparams(*ptq.search_range(x[None], bits, "max"), bits), bits), x[None][0])


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_error_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    step = (w.amax(1, keepdim=True).clamp(min=0) - w.amin(1, keepdim=True).clamp(max=0)) / (2 ** bits - 1)
    assert ((ptq.quantize_weight(w, bits) - w).abs() <= step / 2 + 1e-12).all()
    x = torch.randn(1000, generator=g, dtype=torch.float64) * 3 + 1
    s, z = ptq.qparams(*ptq.search_range(x, bits, "max"), bits)
    assert ((ptq.fake_quant(x, s, z, bits) - x).abs() <= s / 2 + 1e-12).all()


def test_percentile_search_clips_an_outlier_and_lowers_the_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 200_000, generator=g, dtype=torch.float64)
    x[0, 0] = 200.0  # one outlier: min/max spends the grid on it
    for q in (0.999, 0.99999, 1e-5, 0.3):
        torch.testing.assert_close(ptq.quantile(x, q), torch.quantile(x, q, dim=-1))
    err = {r: (ptq.fake_quant(x, *ptq.qparams(*(v[:, None] for v in ptq.search_range(x, 4, r)), 4), 4) - x)
           .square().mean().item() for r in ("max", "mse")}
    assert ptq.search_range(x, 4, "mse")[1].item() < 10 and err["mse"] < err["max"] / 4, err


def test_calibration_set_follows_get_train_samples(calibrated):
    _, calib = calibrated
    assert ptq.calib_steps(50, 25) == list(range(0, 50, 2)) and ptq.calib_steps(8, 3) == [0, 2, 4]
    assert [c[1][0].item() for c in calib] == [999, 714, 428, 143]  # calls 0, 2, 4, 6 of the 8 DDIM steps
    x, t, y = calib[0]
    assert x.shape == (6, 1, 32, 32) and (y[3:] == 10).all() and torch.equal(y[:3], torch.arange(3))  # CFG halves


def test_csb_balances_salience_and_leaves_the_fp_function_unchanged(calibrated):
    m, calib = calibrated
    name = "layers.1.feed_forward.w1"
    sx_r = ptq.sample_salience(m, calib, [name], batch_size=6)[name]
    assert sx_r.shape == (4 * 6, m.get_submodule(name).weight.shape[1])  # one row per image and timestep
    sx = sx_r.double().amax(0)
    sw = torch.cat([m.get_submodule(n).weight for n in (name, "layers.1.feed_forward.w3")]).abs().amax(0).double()
    b = ptq.balance(sx, sw)
    assert not torch.allclose(b, torch.ones_like(b))
    torch.testing.assert_close(sx / b, (sx * sw).sqrt())  # both sides at the geometric mean (up to theirs' 1e-8)
    torch.testing.assert_close(sw * b, (sx * sw).sqrt())
    fp = copy.deepcopy(m).double()  # balance only (no bits): exact in float64
    balanced = copy.deepcopy(m).double()
    ptq.quantize(balanced, [tuple(v.double() if v.is_floating_point() else v for v in c) for c in calib],
                 wbits=None, abits=None, quant="ptq4dit")
    csb = {n for n, q in balanced.named_modules() if isinstance(q, ptq.QuantLinear) and q.balance is not None}
    assert len(csb) == 6 * len(m.layers) and not any(n.endswith(("w2", "adaLN_modulation.1")) for n in csb)
    blk = balanced.layers[0]
    assert blk.attention.wq.balance is blk.attention.wv.balance and blk.feed_forward.w1.balance is blk.feed_forward.w3.balance
    with torch.no_grad():
        assert (balanced(*inputs(torch.float64)) - fp(*inputs(torch.float64))).abs().max().item() < 1e-10


def test_spearman_and_ssc_weights_follow_the_paper():
    a = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert ptq.spearman(a, a.exp()) == pytest.approx(1.0) and ptq.spearman(a, -a) == pytest.approx(-1.0)
    rho = [0.9, 0.1, -0.5, 0.1]
    eta = ptq.ssc_weights(rho)
    assert eta.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(eta, torch.tensor(rho, dtype=torch.float64).neg().exp() / sum(
        torch.tensor(rho, dtype=torch.float64).neg().exp()))  # softmax(-ρ)
    assert eta[2] > eta[1] == eta[3] > eta[0]  # the less correlated (more complementary), the more weight
    # the row whose activation salience runs against the weight salience dominates
    sw = torch.arange(1.0, 9.0, dtype=torch.float64)
    same, against = sw.clone(), sw.flip(0)
    sx, rhos = ptq.ssc_salience(torch.stack([same, against]), sw)
    assert rhos == pytest.approx([1.0, -1.0])
    e = torch.tensor([1.0, -1.0]).neg().exp()
    torch.testing.assert_close(sx, (e[0] * same + e[1] * against) / e.sum())


def test_calibrated_w4a8_is_closer_to_fp_than_a_bad_quantizer(calibrated):
    m, calib = calibrated
    with torch.no_grad():
        ref = m(*inputs())

        def rel_err(wbits, abits, quant):
            q = copy.deepcopy(m)
            ptq.quantize(q, calib, wbits, abits, quant)
            layers = [l for l in q.modules() if isinstance(l, ptq.QuantLinear)]
            assert len(layers) == 8 * len(m.layers) and all(l.act is not None for l in layers)
            assert torch.equal(q.final_layer.linear.weight, m.final_layer.linear.weight)
            return ((q(*inputs()) - ref).norm() / ref.norm()).item()

        w8a8, w4a8, bad = rel_err(8, 8, "rtn"), rel_err(4, 8, "ptq4dit"), rel_err(2, 4, "rtn")
    assert w8a8 < w4a8 < bad and w8a8 < 0.1, (w8a8, w4a8, bad)


def test_cli_end_to_end_on_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    m = tiny_fp()
    ckpt, out = tmp_path / "fp.pt", tmp_path / "r.json"
    torch.save({"model": m.state_dict(), "ema": m.state_dict(), "step": 0, "model_config": asdict(m.config)}, ckpt)
    common = ["ptq.py", "--ckpt", str(ckpt), "--device", "cpu", "--num-calib", "2", "--num-calib-steps", "2",
              "--num-steps", "3", "--num-samples", "20", "--batch-size", "10"]
    monkeypatch.setattr(sys, "argv", common + ["--wbits", "4", "--abits", "8", "--quant", "ptq4dit", "--method", "ddim",
                                               "--out", str(out)])
    ptq.main()
    r = json.loads(out.read_text())
    assert (r["quant"], r["method"], r["wbits"], r["abits"]) == ("ptq4dit", "ddim", 4, 8) and 0 <= r["accuracy"] <= 1 and r["fd"] > 0
    assert -1 <= r["mean_rho"] <= 1 and 0 < r["weight_bytes"] < 4 * sum(p.numel() for p in m.parameters())
    assert "accuracy=" in capsys.readouterr().out
    ternary = model_lib.build_model("tiny", in_channels=1)
    torch.save({"model": ternary.state_dict(), "model_config": asdict(ternary.config)}, ckpt)
    monkeypatch.setattr(sys, "argv", common)
    with pytest.raises(ValueError, match="ptq.py quantizes a full-precision model; this checkpoint is ternary"):
        ptq.main()


def test_a_full_disk_leaves_no_json_in_place(tmp_path, full_disk):
    """Issue 30: --out is written whole or not at all: a full disk is one line, and neither a 0-byte JSON nor a
    temp file is left."""
    import cli
    m = tiny_fp()
    ckpt, out = tmp_path / "fp.pt", tmp_path / "r.json"
    torch.save({"model": m.state_dict(), "ema": m.state_dict(), "step": 0, "model_config": asdict(m.config)}, ckpt)
    full_disk(room=10)
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--num-calib", "1", "--num-calib-steps", "1", "--num-steps", "1",
            "--num-samples", "10", "--batch-size", "10", "--quant", "rtn", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: ptq.main(argv))
    assert e.value.code.startswith(f"error: {out}: disk full after 0 bytes") and sorted(os.listdir(tmp_path)) == ["fp.pt"]
