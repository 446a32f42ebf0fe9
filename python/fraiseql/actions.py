"""Builders for the built-in actions. Each returns the same table a `[[observers.handlers]]`
entry takes under `actions`, so Python and TOML declarations are validated by one parser."""

from __future__ import annotations

from typing import Any, Literal


def _require_one(kind: str, **options: str | None) -> None:
    given = [k for k, v in options.items() if v]
    if len(given) != 1:
        names = " or ".join(options)
        raise ValueError(f"fraiseql.{kind}() needs exactly one of {names}, got {len(given)}")


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def webhook(
    url: str | None = None,
    *,
    url_env: str | None = None,
    headers: dict[str, str] | None = None,
    body_template: str | None = None,
    secret_env: str | None = None,
    signing_secret_env: str | None = None,
    format: Literal["json", "cloudevents"] | None = None,
    source: str | None = None,
    timeout_ms: int | None = None,
) -> dict[str, Any]:
    """HTTP POST of the change (spec payload, `body_template`, or a CloudEvent with
    `format="cloudevents"`). `signing_secret_env` names the variable holding a Standard
    Webhooks secret (`whsec_…`); `secret_env` the original `X-Fraiseql-Signature` one.
    Prefer `url_env` for secrets."""
    _require_one("webhook", url=url, url_env=url_env)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError(f"fraiseql.webhook(url=...) must start with http:// or https://, got {url!r}")
    if headers is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise TypeError("fraiseql.webhook(headers=...) must map str to str")
    if timeout_ms is not None and timeout_ms < 1:
        raise ValueError("fraiseql.webhook(timeout_ms=...) must be at least 1")
    return _clean(
        {
            "type": "webhook",
            "url": url,
            "url_env": url_env,
            "headers": headers,
            "body_template": body_template,
            "secret_env": secret_env,
            "signing_secret_env": signing_secret_env,
            "format": format,
            "source": source,
            "timeout_ms": timeout_ms,
        }
    )


def slack(
    webhook_url: str | None = None,
    *,
    webhook_url_env: str | None = None,
    channel: str | None = None,
    message: str,
) -> dict[str, Any]:
    """A Slack incoming-webhook message; `{field}` in `message` is replaced from the row."""
    _require_one("slack", webhook_url=webhook_url, webhook_url_env=webhook_url_env)
    if channel is not None and not channel.startswith(("#", "@")):
        raise ValueError(f"fraiseql.slack(channel=...) must start with # or @, got {channel!r}")
    if not message:
        raise ValueError("fraiseql.slack(message=...) must not be empty")
    return _clean(
        {
            "type": "slack",
            "webhook_url": webhook_url,
            "webhook_url_env": webhook_url_env,
            "channel": channel,
            "message": message,
        }
    )


def email(
    *,
    from_: str,
    to: str | list[str],
    subject: str,
    body_template: str,
    smtp_host: str | None = None,
    smtp_host_env: str | None = None,
    smtp_port: int = 587,
    smtp_user_env: str | None = None,
    smtp_password_env: str | None = None,
    tls: Literal["required", "opportunistic", "none"] = "required",
) -> dict[str, Any]:
    """An email over SMTP; `{field}` in `subject` and `body_template` is replaced from the row."""
    _require_one("email", smtp_host=smtp_host, smtp_host_env=smtp_host_env)
    recipients = [to] if isinstance(to, str) else list(to)
    if not recipients:
        raise ValueError("fraiseql.email(to=...) needs at least one recipient")
    for addr in [from_, *recipients]:
        if "@" not in addr:
            raise ValueError(f"fraiseql.email(): {addr!r} is not an email address")
    if tls not in ("required", "opportunistic", "none"):
        raise ValueError(f"fraiseql.email(tls=...) must be required, opportunistic or none, got {tls!r}")
    if not 0 < smtp_port < 65536:
        raise ValueError(f"fraiseql.email(smtp_port=...) must be a TCP port, got {smtp_port}")
    return _clean(
        {
            "type": "email",
            "from": from_,
            "to": recipients,
            "subject": subject,
            "body_template": body_template,
            "smtp_host": smtp_host,
            "smtp_host_env": smtp_host_env,
            "smtp_port": smtp_port,
            "smtp_user_env": smtp_user_env,
            "smtp_password_env": smtp_password_env,
            "tls": tls,
        }
    )
