"""plot.py: loss curves, the kernel speed-up plot and the size study are drawn (skipped without matplotlib, an optional dependency).
Run: python -m pytest tests/test_plot.py -v"""
import json
import os

import pytest

import plot
from conftest import ROOT


def test_smooth_is_a_centred_median():
    assert plot.smooth([10, 1, 1, 1, 10], 3) == [10, 1, 1, 1, 10]
    assert plot.smooth([1, 9, 1, 1], 3) == [1, 1, 1, 1]


def test_kernel_plot_and_one_of_the_two_modes(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "k.png")
    plot.main(["--kernels", os.path.join(ROOT, "bench_results", "kernels_h200.json"), "--out", out])
    assert os.path.getsize(out) > 1000
    results = json.loads(open(os.path.join(ROOT, "bench_results", "kernels_h200.json")).read())
    results["provenance"] = {"date": "2026-12-01 10:00 UTC", "commit": "abc1234", "command": "python bench.py",
                             "gpu": results["device"]}  # what bench.py writes now
    (tmp_path / "k.json").write_text(json.dumps(results))
    plot.main(["--kernels", str(tmp_path / "k.json"), "--out", out])
    assert os.path.getsize(out) > 1000
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 30)))
    plot.main(["--logs", str(log), "--out", out])
    with pytest.raises(ValueError, match="give --logs"):
        plot.main(["--out", out])
    with pytest.raises(ValueError, match="is the input"):
        plot.main(["--logs", str(log), "--out", str(log)])


def test_study_plot_reads_evaluate_results_and_logs(tmp_path):
    pytest.importorskip("matplotlib")
    evals, logs = [], []
    # the ternary model has one α more per ternary layer than its twin; the 1e8 model has no twin
    runs = [(True, 4167224, 14.0), (False, 4167176, 8.0), (True, 32484968, 9.0), (False, 32484872, 7.5),
            (True, 1e8, 5.0)]
    for i, (ternary, params, fd) in enumerate(runs):
        (tmp_path / f"e{i}.json").write_text(json.dumps(dict(ternary=ternary, params=params, accuracy=0.8, fd=fd)))
        (tmp_path / f"l{i}.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 30)))
        evals.append(str(tmp_path / f"e{i}.json"))
        logs.append(str(tmp_path / f"l{i}.jsonl"))
    out = str(tmp_path / "s.png")
    plot.main(["--study", *evals, "--logs", *logs, "--out", out])
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert plot.final_loss(logs[0]) == sorted(1.0 / s for s in range(20, 30))[5]
    mean = {("ternary" if t else "full precision", p): (0.8, fd, 0.1) for t, p, fd in runs}
    assert plot.fd_ratios(mean) == {4167224: 14.0 / 8.0, 32484968: 9.0 / 7.5}
    # a warm-started run is a kind of its own, not a second seed of the ternary model of its size
    (tmp_path / "w.json").write_text(json.dumps(dict(ternary=True, params=32484968, accuracy=0.9, fd=7.9,
                                                     recipe="warm start")))
    plot.main(["--study", *evals, str(tmp_path / "w.json"), "--logs", *logs, logs[0], "--out", out])
    found = plot.study_runs(evals + [str(tmp_path / "w.json")], logs + [logs[0]])
    assert len(found["ternary", 32484968]) == 1 and found["ternary, warm start", 32484968][0][1] == 7.9
    with pytest.raises(ValueError, match="give each run's log"):
        plot.main(["--study", *evals, "--logs", logs[0], "--out", out])
    (tmp_path / "e0.json").write_text(json.dumps(dict(ternary=True, accuracy=0.8, fd=1.0)))
    with pytest.raises(ValueError, match="parameter count"):
        plot.main(["--study", *evals, "--logs", *logs, "--out", out])
