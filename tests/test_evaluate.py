"""Tests of evaluate.py: the Fréchet distance against closed forms, ternary PTQ, adaLN hooks, the shipped classifier.

    python -m pytest tests/test_evaluate.py -q
"""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

import evaluate
import model as model_lib
import quant


def random_cov(d, gen, rank=None):
    a = torch.randn(d, rank or d, generator=gen, dtype=torch.float64)
    return a @ a.T / (rank or d)


def test_fd_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    assert abs(evaluate.feature_fd(f, f)) < 1e-8


def test_fd_closed_form_diagonal_and_rotated():
    g = torch.Generator().manual_seed(1)
    d = 16
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 3, torch.rand(d, generator=g, dtype=torch.float64) * 3
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()  # Gaussians with diagonal covariances
    assert evaluate.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected.item(), rel=1e-9)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]  # a shared rotation changes nothing
    rot = evaluate.frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert rot == pytest.approx(expected.item(), rel=1e-8)
    # 1-D: N(0, 1) vs N(m, s²) is m² + (1 - s)²
    assert evaluate.frechet_distance(torch.zeros(1), torch.ones(1, 1), torch.full((1,), 2.0),
                                     torch.full((1, 1), 0.25)) == pytest.approx(4 + 0.25)


def test_fd_general_covariances_symmetric_and_matches_eigvals():
    g = torch.Generator().manual_seed(2)
    d = 12
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    for s1, s2 in [(random_cov(d, g), random_cov(d, g)), (random_cov(d, g, rank=4), random_cov(d, g))]:  # + singular
        # tr((S1 S2)^½) = Σ sqrt(eigenvalues of the non-symmetric S1 S2), which are real and ≥ 0
        tr = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
        expected = ((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr
        d12, d21 = evaluate.frechet_distance(mu1, s1, mu2, s2), evaluate.frechet_distance(mu2, s2, mu1, s1)
        assert d12 == pytest.approx(expected.item(), rel=1e-6, abs=1e-8)
        assert d12 == pytest.approx(d21, rel=1e-8)


def tiny_model(**kw):
    torch.manual_seed(0)  # smaller than "tiny", and 16 px, so that evaluate.py's resize to 32 px is exercised
    m = model_lib.TerDiT(model_lib.TerDiTConfig(input_size=16, in_channels=1, dim=64, depth=2, n_heads=2, **kw))
    with torch.no_grad():  # undo adaLN-Zero's zeros so every layer has something to quantize / report
        for block in m.layers:
            nn.init.normal_(block.adaLN_modulation[1].weight, std=0.05)
            nn.init.normal_(block.adaLN_modulation[1].bias, std=0.05)
    return m.eval()


def test_ptq_ternary_three_values_per_tensor_and_fp_layers_untouched():
    m = tiny_model(ternary=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ternary_names = {n for n, mod in m.named_modules() if isinstance(mod, quant.TernaryLinear)}
    assert len(ternary_names) == 2 * (4 + 3 + 1)  # 2 blocks × (wq wk wv wo, w1 w2 w3, adaLN)
    evaluate.ptq_ternary(m)
    for name, mod in m.named_modules():
        if name in ternary_names:
            w, w0 = mod.weight, before[name + ".weight"].double()
            values = w.unique()
            assert len(values) == 3, name
            alpha = values.max()
            assert alpha > 0 and torch.equal(values, torch.stack([-alpha, torch.zeros_like(alpha), alpha]))
            trits = quant.ternarize(w0)[0]
            assert torch.equal(w.sign(), trits.to(w.dtype))  # the trits are round-to-nearest's
            ls = (w0 * trits).sum() / (trits * trits).sum()  # and α is the least-squares scale
            assert alpha.item() == pytest.approx(ls.item(), rel=1e-5)
            if mod.bias is not None:
                assert torch.equal(mod.bias, before[name + ".bias"])
    for k, v in m.state_dict().items():  # x_embedder, t_embedder, y_embedder, norms, final_layer: unchanged
        if k.rsplit(".", 1)[0] not in ternary_names or k.endswith(".bias"):
            assert torch.equal(v, before[k]), k
    out = m(torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2]))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="already ternary"):
        evaluate.ptq_ternary(tiny_model(ternary=True))


