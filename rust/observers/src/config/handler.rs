//! `[[observers.handlers]]`: handlers, retry, checkpoint and actions.

use std::collections::HashMap;

use super::interp::is_env_name;
use super::node::{quote_short, Entry, Kind, Node};
use super::reader::{Ctx, Range};
use super::{
    validate_sql_identifier, ActionConfig, BackoffStrategy, CheckpointConfig, EmailConfig,
    EmailTls, HandlerConfig, RetryConfig, SlackConfig, WebhookConfig, WebhookFormat,
    DEFAULT_IDEMPOTENCY_TABLE, DEFAULT_SMTP_PORT, DEFAULT_WEBHOOK_TIMEOUT_MS,
};

const ACTION_TYPES: &[&str] = &["webhook", "slack", "email"];

/// `Order` → `order`, `OrderItem` → `order_item`, `HTTPRequest` → `http_request`.
pub(crate) fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = i.checked_sub(1).map(|p| chars[p]);
            let next = chars.get(i + 1);
            let boundary = match prev {
                Some(p) if p.is_lowercase() || p.is_ascii_digit() => true,
                Some(p) if p.is_uppercase() => next.is_some_and(|n| n.is_lowercase()),
                _ => false,
            };
            if boundary && !out.ends_with('_') {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Normalizes an event name: `INSERT|UPDATE|DELETE` in any case, or `create|update|delete`.
pub(crate) fn normalize_event(s: &str) -> Option<&'static str> {
    match s.to_ascii_lowercase().as_str() {
        "insert" | "create" => Some("INSERT"),
        "update" => Some("UPDATE"),
        "delete" => Some("DELETE"),
        _ => None,
    }
}

/// Reads handlers from `observers.handlers`, checking that names are unique.
pub(crate) fn handlers(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Vec<HandlerConfig> {
    let Some(items) = ctx.array(node, path, "an array of tables ([[observers.handlers]])") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let handler = handler(ctx, item, &item_path, None, false);
        // Checked on the raw name, so that a duplicate is reported along with other errors.
        let name = match &item.kind {
            Kind::Table(entries) => entries.iter().find(|e| e.key == "name"),
            _ => None,
        };
        if let Some(Entry {
            value: Node {
                kind: Kind::Str(name),
                line,
            },
            ..
        }) = name
        {
            if let Some(first) = seen.get(name) {
                ctx.error(
                    &format!("{item_path}.name"),
                    *line,
                    format!(
                        "duplicate handler name {} (first defined at {first}); handler names \
                         must be unique",
                        quote_short(name)
                    ),
                );
                continue;
            }
            let origin = match item.line {
                Some(l) => format!("{}:{l}", ctx.file),
                None => ctx.file.clone(),
            };
            seen.insert(name.clone(), origin);
        }
        out.extend(handler);
    }
    out
}

