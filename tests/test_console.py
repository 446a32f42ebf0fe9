"""The operator console's JSON API on the status server: reads open, mutations behind the
admin token, every bad request a clear JSON error that changes nothing."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import fraiseql
from fraiseql.scalars import ID
from fraiseql.testing.sinks import SinkResponse, WebhookSink

TOKEN = "console-test-token-0123456789"
FAST = fraiseql.Retry(max_attempts=2, backoff_strategy="fixed", initial_delay_ms=1, max_delay_ms=5)


class Api:
    """A small client of the console's API; errors come back as (status, body) too."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, token: str | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if (token or self.token) is not None:
            request.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        assert status == 200, (path, body)
        return body


def declare_order() -> None:
    @fraiseql.type
    class Order:
        id: ID
        status: str
        total: float


def declare_hook(sink: WebhookSink) -> None:
    """`Order` and the observer `hook`, a webhook to `sink` with two fast attempts."""
    declare_order()
    fraiseql.observer(
        name="hook",
        entity="Order",
        event="INSERT",
        actions=[fraiseql.webhook(url=sink.url)],
        retry=FAST,
    )


def order(**kw: Any) -> dict[str, Any]:
    return {"id": "o1", "status": "new", "total": 10.0, **kw}


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("FRAISEQL_TEST_ADMIN_TOKEN", TOKEN)
    return {"observers": {"backend": "in_memory", "admin_token_env": "FRAISEQL_TEST_ADMIN_TOKEN"}}


@pytest.fixture
def failing_sink() -> Iterator[WebhookSink]:
    """A webhook receiver that fails until its ``default`` is set to 200."""
    with WebhookSink(default=503) as sink:
        yield sink


def dead_letter_orders(engine: fraiseql.Engine, *ids: str) -> list[dict[str, Any]]:
    for i in ids:
        engine.emit("Order", "INSERT", new=order(id=i))
    engine.drain()
    entries = engine.dlq()
    assert len(entries) == len(ids)
    return entries


