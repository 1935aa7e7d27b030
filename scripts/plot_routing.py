"""Plot a run's routing and losses from its run directory.

    python scripts/plot_routing.py RUN_DIR [--out DIR]      (default DIR: RUN_DIR/plots)

Reads RUN_DIR/metrics.jsonl and RUN_DIR/routing.jsonl (either may be missing) and writes:

    expert_load.png             the last step: MoE layers x experts, share of routed assignments
    expert_load_over_steps.png  one panel per MoE layer: expert x step, share of assignments
    load_cv.png                 load coefficient of variation over steps, one line per layer
    loss.png                    LM loss (and val_loss where logged); aux and z loss
Needs matplotlib (`pip install 'moetrain[plot]'`). Steps logged twice (a resumed run) keep the
last record; an unparsable line (a crash mid-write) is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

#: Heatmaps average the steps into at most this many columns (a long run has 10^4-10^5 steps).
MAX_COLUMNS = 400


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records by ascending step; the last record of a step wins; broken lines are skipped."""
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def first_moe_block(run_dir: Path) -> int:
    """Transformer block index of the first MoE layer (config.yaml's first_dense_layers), or 0."""
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        return int(cfg["model"]["moe"]["first_dense_layers"])
    except Exception:  # no config, no PyYAML, an older schema: number the MoE layers from 0
        return 0


def load_shares(routing: list[dict[str, Any]]):
    """(steps [N], shares [N, layers, experts]): each layer's counts over their sum."""
    import numpy as np

    routing = [r for r in routing if r.get("layers")]
    steps = np.array([r["step"] for r in routing])
    counts = np.array([[layer["tokens_per_expert"] for layer in r["layers"]] for r in routing],
                      dtype=float)
    totals = counts.sum(axis=2, keepdims=True)
    return steps, counts / np.where(totals > 0, totals, 1.0)


def bin_steps(steps, values, max_columns: int = MAX_COLUMNS):
    """Average consecutive steps into at most `max_columns` bins: (bin start steps, values)."""
    import numpy as np

    n = len(steps)
    if n <= max_columns:
        return steps, values
    edges = np.linspace(0, n, max_columns + 1).astype(int)
    return (steps[edges[:-1]],
            np.stack([values[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])]))


