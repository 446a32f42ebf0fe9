//! Reading `fraiseql.toml` and `fraiseql-observer.toml`, the `FRAISEQL_NATS_*` overrides and
//! the cross-field checks.

use super::error::ConfigError;
use super::handler;
use super::nats_auth;
use super::node::{self, quote_short, Node, SyntaxError};
use super::reader::{parse_int, url_shape, Ctx, Range};

use super::{
    validate_sql_identifier, Backend, Config, ConfigErrors, NatsConfig, RedisConfig,
    NATS_URL_REQUIRED, RUN_BRIDGE_REQUIRES_NATS,
};

const BACKENDS: &[&str] = &["postgres", "nats", "redis", "in_memory"];

/// File label used for errors in `FRAISEQL_NATS_*` overrides.
const ENV_LABEL: &str = "environment";

/// Where a setting came from, for errors about combinations of settings.
#[derive(Debug, Clone)]
struct Origin {
    file: String,
    key: String,
    line: Option<usize>,
}

impl Origin {
    fn new(ctx: &Ctx<'_>, key: &str, line: Option<usize>) -> Self {
        Self {
            file: ctx.file.clone(),
            key: key.to_string(),
            line,
        }
    }

    fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file.clone(), self.key.clone(), self.line, message)
    }

    /// Names `other` as seen from this setting: `key (line N)` in the same file, else
    /// `key in file` (or the variable's name).
    fn other(&self, other: &Origin) -> String {
        match other.line {
            Some(line) if other.file == self.file => format!("{} (line {line})", other.key),
            _ => other.describe(),
        }
    }

    fn describe(&self) -> String {
        if self.file == ENV_LABEL {
            self.key.clone()
        } else {
            format!("{} in {}", self.key, self.file)
        }
    }
}

#[derive(Debug, Default)]
struct Provenance {
    backend: Option<Origin>,
    backend_invalid: bool,
    nats_url: Option<Origin>,
    nats_credentials_file: Option<Origin>,
    nats_nkey_file: Option<Origin>,
    redis_url: Option<Origin>,
    run_bridge: Option<Origin>,
    bridge_channel_set: bool,
    syntax_error: bool,
    /// `[database] url` is in a file (else `DATABASE_URL` is read).
    database_url_set: bool,
    /// The variable the database URL comes from: `DATABASE_URL` when the file sets none, or
    /// `VAR` when it is `"${VAR}"` (with or without a default).
    database_url_env: Option<String>,
    /// A URL was given but could not be read (already reported): no "requires url" error.
    nats_url_failed: bool,
    redis_url_failed: bool,
}

