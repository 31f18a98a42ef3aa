"""Quality against NFE: the teacher's samplers and the distilled students on one log-log chart.

Draws the measured numbers of `bench/quality_vs_nfe.json` (each series names the BENCHMARKS.md table and command it
comes from; nothing is measured here) as FD to the exact data distribution against network function evaluations,
one panel per teacher, and prints them as a markdown table.

    python bench/quality_vs_nfe.py                       # writes docs/quality_vs_nfe.png
    python bench/quality_vs_nfe.py --out=chart.png --dpi=150
"""

import json
import math
import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid.cli import check_output_file, user_errors  # noqa: E402
from pid.errors import DataError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("sampler", "student")
PANEL_INCHES = (11.0, 5.0)   # the legend sits right of the axes
Y_RANGE = (0.15, 300.0)   # FD: the exact data's floor is 0.46; Heun at NFE 3 and 5 (1e6, 3e3) is marked off-chart


def load_series(path: str) -> dict:
    """The data file, checked: every series has name, teacher, kind, source and equal-length positive nfe / fd."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for i, s in enumerate(data.get("series", [])):
        missing = {"name", "teacher", "kind", "nfe", "fd", "source"} - set(s)
        if missing:
            raise DataError(f"{path}: series {i} lacks {sorted(missing)}")
        if s["kind"] not in KINDS or len(s["nfe"]) != len(s["fd"]) or not s["nfe"]:
            raise DataError(f"{path}: series {s['name']!r} needs kind in {KINDS} and nfe, fd lists of one length")
        if min(s["nfe"]) <= 0 or min(s["fd"]) <= 0:
            raise DataError(f"{path}: series {s['name']!r}: NFE and FD must be > 0 on log axes")
    if not data.get("series"):
        raise DataError(f"{path} has no series")
    return data


def draw(data: dict, dpi: float):
    """A matplotlib Figure: one log-log panel per teacher, samplers as lines, students as large markers."""
    from matplotlib.figure import Figure
    teachers = list(dict.fromkeys(s["teacher"] for s in data["series"]))
    fig = Figure(figsize=(PANEL_INCHES[0], PANEL_INCHES[1] * len(teachers)), dpi=dpi, layout="constrained")
    for index, teacher in enumerate(teachers):
        ax = fig.add_subplot(len(teachers), 1, index + 1)
        for s in (s for s in data["series"] if s["teacher"] == teacher):
            if s["kind"] == "sampler":
                shown = [min(fd, Y_RANGE[1]) for fd in s["fd"]]
                line, = ax.plot(s["nfe"], shown, marker="o", markersize=4, linewidth=1.5, label=s["name"])
                off = [(n, fd) for n, fd in zip(s["nfe"], s["fd"]) if fd > Y_RANGE[1]]
                if off:
                    text = "off the chart: " + ", ".join(f"NFE {n} at {fd:.2g}" for n, fd in off)
                    ax.annotate(text, (off[-1][0], Y_RANGE[1]), xytext=(8, -14), textcoords="offset points",
                                fontsize=7, color=line.get_color())
            else:
                ax.plot(s["nfe"], s["fd"], marker="*" if len(s["nfe"]) == 1 else "D", markersize=11,
                        linestyle="--" if len(set(s["nfe"])) > 1 else "none", linewidth=1, label=s["name"])
        for floor in (f for f in data.get("floors", []) if f["teacher"] == teacher):
            ax.axhline(floor["fd"], color="grey", linestyle=":", linewidth=1.2, label=floor["name"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(*Y_RANGE)
        top = max(n for s in data["series"] if s["teacher"] == teacher for n in s["nfe"])
        ticks = [2 ** i for i in range(int(math.log2(top)) + 2)]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("NFE (network calls per image)")
        ax.set_ylabel(f"FD to the exact data ({data.get('metric', 'fd')}, log)")
        seeds = next((s["seeds"] for s in data["series"] if s["teacher"] == teacher and "seeds" in s),
                     data.get("seeds", "?"))
        ax.set_title(f"{teacher}: quality against NFE (seeds {seeds}; lower is better)", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return fig


def table(data: dict) -> str:
    """The drawn numbers as a markdown table."""
    lines = ["| teacher | series | NFE | FD |", "|---|---|---:|---:|"]
    for s in data["series"]:
        for n, fd in zip(s["nfe"], s["fd"]):
            lines.append(f"| {s['teacher']} | {s['name']} | {n} | {fd:.4g} |")
    return "\n".join(lines)


@click.command()
@click.option("--data", "data_path", default=os.path.join(HERE, "quality_vs_nfe.json"), show_default=True,
              help="Measured series (JSON)")
@click.option("--out", default=os.path.join(os.path.dirname(HERE), "docs", "quality_vs_nfe.png"), show_default=True,
              help="Output PNG")
@click.option("--dpi", type=click.FloatRange(min=10, max=1000), default=100, show_default=True)
@user_errors
def main(data_path, out, dpi):
    """Draw docs/quality_vs_nfe.png from bench/quality_vs_nfe.json."""
    check_output_file(out, "--out", (".png",))
    data = load_series(data_path)
    draw(data, dpi).savefig(out, format="png", dpi=dpi)
    click.echo(table(data))
    click.echo(f"\nwrote {out} ({math.ceil(PANEL_INCHES[0] * dpi)} px wide)")


if __name__ == "__main__":
    main()
