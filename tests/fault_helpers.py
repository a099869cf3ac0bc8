"""What the fault tests share: run the real CLI in a subprocess and read its one-line error and its runs;
small real disks (tmpfs mounts, root only) to fill."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli


def run_cli(env: dict, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def run_in_process(*args) -> subprocess.CompletedProcess:
    """The same CLI, in this process (no second start of Python and torch): for the many quick cases."""
    result = CliRunner().invoke(cli, list(map(str, args)))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def error_line(done: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one ``Error: ...`` line and no traceback; returns that line.

    (MLflow's own progress bars and log lines may come before it on stderr.)
    """
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def run_statuses(tracking_uri: str) -> dict[str, list[str]]:
    """Run name -> statuses of the runs of that name, over every experiment of the store."""
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    statuses = {}
    for run in client.search_runs(experiments):
        statuses.setdefault(run.info.run_name, []).append(run.info.status)
    return statuses


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path, leave_bytes: int = 0) -> None:
    """Write a filler file until the disk is full, then give ``leave_bytes`` back."""
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(64 * 1024)) and f.flush()
    if leave_bytes:
        os.truncate(filler, max(filler.stat().st_size - leave_bytes, 0))
