"""plot.py: loss curves and the kernel speed-up plot are drawn (skipped without matplotlib, an optional dependency).
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
    with pytest.raises(SystemExit, match="one of the two"):
        plot.main(["--out", out])
