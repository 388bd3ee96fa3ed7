"""One rank's worker process: `python -m dsflow.runtime.worker ...` (started by the cluster).

With MS_ROLE=MS_SCHED the same entry point runs MindSpore's cluster scheduler, whose
init() only returns when the cluster ends. Both roles watch their parent: if the
coordinator dies, they exit instead of lingering.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client

from dsflow.runtime.backends.base import RankBackend
from dsflow.runtime.worker_ops import RankOps
from dsflow.runtime.worker_protocol import AUTHKEY_ENV, WARMUP_ENV


def _watch_parent(parent_pid: int) -> None:
    def loop() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(3)
    threading.Thread(target=loop, daemon=True).start()


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _memory() -> dict:
    return {"rss_peak_bytes": _rss_peak_bytes(), "rss_bytes": _rss_now_bytes()}


def _serve(conn, ops: RankOps) -> None:
    """Answer ops until "exit". An op that raises is answered with a non-fatal error and
    the worker goes on: a bad input or a deterministic backend error fails that step's
    requests, not the cluster (a restart would only fail the same way again)."""
    while True:
        try:
            op, payload = conn.recv()
        except EOFError:
            return
        if op == "exit":
            conn.send(("ok", _memory()))
            return
        if op == "stats":
            conn.send(("ok", _memory()))
            continue
        try:
            reply = ops.handle(op, payload)
        except Exception as e:
            traceback.print_exc()
            reply = ("error", {"rank": ops.rank, "message": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc(), "fatal": False})
        conn.send(reply)


def make_backend(manifest, rank: int, device: str, device_id: int,
                 allow_version_mismatch: bool = False) -> "RankBackend":
    """The only place the device matters: MindSpore GraphCell on CPU, or Lite on Ascend;
    an ONNX build (its manifest's target) runs on ONNX Runtime's CPU provider."""
    if manifest.target == "onnx":
        from dsflow.runtime.backends.onnxrt import OnnxRuntimeBackend
        return OnnxRuntimeBackend(manifest, rank)
    if device == "ascend":
        from dsflow.runtime.backends.lite import LiteBackend
        return LiteBackend(manifest, rank, device_id,
                           allow_version_mismatch=allow_version_mismatch or None)
    from dsflow.runtime.backends.mindspore import MindSporeBackend, init_mindspore
    init_mindspore(manifest.tp)
    return MindSporeBackend(manifest, rank)


def _finish_startup(conn, backend, rank: int, load_s: float) -> float:
    """Pass on a backend's start-up warning, and let a backend that compiles lazily
    (Lite: one GE gear at a time) compile every shape now; each line goes to the
    coordinator as a "progress" message. Returns the warm-up seconds."""
    def report(line: str) -> None:
        conn.send(("progress", {"rank": rank, "message": line}))
    if backend.version_warning:
        report(f"rank {rank}: warning: {backend.version_warning}")
    if not backend.gears() or os.environ.get(WARMUP_ENV) == "0":
        return 0.0
    report(f"rank {rank}: graphs built in {load_s:.1f} s; warming up "
           f"{len(backend.gears())} gear(s) (first start-up only is slow)")
    return backend.warm_up(report)


def run_worker(args: argparse.Namespace) -> int:
    from dsflow.artifacts.manifest import read_manifest

    host, port = args.connect.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY_ENV]))
    try:
        t0 = time.perf_counter()
        manifest = read_manifest(args.artifacts)
        backend = make_backend(manifest, args.rank, args.device, args.device_id,
                               args.allow_version_mismatch)
        load_s = time.perf_counter() - t0
        warm_up_s = _finish_startup(conn, backend, args.rank, load_s)
        conn.send(("ready", {"rank": args.rank, "pid": os.getpid(), "load_s": load_s,
                             "warm_up_s": warm_up_s, **_memory()}))
        _serve(conn, RankOps(backend, args.rank, manifest.tp))
        return 0
    except BaseException as e:  # report, then die: the coordinator tears the cluster down
        try:
            conn.send(("error", {"rank": args.rank, "message": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc(), "fatal": True}))
        except OSError:
            pass
        traceback.print_exc()
        return 1


def run_scheduler() -> int:
    import mindspore as ms
    from mindspore.communication import init
    ms.set_device("CPU")
    init()  # serves the cluster; returns when the workers are gone
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsflow.runtime.worker")
    p.add_argument("--artifacts")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--connect")
    p.add_argument("--parent-pid", type=int, default=os.getppid())
    p.add_argument("--device", choices=["cpu", "ascend"], default="cpu")
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--allow-version-mismatch", action="store_true")
    args = p.parse_args(argv)
    _watch_parent(args.parent_pid)
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        rc = run_scheduler()
    else:
        rc = run_worker(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip MindSpore's slow (~7 s) cluster finalisation at interpreter exit


if __name__ == "__main__":
    main()
