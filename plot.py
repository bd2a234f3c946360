"""
Training-loss curves of one or more runs, from their log.jsonl files (written by train.py), as one PNG; or the
2-bit kernel's speed-up over cuBLAS per layer shape, from a `bench.py --what kernels` JSON.

    python plot.py --logs out/ternary/log.jsonl out/fp/log.jsonl --labels ternary fp --out assets/loss.png
    python plot.py --kernels bench_results/kernels_h200.json --out results/kernel_speedup.png

Each curve is a centred moving median (--smooth log points) over the faint raw losses. matplotlib is needed
by this script only (pip install matplotlib); nothing else in the repository imports it.
"""

import argparse
import json
import os
import sys


def read_log(path):
    """(steps, losses) of a log.jsonl. A resumed run re-logs the steps after its last checkpoint: the last wins."""
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if "loss" in rec:
                    by_step[rec["step"]] = rec["loss"]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(v, k):
    """Centred moving median over k log points, the window shrinking symmetrically at the ends. A median, not a
    mean: the first losses are 10x the rest, and in a mean window they put a step into the curve."""
    h = [min(k // 2, i, len(v) - 1 - i) for i in range(len(v))]
    return [sorted(v[i - h[i]: i + h[i] + 1])[h[i]] for i in range(len(v))]


def plot_kernels(ax, path):
    """Speed-up (cuBLAS time / ternary time) against the token count M, one line per layer shape."""
    with open(path) as f:
        results = json.load(f)
    shapes, layers = {}, {}
    for r in results["kernels"]:
        key = (r["model"], r["layer"], f"{r['model']} {r['layer']} {r['K']}→{r['N']}")
        shapes.setdefault(key, []).append((r["M"], r["speedup"]))
        layers.setdefault(r["layer"], f"C{len(layers) % 10}")
    for (model, layer, label), points in shapes.items():  # a colour per layer, a line style per model
        ax.plot(*zip(*sorted(points)), marker="o", markersize=3, linewidth=1.2, label=label, color=layers[layer],
                linestyle={"600M": ":", "4.2B": "-"}.get(model, "--"))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set(xscale="log", xlabel="tokens M (batch x 256 per linear)", ylabel="speed-up over cuBLAS bf16")
    when = results.get("provenance", {}).get("date")  # bench.py's record of when it measured (older files: none)
    ax.set_title(f"2-bit kernel vs cuBLAS, {results['device']}" + (f", {when[:10]}" if when else ""))
    ax.legend(fontsize=7, ncol=2)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot training-loss curves from train.py's log.jsonl files.")
    p.add_argument("--logs", nargs="+", default=None, help="log.jsonl files, one curve each")
    p.add_argument("--kernels", default=None, help="instead: a bench.py --what kernels JSON, speed-up per shape")
    p.add_argument("--labels", nargs="+", default=None, help="curve labels (default: each log's folder name)")
    p.add_argument("--smooth", type=int, default=20, help="smoothing window, in log points")
    p.add_argument("--logy", action="store_true", help="log-scale loss axis")
    p.add_argument("--out", default="assets/loss.png", help="output PNG")
    args = p.parse_args(argv)
    if bool(args.logs) == bool(args.kernels):
        sys.exit("error: give --logs (loss curves) or --kernels (kernel speed-ups), one of the two")
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(f))) for f in args.logs or []]
    if args.logs and len(labels) != len(args.logs):
        sys.exit(f"error: {len(args.logs)} --logs but {len(labels)} --labels")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot.py needs matplotlib (an optional dependency): pip install matplotlib")

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if args.kernels:
        plot_kernels(ax, args.kernels)
    for path, label in zip(args.logs or [], labels):
        steps, losses = read_log(path)
        if not steps:
            sys.exit(f"error: no loss records in '{path}'")
        line, = ax.plot(steps, smooth(losses, args.smooth), label=label, linewidth=1.5)
        ax.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
    if args.logs:
        ax.set(xlabel="step", ylabel="training loss", yscale="log" if args.logy else "linear")
        ax.set_title(f"training loss, centred moving median over {args.smooth} log points")
        ax.legend()
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
