"""Which process owns a run, and when it is surely dead: only where its pid means something.

Real processes: a child started and ended here gives a pid that is surely dead; the owner records of
other machines are this machine's own record with one field changed, as a cloned machine or a container
with the same host name would write it.
"""

import json
import subprocess
import sys

import psutil

from pipeline.runtime.processes import is_dead, runs_here, this_process, why_dead


def ended_process_owner() -> dict:
    """The owner record of a real process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = round(psutil.Process(child.pid).create_time(), 2)
    owner = {**json.loads(this_process()), "pid": child.pid, "started": started}
    child.wait()
    return owner


def test_this_process_is_alive_and_runs_here():
    me = this_process()
    assert runs_here(me) and not is_dead(me)


def test_an_ended_process_here_is_dead_and_says_where_it_ran():
    owner = json.dumps(ended_process_owner())
    assert is_dead(owner)
    assert f"pid {json.loads(owner)['pid']} on {json.loads(owner)['host']}" in why_dead(owner)


def test_a_reused_pid_is_not_its_old_owner():
    # this process's pid, but a start time the process never had: the pid was reused since
    owner = {**json.loads(this_process()), "started": json.loads(this_process())["started"] - 3600}
    assert is_dead(json.dumps(owner))


def test_the_same_host_name_on_another_boot_or_pid_namespace_is_never_judged():
    # a cloned machine or a container shares the host name: an ended pid there says nothing about here
    ended = ended_process_owner()
    for other in ({"boot": "another-boot-id"}, {"pid_namespace": "pid:[1]"}):
        owner = json.dumps({**ended, **other})
        assert not runs_here(owner) and not is_dead(owner)


def test_an_owner_this_code_did_not_write_is_never_judged():
    for owner in ("", "not json", json.dumps({"host": "vm", "pid": 1}), json.dumps([1, 2])):
        assert not runs_here(owner) and not is_dead(owner)