@pytest.mark.parametrize("adaln_norm", [True, False])
def test_adaln_stats_hooks_finite(adaln_norm):
    m = tiny_model(adaln_norm=adaln_norm)
    rows = evaluate.adaln_stats(m, torch.randn(4, 1, 16, 16), torch.arange(4), timesteps=(10, 500, 990))
    assert len(rows) == 3 * len(m.layers)
    for r in rows:
        assert all(math.isfinite(v) and v >= 0 for v in r["linear"].values())
        assert r["linear"]["max_abs"] > 0
        if adaln_norm:
            assert all(math.isfinite(v) for v in r["norm"].values())
            assert r["norm"]["rms"] == pytest.approx(1.0, rel=0.05)  # RMSNorm's output has unit RMS (weight = 1)
        else:
            assert r["norm"] is None
    assert all(not block.adaLN_modulation[k]._forward_hooks for block in m.layers for k in (1, 2))  # removed


def test_shipped_classifier_accuracy_and_floor():
    assert os.path.getsize(evaluate.ASSET) < 2e6
    clf = evaluate.load_classifier()
    xt, yt = evaluate.real_images("test")
    acc = (evaluate.run_classifier(clf, xt)[0].argmax(1) == yt).float().mean().item()
    assert acc >= 0.85
    noise = torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = evaluate.score(noise, torch.arange(200) % 10, clf)
    assert r["real_acc"] == pytest.approx(acc) and r["floor_fd"] > 0 and r["fd"] > 10 * r["floor_fd"]


def test_cli_end_to_end_on_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    from dataclasses import asdict
    m = tiny_model(ternary=False)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict(), "ema": m.state_dict(), "step": 0, "model_config": asdict(m.config)}, ckpt)
    out = tmp_path / "r.json"
    common = ["evaluate.py", "--ckpt", str(ckpt), "--device", "cpu", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", common + ["--num-samples", "20", "--num-steps", "2", "--batch-size", "10",
                                               "--ptq"])
    evaluate.main()
    r = json.loads(out.read_text())
    assert r["ptq"] and 0 <= r["accuracy"] <= 1 and r["fd"] > 0 and r["ckpt_bytes"] == os.path.getsize(ckpt)
    assert r["params"] == sum(p.numel() for p in m.parameters()) and r["recipe"] is None  # no train.py args
    monkeypatch.setattr(sys, "argv", common + ["--adaln-stats", "--num-samples", "10"])
    evaluate.main()
    assert len(json.loads(out.read_text())["adaln_stats"]) == 5 * len(m.layers)
    assert "linear: mean|x|" in capsys.readouterr().out


def test_cli_act_fp8_on_a_packed_model_only(tmp_path, monkeypatch):
    from dataclasses import asdict
    import pack
    m = tiny_model()
    ckpt, tdit, out = tmp_path / "ckpt.pt", str(tmp_path / "m.tdit"), tmp_path / "r.json"
    torch.save({"model": m.state_dict(), "ema": m.state_dict(), "step": 0, "model_config": asdict(m.config)}, ckpt)
    pack.write_packed(tdit, asdict(m.config), 0, pack.encode(m), trits_per_byte=4)
    args = ["--act", "fp8", "--device", "cpu", "--num-samples", "10", "--num-steps", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--ckpt", tdit, *args])
    evaluate.main()
    r = json.loads(out.read_text())
    assert r["act"] == "fp8" and 0 <= r["accuracy"] <= 1 and r["fd"] > 0
    assert r["params"] == sum(p.numel() for p in m.parameters())  # the packed model counted as trained
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--ckpt", str(ckpt), *args])
    with pytest.raises(ValueError, match=r"need a packed model .*`python pack.py --ckpt .* --out model.tdit`"):
        evaluate.main()