def test_the_page_is_served_with_headers_that_keep_it_to_itself(registry: fraiseql.Registry) -> None:
    declare_order()
    fraiseql.subscription(entity_type="Order", operation="create")(lambda o: None)
    with fraiseql.Engine(http_port=0) as engine:
        base = f"http://127.0.0.1:{engine.http_port}"
        with urllib.request.urlopen(f"{base}/", timeout=5) as page:
            html = page.read().decode()
            headers = page.headers
        with urllib.request.urlopen(f"{base}/console.js", timeout=5) as script:
            assert script.headers["Content-Type"].startswith("text/javascript")
    assert "<title>fraiseql observers</title>" in html
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_observers_show_their_counts_and_never_a_secret(
    registry: fraiseql.Registry, webhook_sink: WebhookSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    declare_order()
    monkeypatch.setenv("HOOK_TOKEN", "sk_live_do_not_show")
    fraiseql.observer(
        name="notify_big",
        entity="Order",
        event="INSERT",
        condition="total > 100",
        actions=[
            fraiseql.webhook(
                url=f"http://user:hunter2@127.0.0.1:{webhook_sink.port}/hook?key=querysecret",
                headers={"Authorization": "${HOOK_TOKEN}"},
            )
        ],
    )
    with fraiseql.Engine(http_port=0) as engine:
        engine.emit("Order", "INSERT", new=order(id="a", total=500.0))
        engine.emit("Order", "INSERT", new=order(id="b", total=5.0))
        engine.drain()
        api = Api(engine.http_port)
        body = api.get("/api/observers")
        text = json.dumps(body)
        info = api.get("/api/console")
    assert body["events_received"] == 2
    [observer] = body["observers"]
    assert observer["name"] == "notify_big"
    assert (observer["entity"], observer["event"], observer["condition"]) == (
        "Order",
        "INSERT",
        "total > 100",
    )
    assert observer["matched"] == 1
    [action] = observer["actions"]
    assert action["kind"] == "webhook"
    assert (action["succeeded"], action["failed"]) == (1, 0)
    for secret in ("hunter2", "querysecret", "sk_live_do_not_show", "HOOK_TOKEN"):
        assert secret not in text
    assert info["mutations"] == "disabled"


def test_recent_events_say_what_each_observer_did(registry: fraiseql.Registry) -> None:
    declare_order()

    @fraiseql.subscription(entity_type="Order", operation="create", condition="total > 100", retry=FAST)
    def big(o: Any) -> None:
        if o.id == "bad":
            raise RuntimeError("no")

    with fraiseql.Engine(http_port=0) as engine:
        for i, total in (("small", 1.0), ("large", 500.0), ("bad", 900.0)):
            engine.emit("Order", "INSERT", new=order(id=i, total=total))
            engine.drain()
        engine.emit("Order", "DELETE", old=order(id="gone"))
        engine.drain()
        api = Api(engine.http_port)
        events = api.get("/api/events")["events"]
        two = api.get("/api/events?limit=2")["events"]
    outcomes = {e["key"]: [o["outcome"] for o in e["outcomes"]] for e in events}
    assert outcomes == {"small": ["no_match"], "large": ["delivered"], "bad": ["dead_lettered"], "gone": []}
    assert [e["key"] for e in events] == ["gone", "bad", "large", "small"]  # newest first
    assert [e["key"] for e in two] == ["gone", "bad"]
    assert all("new" not in e and "old" not in e for e in events)  # rows are never shown


def test_without_a_token_the_console_is_read_only(
    registry: fraiseql.Registry, failing_sink: WebhookSink
) -> None:
    declare_hook(failing_sink)
    with fraiseql.Engine(http_port=0) as engine:
        [entry] = dead_letter_orders(engine, "r1")
        api = Api(engine.http_port, token=TOKEN)
        listed = api.get("/api/dlq")
        for method, path, body in [
            ("POST", f"/api/dlq/{entry['id']}/retry", None),
            ("DELETE", f"/api/dlq/{entry['id']}", None),
            ("POST", "/api/dlq/purge", {"all": True}),
        ]:
            status, answer = api.call(method, path, body)
            assert status == 403, (path, answer)
            assert "read-only" in answer["error"]
        assert engine.dlq() == [entry]  # nothing changed
    assert listed["total"] == 1
    [row] = listed["entries"]
    assert (row["id"], row["observer"], row["attempts"]) == (entry["id"], "hook", 2)
    assert row["action"] == f"Webhook to {failing_sink.url}"
    assert "503" in row["error"]


def test_retry_and_purge_with_the_token(
    registry: fraiseql.Registry, failing_sink: WebhookSink, token_env: dict[str, Any]
) -> None:
    declare_hook(failing_sink)
    with fraiseql.Engine(token_env, http_port=0) as engine:
        entries = dead_letter_orders(engine, "r1", "r2", "r3", "r4")
        first, second, third, fourth = sorted(e["id"] for e in entries)
        api = Api(engine.http_port, token=TOKEN)
        assert api.get("/api/console")["mutations"] == "token"

        status, body = api.call("POST", f"/api/dlq/{first}/retry", token="not-the-token-at-all")
        assert (status, "not the one configured" in body["error"]) == (401, True)
        status, body = Api(engine.http_port).call("POST", f"/api/dlq/{first}/retry")
        assert (status, "Bearer" in body["error"]) == (401, True)

        # Still failing: the entry stays, under the same id, with its attempts counted.
        status, body = api.call("POST", f"/api/dlq/{first}/retry")
        assert status == 200 and body["delivered"] is False and "503" in body["error"], body
        shown = api.get(f"/api/dlq/{first}")
        assert shown["attempts"] == 4
        assert shown["event"]["new"]["id"] in {"r1", "r2", "r3", "r4"}

        failing_sink.default = SinkResponse(status=200)
        status, body = api.call("POST", f"/api/dlq/{first}/retry")
        assert (status, body) == (200, {"id": first, "delivered": True})
        status, body = api.call("POST", "/api/dlq/retry", {"ids": [second, 999_999]})
        assert status == 200
        assert body["results"][0] == {"id": second, "delivered": True}
        assert body["results"][1]["status"] == 404
        status, body = api.call("DELETE", f"/api/dlq/{third}")
        assert (status, body) == (200, {"removed": 1})
        status, body = api.call("DELETE", f"/api/dlq/{third}")
        assert status == 404 and f"no dead-letter entry with id {third}" in body["error"]
        assert [e["id"] for e in engine.dlq()] == [fourth]
        status, body = api.call("POST", "/api/dlq/purge", {"all": True})
        assert (status, body) == (200, {"removed": 1})
        assert engine.dlq() == []
    # 2 attempts for each of 4 changes, 2 on the retry that failed again, 1 per good retry.
    assert len(failing_sink.requests) == 4 * 2 + 2 + 2


def test_search_finds_entries_by_their_text(
    registry: fraiseql.Registry, failing_sink: WebhookSink, token_env: dict[str, Any]
) -> None:
    declare_hook(failing_sink)
    with fraiseql.Engine(token_env, http_port=0) as engine:
        dead_letter_orders(engine, "needle-7", "hay-1", "hay-2")
        api = Api(engine.http_port)
        found = api.get("/api/dlq?q=NEEDLE")
        [hit] = found["entries"]
        shown = api.get(f"/api/dlq/{hit['id']}")
        by_error = api.get("/api/dlq?q=503")
        none = api.get("/api/dlq?q=%00%27%22;drop%20table")
        limited = api.get("/api/dlq?limit=2")
    assert found["total"] == 3  # the size of the whole queue, beside what was found
    assert shown["event"]["new"]["id"] == "needle-7"
    assert len(by_error["entries"]) == 3
    assert none["entries"] == []
    assert len(limited["entries"]) == 2
    assert limited["entries"][0]["id"] > limited["entries"][1]["id"]  # newest first


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "message"),
    [
        ("GET", "/api/dlq?limit=0", None, 400, "limit: expected a number from 1 to 1000"),
        ("GET", "/api/dlq?limit=abc", None, 400, "limit: expected a number"),
        ("GET", "/api/dlq?limit=1&limit=2", None, 400, "limit: given twice"),
        ("GET", "/api/events?evil=1", None, 400, 'unknown parameter "evil"'),
        ("GET", "/api/dlq?q=" + "x" * 201, None, 400, "q: at most 200 characters"),
        ("GET", "/api/dlq/abc", None, 400, "a dead-letter entry id is a positive integer"),
        ("GET", "/api/dlq/0", None, 400, "a dead-letter entry id is a positive integer"),
        ("GET", "/api/dlq/18446744073709551616", None, 400, "positive integer"),
        ("GET", "/api/dlq/12345", None, 404, "no dead-letter entry with id 12345"),
        ("GET", "/api/nothing", None, 404, "no such API endpoint"),
        ("PUT", "/api/observers", b"{}", 405, "method not allowed"),
        ("POST", "/api/dlq/purge", b"{not json", 400, "expected a JSON body"),
        ("POST", "/api/dlq/purge", b'{"ids": ["1"]}', 400, "expected a JSON body"),
        ("POST", "/api/dlq/purge", b'{"ids": [1], "all": true}', 400, "give ids or all, not both"),
        ("POST", "/api/dlq/purge", b'{"ids": []}', 400, "ids: name at least one entry"),
        ("POST", "/api/dlq/purge", b'{"ids": [1], "evil": 1}', 400, "unknown field"),
        ("POST", "/api/dlq/retry", b'{"all": true}', 400, "only a purge takes all"),
        ("POST", "/api/dlq/retry", json.dumps({"ids": list(range(1, 1002))}).encode(), 400, "at most 1000"),
        ("POST", "/api/dlq/purge", b"[" + b"1," * 40_000 + b"1]", 413, "larger than 65536 bytes"),
    ],
)
def test_bad_requests_get_a_clear_error_and_change_nothing(
    registry: fraiseql.Registry,
    failing_sink: WebhookSink,
    token_env: dict[str, Any],
    method: str,
    path: str,
    raw: bytes | None,
    status: int,
    message: str,
) -> None:
    declare_hook(failing_sink)
    with fraiseql.Engine(token_env, http_port=0) as engine:
        before = dead_letter_orders(engine, "kept")
        api = Api(engine.http_port, token=TOKEN)
        got_status, body = api.call(method, path, raw=raw)
        assert got_status == status, body
        assert message in body["error"]
        assert engine.dlq() == before
        assert api.get("/api/console")["version"]  # the server is still there


