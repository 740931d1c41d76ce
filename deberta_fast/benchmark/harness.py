"""Small benchmark harness shared by the scripts in bench/: timing, peak memory, machine facts, CSV and tables.

Timings are medians over repeats after warm-up, measured in the calling process so that ratios between
providers come from one run. Peak memory on CPU is the growth of the process's peak resident set (Linux
VmHWM, reset through /proc/self/clear_refs) while one call runs; on CUDA it is torch's max_memory_allocated.
"""

from __future__ import annotations

import csv
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import torch


def results_dir() -> str:
    """bench/results of the source tree when run from one, else ./bench_results."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(repo, "bench")):
        return os.path.join(repo, "bench", "results")
    return os.path.abspath("bench_results")


def git_revision() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            match = re.search(r"model name\s*:\s*(.+)", handle.read())
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, str]:
    """What a CSV row needs to say where and with what it was measured."""
    import transformers

    facts = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git": git_revision(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = "not installed"
    return facts


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def peak_rss_growth_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident-set growth while ``fn`` runs, in MiB (Linux only; None elsewhere)."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        before = _resident_kib("VmRSS")
        fn()
        return (_resident_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def write_csv(rows: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    temporary = f"{path}.tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of the given columns."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def table_png(rows: Sequence[dict], columns: Sequence[str], path: str) -> str | None:
    """Median times as grouped bars, one panel per (case, mode); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(dict.fromkeys((row["case"], row.get("mode", "")) for row in rows))
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    for axis, (case, mode) in zip(axes[:, 0], panels):
        selected = [r for r in rows if r["case"] == case and r.get("mode", "") == mode and r.get("median_s")]
        shapes = list(dict.fromkeys(_shape_label(r) for r in selected))
        providers = list(dict.fromkeys(r["provider"] for r in selected))
        width = 0.8 / max(1, len(providers))
        for index, provider in enumerate(providers):
            values = {(_shape_label(r)): r["median_s"] for r in selected if r["provider"] == provider}
            xs = [i + index * width for i, s in enumerate(shapes) if s in values]
            axis.bar(xs, [values[s] for s in shapes if s in values], width=width, label=provider)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
        axis.set_yscale("log")
        axis.set_ylabel("median s")
        axis.set_title(f"{case} {mode}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _shape_label(row: dict) -> str:
    parts = [f"{key}={row[key]}" for key in ("length", "layers", "tokens") if row.get(key) not in (None, "")]
    return " ".join(parts)
