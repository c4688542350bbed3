"""Evaluation reports: one method's results (report.md / report.json), a comparison of methods in
the papers' table layout (comparison.md / comparison.json), bar charts and image grids (PNG).

A method's results are a dict
    {"method": "safetydpo", "model": {...}, "benchmarks": {"i2p": {"n": 4703, "ip": 0.137, ...}, ...}}
where a benchmark's entry holds whichever metrics were computed: n, ip, q16, nudenet,
ip_per_category {category: {"ip", "n"}}, clip_score, clip_score_standard, fid,
pass_rate {"pass_rate", "n", "errors"}, win_rate {"win_rate", "wins", ..., "baseline"}.

Comparison columns follow the papers' tables: IP on I2P / UD / CoProV2 / Sage (seen, unseen),
FID and CLIPScore on COCO, then PSA's Pass / Win rates; columns nobody computed are left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from safealign_jax.images import contact_sheet, save_png

# {title: benchmark} of the prompt sets whose inappropriate probability (IP) is reported
IP_BENCHMARKS = {"I2P": "i2p", "UD": "ud", "CoProV2": "coprov2", "Sage seen": "sage_seen",
                 "Sage unseen": "sage_unseen"}
# (column title, benchmark, metric, lower is better): IP per prompt set, FID and CLIPScore on
# COCO, then PSA's Pass and Win rates on Sage's seen and unseen users
COLUMNS = (
    *((f"{title} IP", benchmark, "ip", True) for title, benchmark in IP_BENCHMARKS.items()),
    ("FID", "coco", "fid", True),
    ("CLIP", "coco", "clip_score", False),
    ("CLIP (2.5x)", "coco", "clip_score_standard", False),
    *((f"{rate.title()} {users}", f"sage_{users}", f"{rate}_rate", False)
      for rate in ("pass", "win") for users in ("seen", "unseen")),
)


def metric(result: dict, benchmark: str, name: str) -> float | None:
    """A number from a method's results (rates stored as dicts are unwrapped), or None."""
    value = result.get("benchmarks", {}).get(benchmark, {}).get(name)
    if isinstance(value, dict):
        value = value.get(name)
    return None if value is None else float(value)


def _cell(value: float | None, name: str) -> str:
    if value is None:
        return "-"
    if name in ("fid", "clip_score"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def bar_chart(path: str, groups: Sequence[str], series: dict[str, Sequence[float | None]], title: str, ylabel: str) -> None:
    """A grouped bar chart PNG: one group per x label, one bar per series (None: no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(series)) / 2 + 2), 3.5))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(path: str, images: np.ndarray, columns: int = 8) -> None:
    """A grid PNG of (B, H, W, 3) uint8 images."""
    save_png(contact_sheet(list(images), columns=min(columns, len(images))), path)


def write_method_report(folder: str, result: dict) -> dict:
    """report.json, report.md and ip.png (IP per benchmark) for one method in `folder`.
    Image grids written beforehand as `grid_<benchmark>.png` are linked from report.md."""
    os.makedirs(folder, exist_ok=True)
    _write(os.path.join(folder, "report.json"), json.dumps(result, indent=1, sort_keys=True) + "\n")
    benchmarks = result.get("benchmarks", {})
    names = sorted({k for b in benchmarks.values() for k, v in b.items() if isinstance(v, int | float) and k != "n"})
    lines = [f"# Evaluation: {result.get('method', '')}", ""]
    if result.get("model"):
        lines += ["Model: `" + json.dumps(result["model"], sort_keys=True) + "`", ""]
    rows = [[b, str(benchmarks[b].get("n", "-")), *(_cell(metric(result, b, n), n) for n in names)] for b in benchmarks]
    lines += [_table(["benchmark", "images", *names], rows), ""]
    for benchmark, values in benchmarks.items():
        per_category = values.get("ip_per_category") or {}
        if per_category:
            lines += [f"## {benchmark}: IP per category", ""]
            lines += [_table(["category", "IP", "images"],
                             [[c, _cell(v.get("ip"), "ip"), str(v.get("n", "-"))] for c, v in per_category.items()]), ""]
        for rate in ("pass_rate", "win_rate"):
            if isinstance(values.get(rate), dict):
                details = ", ".join(f"{k} {v}" for k, v in values[rate].items() if k != rate)
                lines += [f"{benchmark} {rate.replace('_', ' ')}: {_cell(metric(result, benchmark, rate), rate)} ({details})", ""]
    with_ip = [b for b in benchmarks if metric(result, b, "ip") is not None]
    if with_ip:
        bar_chart(os.path.join(folder, "ip.png"), with_ip, {result.get("method", ""): [metric(result, b, "ip") for b in with_ip]},
                  "Inappropriate probability", "IP")
        lines += ["![IP per benchmark](ip.png)", ""]
    for benchmark in benchmarks:
        if os.path.exists(os.path.join(folder, f"grid_{benchmark}.png")):
            lines += [f"### {benchmark} samples", "", f"![{benchmark}](grid_{benchmark}.png)", ""]
    _write(os.path.join(folder, "report.md"), "\n".join(lines))
    return result


def comparison(results: Sequence[dict]) -> dict:
    """{'columns': [titles], 'rows': [{'method', 'values': [...]}]} over the columns any method has."""
    columns = [c for c in COLUMNS if any(metric(r, c[1], c[2]) is not None for r in results)]
    return {
        "columns": [c[0] for c in columns],
        "lower_is_better": [c[3] for c in columns],
        "rows": [{"method": r.get("method", ""), "values": [metric(r, c[1], c[2]) for c in columns]} for r in results],
    }


def write_comparison(folder: str, results: Sequence[dict]) -> dict:
    """comparison.json, comparison.md (rows = methods) and comparison_ip.png in `folder`."""
    table = comparison(results)
    _write(os.path.join(folder, "comparison.json"), json.dumps(table, indent=1) + "\n")
    metrics = [c for c in COLUMNS if c[0] in table["columns"]]
    rows = [[row["method"], *(_cell(v, c[2]) for v, c in zip(row["values"], metrics, strict=True))] for row in table["rows"]]
    arrows = [f"{t} {'↓' if low else '↑'}" for t, low in zip(table["columns"], table["lower_is_better"], strict=True)]
    lines = ["# Comparison", "", _table(["method", *arrows], rows), ""]
    ip_columns = [i for i, c in enumerate(metrics) if c[2] == "ip"]
    if ip_columns:
        bar_chart(
            os.path.join(folder, "comparison_ip.png"), [table["columns"][i].replace(" IP", "") for i in ip_columns],
            {row["method"]: [row["values"][i] for i in ip_columns] for row in table["rows"]},
            "Inappropriate probability (lower is better)", "IP",
        )
        lines += ["![IP per benchmark and method](comparison_ip.png)", ""]
    _write(os.path.join(folder, "comparison.md"), "\n".join(lines))
    return table
