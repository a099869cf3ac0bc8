"""Benchmarks 1 and 2: the project's epoch against the book's, and against the compute floor.

1. The reference is the book's ``load_data_fashion_mnist`` + ``train_epoch_ch3`` (d2l §3.6-3.7):
   torchvision's ``FashionMNIST`` with ``ToTensor``, a ``DataLoader`` of batch 256, shuffled, 4
   workers, training the same model (``pipeline.core.models.build_model``) with the same SGD and loss.
   The project trains on ``pipeline.core.training.Tensors`` (the whole split in memory, batches sliced by
   index), with ``pipeline.core.training.fit`` (tracking off) and ``pipeline.tracking.training.train`` inside an MLflow
   run (tracking on: ``mlflow.log_metrics`` once per epoch). Both sides train on the same number of
   images (the project's 50,000-image training split; the reference a seeded ``Subset`` of as many
   images of torchvision's training set) and validate on as many held-out images.
2. The floor is one full-batch forward and backward pass over the whole training tensor: the same
   arithmetic as an epoch with none of the per-batch overhead, bound by memory bandwidth.
"""

import gzip
import math
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

import mlflow
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import data as tud
from torchvision import datasets, transforms

from bench.common import TORCH_DEFAULT_THREADS, Result, timed
from pipeline.config import DataConfig, TrainConfig
from pipeline.core.idx import locate_raw_files
from pipeline.core.models import build_model
from pipeline.core.splits import prepare_splits
from pipeline.core.training import Tensors, batch_orders, fit, train_epoch
from pipeline.tracking.runs import log_epoch
from pipeline.tracking.training import train

BOOK_WORKERS = 4  # d2l's get_dataloader_workers()


# ---------------------------------------------------------------------------------------------------
# The reference: the book's data pipeline and training loop


def torchvision_root(data_dir: str | None, root: Path) -> Path:
    """Lay the raw files out as torchvision's FashionMNIST reads them: uncompressed, in root/FashionMNIST/raw."""
    raw_dir = root / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for path in locate_raw_files(data_dir, allow_download=False).values():
        content = path.read_bytes()
        (raw_dir / path.name.removesuffix(".gz")).write_bytes(
            gzip.decompress(content) if path.suffix == ".gz" else content)
    return root


def book_loaders(root: Path, n_train: int, n_val: int, batch_size: int) -> tuple[tud.DataLoader, tud.DataLoader]:
    """The book's ``load_data_fashion_mnist``, on a seeded train/validation split of the training file."""
    dataset = datasets.FashionMNIST(root=str(root), train=True, transform=transforms.ToTensor())
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    train = tud.Subset(dataset, order[:n_train])
    val = tud.Subset(dataset, order[n_train:n_train + n_val])
    return (tud.DataLoader(train, batch_size, shuffle=True, num_workers=BOOK_WORKERS),
            tud.DataLoader(val, batch_size, shuffle=False, num_workers=BOOK_WORKERS))


def book_train_epoch(net, train_iter, loss, updater) -> tuple[float, float]:
    """d2l's ``train_epoch_ch3`` with a torch optimiser: per-batch loss and accuracy read back as floats."""
    net.train()
    total_loss, correct, count = 0.0, 0.0, 0
    for X, y in train_iter:
        y_hat = net(X)
        l = loss(y_hat, y)  # noqa: E741 (the book's name)
        updater.zero_grad()
        l.mean().backward()
        updater.step()
        total_loss += float(l.sum().detach())
        correct += float((y_hat.argmax(dim=1).type(y.dtype) == y).sum())
        count += y.numel()
    return total_loss / count, correct / count


def book_evaluate_accuracy(net, data_iter) -> float:
    """d2l's ``evaluate_accuracy``."""
    net.eval()
    correct, count = 0.0, 0
    with torch.no_grad():
        for X, y in data_iter:
            correct += float((net(X).argmax(dim=1).type(y.dtype) == y).sum())
            count += y.numel()
    return correct / count


