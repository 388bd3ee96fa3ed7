"""Starting, driving and stopping the rank worker processes.

tp = 1: one worker, no MindSpore cluster. tp > 1 on CPU: MindSpore's own cluster
runtime on 127.0.0.1: one scheduler process (MS_ROLE=MS_SCHED) and one worker per rank
(MS_ROLE=MS_WORKER, MS_NODE_ID=rank), on a free port picked here. On Ascend the
workers run MindSpore Lite, whose collectives come from HCCL and the rank table, so
no MindSpore cluster is started; rank r drives device `device_ids[r]`. Every child runs
in its own session, so a Ctrl-C in the terminal reaches only the coordinator, which
then shuts the children down in order; children also exit if the coordinator dies.

MindSpore's log lines go to one file per process in a run directory (also the
children's working directory, where compile failures drop analyze_fail.ir); the
directory is removed after a clean run and kept, and named, after a failure.
"""
from __future__ import annotations

import logging
import os
import pickle
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any, Callable, Optional

from dsflow.runtime.worker_protocol import AUTHKEY_ENV, THREADS_ENV, StepError, WorkerError

log = logging.getLogger("dsflow.cluster")

STARTUP_TIMEOUT_S = 600.0
POLL_S = 0.25


class _Silent(WorkerError):
    """Ranks alive but not answering before a deadline."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class Cluster:
    """tp worker processes (plus a scheduler) answering `request`s in lockstep."""

    def __init__(self, artifacts: Path, tp: int, verbose: bool = False,
                 threads_per_rank: Optional[int] = None, device: str = "cpu",
                 device_ids: Optional[list[int]] = None,
                 on_progress: Optional[Callable[[str], None]] = None,
                 allow_version_mismatch: bool = False):
        self.artifacts = Path(artifacts).resolve()
        # start-up progress lines from the workers (Lite warm-up), stderr by default
        self.on_progress = on_progress or (lambda line: print(line, file=sys.stderr,
                                                              flush=True))
        self.tp = tp
        self.device = device
        self.device_ids = list(device_ids) if device_ids is not None else list(range(tp))
        self.ms_cluster = device == "cpu" and tp > 1
        self.verbose = verbose
        self.allow_version_mismatch = allow_version_mismatch
        self.threads = threads_per_rank or max(1, (os.cpu_count() or 1) // tp)
        self.run_dir = Path(tempfile.mkdtemp(prefix="dsflow-run-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.conns: list[Optional[Connection]] = [None] * tp
        self.ready: list[dict] = [{}] * tp
        self.failed = False
        self.final_stats: list[dict] = []
        self.bytes_received = 0  # replies' pickled bytes (tools/bench_host_step.py)
        self._busy = False  # a request is in flight: its replies would precede any other
        self._authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self._authkey)

    # ---- start ----------------------------------------------------------------
    def _env(self, role: str, rank: int, sched_port: int) -> dict[str, str]:
        env = dict(os.environ)
        env[AUTHKEY_ENV] = self._authkey.hex()
        env.setdefault("GLOG_v", "1" if self.verbose else "3")
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        env.setdefault(THREADS_ENV, str(self.threads))
        env["PYTHONUNBUFFERED"] = "1"
        if self.ms_cluster:
            env.update(MS_ROLE=role, MS_SCHED_HOST="127.0.0.1", MS_SCHED_PORT=str(sched_port),
                       MS_WORKER_NUM=str(self.tp))
            if role == "MS_WORKER":
                env.update(MS_NODE_ID=str(rank), RANK_ID=str(rank))
        return env

    def _spawn(self, name: str, env: dict[str, str], args: list[str]) -> None:
        out = None if self.verbose else open(self.run_dir / f"{name}.log", "wb")
        cmd = [sys.executable, "-m", "dsflow.runtime.worker", "--parent-pid", str(os.getpid()),
               *args]
        self.procs[name] = subprocess.Popen(
            cmd, env=env, cwd=self.run_dir, stdin=subprocess.DEVNULL,
            stdout=out if out else sys.stderr, stderr=subprocess.STDOUT,
            start_new_session=True)
        if out:
            out.close()

    def start(self) -> "Cluster":
        try:
            self._start()
        except BaseException:
            self.failed = True
            self.close()
            raise
        return self

    def _start(self) -> None:
        port = free_port() if self.ms_cluster else 0
        address = "%s:%d" % self._listener.address
        if self.ms_cluster:
            self._spawn("scheduler", self._env("MS_SCHED", 0, port), [])
        for rank in range(self.tp):
            self._spawn(f"rank{rank}", self._env("MS_WORKER", rank, port),
                        ["--artifacts", str(self.artifacts), "--rank", str(rank),
                         "--connect", address, "--device", self.device,
                         "--device-id", str(self.device_ids[rank]),
                         *(["--allow-version-mismatch"] if self.allow_version_mismatch
                           else [])])
        accepted: list[Connection] = []
        acceptor = threading.Thread(target=self._accept_all, args=(accepted,), daemon=True)
        acceptor.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(accepted) < self.tp:
            self._check_alive()
            if time.monotonic() > deadline:
                raise WorkerError(f"workers did not connect within {STARTUP_TIMEOUT_S:.0f} s; "
                                  f"logs: {self.run_dir}")
            acceptor.join(POLL_S)
        pending = list(accepted)
        while pending:
            for conn in self._wait(pending, deadline):
                op, info = conn.recv()
                if op == "progress":  # a rank is busy starting up: give it more time
                    self.on_progress(info["message"])
                    deadline = time.monotonic() + STARTUP_TIMEOUT_S
                    continue
                self._raise_if_error(op, info)
                self.conns[info["rank"]] = conn
                self.ready[info["rank"]] = info
                pending.remove(conn)
        log.info("cluster of %d rank(s) ready; logs in %s", self.tp, self.run_dir)

    def _accept_all(self, accepted: list) -> None:
        for _ in range(self.tp):
            try:
                accepted.append(self._listener.accept())
            except (OSError, EOFError):  # listener closed, or a failed handshake
                return

    # ---- requests ----------------------------------------------------------------
    def check_alive(self) -> None:
        """Raise WorkerError naming a child process that has exited; never blocks."""
        self._check_alive()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None and not (name == "scheduler" and rc == 0):
                self.failed = True
                log_file = self.run_dir / f"{name}.log"
                tail = "" if self.verbose else _tail(log_file)
                raise WorkerError(f"{name} exited unexpectedly (code {rc}); log: {log_file}"
                                  + (f"\n{tail}" if tail else ""))

    def _wait(self, conns: list[Connection], deadline: Optional[float] = None) -> list:
        while True:
            ready = wait(conns, POLL_S)
            if ready:
                return ready
            self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise _Silent(f"workers did not answer in time; logs: {self.run_dir}")

    def _lost(self, rank: int) -> None:
        """A rank's connection broke: report its exit if it died, else the break."""
        self.failed = True
        deadline = time.monotonic() + 2.0
        while self.procs[f"rank{rank}"].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._check_alive()
        raise WorkerError(f"rank {rank} closed its connection; logs: {self.run_dir}")

    def _raise_if_error(self, op: str, info: Any) -> None:
        if op == "error" and info.get("fatal", True):
            self.failed = True
            log.debug("rank %s traceback:\n%s", info.get("rank"), info.get("traceback"))
            raise WorkerError(f"rank {info['rank']} failed: {info['message']} "
                              f"(log: {self.run_dir / ('rank%d.log' % info['rank'])})")

    @property
    def busy(self) -> bool:
        return self._busy

    def request(self, op: str, payload: dict, timeout: Optional[float] = None) -> list[Any]:
        """Send one op to every rank; return the replies in rank order. A rank that does
        not answer within `timeout` seconds (alive but silent: a hung collective, a
        stopped process) fails the cluster with one line naming it. An op a rank refused
        (a non-fatal error) raises StepError once every rank has answered."""
        self._busy = True
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((op, payload))
            except OSError:
                self._lost(rank)
        replies: list[Any] = [None] * self.tp
        index = {id(c): r for r, c in enumerate(self.conns)}
        pending = list(self.conns)
        deadline = None if timeout is None else time.monotonic() + timeout
        refused = []
        while pending:
            try:
                ready = self._wait(pending, deadline)
            except _Silent:
                silent = ", ".join(str(index[id(c)]) for c in pending)
                self.failed = True
                log.error("step %r exceeded the step timeout (%.0f s): rank(s) %s did not "
                          "answer; the worker cluster is replaced (logs: %s)", op, timeout,
                          silent, self.run_dir)
                raise WorkerError(f"step {op!r} exceeded the step timeout ({timeout:.0f} s): "
                                  f"rank(s) {silent} did not answer") from None
            for conn in ready:
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    self._lost(index[id(conn)])
                self.bytes_received += len(data)
                op_back, body = pickle.loads(data)
                self._raise_if_error(op_back, body)
                if op_back == "error":
                    refused.append(body)
                replies[index[id(conn)]] = body
                pending.remove(conn)
        self._busy = False
        if refused:
            log.debug("rank %s traceback:\n%s", refused[0]["rank"], refused[0]["traceback"])
            raise StepError(f"rank {refused[0]['rank']} could not run {op!r}: "
                            f"{refused[0]['message']}")
        return replies

    def kill(self) -> None:
        """Kill every child now (a hung rank: nothing would answer an exit request)."""
        self.failed = True
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()

    # ---- stop -------------------------------------------------------------------
    def close(self) -> None:
        """Ask workers to exit, then make sure every child is gone."""
        if not self.procs and not self.run_dir.exists():
            return
        if not self.failed and not self._busy and all(self.conns):
            try:
                self.final_stats = self.request("exit", {})
            except (WorkerError, OSError):
                self.failed = True
        for conn in self.conns:
            if conn is not None:
                conn.close()
        self._listener.close()
        deadline = time.monotonic() + 5.0
        for name, p in self.procs.items():
            if name == "scheduler":
                continue
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs.clear()
        if self.failed:
            log.warning("worker logs kept in %s", self.run_dir)
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