def plot_final_load(plt, steps, shares, offset: int, out: Path) -> Path:
    n_layers, n_experts = shares.shape[1:]
    final = shares[-1]
    width = min(18, max(8, 4 + 0.45 * n_experts))
    height = min(14, max(3.5, 1.8 + 0.45 * n_layers))
    fig, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    # Centred on the balanced share 1/E: red = overloaded, blue = underloaded.
    balanced = 1.0 / n_experts
    vmax = max(final.max(), 2 * balanced)
    from matplotlib.colors import TwoSlopeNorm

    im = ax.imshow(final, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                   norm=TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=vmax))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    _ticks(ax.set_xticks, ax.set_xticklabels, n_experts, 0)
    _ticks(ax.set_yticks, ax.set_yticklabels, n_layers, offset)
    if n_layers * n_experts <= 256:
        for (i, j), v in _enumerate2(final):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v - balanced) > 0.6 * (vmax - balanced) else "black")
    fig.colorbar(im, ax=ax, label="share of the layer's routed assignments")
    ax.set_title(f"expert load at step {int(steps[-1])}, % of each layer's assignments "
                 f"(balanced: {100 * balanced:.3g}%)")
    path = out / "expert_load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_load_over_steps(plt, steps, shares, offset: int, out: Path) -> Path:
    n_layers, n_experts = shares.shape[1:]
    cols = min(n_layers, 3 if n_layers <= 6 else 4 if n_layers <= 16 else 6)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.8, 2.8 * rows + 0.6),
                             squeeze=False, sharex=True, sharey=True, constrained_layout=True)
    bins, binned = bin_steps(steps, shares)
    vmax = float(binned.max()) if binned.size else 1.0
    im = None
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n_layers:
            ax.axis("off")
            continue
        # extent maps columns to steps so the x axis reads in steps even after binning.
        im = ax.imshow(binned[:, i, :].T, aspect="auto", origin="lower", cmap="viridis",
                       interpolation="nearest", vmin=0.0, vmax=vmax,
                       extent=(float(bins[0]) - 0.5, float(steps[-1]) + 0.5, -0.5, n_experts - 0.5))
        ax.set_title(f"layer {i + offset}", fontsize=10)
        if i % cols == 0:
            ax.set_ylabel("expert")
        if i // cols == rows - 1 or i + cols >= n_layers:
            ax.set_xlabel("step")
    fig.colorbar(im, ax=axes, label="share of the layer's routed assignments", shrink=0.9 if rows <= 3 else 0.4,
                 pad=0.01, aspect=30)
    fig.suptitle(f"expert load over training (balanced: 1/{n_experts} = {100 / n_experts:.3g}%)")
    path = out / "expert_load_over_steps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_load_cv(plt, routing, metrics, offset: int, out: Path) -> Path:
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    routing = [r for r in routing if r.get("layers")]
    if routing:
        steps = np.array([r["step"] for r in routing])
        cv = np.array([[layer["load_cv"] for layer in r["layers"]] for r in routing])
        n_layers = cv.shape[1]
        colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, n_layers))
        for i in range(n_layers):
            label = f"layer {i + offset}" if n_layers <= 12 else None
            ax.plot(steps, cv[:, i], color=colors[i], lw=1.2, alpha=0.85, label=label)
        ax.plot(steps, cv.mean(axis=1), color="black", lw=2.2, label="mean over layers")
        if n_layers > 12:  # a legend of 48 entries hides the plot; a depth colour bar does not
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            sm = ScalarMappable(norm=Normalize(offset, offset + n_layers - 1), cmap="viridis")
            fig.colorbar(sm, ax=ax, label="layer")
    else:  # no routing.jsonl: the mean CV that metrics.jsonl carries
        rec = [m for m in metrics if "load_cv" in m]
        ax.plot([m["step"] for m in rec], [m["load_cv"] for m in rec], color="black", lw=2,
                label="mean over layers")
    ax.set_xlabel("step")
    ax.set_ylabel("load CV (std / mean of expert load)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("load balance over training (0 = perfectly balanced)")
    path = out / "load_cv.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(plt, metrics, out: Path) -> Path:
    fig, (ax, ax_aux) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    steps = [m["step"] for m in metrics]
    loss = [_num(m.get("loss")) for m in metrics]
    window = len(loss) // 50
    if window >= 3:  # long runs: the raw curve faint, a moving average on top
        ax.plot(steps, loss, lw=0.6, alpha=0.35, color="tab:blue")
        ax.plot(steps[window - 1:], _moving_average(loss, window), lw=1.5, color="tab:blue",
                label=f"train loss (mean of {window} steps)")
    else:
        ax.plot(steps, loss, lw=1.2, color="tab:blue", label="train loss")
    val = [(m["step"], _num(m["val_loss"])) for m in metrics if m.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=1.5, ms=5, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("language-model loss")
    for key, color in (("aux_loss", "tab:green"), ("z_loss", "tab:purple")):
        if any(key in m for m in metrics):
            ax_aux.plot(steps, [_num(m.get(key)) for m in metrics], lw=1.2, color=color, label=key)
    ax_aux.set_xlabel("step")
    ax_aux.set_ylabel("loss (with its coefficient)")
    ax_aux.grid(alpha=0.3)
    ax_aux.legend()
    ax_aux.set_title("auxiliary losses")
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _moving_average(values: list[float], window: int) -> list[float]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return list(np.convolve(v, np.ones(window) / window, mode="valid"))


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _ticks(set_ticks, set_labels, n: int, offset: int) -> None:
    step = max(1, math.ceil(n / 32))  # at most ~32 labels on an axis
    positions = list(range(0, n, step))
    set_ticks(positions)
    set_labels([str(p + offset) for p in positions])


def _enumerate2(matrix):
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            yield (i, j), float(v)


def make_plots(run_dir: Path, out: Path) -> list[Path]:
    """Write every plot the run's files allow; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    routing = read_jsonl(run_dir / "routing.jsonl")
    if not metrics and not routing:
        raise FileNotFoundError(f"{run_dir} has no readable metrics.jsonl or routing.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    offset = first_moe_block(run_dir)
    written = []
    if any(r.get("layers") for r in routing):
        steps, shares = load_shares(routing)
        written.append(plot_final_load(plt, steps, shares, offset, out))
        written.append(plot_load_over_steps(plt, steps, shares, offset, out))
    if routing or any("load_cv" in m for m in metrics):
        written.append(plot_load_cv(plt, routing, metrics, offset, out))
    if metrics:
        written.append(plot_losses(plt, metrics, out))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl, routing.jsonl)")
    ap.add_argument("--out", type=Path, default=None, help="where the PNGs go (default RUN_DIR/plots)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install 'moetrain[plot]' (the plot extra)",
              file=sys.stderr)
        return 2
    try:
        paths = make_plots(args.run_dir, args.out or args.run_dir / "plots")
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
