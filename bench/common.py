"""What every benchmark shares: medians, machine facts, the printed report and the results file.

A benchmark returns a ``Result``: its measured figures (``metrics``), the project's targets checked
against them, and a note saying what exactly was measured. ``report`` prints it twice, as one JSON
line for scripts and as a table for people; ``save`` merges it into ``bench/results/latest.json``.
"""

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_FILE = REPO / "bench" / "results" / "latest.json"
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own choice, read before the bench sets the commands'


@dataclass
class Result:
    benchmark: str
    metrics: dict  # name -> number, in the unit its name ends with (_s, _mb, _per_s, _x, ...)
    targets: dict = field(default_factory=dict)  # name -> {"target": text, "value": number, "met": bool}
    note: str = ""
    details: dict = field(default_factory=dict)  # anything else worth keeping, e.g. memory per process
    quick: bool = False  # a smoke run on a tiny slice: the figures mean nothing
    measured_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    machine: dict = field(default_factory=lambda: machine())

    def check(self, name: str, value: float, limit: float, at_least: bool, text: str) -> None:
        """Record whether ``value`` meets a target (``at_least`` limit, or at most)."""
        met = value >= limit if at_least else value <= limit
        self.targets[name] = {"target": text, "value": round(value, 4), "met": bool(met)}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall-clock seconds of one call, and what it returned."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def machine() -> dict:
    """What the numbers depend on. The load average shows how busy the (shared) machine was."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu,
        "load_average_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "torch": torch.__version__,
    }


def subprocess_env(tracking_uri: str, data_dir: str | None = None) -> dict:
    """Environment for a ``python -m pipeline`` child: this venv first on PATH, a temporary store.

    An experiment or run named by this process's environment belongs to another store: the child
    chooses its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    if data_dir:
        env["FASHION_MNIST_DIR"] = str(data_dir)
    return env


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def report(result: Result) -> None:
    """One JSON line (for scripts), then the same figures as a table (for people)."""
    print(json.dumps(asdict(result)), flush=True)
    rows = [(name, _format(value)) for name, value in result.metrics.items()]
    rows += [(f"target: {t['target']}", f"{'met' if t['met'] else 'MISSED'} ({_format(t['value'])})")
             for t in result.targets.values()]
    width = max(len(name) for name, _ in rows)
    title = f"{result.benchmark}{' (quick: figures are meaningless)' if result.quick else ''}"
    print(f"\n{title}\n{'-' * len(title)}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for name, value in result.details.items():
        print(f"  {name}: {value}")
    if result.note:
        print(f"  note: {result.note}")
    print(flush=True)


def save(results: list[Result], path: Path = RESULTS_FILE) -> Path:
    """Merge into the results file: a benchmark run alone replaces only its own entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update({r.benchmark: asdict(r) for r in results})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)
    return path