pub(crate) fn from_sources(
    main: Option<(&str, &str)>,
    runtime: Option<(&str, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let (cfg, _, errors) = read_sources(main, runtime, env);
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// What a command must know of a config before it can load it whole: see [`ConfigFacts`].
/// Read from what could be read, whatever else is wrong (an unset variable, say).
pub(crate) fn facts(
    main: Option<(&str, &str)>,
    runtime: Option<(&str, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> super::ConfigFacts {
    let (cfg, prov, _) = read_sources(main, runtime, env);
    let o = &cfg.observers;
    super::ConfigFacts {
        backend: o.backend,
        uses_nats: o.backend == Backend::Nats || o.run_bridge,
        nats_url: o.nats.url.clone(),
        database_url_env: prov.database_url_env,
    }
}

/// Reads every source into a config, with every problem found and where settings came from.
fn read_sources(
    main: Option<(&str, &str)>,
    runtime: Option<(&str, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Config, Provenance, Vec<ConfigError>) {
    let mut cfg = Config::default_with_backend(Backend::Postgres);
    let mut prov = Provenance::default();
    let mut errors = Vec::new();

    type Loader = fn(&mut Ctx<'_>, &Node, &mut Config, &mut Provenance);
    let sources: [(Option<(&str, &str)>, Loader); 2] = [(main, load_main), (runtime, load_runtime)];
    for (source, loader) in sources {
        let Some((label, text)) = source else {
            continue;
        };
        match node::parse_document(text) {
            Ok(root) => {
                let mut ctx = Ctx::new(label, env);
                loader(&mut ctx, &root, &mut cfg, &mut prov);
                errors.extend(ctx.finish());
            }
            Err(syntax) => {
                prov.syntax_error = true;
                errors.extend(syntax.into_iter().map(|e| syntax_error(label, e)));
            }
        }
    }
    if !prov.bridge_channel_set {
        cfg.observers.bridge.notify_channel = cfg.observers.notify_channel.clone();
    }

    env_overrides(env, &mut cfg.observers.nats, &mut prov, &mut errors);

    if !prov.database_url_set {
        cfg.database.url = env("DATABASE_URL").filter(|u| !u.trim().is_empty());
        prov.database_url_env = Some("DATABASE_URL".to_owned());
    }

    let url_was_empty = cfg
        .observers
        .nats
        .url
        .as_ref()
        .is_some_and(|u| u.trim().is_empty());
    if url_was_empty {
        cfg.observers.nats.url = None;
    }

    if !prov.syntax_error {
        cross_checks(&cfg, &prov, url_was_empty, &mut errors);
        nats_auth_checks(&cfg.observers.nats, &prov, &mut errors);
    }
    (cfg, prov, errors)
}

fn syntax_error(label: &str, e: SyntaxError) -> ConfigError {
    ConfigError {
        file: label.to_string(),
        key: String::new(),
        line: e.line,
        column: e.column,
        message: format!("TOML syntax error: {}", e.message),
    }
}

fn cross_checks(
    cfg: &Config,
    prov: &Provenance,
    url_was_empty: bool,
    errors: &mut Vec<ConfigError>,
) {
    let o = &cfg.observers;
    if prov.backend_invalid {
        return;
    }
    let backend_origin = prov.backend.clone().unwrap_or_else(|| Origin {
        file: "configuration".to_string(),
        key: "observers.backend".to_string(),
        line: None,
    });
    match o.backend {
        Backend::Nats if o.nats.url.is_none() && !prov.nats_url_failed => {
            let hint = match (&prov.nats_url, url_was_empty) {
                (Some(origin), true) => format!("{} is empty", origin.describe()),
                _ => "set [observers.nats] url or observers.nats_url in fraiseql.toml, \
                      [transport.nats] url in fraiseql-observer.toml, or FRAISEQL_NATS_URL"
                    .to_string(),
            };
            errors.push(
                backend_origin.error(format!("{NATS_URL_REQUIRED} (backend is \"nats\"; {hint})")),
            );
        }
        Backend::Redis if o.redis_url.is_none() && !prov.redis_url_failed => {
            let hint = match &prov.redis_url {
                Some(origin) => format!("{} is empty", origin.describe()),
                None => "e.g. redis_url = \"${REDIS_URL}\" in [observers]".to_string(),
            };
            errors.push(backend_origin.error(format!(
                "redis backend requires observers.redis_url to be set ({hint})"
            )));
        }
        _ => {}
    }
    if o.run_bridge && o.backend != Backend::Nats {
        let origin = prov.run_bridge.clone().unwrap_or_else(|| Origin {
            file: "configuration".to_string(),
            key: "observers.run_bridge".to_string(),
            line: None,
        });
        let from = match &prov.backend {
            Some(b) => format!("set by {}", b.describe()),
            None => "the default".to_string(),
        };
        errors.push(origin.error(format!(
            "{RUN_BRIDGE_REQUIRES_NATS} (backend is \"{}\", {from}; set backend = \"nats\")",
            o.backend.as_str()
        )));
    }
}

/// `credentials_file` and `nkey_file` are two ways to authenticate, and so is a user, password
/// or token in the URL: only one of them may be set (after merging every source).
fn nats_auth_checks(nats: &NatsConfig, prov: &Provenance, errors: &mut Vec<ConfigError>) {
    let creds = nats
        .credentials_file
        .as_ref()
        .and(prov.nats_credentials_file.as_ref());
    let nkey = nats.nkey_file.as_ref().and(prov.nats_nkey_file.as_ref());
    if let (Some(creds), Some(nkey)) = (creds, nkey) {
        errors.push(nkey.error(format!(
            "conflicts with {}: a credentials file already holds the user's nkey seed (with its \
             JWT); set only one of credentials_file and nkey_file",
            nkey.other(creds)
        )));
        return;
    }
    let Some(file) = creds.or(nkey) else {
        return;
    };
    if nats.url.as_deref().is_some_and(url_has_credentials) {
        let url = match &prov.nats_url {
            Some(origin) => format!(", set by {}", file.other(origin)),
            None => String::new(),
        };
        errors.push(file.error(format!(
            "cannot be combined with a user, password or token in the NATS URL{url}; \
             authenticate one way only"
        )));
    }
}

/// Whether any URL of the comma-separated list carries `user[:password]@` or `token@`.
fn url_has_credentials(urls: &str) -> bool {
    urls.split(',').any(|part| {
        let part = part.trim();
        let rest = part.find("://").map_or(part, |i| &part[i + 3..]);
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        rest[..end].contains('@')
    })
}

fn load_main(ctx: &mut Ctx<'_>, root: &Node, cfg: &mut Config, prov: &mut Provenance) {
    let Some(top) = ctx.table(root, "") else {
        return;
    };
    if let Some(db) = top.get("database") {
        if let Some(t) = ctx.table(db, "database") {
            if let Some(n) = t.get("url") {
                prov.database_url_set = true;
                prov.database_url_env = sole_reference(n);
                if let Some(url) = ctx.nonempty(n, &t.path("url")) {
                    cfg.database.url = Some(url);
                }
            }
        }
    }
    let Some(obs) = top.get("observers") else {
        return;
    };
    let Some(t) = ctx.table(obs, "observers") else {
        return;
    };
    let o = &mut cfg.observers;

    if let Some(n) = t.get("enabled") {
        if let Some(v) = ctx.boolean(n, &t.path("enabled")) {
            o.enabled = v;
        }
    }
    if let Some(n) = t.get("backend") {
        read_backend(ctx, n, &t.path("backend"), &mut o.backend, prov);
    }
    if let Some(n) = t.get("redis_url") {
        let path = t.path("redis_url");
        prov.redis_url = Some(Origin::new(ctx, &path, n.line));
        match ctx.string(n, &path) {
            Some(url) if url.trim().is_empty() => o.redis_url = None,
            Some(url) => match check_redis_url(url.trim()) {
                Ok(()) => o.redis_url = Some(url.trim().to_string()),
                Err(e) => {
                    ctx.error(&path, n.line, e);
                    prov.redis_url_failed = true;
                }
            },
            None => prov.redis_url_failed = true,
        }
    }
    if let Some(n) = t.get("max_dlq_size") {
        let path = t.path("max_dlq_size");
        match &n.kind {
            node::Kind::Int(0) => ctx.error(
                &path,
                n.line,
                "expected a positive integer, found 0 (omit the key for an unbounded DLQ)",
            ),
            _ => {
                if let Some(v) = ctx.int(n, &path, Range::Positive) {
                    o.max_dlq_size = Some(usize::try_from(v).unwrap_or(usize::MAX));
                }
            }
        }
    }
    if let Some(n) = t.get("run_bridge") {
        let path = t.path("run_bridge");
        if let Some(v) = ctx.boolean(n, &path) {
            o.run_bridge = v;
            prov.run_bridge = Some(Origin::new(ctx, &path, n.line));
        }
    }
    if let Some(n) = t.get("http_port") {
        if let Some(v) = ctx.int(n, &t.path("http_port"), Range::Between(0, 65535)) {
            o.http_port = u16::try_from(v).unwrap_or(o.http_port);
        }
    }
    if let Some(n) = t.get("auto_install") {
        if let Some(v) = ctx.boolean(n, &t.path("auto_install")) {
            o.auto_install = v;
        }
    }
    if let Some(n) = t.get("http_host") {
        if let Some(v) = ctx.nonempty(n, &t.path("http_host")) {
            if v.parse::<std::net::IpAddr>().is_ok() || v == "localhost" {
                o.http_host = v;
            } else {
                ctx.error(
                    &t.path("http_host"),
                    n.line,
                    format!(
                        "expected an IP address to bind (127.0.0.1, 0.0.0.0, ::), found {}",
                        super::node::quote_short(&v)
                    ),
                );
            }
        }
    }
    if let Some(n) = t.get("ordering") {
        if let Some(v) = ctx.choice(
            n,
            &t.path("ordering"),
            &["per_key", "none"],
            handler::parse_ordering,
        ) {
            o.ordering = v;
        }
    }
    if let Some(n) = t.get("shutdown_timeout_secs") {
        if let Some(v) = ctx.int(
            n,
            &t.path("shutdown_timeout_secs"),
            Range::Between(0, 86_400),
        ) {
            o.shutdown_timeout_secs = u64::try_from(v).unwrap_or(30);
        }
    }
    if let Some(n) = t.get("admin_token_env") {
        o.admin_token_env = ctx.env_name(n, &t.path("admin_token_env"));
    }
    if let Some(n) = t.get("blocked_after_secs") {
        if let Some(v) = ctx.int(n, &t.path("blocked_after_secs"), Range::Between(1, 86_400)) {
            o.blocked_after_secs = u64::try_from(v).unwrap_or(60);
        }
    }
    if let Some(n) = t.get("max_concurrency") {
        if let Some(v) = ctx.int(n, &t.path("max_concurrency"), Range::Positive) {
            o.max_concurrency = usize::try_from(v).unwrap_or(usize::MAX);
        }
    }
    if let Some(n) = t.get("queue_capacity") {
        if let Some(v) = ctx.int(n, &t.path("queue_capacity"), Range::Positive) {
            o.queue_capacity = usize::try_from(v).unwrap_or(usize::MAX);
        }
    }
    if let Some(n) = t.get("notify_channel") {
        if let Some(v) = checked(ctx, n, &t.path("notify_channel"), check_channel) {
            o.notify_channel = v;
        }
    }

    // `nats_url` is shorthand for `[observers.nats] url`; both given and different is an error.
    let table_url = match t.get("nats") {
        Some(n) => apply_nats(ctx, n, "observers.nats", &mut o.nats, prov),
        None => None,
    };
    if let Some(n) = t.get("nats_url") {
        let path = t.path("nats_url");
        let url = read_nats_url(ctx, n, &path);
        prov.nats_url_failed |= url.is_none();
        if let Some(url) = url {
            let origin = Origin::new(ctx, &path, n.line);
            match table_url {
                Some((other, other_origin)) if other.trim() != url.trim() => {
                    let at = other_origin
                        .line
                        .map_or_else(String::new, |l| format!(" (line {l})"));
                    ctx.error(
                        &path,
                        n.line,
                        format!(
                            "conflicts with observers.nats.url{at}: nats_url is shorthand for \
                             [observers.nats] url and the two differ; set only one"
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    o.nats.url = Some(url);
                    prov.nats_url = Some(origin);
                }
            }
        }
    }

    if let Some(n) = t.get("bridge") {
        if let Some(b) = ctx.table(n, "observers.bridge") {
            if let Some(n) = b.get("transport_name") {
                if let Some(v) = checked(ctx, n, &b.path("transport_name"), check_nats_name) {
                    o.bridge.transport_name = v;
                }
            }
            if let Some(n) = b.get("batch_size") {
                if let Some(v) = ctx.int(n, &b.path("batch_size"), Range::Positive) {
                    o.bridge.batch_size = usize::try_from(v).unwrap_or(usize::MAX);
                }
            }
            if let Some(n) = b.get("poll_interval_secs") {
                if let Some(v) =
                    ctx.int(n, &b.path("poll_interval_secs"), Range::Between(1, 86_400))
                {
                    o.bridge.poll_interval_secs = u64::try_from(v).unwrap_or(1);
                }
            }
            if let Some(n) = b.get("format") {
                if let Some(v) =
                    ctx.choice(n, &b.path("format"), &["json", "cloudevents"], |s| match s
                        .to_ascii_lowercase()
                        .as_str()
                    {
                        "json" => Some(super::MessageFormat::Json),
                        "cloudevents" => Some(super::MessageFormat::CloudEvents),
                        _ => None,
                    })
                {
                    o.bridge.format = v;
                }
            }
            if let Some(n) = b.get("notify_channel") {
                if let Some(v) = checked(ctx, n, &b.path("notify_channel"), check_channel) {
                    o.bridge.notify_channel = v;
                }
                prov.bridge_channel_set = true;
            }
        }
    }

    if let Some(n) = t.get("telemetry") {
        if let Some(c) = ctx.table(n, "observers.telemetry") {
            if let Some(n) = c.get("otlp_endpoint") {
                o.telemetry.otlp_endpoint = ctx.http_url(n, &c.path("otlp_endpoint"));
            }
            if let Some(n) = c.get("service_name") {
                if let Some(v) = ctx.nonempty(n, &c.path("service_name")) {
                    o.telemetry.service_name = v;
                }
            }
        }
    }
    if let Some(n) = t.get("cloudevents") {
        if let Some(c) = ctx.table(n, "observers.cloudevents") {
            if let Some(n) = c.get("source") {
                let p = c.path("source");
                if let Some(s) = ctx.string(n, &p) {
                    match super::check_uri_reference(&s) {
                        Ok(()) => o.cloudevents_source = Some(s),
                        Err(e) => ctx.error(&p, n.line, e),
                    }
                }
            }
        }
    }
    if let Some(n) = t.get("postgres") {
        load_postgres(ctx, n, &mut o.postgres);
    }
    if let Some(n) = t.get("redis") {
        apply_redis(ctx, n, &mut o.redis);
    }

    if let Some(n) = t.get("handlers") {
        o.handlers = handler::handlers(ctx, n, "observers.handlers");
    }
}

fn load_postgres(ctx: &mut Ctx<'_>, node: &Node, pg: &mut super::PostgresConfig) {
    let Some(p) = ctx.table(node, "observers.postgres") else {
        return;
    };
    if let Some(n) = p.get("listener_id") {
        if let Some(v) = checked(ctx, n, &p.path("listener_id"), check_listener_id) {
            pg.listener_id = v;
        }
    }
    if let Some(n) = p.get("batch_size") {
        if let Some(v) = ctx.int(n, &p.path("batch_size"), Range::Between(1, 100_000)) {
            pg.batch_size = usize::try_from(v).unwrap_or(1);
        }
    }
    if let Some(n) = p.get("poll_interval_ms") {
        if let Some(v) = ctx.int(
            n,
            &p.path("poll_interval_ms"),
            Range::Between(10, 3_600_000),
        ) {
            pg.poll_interval_ms = u64::try_from(v).unwrap_or(1000);
        }
    }
    if let Some(n) = p.get("listen") {
        if let Some(v) = ctx.boolean(n, &p.path("listen")) {
            pg.listen = v;
        }
    }
    if let Some(n) = p.get("skip_unchanged_updates") {
        if let Some(v) = ctx.boolean(n, &p.path("skip_unchanged_updates")) {
            pg.skip_unchanged_updates = v;
        }
    }
    if let Some(n) = p.get("capture") {
        if let Some(v) = ctx.choice(
            n,
            &p.path("capture"),
            &["auto", "logical", "trigger"],
            |s| match s.to_ascii_lowercase().as_str() {
                "auto" => Some(super::Capture::Auto),
                "logical" | "wal" => Some(super::Capture::Logical),
                "trigger" | "triggers" => Some(super::Capture::Trigger),
                _ => None,
            },
        ) {
            pg.capture = v;
        }
    }
    if let Some(n) = p.get("publication") {
        if let Some(v) = checked(ctx, n, &p.path("publication"), check_publication) {
            pg.publication = v;
        }
    }
    if let Some(n) = p.get("max_retained_wal") {
        if let Some(v) = ctx.size(n, &p.path("max_retained_wal")) {
            pg.max_retained_wal = v;
        }
    }
    if let Some(n) = p.get("retention") {
        if let Some(v) = ctx.duration(n, &p.path("retention")) {
            pg.retention = v;
        }
    }
    if let Some(n) = p.get("stall_warning_secs") {
        if let Some(v) = ctx.int(n, &p.path("stall_warning_secs"), Range::Between(1, 86_400)) {
            pg.stall_warning_secs = u64::try_from(v).unwrap_or(30);
        }
    }
}

/// Applies `[observers.redis]`.
fn apply_redis(ctx: &mut Ctx<'_>, node: &Node, redis: &mut RedisConfig) {
    let Some(t) = ctx.table(node, "observers.redis") else {
        return;
    };
    let names: [(&str, &mut String); 3] = [
        ("stream", &mut redis.stream),
        ("group", &mut redis.group),
        ("forwarder_name", &mut redis.forwarder_name),
    ];
    for (key, slot) in names {
        if let Some(n) = t.get(key) {
            if let Some(v) = checked(ctx, n, &t.path(key), check_redis_name) {
                *slot = v;
            }
        }
    }
    let ints: [(&str, Range, &mut u64); 4] = [
        ("maxlen", Range::Positive, &mut redis.maxlen),
        (
            "claim_idle_secs",
            Range::Between(1, 86_400),
            &mut redis.claim_idle_secs,
        ),
        ("max_deliver", Range::Positive, &mut redis.max_deliver),
        ("block_ms", Range::Between(1, 60_000), &mut redis.block_ms),
    ];
    for (key, range, slot) in ints {
        if let Some(n) = t.get(key) {
            if let Some(v) = ctx.int(n, &t.path(key), range) {
                *slot = u64::try_from(v).unwrap_or(u64::MAX);
            }
        }
    }
    if let Some(n) = t.get("batch_size") {
        if let Some(v) = ctx.int(n, &t.path("batch_size"), Range::Between(1, 10_000)) {
            redis.batch_size = usize::try_from(v).unwrap_or(256);
        }
    }
}

/// Redis stream, group and forwarder names: no spaces or control characters.
fn check_redis_name(s: &str) -> Result<(), String> {
    if let Some(bad) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "expected a name without spaces, found {} ({bad:?} is not allowed)",
            quote_short(s)
        ));
    }
    Ok(())
}

fn load_runtime(ctx: &mut Ctx<'_>, root: &Node, cfg: &mut Config, prov: &mut Provenance) {
    let Some(top) = ctx.table(root, "") else {
        return;
    };
    let Some(tr) = top.get("transport") else {
        return;
    };
    let Some(t) = ctx.table(tr, "transport") else {
        return;
    };
    if let Some(n) = t.get("backend") {
        read_backend(ctx, n, &t.path("backend"), &mut cfg.observers.backend, prov);
    }
    if let Some(n) = t.get("nats") {
        apply_nats(ctx, n, "transport.nats", &mut cfg.observers.nats, prov);
    }
}

fn read_backend(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    backend: &mut Backend,
    prov: &mut Provenance,
) {
    match ctx.choice(node, path, BACKENDS, Backend::parse) {
        Some(b) => {
            *backend = b;
            prov.backend = Some(Origin::new(ctx, path, node.line));
            prov.backend_invalid = false;
        }
        None => prov.backend_invalid = true,
    }
}

/// `VAR` when the value is exactly one reference, `"${VAR}"` or `"${VAR:-default}"`.
fn sole_reference(node: &Node) -> Option<String> {
    let node::Kind::Str(raw) = &node.kind else {
        return None;
    };
    let inner = raw.trim().strip_prefix("${")?.strip_suffix('}')?;
    let name = inner.split_once(":-").map_or(inner, |(name, _)| name);
    super::interp::is_env_name(name).then(|| name.to_owned())
}

/// Reads a string (interpolated, non-empty) and checks it with `check`.
fn checked(ctx: &mut Ctx<'_>, node: &Node, path: &str, check: Check) -> Option<String> {
    let s = ctx.nonempty(node, path)?;
    match check(&s) {
        Ok(()) => Some(s),
        Err(e) => {
            ctx.error(path, node.line, e);
            None
        }
    }
}

/// Reads a NATS URL; an empty value is kept (reported later only if the nats backend needs it).
fn read_nats_url(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<String> {
    let s = ctx.string(node, path)?;
    let s = s.trim();
    if s.is_empty() {
        return Some(String::new());
    }
    match check_nats_url(s) {
        Ok(()) => Some(s.to_string()),
        Err(e) => {
            ctx.error(path, node.line, e);
            None
        }
    }
}

/// Applies a `[*.nats]` table. Returns the URL it set, if any, with its origin.
fn apply_nats(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    nats: &mut NatsConfig,
    prov: &mut Provenance,
) -> Option<(String, Origin)> {
    let t = ctx.table(node, path)?;
    let mut url_set = None;
    if let Some(n) = t.get("url") {
        let p = t.path("url");
        let url = read_nats_url(ctx, n, &p);
        prov.nats_url_failed |= url.is_none();
        if let Some(url) = url {
            let origin = Origin::new(ctx, &p, n.line);
            nats.url = Some(url.clone());
            prov.nats_url = Some(origin.clone());
            url_set = Some((url, origin));
        }
    }
    if let Some(n) = t.get("subject_prefix") {
        if let Some(v) = checked(ctx, n, &t.path("subject_prefix"), check_subject_prefix) {
            nats.subject_prefix = v;
        }
    }
    if let Some(n) = t.get("consumer_name") {
        if let Some(v) = checked(ctx, n, &t.path("consumer_name"), check_nats_name) {
            nats.consumer_name = v;
        }
    }
    if let Some(n) = t.get("stream_name") {
        if let Some(v) = checked(ctx, n, &t.path("stream_name"), check_nats_name) {
            nats.stream_name = v;
        }
    }
    for (key, slot) in [
        ("tls_ca_file", &mut nats.tls_ca_file),
        ("tls_cert_file", &mut nats.tls_cert_file),
        ("tls_key_file", &mut nats.tls_key_file),
    ] {
        if let Some(n) = t.get(key) {
            if let Some(v) = checked(ctx, n, &t.path(key), check_readable_file) {
                *slot = Some(v);
            }
        }
    }
    if let Some(n) = t.get("credentials_file") {
        let p = t.path("credentials_file");
        if let Some(v) = checked(ctx, n, &p, nats_auth::check_credentials_file) {
            nats.credentials_file = Some(v);
            prov.nats_credentials_file = Some(Origin::new(ctx, &p, n.line));
        }
    }
    if let Some(n) = t.get("nkey_file") {
        let p = t.path("nkey_file");
        if let Some(v) = checked(ctx, n, &p, |s| nats_auth::read_nkey_seed(s).map(drop)) {
            nats.nkey_file = Some(v);
            prov.nats_nkey_file = Some(Origin::new(ctx, &p, n.line));
        }
    }
    for (key, other) in [
        ("tls_cert_file", "tls_key_file"),
        ("tls_key_file", "tls_cert_file"),
    ] {
        if let (Some(n), None) = (t.get(key), t.get(other)) {
            ctx.error(
                &t.path(key),
                n.line,
                format!("a client certificate needs both tls_cert_file and tls_key_file; {other} is missing"),
            );
        }
    }
    if let Some(n) = t.get("partitions") {
        if let Some(v) = ctx.int(n, &t.path("partitions"), Range::Between(0, MAX_PARTITIONS)) {
            nats.partitions = u32::try_from(v).unwrap_or(0);
        }
    }
    if let Some(n) = t.get("jetstream") {
        let jpath = t.path("jetstream");
        if let Some(j) = ctx.table(n, &jpath) {
            for field in JS_FIELDS {
                if let Some(n) = j.get(field.key) {
                    if let Some(v) = ctx.int(n, &j.path(field.key), field.range) {
                        field.set(nats, v);
                    }
                }
            }
        }
    }
    url_set
}

/// `[observers.nats] partitions`: one durable consumer and one lease each.
const MAX_PARTITIONS: i128 = 1024;

/// A JetStream integer setting: key, environment override, allowed values.
struct JsField {
    key: &'static str,
    env: &'static str,
    range: Range,
}

impl JsField {
    fn set(&self, nats: &mut NatsConfig, v: i128) {
        let js = &mut nats.jetstream;
        let as_u64 = || u64::try_from(v).unwrap_or(u64::MAX);
        let as_i64 = || i64::try_from(v).unwrap_or(i64::MAX);
        match self.key {
            "dedup_window_minutes" => js.dedup_window_minutes = as_u64(),
            "max_age_days" => js.max_age_days = as_u64(),
            "max_msgs" => js.max_msgs = as_i64(),
            "max_bytes" => js.max_bytes = as_i64(),
            "ack_wait_secs" => js.ack_wait_secs = as_u64(),
            "replicas" => js.replicas = as_u64(),
            _ => js.max_deliver = as_i64(),
        }
    }
}

/// Upper bounds keep every duration representable as i64 nanoseconds (what JetStream uses).
const JS_FIELDS: &[JsField] = &[
    JsField {
        key: "dedup_window_minutes",
        env: "FRAISEQL_NATS_DEDUP_WINDOW_MINUTES",
        range: Range::Between(1, 153_722_867),
    },
    JsField {
        key: "max_age_days",
        env: "FRAISEQL_NATS_MAX_AGE_DAYS",
        range: Range::Between(0, 106_751),
    },
    JsField {
        key: "max_msgs",
        env: "FRAISEQL_NATS_MAX_MSGS",
        range: Range::Limit,
    },
    JsField {
        key: "max_bytes",
        env: "FRAISEQL_NATS_MAX_BYTES",
        range: Range::Limit,
    },
    JsField {
        key: "ack_wait_secs",
        env: "FRAISEQL_NATS_ACK_WAIT_SECS",
        range: Range::Between(1, 9_223_372_036),
    },
    JsField {
        key: "max_deliver",
        env: "FRAISEQL_NATS_MAX_DELIVER",
        range: Range::Limit,
    },
    // JetStream allows at most 5.
    JsField {
        key: "replicas",
        env: "FRAISEQL_NATS_REPLICAS",
        range: Range::Between(1, 5),
    },
];

/// Applies the twelve `FRAISEQL_NATS_*` overrides. Unset or blank variables are ignored.
fn env_overrides(
    env: &dyn Fn(&str) -> Option<String>,
    nats: &mut NatsConfig,
    prov: &mut Provenance,
    errors: &mut Vec<ConfigError>,
) {
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let mut fail = |name: &str, message: String| {
        errors.push(ConfigError::new(ENV_LABEL, name, None, message));
    };

    if let Some(v) = get("FRAISEQL_NATS_URL") {
        match check_nats_url(v.trim()) {
            Ok(()) => {
                nats.url = Some(v.trim().to_string());
                prov.nats_url = Some(Origin {
                    file: ENV_LABEL.to_string(),
                    key: "FRAISEQL_NATS_URL".to_string(),
                    line: None,
                });
            }
            Err(e) => fail(
                "FRAISEQL_NATS_URL",
                format!("{e} (overrides observers.nats.url)"),
            ),
        }
    }
    let strings: [(&str, &str, Check); 3] = [
        (
            "FRAISEQL_NATS_SUBJECT_PREFIX",
            "subject_prefix",
            check_subject_prefix,
        ),
        (
            "FRAISEQL_NATS_CONSUMER_NAME",
            "consumer_name",
            check_nats_name,
        ),
        ("FRAISEQL_NATS_STREAM_NAME", "stream_name", check_nats_name),
    ];
    for (name, key, check) in strings {
        let Some(v) = get(name) else { continue };
        let v = v.trim().to_string();
        match check(&v) {
            Ok(()) => match key {
                "subject_prefix" => nats.subject_prefix = v,
                "consumer_name" => nats.consumer_name = v,
                _ => nats.stream_name = v,
            },
            Err(e) => fail(name, format!("{e} (overrides observers.nats.{key})")),
        }
    }
    if let Some(v) = get("FRAISEQL_NATS_PARTITIONS") {
        match parse_int(&v) {
            Some(i) if (0..=MAX_PARTITIONS).contains(&i) => {
                nats.partitions = u32::try_from(i).unwrap_or(0);
            }
            _ => fail(
                "FRAISEQL_NATS_PARTITIONS",
                format!(
                    "expected an integer between 0 and {MAX_PARTITIONS} (overrides \
                     observers.nats.partitions), found {}",
                    quote_short(&v)
                ),
            ),
        }
    }
    for field in JS_FIELDS {
        let Some(v) = get(field.env) else { continue };
        match parse_int(&v) {
            Some(i) if field.range.contains(i) => field.set(nats, i),
            _ => fail(
                field.env,
                format!(
                    "expected {} (overrides observers.nats.jetstream.{}), found {}",
                    field.range.expected(),
                    field.key,
                    quote_short(&v)
                ),
            ),
        }
    }
}

/// A value check: `Err` holds the message.
type Check = fn(&str) -> Result<(), String>;

/// NATS server URL(s): comma-separated, each `host:port` or `scheme://...` with scheme
/// `nats`, `tls`, `ws` or `wss`. Messages never echo the value.
fn check_nats_url(s: &str) -> Result<(), String> {
    const EXPECTED: &str = "expected NATS server URL(s) such as \"nats://localhost:4222\" \
                            (several separated by commas)";
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("{EXPECTED}, found an empty entry in the list"));
        }
        if part.chars().any(char::is_whitespace) {
            return Err(format!("{EXPECTED}, found a value containing spaces"));
        }
        if let Some(i) = part.find("://") {
            let scheme = part[..i].to_ascii_lowercase();
            if !["nats", "tls", "ws", "wss"].contains(&scheme.as_str()) {
                return Err(format!(
                    "{EXPECTED} with scheme nats://, tls://, ws:// or wss://, found {}",
                    url_shape(part)
                ));
            }
            if part[i + 3..].is_empty() {
                return Err(format!(
                    "{EXPECTED}, found {} with no host",
                    url_shape(part)
                ));
            }
        }
    }
    Ok(())
}

fn check_redis_url(s: &str) -> Result<(), String> {
    let lower = s.to_ascii_lowercase();
    let ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|p| lower.starts_with(p) && lower.len() > p.len());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a Redis URL starting with redis://, rediss://, redis+unix:// or unix://, \
             found {}",
            url_shape(s)
        ))
    }
}

