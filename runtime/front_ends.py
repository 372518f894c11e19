"""Several HTTP front-end processes over one engine process (`runtime.serve --api-processes N`).

At GPU speed one Python process cannot both parse requests and write every stream's SSE chunks as fast as
the engine makes tokens (docs/BENCHMARKS.md, issue 17: the front end 73% busy, requests waiting in it
between their last token and the next request). Here a supervisor binds the listening socket, spawns the
engine process (`runtime.engine_process`) with one pair of pipes per front end, and N front ends that
accept on the shared socket (the kernel spreads connections among them, as uvicorn's own workers do).
The queue bound is shared (samples in flight, in shared memory); /metrics adds up the front ends'
histograms and counters through prometheus_client's multiprocess mode and reads the engine's counters
from any front end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from core.errors import UserError


def serve_front_ends(cfg: Any) -> None:
    """Run until SIGINT/SIGTERM or until a front end or the engine exits; then stop them all."""
    import multiprocessing

    from runtime.engine_process import role, start_engine

    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as exc:
        raise UserError(f"port: cannot listen on {cfg.host}:{cfg.port} ({exc.strerror})") from None
    sock.listen(2048)
    ctx = multiprocessing.get_context("spawn")
    try:
        engine, links = start_engine(cfg, cfg.api_processes)
    except BaseException:
        sock.close()
        raise
    metrics_dir = tempfile.mkdtemp(prefix="shrinkwrap-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by each front end's prometheus_client import
    front_ends = []
    try:
        for link in links:
            with role(f"front end {link.index}"):
                process = ctx.Process(target=_front_end_main, args=(cfg, link, sock), daemon=True,
                                      name=f"shrinkwrap-front-end-{link.index}")
                process.start()
            link.commands.close()  # the front end holds them now: the engine sees it go when it goes
            link.events.close()
            front_ends.append(process)
        print(f"serving on http://{cfg.host}:{cfg.port} with {cfg.api_processes} front-end processes "
              f"(context {links[0].info['max_context']})", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while engine.is_alive() and all(p.is_alive() for p in front_ends):
            time.sleep(0.5)
        dead = [f"{p.name} (exit status {p.exitcode})" for p in [engine, *front_ends] if not p.is_alive()]
        raise UserError(f"{', '.join(dead)} exited: the server stops")
    finally:
        for process in front_ends:
            if process.is_alive():
                process.terminate()  # uvicorn's own SIGTERM handling: a graceful close
        for process in front_ends:
            process.join(15)
        engine.join(15)  # it leaves when every front end's pipes have closed
        if engine.is_alive():
            engine.terminate()
        sock.close()
        for name in os.listdir(metrics_dir):
            os.unlink(os.path.join(metrics_dir, name))
        os.rmdir(metrics_dir)


def _end_with_parent(parent: int) -> None:
    """A supervisor killed outright (SIGKILL, OOM) cannot stop its front ends: each stops itself (uvicorn's
    graceful SIGTERM), and the engine follows when the last one's pipes close. Nor can it remove the metrics
    folder: the front ends do (a metric written after that goes to an unlinked file, harmlessly)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    shutil.rmtree(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), ignore_errors=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _front_end_main(cfg: Any, link: Any, sock: socket.socket) -> None:
    import uvicorn

    from runtime.engine_process import EngineClient
    from runtime.loading import load_tokenizer
    from runtime.serve import Server, create_app, model_name

    sys.setswitchinterval(cfg.gil_switch_ms / 1e3)
    threading.Thread(target=_end_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    scheduler = EngineClient(link)
    scheduler.start()
    server = Server(scheduler, load_tokenizer(cfg.artifact), model_name(cfg))
    try:
        uvicorn.Server(uvicorn.Config(create_app(server), log_level=cfg.log_level, loop=cfg.loop,
                                      http=cfg.http)).run(sockets=[sock])
    finally:
        scheduler.stop()