/// Reads one handler. `origin` defaults to `file:line` of the handler's table.
/// Reads one handler. `own_action`: the declaration brings an action of its own (a Python
/// function), so `actions` may be absent.
pub(crate) fn handler(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    origin: Option<&str>,
    own_action: bool,
) -> Option<HandlerConfig> {
    let before = ctx.errors.len();
    let t = ctx.table(node, path)?;
    let origin = match (origin, t.line) {
        (Some(o), _) => o.to_string(),
        (None, Some(line)) => format!("{}:{line}", ctx.file),
        (None, None) => ctx.file.clone(),
    };

    let name = required(
        ctx,
        &t,
        "name",
        "the handler's name, e.g. \"on_order_shipped\"",
    )
    .and_then(|n| {
        let s = ctx.nonempty(n, &t.path("name"))?;
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            ctx.error(
                &t.path("name"),
                n.line,
                format!("expected a name without spaces, found {}", quote_short(&s)),
            );
            return None;
        }
        Some(s)
    });

    let entity =
        required(ctx, &t, "entity", "the entity type name, e.g. \"Order\"").and_then(|n| {
            let s = ctx.nonempty(n, &t.path("entity"))?;
            if !is_env_name(&s) {
                ctx.error(
                    &t.path("entity"),
                    n.line,
                    format!(
                        "expected an entity type name (letters, digits and _, not starting \
                         with a digit), found {}",
                        quote_short(&s)
                    ),
                );
                return None;
            }
            Some(s)
        });

    let table = match t.get("table") {
        Some(n) => {
            ctx.nonempty(n, &t.path("table"))
                .and_then(|s| match validate_sql_identifier(&s) {
                    Ok(()) => Some(s),
                    Err(e) => {
                        ctx.error(&t.path("table"), n.line, e);
                        None
                    }
                })
        }
        None => entity.as_ref().map(|e| format!("tb_{}", snake_case(e))),
    };

    let event = required(ctx, &t, "event", "INSERT, UPDATE or DELETE").and_then(|n| {
        ctx.choice(
            n,
            &t.path("event"),
            &["INSERT", "UPDATE", "DELETE"],
            normalize_event,
        )
    });

    let condition = match t.get("condition") {
        Some(n) => {
            let c = ctx.string(n, &t.path("condition"));
            match c {
                Some(c) if c.trim().is_empty() => {
                    ctx.error(
                        &t.path("condition"),
                        n.line,
                        "expected a condition expression, found an empty string \
                         (omit the key to run on every event)",
                    );
                    None
                }
                Some(c) => Some(Some(c)),
                None => None,
            }
        }
        None => Some(None),
    };

    let retry = match t.get("retry") {
        Some(n) => retry(ctx, n, &t.path("retry")),
        None => Some(RetryConfig::default()),
    };
    let checkpoint = match t.get("checkpoint") {
        Some(n) => checkpoint(ctx, n, &t.path("checkpoint")),
        None => Some(CheckpointConfig::AtLeastOnce),
    };
    let ordering = match t.get("ordering") {
        Some(n) => ctx
            .choice(n, &t.path("ordering"), &["per_key", "none"], parse_ordering)
            .map(Some),
        None => Some(None),
    };
    let order_key = match t.get("order_key") {
        Some(n) => {
            let path = t.path("order_key");
            ctx.array(n, &path, "an array of column names, e.g. [\"id\"]")
                .and_then(|items| {
                    let mut columns = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        let p = format!("{path}[{i}]");
                        let column = ctx.nonempty(item, &p)?;
                        if !is_env_name(&column.to_ascii_uppercase()) {
                            ctx.error(
                                &p,
                                item.line,
                                format!(
                                    "expected a column name (letters, digits and _), found {}",
                                    quote_short(&column)
                                ),
                            );
                            return None;
                        }
                        columns.push(column);
                    }
                    Some(Some(columns))
                })
        }
        None => Some(None),
    };
    // The observer's own function (a Python handler): how long one call may take.
    let timeout_ms = match t.get("timeout_ms") {
        Some(n) => ctx
            .int(n, &t.path("timeout_ms"), Range::Between(1, 86_400_000))
            .map(|v| Some(u64::try_from(v).unwrap_or(u64::MAX))),
        None => Some(None),
    };

    let actions = match t.get("actions") {
        Some(n) => {
            let apath = t.path("actions");
            match ctx.array(n, &apath, "an array of action tables") {
                Some([]) => {
                    ctx.error(
                        &apath,
                        n.line,
                        "expected at least one action (webhook, slack or email), found an empty array",
                    );
                    None
                }
                Some(items) => {
                    let mut out = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        if let Some(a) = action(ctx, item, &format!("{apath}[{i}]")) {
                            out.push(a);
                        }
                    }
                    Some(out)
                }
                None => None,
            }
        }
        None if own_action => Some(Vec::new()),
        None => {
            ctx.error(
                &t.path("actions"),
                t.line,
                "required key is missing: a handler needs at least one action \
                 (actions = [{ type = \"webhook\", ... }] or [[observers.handlers.actions]] tables)",
            );
            None
        }
    };

    if ctx.errors.len() > before {
        return None;
    }
    Some(HandlerConfig {
        name: name?,
        entity: entity?,
        table: table?,
        event: event?.to_string(),
        condition: condition?,
        retry: retry?,
        checkpoint: checkpoint?,
        actions: actions?,
        timeout_ms: timeout_ms?,
        ordering: ordering?,
        order_key: order_key?,
        origin,
    })
}

