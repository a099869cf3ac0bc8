"""What a worker holds while it works on a study: its heartbeats (one thread beating for all its running
trials), its settings and data (``Worker``), and each asked, not yet told trial with its MLflow run
(``TrialRun``)."""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from mlflow.entities import RunInfo
from optuna.storages import BaseStorage

from pipeline.config import TrainConfig
from pipeline.core.splits import Splits
from pipeline.core.training import Tensors
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.dead_trials import has_heartbeats


class Heartbeats:
    """One thread that records a heartbeat for every running trial of this worker, each interval.

    So a worker killed without a word has its trials failed by any other worker, on any machine
    (``dead_trials``). Journal files have no heartbeats: there the thread never starts.
    """

    def __init__(self, storage: BaseStorage, interval: int):
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="trial heartbeats", daemon=True)

    def __enter__(self) -> "Heartbeats":
        if has_heartbeats(self.storage):
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def add(self, trial_id: int) -> None:
        if has_heartbeats(self.storage):
            self.storage.record_heartbeat(trial_id)  # at once: a trial without one is never found stale
        self.trial_ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        self.trial_ids.discard(trial_id)

    def beat(self) -> None:
        while not self.stopped.wait(self.interval):
            for number in list(self.trial_ids):
                self.storage.record_heartbeat(number)


@dataclass
class Worker:
    """What a worker's trials share: the study and its storage, the settings, the data, the parent run."""

    study: optuna.Study
    storage: BaseStorage
    cfg: TuneConfig
    space: SearchSpace
    splits: Splits
    tensors: Tensors
    parent: RunInfo
    interrupted: Callable[[], None]  # the safe point: raises KeyboardInterrupt once Ctrl-C or SIGTERM came
    heartbeats: Heartbeats


@dataclass
class TrialRun:
    """A trial that has been asked and not yet told, with its MLflow run."""

    trial: optuna.Trial
    trial_id: int
    cfg: TrainConfig
    run_id: str
    history: list[dict] = field(default_factory=list)  # its epochs so far, for its curves if it is pruned
