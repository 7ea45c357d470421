"""The local Ray of a killed sweep driver: recorded when it starts, stopped when the sweep is resumed.

A ``SIGKILL``ed driver cannot shut its Ray down. Ray's fate sharing ends the GCS, the
raylet and the training workers, but its dashboard agent and runtime-env agent (renamed
``ray::DashboardAgent`` / ``ray::RuntimeEnvAgent``, orphaned) were still running 30 s
later. So the driver records its local Ray (its own pid, Ray's session directory and the
Ray processes it started) in the sweep's state folder, and ``--resume`` stops whatever of
that is still alive before it starts a new Ray. A process counts as the dead sweep's only
if it is a recorded pid with the same start time (pids are reused), or it names or holds
open a file in that Ray's session directory (unique to it): never another user's Ray.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import ray

from trainables.errors import UserError

RECORD_FILE = "local-ray.json"
STOP_SECONDS = 10  # SIGTERM first (Ray's processes clean up their sockets), then SIGKILL


def state_folder(storage_path: str, sweep_id: str) -> Path | None:
    """Where the record lives: the sweep's Tune folder when storage is local (a cloud URI has no local processes to find)."""
    return None if "://" in storage_path else Path(storage_path) / sweep_id


def record_local_ray(folder: Path | None) -> None:
    """Record this driver and the Ray processes it started (its descendants), when it started a local Ray.

    A driver attached to a cluster (``ray job submit``) started no Ray process: nothing is recorded.
    """
    me = psutil.Process()
    ray_processes = [_identity(p) for p in me.children(recursive=True) if _is_ray(p)]
    session_dir = _session_dir()
    if folder is None or session_dir is None or not ray_processes:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).write_text(json.dumps({"driver": _identity(me), "session_dir": session_dir, "processes": ray_processes}))


def stop_leftovers(folder: Path | None) -> list[str]:
    """Stop what is still alive of the recorded local Ray of this sweep's previous driver; returns their descriptions.

    Raises a UserError when that driver is still running: the sweep is not interrupted, and
    stopping its Ray would kill it.
    """
    record_path = folder / RECORD_FILE if folder is not None else None
    if record_path is None or not record_path.is_file():
        return []
    record = json.loads(record_path.read_text())
    driver = record["driver"]
    if driver["pid"] == os.getpid():
        return []  # resumed in the same process (tests): that Ray is this driver's own
    if _alive(driver):
        raise UserError(f"the sweep is still running: its driver (pid {driver['pid']}) is alive; stop it first "
                        f"(kill {driver['pid']}) or wait for it, then --resume")
    found = {p.pid: p for p in (_process(entry) for entry in record["processes"]) if p is not None}
    found |= {p.pid: p for p in _in_session(record["session_dir"])}
    found.pop(os.getpid(), None)
    names = [f"{_name(p)} (pid {p.pid})" for p in found.values()]
    for process in found.values():
        _signal(process, "terminate")
    _, alive = psutil.wait_procs(list(found.values()), timeout=STOP_SECONDS)
    for process in alive:
        _signal(process, "kill")
    psutil.wait_procs(alive, timeout=STOP_SECONDS)
    record_path.unlink()
    if names:
        print(f"stopped {len(names)} process(es) left running by the interrupted sweep's local Ray: {', '.join(names)}", file=sys.stderr)
    return names


def _session_dir() -> str | None:
    # Ray's public API does not expose the session directory; its node object does (Ray >= 2.0).
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


def _identity(process: psutil.Process) -> dict:
    return {"pid": process.pid, "create_time": process.create_time()}


def _process(entry: dict) -> psutil.Process | None:
    """The recorded process if it still runs (the same pid *and* start time), else None."""
    try:
        process = psutil.Process(entry["pid"])
        return process if abs(process.create_time() - entry["create_time"]) < 0.01 else None
    except psutil.Error:
        return None


def _alive(entry: dict) -> bool:
    process = _process(entry)
    try:
        return process is not None and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_ray(process: psutil.Process) -> bool:
    try:
        return "ray" in " ".join(process.cmdline()).lower()
    except psutil.Error:
        return False


def _in_session(session_dir: str) -> list[psutil.Process]:
    """Processes whose command line names the session directory, or that hold a file of it open (the renamed agents)."""
    found = []
    for process in psutil.process_iter():
        try:
            if session_dir in " ".join(process.cmdline()) or any(f.path.startswith(session_dir + "/") for f in process.open_files()):
                found.append(process)
        except psutil.Error:  # gone meanwhile, or not ours to inspect
            continue
    return found


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"


def _signal(process: psutil.Process, how: str) -> None:
    try:
        getattr(process, how)()
    except psutil.NoSuchProcess:
        pass  # it ended on its own meanwhile: what we wanted
