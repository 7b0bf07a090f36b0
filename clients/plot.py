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
from numbers import Real
from typing import Any

from ..common.cli import add_exit_status, counted, report_error
from ..common.errors import BertpoolError, ConfigError

EXTRA_HINT = "pip install 'bertpool[plot]' (or scripts/setup with the plot extra, e.g. scripts/setup tf,test,plot)"


class ReportError(ConfigError):
    """A JSON document that is not a bench report with results to draw (not an object, a step
    without its latency or throughput, a sweep with no steps, or the report of a bench that could
    not run). A ConfigError, so both CLIs print it as one line and exit 2."""


def require_matplotlib(what: str = "--plot"):
    """Import matplotlib's Figure; ConfigError naming the ``plot`` extra if it is not installed.
    ``what`` names the caller in the message (the flag, or the plotting command)."""
    try:
        import matplotlib.figure  # a missing (or broken) package fails here
    except ImportError as exc:
        raise ConfigError(f"{what} needs matplotlib, which is not installed: {EXTRA_HINT}") from exc
    return matplotlib.figure.Figure


def check_format(path: str | Path, flag: str = "--plot", what: str = "--plot") -> None:
    """ConfigError unless matplotlib is installed and writes the format ``path``'s suffix names, so
    that ``--plot`` is refused before the run, not after it. A name without a suffix is refused too:
    matplotlib's savefig would add its default one and write another file than the one named."""
    Figure = require_matplotlib(what)
    suffix = Path(path).suffix[1:].lower()
    formats = Figure().canvas.get_supported_filetypes()
    if suffix not in formats:
        what = f"matplotlib cannot write .{suffix} files" if suffix else "no suffix to name the image format"
        raise ConfigError(f"{flag} {path}: {what}; give one of " + ", ".join("." + f for f in sorted(formats)))


def steps_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A sweep's steps, or a single run as a one-step list."""
    return report["steps"] if "steps" in report else [report]


def check_report(report: Any, source: str = "the report") -> None:
    """ReportError unless ``report`` is what plot_report draws: a JSON object with results, either
    a run (``latency_ms``) or a sweep (a non-empty ``steps`` list), each step with ``latency_ms``
    (``p50``, ``p99``: numbers, or null without replies), a numeric ``throughput_per_s`` and its
    client count, and a ``latency_histogram_ms`` that is null or matching ``edges``/``counts``.

    Checked before drawing so that a truncated, hand-edited or foreign JSON is one line naming
    ``source``, never a KeyError traceback; and the report of a bench that could not run (no
    broker: ``error``, nothing sent) is refused, not drawn as an empty chart that reads like a run
    where no request was answered."""
    if not isinstance(report, dict):
        raise ReportError(f"{source} is not a bertpool-bench report: a JSON object was expected, "
                          f"it holds {_json_kind(report)}")
    if "latency_ms" not in report and "steps" not in report:
        raise ReportError(f"{source} is not a bertpool-bench report with results")
    if "steps" not in report and isinstance(report.get("error"), dict) and not report.get("requests"):
        raise ReportError(f"{source} is the report of a bench that could not run, nothing to draw: "
                          f"{report['error'].get('message')}")
    steps = report.get("steps", [report])
    if not isinstance(steps, list) or not steps:
        raise ReportError(f"{source}: its sweep has no steps to draw")
    for n, step in enumerate(steps):
        where = source if "steps" not in report else f"{source}, step {n + 1}"
        problem = _step_problem(step)
        if problem:
            raise ReportError(f"{where} is not a bertpool-bench result: {problem}")


