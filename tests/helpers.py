"""Helpers the tests share: IDX files written by the tests, free ports, child-process environments, servers.

Fixtures live in ``conftest.py`` and use these; test modules import from here, never from conftest.
"""

import contextlib
import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import subprocess_env as child_env  # noqa: F401 (one definition, shared with the benchmarks)
from pipeline.core.idx import DEBIAN_DIR

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("FASHION_MNIST_DIR", DEBIAN_DIR))


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array as an IDX file (the format the parser reads), gzipped by default."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = Path(str(path) + ".gz") if compress else Path(path)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_fake_dataset(directory: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Four small IDX files with random images and balanced labels, named like the real ones."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return directory


NOISE = 150
FLIPS = 8
SHIFT = 3


def write_learnable_dataset(directory: Path, n_train: int = 12_000, n_test: int = 2_000, seed: int = 0) -> Path:
    """Four IDX files of a made-up task a softmax regression learns well: each class a fixed random
    garment-sized blob, each image its class's blob at a random brightness plus noise. For the tests that
    need training to learn but not Fashion-MNIST itself (``make test-fast`` runs without the real data)."""
    rng = np.random.default_rng(seed)
    base = rng.random((7, 7)) > 0.5  # one garment-like blob of 4x4 blocks; each class flips some blocks
    flips = np.stack([rng.permutation(49) < FLIPS for _ in range(10)]).reshape(10, 7, 7)
    templates = (base ^ flips).repeat(4, axis=1).repeat(4, axis=2)  # (10, 28, 28)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        brightness = rng.uniform(60, 255, (n, 1, 1))
        # mostly black around the blob, as the real images are: large pixels everywhere would make large logits
        images = templates[labels] * (brightness + rng.normal(0, NOISE, (n, 28, 28))) + rng.normal(0, 20, (n, 28, 28))
        for i, (dy, dx) in enumerate(rng.integers(-SHIFT, SHIFT + 1, (n, 2))):  # placed a little off, as photos are
            images[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
        write_idx(directory / f"{prefix}-images-idx3-ubyte", np.clip(images, 0, 255).astype(np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_url(url: str, process: subprocess.Popen, output, seconds: float = 240) -> None:
    """Poll ``url`` until the server started as ``process`` answers; if it dies or is late, stop it and
    fail with the end of its ``output()``."""
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                stop_process_group(process)
                raise AssertionError(f"{url} did not answer:\n{output()[-3000:]}")
            time.sleep(1)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to a server's process group (started with start_new_session: mlflow, uvicorn, workers),
    then SIGKILL to what lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def make(target: str, env: dict, **variables) -> subprocess.Popen:
    """`make TARGET` with this venv as the project's venv, never (re)building it (-o: take it as made)."""
    venv = Path(sys.prefix)
    args = ["make", "-C", str(REPO), "-o", str(venv / ".installed"), target, f"VENV={venv}",
            *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: make and what it starts stop together


@contextlib.contextmanager
def postgres_server(database: str = "optuna", password: str | None = None):
    """A throwaway PostgreSQL server on loopback (Debian's postgresql package); yields its URL.

    With ``password``: the server asks for it (scram-sha-256) and the URL does not hold it: a client gives it
    in PGPASSWORD or ~/.pgpass."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        raise RuntimeError("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: run `make test`, "
                           "or `apt-get install postgresql`, to install them")
    bin_dir = initdb[-1].parent
    home = Path(tempfile.mkdtemp(prefix="pg-"))  # under /tmp: pytest's tmp_path is closed to other users
    # The server refuses to run as root: then it runs as the postgres user, which must own its folder.
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(home, "postgres", "postgres")
    port, data = free_port(), home / "data"

    def pg(tool, *args):
        env = {**os.environ, **({} if password is None else {"PGPASSWORD": password})}
        subprocess.run([*as_postgres, str(bin_dir / tool), *args], check=True, capture_output=True, env=env)

    if password is None:
        pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
    else:
        (home / "pwfile").write_text(password + "\n")
        if as_postgres:
            shutil.chown(home / "pwfile", "postgres", "postgres")
        pg("initdb", "-D", str(data), "-U", "postgres", "-A", "scram-sha-256", "--pwfile", str(home / "pwfile"),
           "--no-sync")
    pg("pg_ctl", "-D", str(data), "-l", str(home / "log"), "-w", "start",
       "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(home)
