"""`serve`: the app (router.py) under uvicorn, hardened for a shared network: a connection must send its
request head within header_timeout seconds (slow-loris clients are closed), a body must arrive within
body_timeout, and SIGTERM gives requests in flight shutdown_timeout seconds before they end with
finish_reason "abort" (streams get that final chunk and [DONE]) and the server exits."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading

from .router import MAX_BODY_BYTES, create_app
from .speculation import Speculation
from .validation import Limits

logger = logging.getLogger("autolm.serve")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def guarded_h11(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive in time (uvicorn
    times out idle keep-alive connections, but not one that sends its headers a byte at a time)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head has arrived
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
                self._head_timer = None

        def _too_slow(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11


def serve(
    model,
    tokenizer,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_body: int = MAX_BODY_BYTES,
    shutdown_timeout: float = 5.0,
    prefix_cache_mb: int = 256,
    limits: Limits | None = None,
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
    speculation: Speculation | None = None,
    prefill_chunk: int = 512,
    task: str = "generate",
    runtime_lora: bool = False,
) -> None:
    """Run the server until interrupted (see the module's docstring for the timeouts; `speculation`:
    autolm.serve.speculation; task "embed": an embedding model at /v1/embeddings, see create_app)."""
    import uvicorn

    _announce(model_name, host, port, api_key, speculation)
    app = create_app(
        model,
        tokenizer,
        model_name,
        api_key,
        max_batch,
        max_body,
        limits,
        body_timeout,
        prefix_cache_mb,
        engine_thread=False,
        speculation=speculation,
        prefill_chunk=prefill_chunk,
        task=task,
        runtime_lora=runtime_lora,
    )
    state = app.state.server
    timers: list[threading.Timer] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not state.closing:  # the first signal: new requests refused, those in flight given their time
                state.closing = True
                if state.engine is not None:
                    timers.append(threading.Timer(shutdown_timeout, state.engine.abort))
                    timers[-1].daemon = True
                    timers[-1].start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        http=guarded_h11(header_timeout),
        # the engine ends what is left at shutdown_timeout; this leaves time to send those last chunks
        timeout_graceful_shutdown=int(shutdown_timeout) + 5,
    )
    try:
        if state.engine is None:  # nothing to run beside uvicorn
            Server(config).run()
        else:
            _run_beside(Server(config), state.engine)
    finally:
        # a timer left waiting would hold the engine, and with it the model, past the interpreter's exit: the
        # compiled graphs' loaders are then never closed and leave their unpacked files in the temp folder
        for timer in timers:
            timer.cancel()
            timer.join()


def _announce(model_name: str, host: str, port: int, api_key: str | None, speculation) -> None:
    """Where it serves (on stderr), with a warning where anyone on the network could use it."""
    if not api_key and not _loopback(host):
        message = (
            f"WARNING: serving on {host} without --api-key: anyone who can reach this address can use the "
            "model. Pass --api-key (or AUTOLM_API_KEY) or bind 127.0.0.1."
        )
        logger.warning(message)
        print(message, file=sys.stderr, flush=True)
    print(f"serving {model_name} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    if speculation is not None:
        print(f"a request running alone decodes speculatively: {speculation}", file=sys.stderr, flush=True)


def _run_beside(server, engine) -> None:
    """uvicorn on a thread of its own, the engine on this one (the thread that loaded the model, see
    autolm.serve.engine); SIGINT/SIGTERM go to uvicorn as when it runs on the main thread."""
    failure: list[BaseException] = []

    def http() -> None:
        try:
            server.run()
        except (
            BaseException
        ) as e:  # a port in use ends uvicorn with SystemExit: the engine stops, we re-raise
            failure.append(e)
        finally:
            engine.stop()

    on_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in _SIGNALS} if on_main else {}
    thread = threading.Thread(target=http, name="autolm-http", daemon=True)
    thread.start()
    try:
        engine.run()
    finally:
        engine.stop()
        server.should_exit = True
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
