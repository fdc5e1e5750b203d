"""`memwise serve MODEL --ray --replicas N`: the same app, N times, as one Ray Serve deployment on
a local Ray instance bound to 127.0.0.1 with the dashboard off.

Ray Serve pickles an ingress app when the deployment is declared, in this process, but the model
must load in each replica. So the ingress is a small ASGI object holding only the options; it builds
the real app (and its engine) on the first thing a replica sends it, the lifespan startup. Every
response carries X-Memwise-Replica, so a client can see which replica served it.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

from memwise.errors import MemwiseError

REPLICA_HEADER = b"x-memwise-replica"


class _ReplicaApp:
    """An ASGI app that becomes `build_app(options)` inside the replica that first calls it."""

    def __init__(self, options: dict[str, Any]):
        self.options = options
        self._app: Any = None     # no lock: a replica's first call (the lifespan) comes before any request
        self.replica = ""

    def _real(self) -> Any:
        if self._app is None:
            from memwise.serve.factory import build_app
            self._app = build_app(self.options)
            self.replica = f"{socket.gethostname()}-{os.getpid()}"
        return self._app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        app = self._real()
        if scope["type"] != "http":
            return await app(scope, receive, send)
        tag = self.replica.encode()

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, tag)]}
            await send(message)
        await app(scope, receive, tagged)


def deployment(options: dict[str, Any], replicas: int) -> Any:
    """The bound Ray Serve application: `replicas` copies of the app, each with its own engine."""
    from ray import serve

    ingress = _ReplicaApp(options)
    # Each replica's own bounded queue answers 429, so Ray must hand it everything that could fit:
    # the running batch and the queue behind it.
    in_flight = options["max_batch"] + options["max_queue"]

    @serve.deployment(name="memwise", num_replicas=replicas, max_ongoing_requests=in_flight,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(ingress)
    class MemwiseReplica:
        pass

    return MemwiseReplica.bind()


def serve_on_ray(options: dict[str, Any], replicas: int, host: str, port: int) -> int:
    """Start local Ray and Serve, deploy, and block until SIGINT or SIGTERM; then shut both down."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise MemwiseError(f"memwise serve --ray needs the serve-ray extra (pip install 'memwise[serve-ray]'): {e}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
             log_to_driver=False, namespace="memwise")
    try:
        serve.start(http_options={"host": host, "port": port}, detached=False)
        serve.run(deployment(options, replicas), name="memwise", route_prefix="/")
        print(f"memwise serve: {replicas} Ray Serve replica(s) of {options['source']} on http://{host}:{port}",
              flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
