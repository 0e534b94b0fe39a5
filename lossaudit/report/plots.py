"""Plots for the HTML report, returned as PNG bytes.

Drawn on matplotlib's object API with the Agg canvas (no pyplot, so no global backend is
switched under a user's notebook), imported only when a plot is drawn. Names from the report
(paths, reductions, tensors) have ``$`` escaped, so mathtext never reads a name as a formula.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import pandas as pd

MAX_TENSORS_SHOWN = 60  # a real model has hundreds of tensors: keep the worst, in model order
ERROR_FLOOR = 1e-17  # exact zeros drawn here on the log axis


def imbalance(counts: Sequence[int]) -> float:
    """Spread of target tokens over microbatches: std / mean (0 when every microbatch holds
    the same count, which is exactly when mean_of_means equals the token mean)."""
    counts = [int(c) for c in counts]
    mean = sum(counts) / len(counts) if counts else 0.0
    if not mean:
        return math.nan
    return math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts)) / mean


def case_label(path: str, reduction) -> str:
    return path + (f":{reduction}" if isinstance(reduction, str) else "")


def _text(name: str) -> str:
    """A name from the report as literal text in a plot (``$`` would start mathtext)."""
    return str(name).replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _style():
    import matplotlib

    return matplotlib.rc_context({"font.size": 9})


def error_vs_imbalance(cases: pd.DataFrame, rtol: float | None) -> bytes:
    """Gradient relative error (log) against token-count imbalance, one line per path:reduction.

    Layouts with the same imbalance (the two padding sides) are drawn at their worst error;
    NaN errors (a zero-token microbatch under a per-microbatch mean) cannot be drawn and are
    counted in the legend.
    """
    frame = cases.assign(
        label=[case_label(p, r) for p, r in zip(cases["path"], cases["reduction"])],
        x=cases["tokens"].map(imbalance),
        y=pd.to_numeric(cases["grad_rel_err"], errors="coerce"),
    )
    with _style():
        fig = _figure(7.5, 4.2)
        ax = fig.add_subplot()
        for label, rows in frame.groupby("label", sort=False):
            drawable = rows[rows["y"].map(math.isfinite) & rows["x"].map(math.isfinite)]
            missing = len(rows) - len(drawable)
            worst = drawable.groupby("x")["y"].max().sort_index().clip(lower=ERROR_FLOOR)
            star = "*" if rows["expected"].astype(bool).all() else ""
            name = _text(f"{label}{star}") + (f" ({missing} NaN not drawn)" if missing else "")
            ax.plot(worst.index, worst.values, marker="o", linestyle="--" if star else "-", label=name)
        if rtol is not None and math.isfinite(rtol):
            ax.axhline(rtol, color="black", linewidth=0.8, linestyle=":", label=f"tolerance {rtol:.1e}")
        ax.set_yscale("log")
        ax.set_xlabel("target-token imbalance over microbatches (std / mean of counts)")
        ax.set_ylabel("gradient relative error")
        ax.set_title("gradient error per layout (* = expected to differ)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        return _png(fig)


def tensor_errors(entry: dict) -> bytes:
    """Relative gradient error of each parameter tensor for one case, in model order."""
    tensors = [(name, err) for name, err in entry["tensors"]]
    if len(tensors) > MAX_TENSORS_SHOWN:
        keep = sorted(range(len(tensors)), key=lambda i: -_sortable(tensors[i][1]))[:MAX_TENSORS_SHOWN]
        tensors = [tensors[i] for i in sorted(keep)]
    names = [name for name, _ in tensors]
    errors = [max(_sortable(err), ERROR_FLOOR) for _, err in tensors]
    with _style():
        fig = _figure(7.5, 1.2 + 0.18 * len(names))
        ax = fig.add_subplot()
        ax.barh(range(len(names)), errors, color="#d62728" if not entry.get("expected") else "#ff7f0e")
        ax.set_yticks(range(len(names)), [_text(n) for n in names], fontsize=7)
        ax.invert_yaxis()  # first tensor of the model on top
        if max(errors) > 10 * min(errors):  # log only where errors span decades
            ax.set_xscale("log")
        ax.set_xlabel("gradient relative error of the tensor")
        fig.suptitle(_text(f"per-tensor error: {case_title(entry)}"))
        ax.grid(True, axis="x", alpha=0.3)
        return _png(fig)


def _sortable(err) -> float:
    return err if isinstance(err, (int, float)) and math.isfinite(err) else math.inf


def case_title(entry: dict) -> str:
    return (f"{case_label(entry['path'], entry.get('reduction'))} k={entry['microbatches']} "
            f"{entry['grouping']} pad-{entry['padding']}")


def microbatch_tokens_and_losses(counts: Sequence[int], losses: Sequence[float | None],
                                 reference_loss: float | None, title: str) -> bytes:
    """Target tokens per microbatch (bars) and each microbatch's token-mean loss (points)."""
    index = list(range(1, len(counts) + 1))
    with _style():
        fig = _figure(7.5, 3.2)
        ax = fig.add_subplot()
        ax.bar(index, counts, color="#9ecae1", label="target tokens")
        ax.set_xlabel("microbatch")
        ax.set_ylabel("target tokens")
        ax.set_xticks(index)
        right = ax.twinx()
        drawn = [(i, v) for i, v in zip(index, losses) if v is not None and math.isfinite(v)]
        right.plot([i for i, _ in drawn], [v for _, v in drawn], "o", color="#2ca02c",
                   label="token-mean loss")
        if reference_loss is not None and math.isfinite(reference_loss):
            right.axhline(reference_loss, color="black", linestyle=":", linewidth=0.8,
                          label=f"full-batch loss {reference_loss:.4f}")
        right.set_ylabel("token-mean loss")
        (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.set_title(_text(title))
        return _png(fig)