def _json_kind(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words (``null``, ``an array``, ...)."""
    kinds = {type(None): "null", bool: "a boolean", list: "an array", str: "a string", dict: "an object"}
    return kinds.get(type(value), "a number")


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _step_problem(step: Any) -> str | None:
    """What keeps ``step`` (one run's record) from being drawn, or None."""
    if not isinstance(step, dict):
        return f"a JSON object was expected, got {_json_kind(step)}"
    latency = step.get("latency_ms")
    if not isinstance(latency, dict) or any(k not in latency for k in ("p50", "p99")):
        return "no latency_ms with p50 and p99"
    if any(latency[k] is not None and not _number(latency[k]) for k in ("p50", "p99")):
        return "latency_ms p50 or p99 is not a number"
    if not _number(step.get("throughput_per_s")):
        return "no numeric throughput_per_s"
    clients = step.get("clients", (step.get("config") or {}).get("clients")
                       if isinstance(step.get("config"), dict) else None)
    if not isinstance(clients, int) or isinstance(clients, bool):
        return "no client count (clients, or config.clients)"
    if not isinstance(step.get("errors", 0), int):
        return "errors is not a count"
    h = step.get("latency_histogram_ms")
    if h is not None and not (isinstance(h, dict) and isinstance(h.get("counts"), list)
                              and isinstance(h.get("edges"), list) and len(h["edges"]) == len(h["counts"]) + 1):
        return "latency_histogram_ms has no edges and counts (one edge more than counts)"
    return None


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
    with its client count (and its failed requests, which no latency includes); right, each step's
    latency histogram (log scale). ReportError (check_report) for a report it cannot draw."""
    check_report(report)
    Figure = require_matplotlib()
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
        curve.text(0.5, 0.5, no_replies_note(report), ha="center", va="center", transform=curve.transAxes)
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
        log_axis(hist.xaxis)
        hist.legend(fontsize=8)
    else:
        hist.text(0.5, 0.5, "no replies: no latencies", ha="center", va="center", transform=hist.transAxes)
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


def log_axis(axis) -> None:
    """Log scale with plain numbers on every labelled tick. The major formatter alone left
    matplotlib's minor labels in scientific form ("2x10^0  3x10^0 ... 10") on spans under a
    decade, the usual width of one pool's latencies."""
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    axis.axes.set_xscale("log")
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # labels a few minors, as plain numbers


def _clients_label(step: dict[str, Any]) -> str:
    """``4 clients``, or ``4 clients, 3 errors``: a point's latencies are its replies' only, so a
    step whose requests failed must say so where its point is drawn."""
    label = counted(step.get("clients", step["config"]["clients"]), "client")
    errors = step.get("errors") or 0
    return f"{label}, {counted(errors, 'error')}" if errors else label


def no_replies_note(report: dict[str, Any]) -> str:
    """The text drawn instead of a curve when no step got a reply: how many requests failed, and
    the commonest error class, so the chart is not read as an idle run."""
    errors: dict[str, int] = {}
    for step in steps_of(report):
        for name, n in (step.get("errors_by_type") or {}).items():
            errors[name] = errors.get(name, 0) + n
    total = sum(errors.values()) or sum(s.get("errors") or 0 for s in steps_of(report))
    if not total:
        return "no request got a reply"
    top = max(errors.items(), key=lambda kv: kv[1], default=None)
    return f"no request got a reply\n{counted(total, 'request')} failed" + (f", e.g. {top[0]}" if top else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertpool.clients.plot",
                                     description="Draw a bertpool-bench JSON report (run or sweep) again.")
    add_exit_status(parser, "0 drawn, 2 a report it cannot read or draw (not a bench report, or one of a bench "
                            "that could not run), matplotlib missing, or an image it cannot write")
    parser.add_argument("report", help="JSON written by bertpool-bench --json")
    parser.add_argument("output", help="image to write, e.g. sweep.png")
    args = parser.parse_args(argv)
    try:
        try:
            report = json.loads(Path(args.report).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the report {args.report}: {exc}") from exc
        check_format(args.output, "output", "drawing a report")  # as bertpool-bench --plot
        check_report(report, args.report)
        plot_report(report, args.output)
    except BertpoolError as exc:
        return report_error(parser.prog, exc)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
