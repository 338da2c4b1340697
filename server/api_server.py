"""`pagedinfer serve`: uvicorn running the app, with a graceful drain.

On SIGTERM (or Ctrl+C) the server keeps its socket open but answers /ready
and new requests with 503, lets in-flight requests finish for up to
--shutdown-timeout seconds, aborts those still running (each ends with an
error: an error event on a stream, a 500 otherwise), stops the engine-core
process, then exits 0. A second signal ends the drain at once, the same way;
one after that is uvicorn's to handle. The core process ignores these
signals (Ctrl+C reaches the whole process group): only this process decides
when it stops.

If the engine core dies (a crash, or a tensor-parallel rank that died), the
open requests fail at once and /health answers 503; DEAD_ENGINE_EXIT_S later
the server exits 1 by itself, so that its supervisor (the kubelet, systemd)
restarts it rather than leaving a server that can only refuse.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from types import FrameType

import uvicorn

from inference.core_spawn import SpawnedCore
from inference.prepare import default_model_dir, known_model_dir
from inference.startup_phases import process_started_at
from server.app import create_app
from server.lora_routes import runtime_updating_from_env
from server.state import ServerSettings, ServerState
from server.tracing_config import tracing_endpoint

logger = logging.getLogger(__name__)

# After the drain, how long uvicorn may take to flush responses and close connections.
CLOSE_TIMEOUT_S = 5
# After the engine died: time for the failed streams to flush and for probes to see the 503.
DEAD_ENGINE_EXIT_S = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.drain_deadline: float | None = None
        self.dead_since: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler should do little: set the deadline, on_tick does the rest.
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.state.settings.shutdown_timeout
            self.state.draining = True
        elif not self.should_exit:
            self.drain_deadline = time.monotonic()  # a second signal: the deadline is now
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        engine = self.state.engine
        if self.drain_deadline is not None and not self.should_exit:
            num_unfinished = engine.num_unfinished if engine is not None else 0
            if num_unfinished == 0 or time.monotonic() >= self.drain_deadline:
                logger.info("drain done (%d requests still unfinished); shutting down", num_unfinished)
                if num_unfinished:
                    # Ended now, their responses finish before uvicorn closes
                    # the connections; left running, uvicorn would wait
                    # CLOSE_TIMEOUT_S for them, then cut them off mid-stream.
                    engine.abort_all("the server shut down before the request finished")
                self.should_exit = True
        elif engine is not None and engine.dead_error is not None and self.state.tokenizer is None:
            logger.error("the engine failed to start: %s; exiting", engine.dead_error)
            self.exit_code = 1
            self.should_exit = True
        elif engine is not None and not engine.is_alive and not self.should_exit:
            now = time.monotonic()
            if self.dead_since is None:
                self.dead_since = now
                logger.error("the engine core died; exiting in %d s", DEAD_ENGINE_EXIT_S)
            elif now - self.dead_since >= DEAD_ENGINE_EXIT_S:
                self.exit_code = 1
                self.should_exit = True
        return await super().on_tick(counter)


def _served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return Path(args.model).name if args.model else default_model_dir().name


def server_settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        served_model_name=_served_model_name(args),
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        max_request_bytes=args.max_request_bytes,
        shutdown_timeout=args.shutdown_timeout,
        log_prompts=args.log_prompts,
        metrics_compat=args.metrics_compat,
        enable_console=not args.disable_console,
        model=known_model_dir(args.model),
        started_at=process_started_at(),
        tracing=tracing_endpoint(args.otlp_traces_endpoint) is not None,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating or runtime_updating_from_env(),
    )


def run_server(args: argparse.Namespace, core: SpawnedCore) -> int:
    """Serve with the engine core `core`, started already (server/cli.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = server_settings(args)
    app = create_app(settings, core)
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=CLOSE_TIMEOUT_S)
    server = DrainingServer(config, app.state.server)
    server.run()
    return server.exit_code
