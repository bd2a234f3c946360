"""bench.py's command line (the benchmarks themselves need a GPU: bench_results/ holds their tables).
Run: python -m pytest tests/test_bench.py -v"""
import pytest

import bench


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert e.value.code == 0 and "(default: kernels)" in out and "(default: 600M,4.2B)" in out