def time_reference(root: Path, n_train: int, n_val: int, cfg: TrainConfig, epochs: int) -> dict:
    """Seconds per training pass and per whole epoch (train + validation) of the book's loop."""
    torch.manual_seed(cfg.seed)  # the DataLoader's shuffling draws from the global generator
    net = build_model(cfg)
    loss = nn.CrossEntropyLoss(reduction="none")
    updater = torch.optim.SGD(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_s, epoch_s = [], []
    with warnings.catch_warnings():  # 4 workers on 2 cores make torch warn each epoch: it is the book's setting
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        train_iter, val_iter = book_loaders(root, n_train, n_val, cfg.batch_size)
        for _ in range(epochs):
            t_train, _ = timed(book_train_epoch, net, train_iter, loss, updater)
            t_val, _ = timed(book_evaluate_accuracy, net, val_iter)
            train_s.append(t_train)
            epoch_s.append(t_train + t_val)
    return {"train_s": train_s, "epoch_s": epoch_s}


# ---------------------------------------------------------------------------------------------------
# The project: the same model and optimiser on in-memory tensors


def epoch_of_fit(tensors: Tensors, cfg: TrainConfig):
    """One training pass as ``fit`` runs it (same model, optimiser and batch orders), to call repeatedly."""
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = batch_orders(cfg, len(tensors.train[1]))
    return lambda: train_epoch(model, *tensors.train, optimizer, cfg, generator)


def time_training_pass(tensors: Tensors, cfg: TrainConfig, epochs: int, threads: int | None = None) -> list[float]:
    """Seconds of ``pipeline.core.training.train_epoch`` alone, epoch after epoch (optimiser built as ``fit`` does).

    ``threads``: torch's intra-op threads for this measurement only (default: PyTorch's own choice, one per core).
    """
    one_epoch = epoch_of_fit(tensors, cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or TORCH_DEFAULT_THREADS)
    try:
        return [timed(one_epoch)[0] for _ in range(epochs)]
    finally:
        torch.set_num_threads(before)


class EpochClock:
    """An ``on_epoch`` callback that notes when each epoch ended; the gaps are whole-epoch times."""

    def __init__(self):
        self.stamps = [time.perf_counter()]

    def __call__(self, metrics: dict) -> None:
        self.stamps.append(time.perf_counter())

    def epoch_seconds(self) -> list[float]:
        # the first gap also holds the set-up before epoch 1 (params logged, optimiser built): dropped
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return gaps[1:]


def time_untracked_epochs(tensors: Tensors, cfg: TrainConfig) -> list[float]:
    """Whole epochs (train + validation + best-weights bookkeeping) of ``pipeline.core.training.fit``."""
    clock = EpochClock()
    fit(build_model(cfg), tensors, cfg, on_epoch=clock)
    return clock.epoch_seconds()


def sqlite_experiment(store: Path) -> str:
    """A fresh sqlite MLflow store with its artifacts beside it; the id of an experiment in it."""
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    return mlflow.create_experiment("bench-throughput", artifact_location=(store / "artifacts").as_uri())


def time_tracked_epochs(splits, tensors: Tensors, cfg: TrainConfig, experiment: str) -> tuple[list[float], float]:
    """Whole epochs of ``pipeline.tracking.training.train`` in an MLflow run, and its per-run cost.

    The per-run cost is what the step spends outside its epochs: params before, curves figure,
    model and summary after. A tuning study pays it once per trial.
    """
    with mlflow.start_run(experiment_id=experiment, run_name="bench-train"):
        clock = EpochClock()
        train(cfg, splits, tensors, progress=False, on_epoch=clock)
        end = time.perf_counter()
    epochs = clock.epoch_seconds()
    before = clock.stamps[1] - clock.stamps[0] - median(epochs)  # the first gap less one typical epoch
    after = end - clock.stamps[-1]
    return epochs, before + after


def time_log_epoch(experiment: str, repeats: int) -> dict:
    """Seconds of one ``pipeline.tracking.runs.log_epoch`` call: synchronous (as tracking.training logs) and not."""
    metrics = {"train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.5, "val_accuracy": 0.8}
    with mlflow.start_run(experiment_id=experiment, run_name="bench-log-epoch"):
        sync = [timed(log_epoch, {"epoch": i, **metrics})[0] for i in range(repeats)]
        background = [timed(log_epoch, {"epoch": repeats + i, **metrics}, synchronous=False)[0]
                      for i in range(repeats)]
    return {"synchronous": sync, "asynchronous": background}


def profile_training_pass(tensors: Tensors, cfg: TrainConfig, top: int = 10) -> dict:
    """Where one training pass goes (torch.profiler): the largest ops' shares of its self CPU time, in %.

    Per batch the pass is some twenty small ops; this says which of them cost, so that the 20x and
    1.5x-floor targets are weighed against what is left (docs/benchmarks.md).
    """
    from torch.profiler import ProfilerActivity, profile

    one_epoch = epoch_of_fit(tensors, cfg)
    one_epoch()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        one_epoch()
    events = profiled.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    largest = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {e.key: round(100 * e.self_cpu_time_total / total, 1) for e in largest}


def time_compute_floor(tensors: Tensors, cfg: TrainConfig, repeats: int) -> list[float]:
    """One forward and backward pass over the whole training tensor at once, ``repeats`` times."""
    model = build_model(cfg)
    x, y = tensors.train_pixels()

    def full_batch_pass():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    full_batch_pass()  # warm-up: first-touch allocation of the activations and gradients
    return [timed(full_batch_pass)[0] for _ in range(repeats)]


# ---------------------------------------------------------------------------------------------------


def run(quick: bool, data_dir: str | None) -> list[Result]:
    """Both benchmarks in one process run, so that every ratio compares like with like.

    The project's measurements take turns, round after round, so that a burst of load from other
    processes on a shared machine falls on all of them rather than on one.
    """
    cfg = TrainConfig(epochs=3 if quick else 5, patience=0)  # per round; no early stop: every epoch is timed
    rounds, book_epochs = (1, 2) if quick else (3, 3)
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        tmp = Path(tmp)
        data_cfg = DataConfig(data_dir=data_dir, limit=1_000 if quick else 0)
        splits = prepare_splits(data_cfg, cache_root=tmp / "prepared")[0]
        tensors = Tensors.from_splits(splits)
        n_train, n_val = len(tensors.train[1]), len(tensors.val[1])
        experiment = sqlite_experiment(tmp)

        floor, train_pass, train_pass_1_thread, untracked, tracked, per_run_tracking = [], [], [], [], [], []
        for _ in range(rounds):
            floor += time_compute_floor(tensors, cfg, repeats=5)
            train_pass += time_training_pass(tensors, cfg, cfg.epochs)
            # the tiny per-batch ops gain little from a second thread and lose much when the cores are
            # busy with anything else (OpenMP threads wait on each other): measured for comparison
            train_pass_1_thread += time_training_pass(tensors, cfg, cfg.epochs, threads=1)
            untracked += time_untracked_epochs(tensors, cfg)
            epochs, per_run = time_tracked_epochs(splits, tensors, cfg, experiment)
            tracked += epochs
            per_run_tracking.append(per_run)
        log_epoch = time_log_epoch(experiment, repeats=20)
        profiled = profile_training_pass(tensors, cfg)
        book = time_reference(torchvision_root(data_dir, tmp / "torchvision"), n_train, n_val, cfg, book_epochs)

    project_ips, book_ips = n_train / median(train_pass), n_train / median(book["train_s"])
    epoch_off, epoch_on = median(untracked), median(tracked)
    speedup = project_ips / book_ips
    tracking_cost = epoch_on / epoch_off - 1
    throughput = Result("epoch_throughput", quick=quick, metrics={
        "train_images": n_train, "val_images": n_val,
        "book_train_images_per_s": book_ips, "project_train_images_per_s": project_ips,
        "train_throughput_ratio_x": speedup,
        "project_train_images_per_s_1_thread": n_train / median(train_pass_1_thread),
        "train_throughput_ratio_1_thread_x": n_train / median(train_pass_1_thread) / book_ips,
        "book_epoch_s": median(book["epoch_s"]),
        "project_epoch_untracked_s": epoch_off, "project_epoch_tracked_s": epoch_on,
        "epoch_time_ratio_x": median(book["epoch_s"]) / epoch_off,
        "tracking_cost_per_epoch_pct": 100 * tracking_cost,
        "tracking_cost_per_run_s": median(per_run_tracking),
        # the same cost timed directly: one log_epoch call, as tracking.training makes it and asynchronously
        "log_epoch_sync_ms": 1000 * median(log_epoch["synchronous"]),
        "log_epoch_async_ms": 1000 * median(log_epoch["asynchronous"]),
        "book_epochs_timed": len(book["epoch_s"]), "project_epochs_timed": len(untracked), "rounds": rounds,
    }, note=(
        f"medians over epochs; both sides train on {n_train:,} images and validate on {n_val:,} "
        f"(reference: seeded Subsets of torchvision's training set, DataLoader batch {cfg.batch_size}, "
        f"shuffled, {BOOK_WORKERS} workers; the first, set-up-laden epoch of each fit/tracking.training.train call is "
        "dropped; the project's measurements alternate over rounds)"
    ))
    throughput.check("speedup", speedup, 20, True, "project training pass >= 20x the book's images/s")
    throughput.check("tracking", 100 * tracking_cost, 5, False, "MLflow tracking < 5% of epoch time")

    floor_s = median(floor)
    batches = math.ceil(n_train / cfg.batch_size)
    compute_floor = Result("compute_floor", quick=quick, metrics={
        "full_batch_forward_backward_s": floor_s,
        "project_training_pass_s": median(train_pass),
        "project_epoch_untracked_s": epoch_off,
        "training_pass_over_floor_x": median(train_pass) / floor_s,
        "epoch_over_floor_x": epoch_off / floor_s,
        "batches_per_epoch": batches,
        # what minibatching adds to the same arithmetic, per batch: gather, optimiser step, op dispatch
        "overhead_per_batch_ms": 1000 * (median(train_pass) - floor_s) / batches,
    }, details={"training pass, % of self CPU time by op (torch.profiler)": profiled},
        note=f"floor: one forward+backward of all {n_train:,} training images at once, median of {len(floor)}")
    compute_floor.check("floor", epoch_off / floor_s, 1.5, False, "project epoch <= 1.5x the floor")
    return [throughput, compute_floor]
