"""What every benchmark shares: timing, peak memory, tables, JSON + PNG output, MLflow logging.

Numbers are only compared within one run (this machine is noisy): each benchmark measures its
baseline in the same process and reports ratios against it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from macformer.host_memory import large_allocations_mapped_fresh

OUTPUT_DIRECTORY = Path("benchmarks/out")


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--output", type=Path, default=OUTPUT_DIRECTORY / name,
                        help="directory for the JSON results and PNG plots")
    parser.add_argument("--tracking-uri", default=None,
                        help="also log the results to this MLflow tracking URI (e.g. sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default="macformer-benchmarks", help="MLflow experiment name")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def check_positive(parser: argparse.ArgumentParser, **values: Sequence[int] | int) -> None:
    for name, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(v <= 0 for v in items):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1,
              budget_s: float = 20.0) -> float:
    """Median wall time of fn() in seconds, after warm-up; fewer repeats when one call is slow."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (not times or spent < budget_s):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


class PeakMemory:
    """Peak memory allocated inside the `with` block, in MiB, beyond what was held on entry.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM), reset on entry
    through /proc/self/clear_refs after returning freed heap pages to the OS (malloc_trim), so the
    block's own allocations show. Resident pages are what the machine must provide; torch's CPU
    allocator has no statistics of its own. Inside the block large allocations are mapped fresh and
    unmapped on free (`large_allocations_mapped_fresh`), so the peak is that of the live tensors,
    not of what the heap kept from earlier calls (which made the same call read 108 or 175 MiB).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._fresh_pages = large_allocations_mapped_fresh()
            self._fresh_pages.__enter__()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self._start = self._status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status_kib("VmHWM") * 1024
            self._fresh_pages.__exit__(None, None, None)
        self.peak_mib = max(0, peak - self._start) / 2**20


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_style(index: int) -> dict[str, Any]:
    """Matplotlib style of series number `index`: 20 colours, then the same with other dashes and
    markers, so that no two of up to 80 series look alike."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](index % 20), "linestyle": ("-", "--", ":", "-.")[index // 20 % 4],
            "marker": ("o", "s", "^", "D")[index // 20 % 4], "markersize": 3}


def save_figure(figure, path: Path, legend_axes=None) -> Path:
    """Lay out, write as PNG and release a matplotlib figure; with `legend_axes`, that axes' series
    are named in one legend beside the panels, never over the data."""
    figure.tight_layout()
    extra = []
    if legend_axes is not None:
        extra.append(figure.legend(*legend_axes.get_legend_handles_labels(), loc="center left",
                                   bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False))
    figure.savefig(path, dpi=110, bbox_inches="tight", bbox_extra_artists=extra)
    pyplot().close(figure)
    return path


def write_results(args: argparse.Namespace, name: str, rows: list[dict[str, Any]], summary: dict[str, Any],
                  figures: list[Path]) -> Path:
    """JSON with the arguments, rows and summary; then MLflow (when --tracking-uri is given)."""
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"{name}.json"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"benchmark": name, "config": config, "summary": summary, "rows": rows}, indent=2))
    print(f"wrote {path}" + "".join(f", {f}" for f in figures))
    if args.tracking_uri:
        log_to_mlflow(args.tracking_uri, args.experiment, name, config, summary, [path, *figures])
    return path


def log_to_mlflow(tracking_uri: str, experiment: str, name: str, config: dict[str, Any], summary: dict[str, Any],
                  files: list[Path]) -> None:
    import mlflow

    from launcher.tracking import ensure_experiment

    ensure_experiment(tracking_uri, experiment)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"bench-{name}"):
        mlflow.set_tag("benchmark", name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items() if k not in ("tracking_uri", "output")})
        # MLflow metric names allow alphanumerics and _ - . space : / only.
        mlflow.log_metrics({re.sub(r"[^\w\-. :/]", "_", k): float(v) for k, v in summary.items()
                            if isinstance(v, (int, float)) and v == v})
        for file in files:
            mlflow.log_artifact(str(file))
    print(f"logged to MLflow experiment {experiment!r} at {tracking_uri}")