/// Subject prefix: dot-separated tokens, no wildcards, no spaces.
fn check_subject_prefix(s: &str) -> Result<(), String> {
    let shown = quote_short(s);
    if s.chars().any(|c| c.is_whitespace() || c == '*' || c == '>') {
        return Err(format!(
            "expected a NATS subject prefix such as \"fraiseql.mutation\" (no spaces and no \
             wildcards * or >), found {shown}"
        ));
    }
    if s.split('.').any(str::is_empty) {
        return Err(format!(
            "expected a NATS subject prefix such as \"fraiseql.mutation\" (tokens separated \
             by single dots, none empty), found {shown}"
        ));
    }
    Ok(())
}

/// A file the engine will read (a TLS certificate or key): it must exist now, so a typo is a
/// config error with file and line rather than a connect failure later. The whole path is
/// shown (a shortened one would hide the file name).
fn check_readable_file(s: &str) -> Result<(), String> {
    match std::fs::metadata(s) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{s:?} is not a file")),
        Err(e) => Err(format!("cannot read {s:?}: {e}")),
    }
}

/// JetStream stream / consumer names (and the bridge's transport name).
fn check_nats_name(s: &str) -> Result<(), String> {
    if let Some(bad) = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(*c))
    {
        return Err(format!(
            "expected a name without spaces or any of . * > / \\, found {} ({bad:?} is not allowed)",
            quote_short(s)
        ));
    }
    Ok(())
}

/// A cursor name: stored as text, so only printable and of reasonable length.
fn check_listener_id(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "expected a name of 1 to 128 characters without spaces, found {}",
            quote_short(s)
        ));
    }
    Ok(())
}

/// A publication name: an unqualified SQL identifier.
fn check_publication(s: &str) -> Result<(), String> {
    if s.contains('.') {
        return Err(format!(
            "expected a PostgreSQL publication name (letters, digits and _, not starting with \
             a digit, at most 63 characters), found {}",
            quote_short(s)
        ));
    }
    validate_sql_identifier(s)
}

/// PostgreSQL NOTIFY channel: an unqualified SQL identifier.
fn check_channel(s: &str) -> Result<(), String> {
    if s.contains('.') {
        return Err(format!(
            "expected a PostgreSQL channel name (letters, digits and _, not starting with a \
             digit, at most 63 characters), found {}",
            quote_short(s)
        ));
    }
    validate_sql_identifier(s)
}
