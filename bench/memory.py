"""Benchmark 4: peak memory of ``python -m pipeline main`` with its default settings.

``main`` launches each step as a child process (``mlflow.projects.run``), so the figure that
matters is the whole process tree's. We sample it from /proc while the command runs (no psutil):

- peak tree PSS: the proportional set size summed over the tree, so the libraries that parent and
  children share are counted once: what the tree costs the machine;
- peak tree RSS: the same with shared pages counted in every process (an upper bound);
- largest process: the kernel's own peak RSS of the biggest single process (``wait4``'s ru_maxrss).

``bench.tuning`` measures ``tune --workers 2`` with the same sampler.
"""

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from bench.common import Result, subprocess_env
from pipeline.config import DataConfig
from pipeline.core.splits import prepare_splits

MB = 1024  # /proc reports kB
MEMORY_TARGET_MB = 1.5 * 1000  # the 1.5 GB target


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the parent pids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def command_line(pid: int) -> str:
    """A short name for a process: its first few arguments (spawned workers: the spawn call)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    return " ".join(Path(args[0]).name.split() + args[1:4])[:60]


def rss_and_pss_kb(pid: int) -> tuple[int, int]:
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]  # after the header line
        fields = dict(line.split(":", 1) for line in lines)
    except (OSError, ValueError):
        return 0, 0
    kb = lambda name: int(fields.get(name, "0 kB").split()[0])  # noqa: E731
    return kb("Rss"), kb("Pss")


@dataclass
class Sampled:
    returncode: int
    wall_s: float
    peak_tree_pss_mb: float
    peak_tree_rss_mb: float
    largest_process_mb: float
    at_peak: dict  # command line -> PSS in MB of each process in the tree when it peaked
    log: Path


def run_sampled(command: list[str], cwd: Path, env: dict, interval: float = 0.1) -> Sampled:
    """Run ``command``, sampling its process tree's memory until it exits; output goes to a log file."""
    log = Path(cwd) / f"output-{time.monotonic_ns()}.log"
    peak_rss = peak_pss = 0
    at_peak = {}
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while True:
            tree = descendants(process.pid)
            totals = [rss_and_pss_kb(pid) for pid in tree]
            peak_rss = max(peak_rss, sum(r for r, _ in totals))
            if sum(p for _, p in totals) > peak_pss:
                peak_pss = sum(p for _, p in totals)
                at_peak = {f"{command_line(pid)} [{pid}]": round(p / MB) for pid, (_, p) in zip(tree, totals) if p}
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:  # reaped here rather than by Popen, because wait4 also gives us the peak RSS
                break
            time.sleep(interval)
    except BaseException:  # interrupted or failed here: stop the command as Ctrl-C would
        process.send_signal(signal.SIGINT)
        process.wait()
        raise
    process.returncode = os.waitstatus_to_exitcode(status)
    return Sampled(returncode=process.returncode, wall_s=time.perf_counter() - start,
                   peak_tree_pss_mb=peak_pss / MB, peak_tree_rss_mb=peak_rss / MB,
                   largest_process_mb=usage.ru_maxrss / MB, at_peak=at_peak, log=log)


def check_succeeded(sampled: Sampled, what: str) -> None:
    if sampled.returncode != 0:
        tail = "\n".join(sampled.log.read_text().splitlines()[-30:])
        raise click.ClickException(
            f"{what} exited with status {sampled.returncode}; the end of its output:\n{tail}")


def run(quick: bool, data_dir: str | None) -> list[Result]:
    """``python -m pipeline main`` with the default settings, in a temporary store.

    With --quick, ``train`` on a tiny slice instead: ``main`` runs four processes one after the
    other, too slow for a smoke test, and the sampling is the same.
    """
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if quick:
            tiny = prepare_splits(DataConfig(data_dir=data_dir, limit=500), cache_root=Path(tmp) / "prepared")[1]
            command = ["python", "-m", "pipeline", "train", "--data", str(tiny), "--epochs", "1"]
        else:  # the default settings, but the study in our temporary folder: MLflow runs main's steps
            # in the project directory, where the default sqlite:///optuna.db would otherwise land
            command = ["python", "-m", "pipeline", "main", "--storage", f"sqlite:///{Path(tmp) / 'optuna.db'}"]
        # subprocess_env puts this venv first on PATH: `main` launches its steps with `python`
        env = subprocess_env(f"sqlite:///{Path(tmp) / 'mlflow.db'}", data_dir)
        sampled = run_sampled(command, Path(tmp), env)
        check_succeeded(sampled, " ".join(command))
    result = Result("memory_main", quick=quick, metrics={
        "peak_tree_pss_mb": sampled.peak_tree_pss_mb, "peak_tree_rss_mb": sampled.peak_tree_rss_mb,
        "largest_process_mb": sampled.largest_process_mb, "wall_s": sampled.wall_s,
    }, details={"PSS of each process at the peak (MB)": sampled.at_peak},
        note=f"`{' '.join(command[:5])}` in a temporary sqlite MLflow store (and Optuna storage); "
             "process tree sampled every 0.1 s from /proc")
    result.check("memory", sampled.peak_tree_pss_mb, MEMORY_TARGET_MB, False,
                 "peak memory of the process tree < 1.5 GB")
    return [result]
