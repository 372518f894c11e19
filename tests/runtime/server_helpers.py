"""Run the real server (uvicorn, loopback, free port) in a background thread for tests."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn

from runtime.bench import free_port
from runtime.serve import ServeConfig, build_server, create_app


@contextlib.contextmanager
def running_server(artifact: str, **options):
    cfg = ServeConfig(artifact=artifact, port=free_port(), **options)
    server = build_server(cfg)
    http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=cfg.port, log_level="error"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{cfg.port}", server
    finally:
        http.should_exit = True
        thread.join(10)
        server.scheduler.stop()


@contextlib.contextmanager
def server_process(artifact: str, *flags: str):
    """`python -m runtime.serve` as a user starts it (its own process group), on a free port; stopped with
    SIGTERM as a supervisor would, and every process it started must be gone after."""
    import subprocess
    import sys

    import psutil

    from runtime.bench import wait_until_healthy

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--artifact", artifact, "--port", str(port),
                             *flags], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, 120)
        children = psutil.Process(proc.pid).children(recursive=True)
        yield url, children
    finally:
        proc.terminate()
        proc.wait(60)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
