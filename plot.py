"""
Training-loss curves of one or more runs, from their log.jsonl files (written by train.py), as one PNG; or the
2-bit kernel's speed-up over cuBLAS per layer shape, from a `bench.py --what kernels` JSON; or the size study:
accuracy, FD and final loss against parameters, ternary and full precision, from evaluate.py JSONs and the
runs' logs.

    python plot.py --logs out/ternary/log.jsonl out/fp/log.jsonl --labels ternary fp --out assets/loss.png
    python plot.py --kernels bench_results/kernels_h200.json --out results/kernel_speedup.png
    python plot.py --study out/eval_XS.json out/eval_S.json --logs out/XS/log.jsonl out/S/log.jsonl --out study.png

In the study each kind of run is a line: ternary, full precision, and each recipe evaluate.py found in a train.py
checkpoint (e.g. "ternary, warm start"); JSONs from before evaluate.py recorded the recipe count as ternary.

Each curve is a centred moving median (--smooth log points) over the faint raw losses. matplotlib is needed
by this script only (pip install matplotlib); nothing else in the repository imports it.
"""

import argparse
import json
import os

import cli


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


def plot_logs(ax, logs, labels, k, logy):
    """One training-loss curve per log: the smoothed line over the faint raw losses."""
    for path, label in zip(logs, labels):
        steps, losses = read_log(path)
        if not steps:
            raise ValueError(f"no loss records in {path}")
        line, = ax.plot(steps, smooth(losses, k), label=label, linewidth=1.5)
        ax.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
    ax.set(xlabel="step", ylabel="training loss", yscale="log" if logy else "linear")
    ax.set_title(f"training loss, centred moving median over {k} log points")
    ax.legend()


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


def final_loss(path, n=10):
    """Median of the last n logged losses: one number per run, steadier than the last log line."""
    losses = read_log(path)[1][-n:]
    return sorted(losses)[len(losses) // 2]


def study_runs(evals, logs):
    """{(kind, parameters): [(accuracy, FD, final loss) per seed]} from evaluate.py JSONs and the runs' logs (logs[i]
    is the run of evals[i]). kind: "full precision", "ternary" (from scratch, or a file that does not say), or
    "ternary, " + the recipe (e.g. "ternary, warm start"): a warm-started run is no seed of the scratch one."""
    runs = {}
    for path, log in zip(evals, logs):
        with open(path) as f:
            r = json.load(f)
        if "params" not in r or "fd" not in r:
            raise ValueError(f"{path} is not an evaluate.py sampling result with a parameter count: rerun evaluate.py")
        recipe = r.get("recipe")  # absent from JSONs older than the field
        if not r["ternary"]:
            kind = "full precision"
        elif recipe in (None, "from scratch"):
            kind = "ternary"
        else:
            kind = "ternary, " + recipe
        runs.setdefault((kind, r["params"]), []).append((r["accuracy"], r["fd"], final_loss(log)))
    return runs


def plot_study(axes, evals, logs):
    """Accuracy, FD and final loss against parameters, one line per kind of run (study_runs: ternary, full
    precision, each recipe), the mean over seeds, each seed a dot."""
    runs = study_runs(evals, logs)
    mean = {key: [sum(v) / len(v) for v in zip(*vs)] for key, vs in runs.items()}
    kinds = sorted({k for k, _ in runs}, key=lambda k: (k != "ternary", k != "full precision", k))
    for i, (ax, name) in enumerate(zip(axes, ("accuracy", "FD (lower is better)", "final training loss"))):
        for kind in kinds:
            sizes = sorted(p for k, p in runs if k == kind)
            line, = ax.plot(sizes, [mean[kind, p][i] for p in sizes], marker="o", label=kind)
            for p in sizes:
                ax.scatter([p] * len(runs[kind, p]), [v[i] for v in runs[kind, p]], color=line.get_color(), s=12)
        ax.set(xscale="log", xlabel="parameters", title=name)
        ax.grid(alpha=0.3)
    ratios = ", ".join(f"{p / 1e6:.1f}M {r:.2f}" for p, r in fd_ratios(mean).items())
    axes[1].set_title("FD; ternary / FP: " + ratios, fontsize=9)
    axes[0].legend(fontsize=8)


def fd_ratios(mean):
    """{ternary parameters: FD(ternary) / FD(FP twin)}. The twin is the FP model within 1% of the ternary one's
    parameter count: it lacks only the α scales (one per ternary layer)."""
    fp = [p for kind, p in mean if kind == "full precision"]
    ratios = {}
    for p in sorted(p for kind, p in mean if kind == "ternary"):
        twin = min(fp, key=lambda q: abs(q - p), default=None)
        if twin is not None and abs(twin - p) < 0.01 * p:
            ratios[p] = mean["ternary", p][1] / mean["full precision", twin][1]
    return ratios


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot loss curves, kernel speed-ups or the size study.")
    p.add_argument("--logs", nargs="+", default=None, help="log.jsonl files, one curve each")
    p.add_argument("--kernels", default=None, help="instead: a bench.py --what kernels JSON, speed-up per shape")
    p.add_argument("--study", nargs="+", default=None,
                   help="instead: evaluate.py JSONs of the size study (with --logs, the runs' logs in the same order)")
    p.add_argument("--labels", nargs="+", default=None, help="curve labels (default: each log's folder name)")
    p.add_argument("--smooth", type=int, default=20, help="smoothing window, in log points")
    p.add_argument("--logy", action="store_true", help="log-scale loss axis")
    p.add_argument("--out", default="assets/loss.png", help="output PNG")
    args = p.parse_args(argv)
    if bool(args.logs or args.study) == bool(args.kernels):
        raise ValueError("give --logs (loss curves), --study with --logs (size study) or --kernels (kernel speed-ups)")
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(f))) for f in args.logs or []]
    if args.logs and len(labels) != len(args.logs):
        raise ValueError(f"{len(args.logs)} --logs but {len(labels)} --labels")
    if args.study and len(args.study) != len(args.logs or []):
        raise ValueError(f"{len(args.study)} --study results but {len(args.logs or [])} --logs: give each run's log")
    cli.check_output(args.out, (args.logs or []) + (args.study or []) + [args.kernels or ""])
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot.py needs matplotlib (an optional dependency): pip install matplotlib") from None

    if args.study:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=120)
        plot_study(axes, args.study, args.logs)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        if args.kernels:
            plot_kernels(ax, args.kernels)
        else:
            plot_logs(ax, args.logs, labels, args.smooth, args.logy)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with cli.atomic_write(args.out) as f:  # a crash leaves no torn PNG
        fig.savefig(f, format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
