//! One place that decides what of a secret-bearing value may be shown: URLs in logs, errors,
//! `/health` and `Debug` output, and the secrets a message must never contain.

use reqwest::Url;

/// URL(s), comma-separated, as logs and errors show them: the scheme, the user name and the
/// host, with a password or token replaced by `***` and a path or query by `/…` (a query can
/// carry a password). A value that is not a URL (a libpq `key=value` string) is not shown.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|part| redact_one(part.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(part: &str) -> String {
    let Some(i) = part.find("://") else {
        return if part.is_empty() {
            String::new()
        } else {
            "<redacted>".to_string()
        };
    };
    let (scheme, rest) = (&part[..i], &part[i + 3..]);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let tail = if tail.trim_start_matches('/').is_empty() {
        ""
    } else {
        "/…"
    };
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&authority[..at], &authority[at + 1..]);
            match userinfo.find(':') {
                Some(c) => format!("{}:***@{host}", &userinfo[..c]),
                None => format!("***@{host}"),
            }
        }
        None => authority.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// `scheme://host[:port]/…`: what logs, errors and `describe()` show of a URL.
pub(crate) fn shown_url(url: &Url) -> String {
    let host = url.host_str().unwrap_or("");
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let tail = if url.path() != "/" || url.query().is_some() {
        "/…"
    } else {
        ""
    };
    format!("{}://{host}{port}{tail}", url.scheme())
}

/// Strings that must never appear in a message: the URL's password, path and query.
pub(crate) fn url_secrets(url: &Url) -> Vec<String> {
    let mut out = vec![url.as_str().to_owned()];
    if let Some(p) = url.password() {
        out.push(p.to_owned());
    }
    if url.path() != "/" {
        out.push(url.path().to_owned());
    }
    if let Some(q) = url.query() {
        out.push(q.to_owned());
    }
    out
}

/// Replaces every secret (longer than 3 characters) in `msg` with `***`.
pub(crate) fn scrub(mut msg: String, secrets: &[String]) -> String {
    for s in secrets {
        if s.len() > 3 && msg.contains(s.as_str()) {
            msg = msg.replace(s.as_str(), "***");
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_scheme_user_and_host_only() {
        assert_eq!(
            redact_url("nats://fraiseql:s3cret@n1:4222, nats://n2:4222"),
            "nats://fraiseql:***@n1:4222,nats://n2:4222"
        );
        assert_eq!(redact_url("nats://tok3n@n1:4222"), "nats://***@n1:4222");
        assert_eq!(redact_url("nats://localhost:4222"), "nats://localhost:4222");
        assert_eq!(
            redact_url("postgres://u:p@db:5432/app?password=x"),
            "postgres://u:***@db:5432/…"
        );
        assert_eq!(redact_url("redis://h:6379/"), "redis://h:6379");
        assert_eq!(redact_url("host=db password=x"), "<redacted>");
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn messages_lose_the_secrets_of_a_url() {
        let url = Url::parse("https://u:hunter22@hooks.example/T000/B000/XXXX?token=abcd").unwrap();
        assert_eq!(shown_url(&url), "https://hooks.example/…");
        let msg = scrub(
            format!("failed: {} (hunter22, /T000/B000/XXXX, token=abcd)", url),
            &url_secrets(&url),
        );
        assert!(!msg.contains("hunter22") && !msg.contains("XXXX") && !msg.contains("abcd"));
    }
}
