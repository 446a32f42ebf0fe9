//! Real sinks for the action tests: an HTTP server (axum) and an SMTP server (tokio), both on
//! 127.0.0.1 with an ephemeral port, recording what they receive and answering as scripted.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// HTTP

/// One request the HTTP sink received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn body(mut self, body: impl Into<String>) -> Reply {
        self.body = body.into();
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct HttpState {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Reply>>,
}

/// An HTTP server answering the scripted replies in order, then 200.
pub struct HttpSink {
    pub addr: SocketAddr,
    state: Arc<HttpState>,
    task: JoinHandle<()>,
}

impl HttpSink {
    pub async fn start() -> HttpSink {
        let state = Arc::new(HttpState::default());
        let app = Router::new().fallback(handle).with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        HttpSink { addr, state, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests().pop().expect("no request received")
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(state): State<Arc<HttpState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    state.requests.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    });
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| Reply::status(200).body("ok"));
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        response = response.header(k.as_str(), v.as_str());
    }
    response.body(Body::from(reply.body)).expect("response")
}

/// A loopback port with nothing listening on it.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------------------------------------
// SMTP

/// One message the SMTP sink accepted.
#[derive(Debug, Clone, Default)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// The DATA section, dot-unstuffed, lines joined with `\r\n`.
    pub data: String,
    /// The decoded `AUTH` credentials of the session (`user`, `password`), if any.
    pub auth: Option<(String, String)>,
}

#[derive(Default)]
struct SmtpState {
    advertise_auth: bool,
    /// When set, `RCPT TO` gets this reply (e.g. `451 4.3.0 try later`).
    rcpt_reply: Mutex<Option<String>>,
    mails: Mutex<Vec<Mail>>,
    auth_failures: Mutex<usize>,
}

/// A minimal ESMTP server: 220, EHLO → 250 (optionally `AUTH PLAIN LOGIN`), MAIL/RCPT → 250,
/// DATA → 354 … `.` → 250, RSET/NOOP → 250, QUIT → 221.
pub struct SmtpSink {
    pub port: u16,
    state: Arc<SmtpState>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start(advertise_auth: bool) -> SmtpSink {
        let state = Arc::new(SmtpState {
            advertise_auth,
            ..SmtpState::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = session(stream, state).await;
                });
            }
        });
        SmtpSink { port, state, task }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.state.mails.lock().unwrap().clone()
    }

    pub fn set_rcpt_reply(&self, reply: Option<&str>) {
        *self.state.rcpt_reply.lock().unwrap() = reply.map(str::to_owned);
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn session(stream: tokio::net::TcpStream, state: Arc<SmtpState>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 sink.test ESMTP ready\r\n").await?;
    let mut mail = Mail::default();
    let mut auth = None;
    while let Some(line) = lines.next_line().await? {
        let line = line.trim_end_matches('\r').to_owned();
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            if state.advertise_auth {
                "250-sink.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n".into()
            } else {
                "250-sink.test\r\n250 8BITMIME\r\n".into()
            }
        } else if upper.starts_with("HELO") {
            "250 sink.test\r\n".into()
        } else if upper.starts_with("AUTH PLAIN") {
            let b64 = match line.split_whitespace().nth(2) {
                Some(b) => b.to_owned(),
                None => {
                    write.write_all(b"334 \r\n").await?;
                    lines.next_line().await?.unwrap_or_default()
                }
            };
            let decoded = base64_decode(b64.trim());
            let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
            if parts.len() == 3 {
                auth = Some((
                    String::from_utf8_lossy(parts[1]).into_owned(),
                    String::from_utf8_lossy(parts[2]).into_owned(),
                ));
                "235 2.7.0 Authentication successful\r\n".into()
            } else {
                *state.auth_failures.lock().unwrap() += 1;
                "535 5.7.8 Authentication credentials invalid\r\n".into()
            }
        } else if upper.starts_with("AUTH LOGIN") {
            write.write_all(b"334 VXNlcm5hbWU6\r\n").await?;
            let user = lines.next_line().await?.unwrap_or_default();
            write.write_all(b"334 UGFzc3dvcmQ6\r\n").await?;
            let pass = lines.next_line().await?.unwrap_or_default();
            auth = Some((
                String::from_utf8_lossy(&base64_decode(user.trim())).into_owned(),
                String::from_utf8_lossy(&base64_decode(pass.trim())).into_owned(),
            ));
            "235 2.7.0 Authentication successful\r\n".into()
        } else if upper.starts_with("MAIL FROM:") {
            mail = Mail {
                from: angle(&line),
                auth: auth.clone(),
                ..Mail::default()
            };
            "250 2.1.0 Ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            match state.rcpt_reply.lock().unwrap().clone() {
                Some(r) => format!("{r}\r\n"),
                None => {
                    mail.to.push(angle(&line));
                    "250 2.1.5 Ok\r\n".into()
                }
            }
        } else if upper == "DATA" {
            write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            let mut data = Vec::new();
            while let Some(l) = lines.next_line().await? {
                let l = l.trim_end_matches('\r');
                if l == "." {
                    break;
                }
                data.push(l.strip_prefix('.').unwrap_or(l).to_owned());
            }
            mail.data = data.join("\r\n");
            state.mails.lock().unwrap().push(std::mem::take(&mut mail));
            "250 2.0.0 Ok: queued\r\n".into()
        } else if upper == "RSET" || upper.starts_with("NOOP") {
            "250 2.0.0 Ok\r\n".into()
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 Command not recognized\r\n".into()
        };
        write.write_all(reply.as_bytes()).await?;
    }
    Ok(())
}

/// `MAIL FROM:<a@b.c> BODY=8BITMIME` → `a@b.c`
fn angle(line: &str) -> String {
    match (line.find('<'), line.find('>')) {
        (Some(a), Some(b)) if a < b => line[a + 1..b].to_owned(),
        _ => line
            .split_once(':')
            .map(|x| x.1.trim())
            .unwrap_or("")
            .to_owned(),
    }
}

/// Standard base64 (with or without padding).
pub fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        buf = (buf << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}