fn required<'n>(
    ctx: &mut Ctx<'_>,
    t: &super::reader::Tbl<'n>,
    key: &str,
    expected: &str,
) -> Option<&'n Node> {
    let n = t.get(key);
    if n.is_none() {
        ctx.error(
            &t.path(key),
            t.line,
            format!("required key is missing (expected {expected})"),
        );
    }
    n
}

/// Reads a retry table.
pub(crate) fn retry(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<RetryConfig> {
    let before = ctx.errors.len();
    let t = ctx.table(node, path)?;
    let mut r = RetryConfig::default();
    if let Some(n) = t.get("max_attempts") {
        if let Some(v) = ctx.int(
            n,
            &t.path("max_attempts"),
            Range::Between(1, i128::from(u32::MAX)),
        ) {
            r.max_attempts = u32::try_from(v).unwrap_or(u32::MAX);
        }
    }
    if let Some(n) = t.get("backoff_strategy") {
        if let Some(v) = ctx.choice(
            n,
            &t.path("backoff_strategy"),
            &["fixed", "linear", "exponential"],
            |s| match s.to_ascii_lowercase().as_str() {
                "fixed" => Some(BackoffStrategy::Fixed),
                "linear" => Some(BackoffStrategy::Linear),
                "exponential" => Some(BackoffStrategy::Exponential),
                _ => None,
            },
        ) {
            r.backoff_strategy = v;
        }
    }
    let initial = t.get("initial_delay_ms").and_then(|n| {
        ctx.int(n, &t.path("initial_delay_ms"), Range::NonNegative)
            .map(|v| (v, n.line))
    });
    let max = t.get("max_delay_ms").and_then(|n| {
        ctx.int(n, &t.path("max_delay_ms"), Range::NonNegative)
            .map(|v| (v, n.line))
    });
    if let Some((v, _)) = initial {
        r.initial_delay_ms = u64::try_from(v).unwrap_or(u64::MAX);
    }
    if let Some((v, _)) = max {
        r.max_delay_ms = u64::try_from(v).unwrap_or(u64::MAX);
    }
    if r.max_delay_ms < r.initial_delay_ms && ctx.errors.len() == before {
        let (key, line) = match (max, initial) {
            (Some((_, line)), _) => ("max_delay_ms", line),
            (None, Some((_, line))) => ("initial_delay_ms", line),
            (None, None) => ("max_delay_ms", t.line),
        };
        ctx.error(
            &t.path(key),
            line,
            format!(
                "max_delay_ms ({}) must be at least initial_delay_ms ({})",
                r.max_delay_ms, r.initial_delay_ms
            ),
        );
    }
    if let Some(n) = t.get("jitter") {
        if let Some(v) = ctx.boolean(n, &t.path("jitter")) {
            r.jitter = v;
        }
    }
    (ctx.errors.len() == before).then_some(r)
}

fn strategy_of(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "at_least_once" | "atleastonce" => Some(false),
        "effectively_once" | "effectivelyonce" => Some(true),
        _ => None,
    }
}

