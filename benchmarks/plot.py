"""Plot one family's results JSON as a PNG: µs (log scale) or % of floor per case, one line per provider.

    python benchmarks/plot.py benchmarks/results/nvidia-h100-80gb-hbm3/gemm.json --metric pct --where shape=8b.gate_up

Runs on CPU from committed JSON (matplotlib, the ``bench`` extra). Only rows with status "ok" are drawn; in µs mode
the case's floors are drawn as dashed lines.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = {"us": ("median_us", "µs per call (median)"), "pct": ("pct_of_floor", "% of floor (100 = at the floor)")}
DEFAULT_FACET = {"gemm": "shape"}
FLOOR_STYLES = ((0, (4, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (2, 3)))


def _match(case: dict, where: dict) -> bool:
    return all(str(case.get(k)) == v for k, v in where.items())


def select(rows: list, where: dict) -> list:
    return [r for r in rows if _match(r.get("case", {}), where)]


def plot_rows(rows: list, out_png, metric: str = "us", title: str = "", facet: str | None = None) -> Path:
    """Draw rows (one family) into out_png. x: cases in row order; y: the metric; one line per provider.

    Cases with no measured row are left out. ``facet``: a case parameter (e.g. ``shape``) that splits the rows
    into one panel per value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {r["case_str"] for r in rows if r.get("status") == "ok"}
    rows = [r for r in rows if r["case_str"] in measured]
    groups: dict = {}
    for r in rows:
        groups.setdefault(str(r.get("case", {}).get(facet)) if facet else "", []).append(r)
    if not groups:
        groups = {"": []}
    n = len(groups)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    widest = max(len({r["case_str"] for r in g}) for g in groups.values()) if rows else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * max(5.0, 0.45 * widest + 2.5), 4.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, group) in zip(axes.flat, groups.items()):
        _plot_panel(ax, group, metric, name)
    gpu = rows[0].get("gpu", "") if rows else ""
    sha = (rows[0].get("git_sha") or "")[:10] if rows else ""
    fig.suptitle(title or f"{rows[0]['family'] if rows else ''} — {gpu} ({sha})", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _plot_panel(ax, rows: list, metric: str, panel_title: str) -> None:
    key, ylabel = METRICS[metric]
    cases, providers = [], []
    for r in rows:
        if r["case_str"] not in cases:
            cases.append(r["case_str"])
        if r["provider"] not in providers:
            providers.append(r["provider"])
    xi = {c: i for i, c in enumerate(cases)}
    for p in providers:
        pts = [(xi[r["case_str"]], r[key]) for r in rows
               if r["provider"] == p and r.get("status") == "ok" and r.get(key) is not None]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=p)
    if metric == "us":
        kinds = []
        for r in rows:
            for k in (r.get("case_floors") or {}):
                if k not in kinds:
                    kinds.append(k)
        for k in kinds:
            pts = {}
            for r in rows:
                v = (r.get("case_floors") or {}).get(k)
                if v is not None:
                    pts[xi[r["case_str"]]] = v
            if pts:
                xs = sorted(pts)
                style = FLOOR_STYLES[kinds.index(k) % len(FLOOR_STYLES)]
                ax.plot(xs, [pts[x] for x in xs], linestyle=style, color="0.45", linewidth=0.9, label=f"floor {k}")
        ax.set_yscale("log")
    else:
        ax.axhline(100.0, linestyle="--", color="0.5", linewidth=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if panel_title:
        ax.set_title(panel_title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a family results file, e.g. benchmarks/results/<gpu>/gemm.json")
    ap.add_argument("--metric", choices=sorted(METRICS), default="us")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="keep cases whose parameter KEY equals VALUE (repeatable), e.g. shape=8b.gate_up, batch=8")
    ap.add_argument("--facet", default=None, help="one panel per value of this case parameter (gemm: shape)")
    ap.add_argument("-o", "--out", default=None, help="PNG path (default: next to the JSON)")
    args = ap.parse_args(argv)
    where = {}
    for w in args.where:
        k, sep, v = w.partition("=")
        if not sep:
            ap.error(f"--where expects KEY=VALUE, got {w!r}")
        where[k] = v
    with open(args.json) as fh:
        rows = json.load(fh)
    rows = select(rows, where)
    if not rows:
        print("no rows match", file=sys.stderr)
        return 1
    suffix = "".join(f"_{k}-{v}" for k, v in where.items())
    out = args.out or str(Path(args.json).with_name(f"{Path(args.json).stem}{suffix}_{args.metric}.png"))
    facet = args.facet if args.facet is not None else DEFAULT_FACET.get(rows[0].get("family"))
    print(plot_rows(rows, out, args.metric, facet=facet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
