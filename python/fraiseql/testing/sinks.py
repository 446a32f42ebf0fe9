"""Real local sinks that record what fraiseql sends out: HTTP webhooks and SMTP mail.

They are real servers on 127.0.0.1 so that the code under test goes through
its real network stack (connection pooling, retries, TLS-less SMTP AUTH...),
which a mock would hide.  ``aiosmtpd`` is imported only when an SMTP sink is
created, so importing this module costs nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import gc
import socket
import ssl
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = ["RecordedMail", "RecordedRequest", "SinkResponse", "SmtpSink", "WebhookSink"]

LOOPBACK = "127.0.0.1"

_T = TypeVar("_T")


class _Recorder(Generic[_T]):
    """Thread-safe list that lets a test block until enough items arrived."""

    def __init__(self) -> None:
        self._items: list[_T] = []
        self._cond = threading.Condition()

    def add(self, item: _T) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def snapshot(self) -> list[_T]:
        with self._cond:
            return list(self._items)

    def wait_for(self, n: int, timeout: float, what: str) -> list[_T]:
        """Return the first ``n`` items, or raise TimeoutError saying how many came."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= n, timeout):
                raise TimeoutError(f"expected {n} {what} within {timeout}s, got {len(self._items)}")
            return list(self._items[:n])


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkResponse:
    """One scripted reply of a :class:`WebhookSink`."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the sink received it, with the reply it got."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    time: float
    status: int

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)


class WebhookSink:
    """Threaded HTTP server on 127.0.0.1 that records every request.

    Replies follow the script given to :meth:`script` (for example 500, 500,
    200 to exercise retries); once it runs out every reply is ``default``.
    """

    def __init__(self, default: SinkResponse | int = 200) -> None:
        self.default = _as_response(default)
        self._script: list[SinkResponse] = []
        self._script_lock = threading.Lock()
        self._recorder: _Recorder[RecordedRequest] = _Recorder()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._server = self._listen(0)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    @property
    def url(self) -> str:
        """Base URL; any path under it is accepted and recorded."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._recorder.snapshot()

    def script(self, *responses: SinkResponse | int) -> None:
        """Queue replies, consumed one per request in order."""
        with self._script_lock:
            self._script.extend(_as_response(r) for r in responses)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until ``n`` requests were recorded; return them."""
        return self._recorder.wait_for(n, timeout, "HTTP requests")

    def start(self) -> WebhookSink:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def down(self) -> None:
        """Go down as a crashed server does: the port refuses connections and the open ones
        (a client's keep-alive pool) are cut, until :meth:`up`. What was recorded stays."""
        self.close()
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        """Listen again, on the same port, after :meth:`down`."""
        self._server = self._listen(self.port)
        self.start()

    def _listen(self, port: int) -> ThreadingHTTPServer:
        server = _HTTPServer((LOOPBACK, port), _handler_for(self))
        server.daemon_threads = True
        return server

    def __enter__(self) -> WebhookSink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _next_response(self) -> SinkResponse:
        with self._script_lock:
            return self._script.pop(0) if self._script else self.default

    def _record(self, request: RecordedRequest) -> None:
        self._recorder.add(request)


class _HTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that goes away mid-request (a killed engine) is not an error of the sink."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _as_response(response: SinkResponse | int) -> SinkResponse:
    return response if isinstance(response, SinkResponse) else SinkResponse(status=response)


def _handler_for(sink: WebhookSink) -> type[BaseHTTPRequestHandler]:
    """A handler class bound to ``sink`` (http.server instantiates it per request)."""

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 so keep-alive clients (connection pools) behave as in production.
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with sink._connections_lock:
                sink._connections.add(self.connection)

        def finish(self) -> None:
            with sink._connections_lock:
                sink._connections.discard(self.connection)
            super().finish()

        def _handle(self) -> None:
            body = _read_body(self)
            response = sink._next_response()
            # Record before replying, so a client that got its reply sees the record.
            headers = list(self.headers.items())
            sink._record(
                RecordedRequest(self.command, self.path, headers, body, time.time(), response.status)
            )
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

        def log_message(self, format: str, *args: Any) -> None:
            """Silence per-request logging to stderr."""

    return Handler


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """Read a Content-Length or chunked body (HTTP clients send either)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return _read_chunked(handler)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _read_chunked(handler: BaseHTTPRequestHandler) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        chunks.append(handler.rfile.read(size))
        handler.rfile.readline()  # CRLF after each chunk


# --------------------------------------------------------------------------
# SMTP
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedMail:
    """One message accepted by the SMTP sink."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message: EmailMessage
    login: str | None
    time: float


class SmtpSink:
    """aiosmtpd server on 127.0.0.1 that records every message it accepts.

    With ``username``/``password`` it requires AUTH (LOGIN or PLAIN) before
    MAIL FROM and allows it without TLS, which is fine on loopback and keeps
    tests simple. With ``tls_context`` it offers STARTTLS and requires it
    before anything else (and AUTH only over TLS), like a real relay on 587.
    """

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.username = username
        self.password = password
        self.tls_context = tls_context
        self._recorder: _Recorder[RecordedMail] = _Recorder()
        self._controller: Any = None

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._controller is None:
            raise RuntimeError("SmtpSink is not started")
        port: int = self._controller.port
        return port

    @property
    def messages(self) -> list[RecordedMail]:
        return self._recorder.snapshot()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[RecordedMail]:
        """Block until ``n`` messages were recorded; return them."""
        return self._recorder.wait_for(n, timeout, "mail messages")

    def start(self) -> SmtpSink:
        if self._controller is None:
            self._controller = _make_controller(self)
            self._controller.start()
        return self

    def close(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
            if self.tls_context is not None:
                # aiosmtpd does not close the transport of a connection whose TLS handshake
                # failed (a client that rejected our certificate); collect it here, quietly,
                # rather than let its ResourceWarning surface in some later test.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ResourceWarning)
                    gc.collect()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_login(self, login: str, password: str) -> bool:
        return login == self.username and password == self.password

    def _record(self, envelope: Any, login: str | None) -> None:
        data: bytes = envelope.original_content or envelope.content
        message = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        mail = RecordedMail(envelope.mail_from, list(envelope.rcpt_tos), data, message, login, time.time())
        self._recorder.add(mail)


def _make_controller(sink: SmtpSink) -> Any:
    """Build the aiosmtpd controller; imported here to keep module import cheap."""
    import asyncio

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    class Handler:
        async def handle_MAIL(
            self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
        ) -> str:
            # Enforced here, not with aiosmtpd's auth_required, which warns when TLS
            # is off and so breaks test suites that turn warnings into errors.
            if sink.username is not None and not session.authenticated:
                return "530 5.7.0 Authentication required"
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            return "250 OK"

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            auth = session.auth_data
            login = auth.login.decode() if isinstance(auth, LoginPassword) else None
            sink._record(envelope, login)
            return "250 OK"

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and sink._check_login(
            data.login.decode(), data.password.decode()
        )
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    class PortZeroController(Controller):
        """Binds port 0 and learns the real port before aiosmtpd connects to it."""

        def _trigger_server(self) -> None:
            assert isinstance(self.server, asyncio.Server)
            self.port = self.server.sockets[0].getsockname()[1]
            super()._trigger_server()  # type: ignore[no-untyped-call]

    options: dict[str, Any] = {}
    if sink.username is not None:
        options = {"authenticator": authenticator, "auth_require_tls": sink.tls_context is not None}
    if sink.tls_context is not None:
        options |= {"tls_context": sink.tls_context, "require_starttls": True}
    return PortZeroController(Handler(), hostname=LOOPBACK, port=0, **options)