/// Reads a checkpoint: `{ strategy = "...", idempotency_table = "..." }` or just the strategy
/// name as a string.
pub(crate) fn checkpoint(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<CheckpointConfig> {
    const SHOWN: &[&str] = &["at_least_once", "effectively_once"];
    if let Kind::Str(_) = node.kind {
        let effectively = ctx.choice(node, path, SHOWN, strategy_of)?;
        return Some(if effectively {
            CheckpointConfig::EffectivelyOnce {
                idempotency_table: DEFAULT_IDEMPOTENCY_TABLE.to_string(),
            }
        } else {
            CheckpointConfig::AtLeastOnce
        });
    }
    let before = ctx.errors.len();
    let t = ctx.table(node, path)?;
    let effectively = match t.get("strategy") {
        Some(n) => ctx.choice(n, &t.path("strategy"), SHOWN, strategy_of),
        None => Some(false),
    };
    let table = t.get("idempotency_table").and_then(|n| {
        let p = t.path("idempotency_table");
        let s = ctx.nonempty(n, &p)?;
        match validate_sql_identifier(&s) {
            Ok(()) => Some((s, n.line)),
            Err(e) => {
                ctx.error(&p, n.line, e);
                None
            }
        }
    });
    match (effectively, table) {
        (Some(false), Some((_, line))) => {
            ctx.error(
                &t.path("idempotency_table"),
                line,
                "idempotency_table is only used with strategy = \"effectively_once\" \
                 (strategy is \"at_least_once\", the default)",
            );
            None
        }
        _ if ctx.errors.len() > before => None,
        (Some(true), table) => Some(CheckpointConfig::EffectivelyOnce {
            idempotency_table: table
                .map_or_else(|| DEFAULT_IDEMPOTENCY_TABLE.to_string(), |(s, _)| s),
        }),
        (Some(false), None) => Some(CheckpointConfig::AtLeastOnce),
        (None, _) => None,
    }
}

/// Reads one action table, dispatching on `type`.
pub(crate) fn action(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<ActionConfig> {
    let Kind::Table(entries) = &node.kind else {
        ctx.type_error(
            node,
            path,
            "an action table, e.g. { type = \"webhook\", url = \"...\" }",
        );
        return None;
    };
    let type_path = format!("{path}.type");
    let Some(type_node) = entries.iter().find(|e| e.key == "type").map(|e| &e.value) else {
        ctx.error(
            &type_path,
            node.line,
            "required key is missing (expected one of \"webhook\", \"slack\", \"email\")",
        );
        return None;
    };
    let kind = ctx.choice(type_node, &type_path, ACTION_TYPES, |s| {
        ACTION_TYPES
            .iter()
            .copied()
            .find(|t| t.eq_ignore_ascii_case(s))
    })?;
    let before = ctx.errors.len();
    let action = match kind {
        "webhook" => webhook(ctx, node, path).map(ActionConfig::Webhook),
        "slack" => slack(ctx, node, path).map(ActionConfig::Slack),
        _ => email(ctx, node, path).map(ActionConfig::Email),
    };
    if ctx.errors.len() > before {
        None
    } else {
        action
    }
}

/// Exactly one of a literal key and its `_env` variant.
fn one_of(
    ctx: &mut Ctx<'_>,
    t: &super::reader::Tbl<'_>,
    literal: &str,
    env_key: &str,
    what: &str,
    read_literal: impl FnOnce(&mut Ctx<'_>, &Node, &str) -> Option<String>,
) -> (Option<String>, Option<String>) {
    let lit = t.get(literal);
    let env = t.get(env_key);
    match (lit, env) {
        (None, None) => {
            ctx.error(
                &t.path(literal),
                t.line,
                format!("{what}: exactly one of {literal} or {env_key} must be set, found neither"),
            );
            (None, None)
        }
        (Some(_), Some(e)) => {
            ctx.error(
                &t.path(env_key),
                e.line,
                format!("{what}: {literal} and {env_key} are mutually exclusive; set only one"),
            );
            (None, None)
        }
        (Some(l), None) => (read_literal(ctx, l, &t.path(literal)), None),
        (None, Some(e)) => (None, ctx.env_name(e, &t.path(env_key))),
    }
}

fn optional_env_name(ctx: &mut Ctx<'_>, t: &super::reader::Tbl<'_>, key: &str) -> Option<String> {
    t.get(key).and_then(|n| ctx.env_name(n, &t.path(key)))
}

fn webhook(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<WebhookConfig> {
    let t = ctx.table(node, path)?;
    t.known(&["type"]); // read by `action` to choose this reader
    let (url, url_env) = one_of(ctx, &t, "url", "url_env", "webhook action", |c, n, p| {
        c.http_url(n, p)
    });
    let mut headers = Vec::new();
    if let Some(n) = t.get("headers") {
        let hpath = t.path("headers");
        if let Some(entries) = ctx.any_table(n, &hpath) {
            for e in entries {
                let p = super::reader::join(&hpath, &e.key);
                let valid_name = !e.key.is_empty()
                    && e.key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
                if !valid_name {
                    ctx.error(
                        &p,
                        e.line,
                        "expected an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)",
                    );
                    continue;
                }
                let Some(v) = ctx.string(&e.value, &p) else {
                    continue;
                };
                if v.contains(['\r', '\n', '\0']) {
                    ctx.error(
                        &p,
                        e.value.line,
                        "header values must not contain line breaks or NUL characters",
                    );
                    continue;
                }
                headers.push((e.key.clone(), v));
            }
        }
    }
    let body_template = t
        .get("body_template")
        .and_then(|n| ctx.string(n, &t.path("body_template")));
    let secret_env = optional_env_name(ctx, &t, "secret_env");
    let signing_secret_env = optional_env_name(ctx, &t, "signing_secret_env");
    let format = t.get("format").map_or(Some(WebhookFormat::Json), |n| {
        ctx.choice(n, &t.path("format"), &["json", "cloudevents"], |s| match s
            .to_ascii_lowercase()
            .as_str()
        {
            "json" => Some(WebhookFormat::Json),
            "cloudevents" => Some(WebhookFormat::CloudEvents),
            _ => None,
        })
    });
    let source = t.get("source").and_then(|n| {
        let p = t.path("source");
        let s = ctx.string(n, &p)?;
        match super::check_uri_reference(&s) {
            Ok(()) => Some(s),
            Err(e) => {
                ctx.error(&p, n.line, e);
                None
            }
        }
    });
    if format == Some(WebhookFormat::CloudEvents) && body_template.is_some() {
        let line = t.get("body_template").and_then(|n| n.line);
        ctx.error(
            &t.path("body_template"),
            line,
            "format = \"cloudevents\" builds the body itself; remove body_template (or use \
             format = \"json\")",
        );
    }
    let timeout_ms = t
        .get("timeout_ms")
        .map_or(Some(DEFAULT_WEBHOOK_TIMEOUT_MS), |n| {
            ctx.int(n, &t.path("timeout_ms"), Range::Positive)
                .map(|v| u64::try_from(v).unwrap_or(u64::MAX))
        });
    Some(WebhookConfig {
        url,
        url_env,
        headers,
        body_template,
        secret_env,
        signing_secret_env,
        format: format?,
        source,
        timeout_ms: timeout_ms?,
    })
}

fn slack(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<SlackConfig> {
    let t = ctx.table(node, path)?;
    t.known(&["type"]); // read by `action` to choose this reader
    let (webhook_url, webhook_url_env) = one_of(
        ctx,
        &t,
        "webhook_url",
        "webhook_url_env",
        "slack action",
        |c, n, p| c.http_url(n, p),
    );
    let channel = match t.get("channel") {
        Some(n) => {
            let p = t.path("channel");
            ctx.nonempty(n, &p).and_then(|s| {
                let ok = (s.starts_with('#') || s.starts_with('@')) && s.chars().count() > 1;
                if ok {
                    Some(s)
                } else {
                    ctx.error(
                        &p,
                        n.line,
                        format!(
                            "expected a channel starting with # or a user starting with @, found {}",
                            quote_short(&s)
                        ),
                    );
                    None
                }
            })
        }
        None => None,
    };
    let message = match t.get("message") {
        Some(n) => ctx.nonempty(n, &t.path("message")),
        None => {
            ctx.error(
                &t.path("message"),
                t.line,
                "required key is missing (expected the message text, e.g. \"Order {id} shipped\")",
            );
            None
        }
    };
    Some(SlackConfig {
        webhook_url,
        webhook_url_env,
        channel,
        message: message?,
    })
}

fn email_address(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<String> {
    let s = ctx.nonempty(node, path)?;
    let addr = match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s.as_str(),
    };
    let valid = matches!(addr.split_once('@'), Some((l, d)) if !l.trim().is_empty() && !d.trim().is_empty());
    if valid {
        Some(s)
    } else {
        ctx.error(
            path,
            node.line,
            format!(
                "expected an email address like \"ops@example.com\", found {}",
                quote_short(&s)
            ),
        );
        None
    }
}

fn email(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<EmailConfig> {
    let t = ctx.table(node, path)?;
    t.known(&["type"]); // read by `action` to choose this reader
    let from = required(ctx, &t, "from", "the sender address")
        .and_then(|n| email_address(ctx, n, &t.path("from")));
    let to = required(ctx, &t, "to", "a recipient address or an array of them").and_then(|n| {
        let p = t.path("to");
        match &n.kind {
            Kind::Str(_) => email_address(ctx, n, &p).map(|a| vec![a]),
            Kind::Array(items) if items.is_empty() => {
                ctx.error(
                    &p,
                    n.line,
                    "expected at least one recipient, found an empty array",
                );
                None
            }
            Kind::Array(items) => {
                let all: Vec<Option<String>> = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| email_address(ctx, item, &format!("{p}[{i}]")))
                    .collect();
                all.into_iter().collect()
            }
            _ => {
                ctx.type_error(n, &p, "an email address or an array of them");
                None
            }
        }
    });
    let subject = required(ctx, &t, "subject", "the subject line")
        .and_then(|n| ctx.nonempty(n, &t.path("subject")));
    let body_template = required(ctx, &t, "body_template", "the body text")
        .and_then(|n| ctx.nonempty(n, &t.path("body_template")));
    let (smtp_host, smtp_host_env) = one_of(
        ctx,
        &t,
        "smtp_host",
        "smtp_host_env",
        "email action",
        |c, n, p| c.nonempty(n, p),
    );
    let smtp_port = t.get("smtp_port").map_or(Some(DEFAULT_SMTP_PORT), |n| {
        ctx.int(n, &t.path("smtp_port"), Range::Between(1, 65535))
            .map(|v| u16::try_from(v).unwrap_or(DEFAULT_SMTP_PORT))
    });
    let smtp_user_env = optional_env_name(ctx, &t, "smtp_user_env");
    let smtp_password_env = optional_env_name(ctx, &t, "smtp_password_env");
    match (t.get("smtp_user_env"), t.get("smtp_password_env")) {
        (Some(n), None) => ctx.error(
            &t.path("smtp_password_env"),
            n.line,
            "smtp_user_env is set but smtp_password_env is not; set both or neither",
        ),
        (None, Some(n)) => ctx.error(
            &t.path("smtp_user_env"),
            n.line,
            "smtp_password_env is set but smtp_user_env is not; set both or neither",
        ),
        _ => {}
    }
    let tls = t.get("tls").map_or(Some(EmailTls::Required), |n| {
        ctx.choice(
            n,
            &t.path("tls"),
            &["required", "opportunistic", "none"],
            |s| match s.to_ascii_lowercase().as_str() {
                "required" => Some(EmailTls::Required),
                "opportunistic" => Some(EmailTls::Opportunistic),
                "none" => Some(EmailTls::None),
                _ => None,
            },
        )
    });
    Some(EmailConfig {
        from: from?,
        to: to?,
        subject: subject?,
        body_template: body_template?,
        smtp_host,
        smtp_host_env,
        smtp_port: smtp_port?,
        smtp_user_env,
        smtp_password_env,
        tls: tls?,
    })
}

/// `per_key` | `none` (any case; `per-key` too).
pub(super) fn parse_ordering(s: &str) -> Option<super::Ordering> {
    match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "per_key" => Some(super::Ordering::PerKey),
        "none" => Some(super::Ordering::None),
        _ => None,
    }
}