def test_a_second_retry_of_an_entry_under_retry_is_refused(
    registry: fraiseql.Registry, token_env: dict[str, Any]
) -> None:
    declare_order()
    release = threading.Event()
    entered = threading.Event()
    failing = True

    @fraiseql.subscription(entity_type="Order", operation="create", retry=fraiseql.Retry(max_attempts=1))
    def slow(o: Any) -> None:
        if failing:
            raise RuntimeError("down")
        entered.set()
        release.wait(10)

    with fraiseql.Engine(token_env, http_port=0) as engine:
        [entry] = dead_letter_orders(engine, "s1")
        failing = False
        api = Api(engine.http_port, token=TOKEN)
        results: list[tuple[int, Any]] = []
        first = threading.Thread(
            target=lambda: results.append(api.call("POST", f"/api/dlq/{entry['id']}/retry"))
        )
        first.start()
        assert entered.wait(10)
        status, body = api.call("POST", f"/api/dlq/{entry['id']}/retry")
        assert status == 409, body
        assert "is being retried already" in body["error"]
        release.set()
        first.join(10)
        assert results == [(200, {"id": entry["id"], "delivered": True})]
        assert engine.dlq() == []


def test_a_short_or_missing_admin_token_fails_the_start(
    registry: fraiseql.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    declare_order()
    config = {"observers": {"backend": "in_memory", "admin_token_env": "FRAISEQL_TEST_ADMIN_TOKEN"}}
    monkeypatch.delenv("FRAISEQL_TEST_ADMIN_TOKEN", raising=False)
    with pytest.raises(fraiseql.ConfigError, match="FRAISEQL_TEST_ADMIN_TOKEN is not set"):
        fraiseql.Engine(config, http_port=0).start()
    monkeypatch.setenv("FRAISEQL_TEST_ADMIN_TOKEN", "short")
    with pytest.raises(fraiseql.ConfigError, match="shorter than 16 characters"):
        fraiseql.Engine(config, http_port=0).start()
