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
