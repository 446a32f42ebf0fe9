//! A database of its own per test, on the PostgreSQL of [`super::services::database_url`]
//! (the one in `FRAISEQL_TEST_DATABASE_URL`, on the standard port, or started for the test
//! binary), dropped at the end. Shared by the live PostgreSQL test files.
#![allow(dead_code)]

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};

pub fn base_url() -> String {
    super::services::database_url()
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (main, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let authority_start = main.find("://").map_or(0, |i| i + 3);
    let root = match main[authority_start..].find('/') {
        Some(i) => &main[..authority_start + i],
        None => main,
    };
    format!("{root}/{db}{query}")
}

pub async fn connect(url: &str, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .unwrap()
}

/// A database of its own, dropped by `cleanup` (or, if the test panicked, on drop).
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// The server's URL (its `postgres` database).
    pub server: String,
    pub pool: PgPool,
    cleaned: bool,
}

impl TestDb {
    /// `prefix_<uuid>`, with a pool of `max` connections.
    pub async fn create(prefix: &str, max: u32) -> TestDb {
        TestDb::create_on(&base_url(), prefix, max).await
    }

    /// The same on the server at `server` (a URL of any of its databases).
    pub async fn create_on(server: &str, prefix: &str, max: u32) -> TestDb {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(server)
            .await
            .expect("connect to the test PostgreSQL");
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .unwrap();
        admin.close().await.unwrap();
        let url = with_database(server, &name);
        let pool = connect(&url, max).await;
        TestDb {
            name,
            url,
            server: server.to_owned(),
            pool,
            cleaned: false,
        }
    }

    pub async fn cleanup(mut self) {
        self.pool.close().await;
        drop_database(&self.server, &self.name).await;
        self.cleaned = true;
    }
}

async fn drop_database(server: &str, name: &str) {
    let Ok(mut admin) = PgConnection::connect(server).await else {
        return;
    };
    // Replication slots keep a database from being dropped: end their sessions, drop them.
    for _ in 0..50 {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE database = $1 AND active_pid IS NOT NULL",
        )
        .bind(name)
        .execute(&mut admin)
        .await;
        let left: i64 = sqlx::query_scalar(
            "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots \
             WHERE database = $1 AND active_pid IS NULL",
        )
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .unwrap_or(-1);
        let remaining: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
                .bind(name)
                .fetch_one(&mut admin)
                .await
                .unwrap_or(0);
        if remaining == 0 || left < 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    admin
        .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
        .await
        .unwrap();
    let _ = admin.close().await;
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (server, name) = (self.server.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(drop_database(&server, &name));
        })
        .join();
    }
}
