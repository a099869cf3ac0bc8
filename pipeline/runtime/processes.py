"""Which process runs a run or a trial, and whether that process is surely dead.

A process killed with SIGKILL (or by the out-of-memory killer) cannot end its MLflow run or its Optuna
trial: they would stay RUNNING for ever. So each records its owner, as JSON: where the process runs and
which process it is. A later command that finds the owner dead ends what it left (``pipeline.tracking.
owners``, ``pipeline.tuning.dead_trials``).

A pid means something only inside one boot of one kernel and one PID namespace: host names are shared
by containers and cloned machines, so the owner records the kernel's boot id and the PID namespace
beside the host name, and only a process in the same place may judge. The start time tells a reused
pid from the owner. Anywhere else nothing can be known from here (Optuna's heartbeats cover trials in
database storages, on any machine).
"""

import functools
import json
import os
import socket
from pathlib import Path

import psutil

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # a new random id at each boot of the kernel
PID_NAMESPACE = Path("/proc/self/ns/pid")


@functools.cache
def this_place() -> dict:
    """Where this process runs: host name (for people), kernel boot and PID namespace (for the check)."""
    try:
        boot, namespace = BOOT_ID.read_text().strip(), os.readlink(PID_NAMESPACE)
    except OSError:  # not Linux, or /proc hidden: no owner of ours can be judged
        boot = namespace = None
    return {"host": socket.gethostname(), "boot": boot, "pid_namespace": namespace}


def this_process() -> str:
    """The owner of what this process runs, as the JSON text stored in tags and trial attributes."""
    me = psutil.Process()
    return json.dumps({**this_place(), "pid": me.pid, "started": round(me.create_time(), 2)})


def parsed(owner: str) -> dict | None:
    """The owner's fields, or None if it is not an owner this code wrote."""
    try:
        fields = json.loads(owner)
        return fields if isinstance(fields, dict) and {"boot", "pid_namespace", "pid", "started"} <= set(fields) \
            else None
    except (ValueError, TypeError):
        return None


def runs_here(owner: str) -> bool:
    """Whether the owner's pid can be looked up from here: same kernel boot, same PID namespace."""
    fields, place = parsed(owner), this_place()
    return (fields is not None and place["boot"] is not None
            and (fields["boot"], fields["pid_namespace"]) == (place["boot"], place["pid_namespace"]))


def is_dead(owner: str) -> bool:
    """True only when surely dead: the owner ran here (``runs_here``) and its process is gone or a zombie."""
    if not runs_here(owner):
        return False
    fields = parsed(owner)
    try:
        process = psutil.Process(fields["pid"])
        # create_time is known to 1/100 s: another start time means the pid now belongs to another process
        return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - fields["started"]) > 0.5
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to inspect
        return False


def why_dead(owner: str) -> str:
    fields = parsed(owner)
    return f"its process (pid {fields['pid']} on {fields['host']}) died without ending it (killed?)"
