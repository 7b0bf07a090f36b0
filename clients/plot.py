"""Plots of bench reports: throughput against latency, and latency histograms.

Needs matplotlib, an optional extra (``pip install 'bertpool[plot]'``);
without it ``require_matplotlib`` raises a ConfigError naming the extra.
Plots are drawn from the report alone (the JSON that bertpool-bench writes),
so a saved report can be drawn again:

    python -m bertpool.clients.plot sweep.json sweep.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..common.cli import counted, report_error
from ..common.errors import BertpoolError, ConfigError

EXTRA_HINT = "pip install 'bertpool[plot]' (or scripts/setup with the plot extra, e.g. scripts/setup tf,test,plot)"


def require_matplotlib():
    """Import matplotlib's Figure; ConfigError naming the ``plot`` extra if it is not installed."""
    try:
        import matplotlib  # noqa: F401  (first, so a missing package fails here)
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(f"--plot needs matplotlib, which is not installed: {EXTRA_HINT}") from exc
    return Figure


def check_format(path: str | Path, flag: str = "--plot") -> None:
    """ConfigError unless matplotlib is installed and writes the format ``path``'s suffix names, so
    that ``--plot`` is refused before the run, not after it. A name without a suffix is refused too:
    matplotlib's savefig would add its default one and write another file than the one named."""
    Figure = require_matplotlib()
    suffix = Path(path).suffix[1:].lower()
    formats = Figure().canvas.get_supported_filetypes()
    if suffix not in formats:
        what = f"matplotlib cannot write .{suffix} files" if suffix else "no suffix to name the image format"
        raise ConfigError(f"{flag} {path}: {what}; give one of " + ", ".join("." + f for f in sorted(formats)))


def steps_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A sweep's steps, or a single run as a one-step list."""
    return report["steps"] if "steps" in report else [report]


def chart_title(report: dict[str, Any]) -> str:
    """Model (the --model-note), workers and backends, batch settings: what produced the numbers."""
    model = report.get("model_note") or "model: no --model-note given"
    pool = report.get("pool") or {}
    # Those that answered (the report's backends survive a broker gone after the run), else the pool's.
    backends = report.get("backends") or pool.get("backends") or {}
    if pool.get("model"):
        model += f" [{pool['model']}]"
    if backends:
        workers = (counted(sum(backends.values()), "worker") + " ("
                   + ", ".join(f"{n} x {b}" for b, n in sorted(backends.items())) + ")")
    elif pool:  # STATS answered, with no ready workers
        workers = counted(pool.get("workers", 0), "worker")
    else:
        workers = "workers: unknown (no STATS)"
    if pool.get("batch_size") is not None:
        batch = f"batch size {pool['batch_size']}"
        if pool.get("batch_timeout_ms") is not None:
            batch += f", timeout {pool['batch_timeout_ms']} ms"
    else:
        batch = "batch settings not in STATS"
    fills = [s["server_mean"]["batch_size"] for s in steps_of(report)
             if (s.get("server_mean") or {}).get("batch_size") is not None]
    if fills:
        batch += f"; mean fill {min(fills):.2f}-{max(fills):.2f} rows" if len(fills) > 1 else \
            f"; mean fill {fills[0]:.2f} rows"
    return f"{model}\n{workers}; {batch}"


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Draw ``report`` (a bench or sweep report) to ``path`` (PNG, or any format matplotlib
    knows from the suffix): left, p50 and p99 latency against throughput, each point labelled
    with its client count; right, each step's latency histogram (log scale)."""
    Figure = require_matplotlib()
    from matplotlib.ticker import ScalarFormatter
    steps = [s for s in steps_of(report) if s["latency_ms"]["p50"] is not None]
    fig = Figure(figsize=(12, 5), layout="constrained")
    curve, hist = fig.subplots(1, 2)
    if steps:
        x = [s["throughput_per_s"] for s in steps]
        for key, style in (("p50", "o-"), ("p99", "s--")):
            y = [s["latency_ms"][key] for s in steps]
            curve.plot(x, y, style, label=f"{key} latency")
            for s, xi, yi in zip(steps, x, y):
                curve.annotate(_clients_label(s), (xi, yi),
                               textcoords="offset points", xytext=(4, 4), fontsize=8)
        curve.legend()
    else:
        curve.text(0.5, 0.5, "no request got a reply", ha="center", va="center", transform=curve.transAxes)
    curve.set_xlabel("throughput (replies/s)")
    curve.set_ylabel("latency (ms)")
    curve.set_title("throughput vs latency (labels: client processes)", fontsize=10)
    curve.grid(True, alpha=0.3)
    for s in steps:
        h = s.get("latency_histogram_ms")
        if h:  # fractions, so steps with more clients (more requests) compare with the others
            total = sum(h["counts"]) or 1
            hist.stairs([c / total for c in h["counts"]], h["edges"], label=_clients_label(s))
    if steps:
        hist.set_xscale("log")
        hist.xaxis.set_major_formatter(ScalarFormatter())
        hist.legend(fontsize=8)
    hist.set_xlabel("latency (ms, log scale)")
    hist.set_ylabel("fraction of the step's replies")
    hist.set_title("latency histogram", fontsize=10)
    hist.grid(True, alpha=0.3)
    fig.suptitle(chart_title(report), fontsize=10)
    path = Path(path)
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot write the plot to {path}: {exc}") from exc
    return path


def _clients_label(step: dict[str, Any]) -> str:
    return counted(step.get("clients", step["config"]["clients"]), "client")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertpool.clients.plot",
                                     description="Draw a bertpool-bench JSON report (run or sweep) again.")
    parser.add_argument("report", help="JSON written by bertpool-bench --json")
    parser.add_argument("output", help="image to write, e.g. sweep.png")
    args = parser.parse_args(argv)
    try:
        try:
            report = json.loads(Path(args.report).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the report {args.report}: {exc}") from exc
        check_format(args.output, "output")  # as bertpool-bench --plot
        if "latency_ms" not in report and "steps" not in report:
            raise ConfigError(f"{args.report} is not a bertpool-bench report with results")
        plot_report(report, args.output)
    except BertpoolError as exc:
        return report_error(parser.prog, exc)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
