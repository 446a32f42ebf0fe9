//! Shared by the transport benchmarks: a NATS config of their own, a throwaway database whose
//! change log holds a backlog, and the PostgreSQL → transport forwarder running over it.

use std::sync::Arc;

use fraiseql_observers::bridge;
use fraiseql_observers::capture::{self, CaptureOptions};
use fraiseql_observers::config::NatsConfig;
use fraiseql_observers::transport::Publisher;
use fraiseql_observers::{
    Backend, Config, Engine, EntityDef, MemoryDlq, MemoryIdempotencyStores, Metrics,
    PostgresSource, Schema,
};
use tokio::sync::watch;

/// A stream, subject prefix and consumer of the caller's own.
pub fn nats_config(url: &str) -> NatsConfig {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    NatsConfig {
        url: Some(url.to_owned()),
        subject_prefix: format!("fqbench{suffix}"),
        consumer_name: "bench".into(),
        stream_name: format!("fqbench_{suffix}"),
        jetstream: fraiseql_observers::config::JetStreamConfig {
            replicas: replicas(),
            ..Default::default()
        },
        ..NatsConfig::default()
    }
}

/// `FRAISEQL_BENCH_REPLICAS`: copies of each stream (default 1; more needs a cluster, see
/// `benches/nats_cluster.py`).
fn replicas() -> u64 {
    std::env::var("FRAISEQL_BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// `FRAISEQL_TEST_DATABASE_URL`, default `postgresql://postgres@127.0.0.1:5432/postgres`.
pub fn database_url() -> String {
    std::env::var("FRAISEQL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh database with a captured `tb_order` whose change log holds `rows` INSERTs.
pub struct Backlog {
    admin: sqlx::PgPool,
    name: String,
    url: String,
    schema: Schema,
}

impl Backlog {
    pub async fn create(admin_url: &str, rows: usize) -> Backlog {
        let admin = sqlx::PgPool::connect(admin_url).await.unwrap();
        let name = format!(
            "fraiseql_bench_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        let base = admin_url.rsplit_once('/').unwrap().0;
        let url = format!("{base}/{name}");
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE tb_order (id text PRIMARY KEY, status text, total numeric)")
            .execute(&pool)
            .await
            .unwrap();
        let schema = Schema::new(vec![EntityDef {
            name: "Order".into(),
            table: "tb_order".into(),
            fields: Vec::new(),
            kinds: Vec::new(),
        }])
        .unwrap();
        capture::install_with(&pool, &schema, &CaptureOptions::new("bench_changes"))
            .await
            .unwrap();
        sqlx::query(&format!(
            "INSERT INTO tb_order SELECT 'ord_' || g, 'pending', g FROM generate_series(1, {rows}) g"
        ))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        Backlog {
            admin,
            name,
            url,
            schema,
        }
    }

    /// Starts the forwarder to `publisher` under the listener id `bench` (batches of 5,000,
    /// up to 1,024 publishes in flight).
    pub async fn forward(
        &self,
        publisher: Arc<dyn Publisher>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<fraiseql_observers::Result<()>> {
        let mut config = Config::default_with_backend(Backend::Redis);
        config.observers.bridge.batch_size = 5000;
        config.observers.max_concurrency = 1024;
        config.observers.bridge.notify_channel = "bench_changes".into();
        let specs = bridge::bridge_observers(&self.schema, publisher.clone(), "bench");
        let dlq = Arc::new(MemoryDlq::new(None));
        let stores = MemoryIdempotencyStores::default();
        let engine = Engine::new(specs, dlq, &stores, Arc::new(Metrics::new())).unwrap();
        let options = bridge::bridge_options(&config, "bench");
        let source = PostgresSource::connect(&self.url, options)
            .await
            .unwrap()
            .with_batch_publisher(publisher);
        tokio::spawn(source.run(Arc::new(engine), stop))
    }

    pub async fn drop_database(self) {
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(&self.admin)
            .await
            .unwrap();
    }
}
