//! `[observers.nats] partitions = N`: per-key order across the instances sharing a stream.
//!
//! Publishers put each change on `{subject}.{partition}`, its order key modulo N
//! ([`crate::order`]). Each partition has a durable pull consumer of its own,
//! `{consumer_name}_p{k}_of_{N}`, filtered on `{prefix}.*.*.{k}`, and one owner at a time: the
//! instances hold leases in a JetStream key-value bucket and share the partitions evenly
//! (each takes at most ⌈N / instances⌉). An owner pulls its partitions, and the engine keeps
//! per-key order within them as it does on one instance.
//!
//! - A lease is the key `p.{k}`, its value the owner's id, written with compare-and-set and
//!   renewed every [`RENEW_EVERY`]; the bucket's max age ([`LEASE_TTL`]) ends the lease of an
//!   instance that died or lost NATS. Live instances renew `m.{N}.{id}` the same way.
//! - An instance holding more than its share stops pulling the extra partitions, waits until
//!   every message it pulled from them is settled, and releases them (the value `""`).
//! - An instance that takes a released partition pulls at once: nothing of it is pending
//!   elsewhere. One that takes an expired lease first waits `ack_wait` if the consumer still
//!   has unacknowledged messages — the previous owner's, which the server hands out again
//!   once their ack wait is over: pulled before that, newer changes of their keys would
//!   overtake them.
//! - An instance whose renewal is refused has lost the lease and stops pulling it at once.
//!
//! Changing N, or switching partitions on or off, needs the stream's other consumers of this
//! name drained: [`ensure_consumers`] refuses to start while they have messages to process,
//! and otherwise deletes them and starts the new ones where the stream is.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{pull, DeliverPolicy, PullConsumer},
    kv,
    message::AckKind,
    stream::Stream,
};
use futures::{StreamExt, TryStreamExt};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::NatsConfig;
use crate::error::{ConnectErrorKind, Error, Result};
use crate::transport::delivery::sleep_or_stop;

/// How long a lease lasts without being renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often leases are renewed and the share looked at again.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How long one pull waits for messages before the next.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long a stopping instance waits for its partitions' messages to be settled before it
/// gives up releasing them (the leases then end with [`LEASE_TTL`]).
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// The durable consumer of partition `k`.
pub fn consumer_name(config: &NatsConfig, k: u32) -> String {
    format!("{}_p{k}_of_{}", config.consumer_name, config.partitions)
}

/// What partition `k`'s consumer reads: `{prefix}.{entity}.{event}.{k}`.
pub fn filter_subject(config: &NatsConfig, k: u32) -> String {
    format!("{}.*.*.{k}", config.subject_prefix)
}

/// The key-value bucket of the leases (`[A-Za-z0-9_-]` only).
pub fn bucket_name(config: &NatsConfig) -> String {
    let raw = format!(
        "fraiseql_partitions_{}_{}",
        config.stream_name, config.consumer_name
    );
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `name` is one of this engine's consumers: `consumer_name` itself, or a partition
/// consumer of any partitioning.
fn of_this_engine(config: &NatsConfig, name: &str) -> bool {
    name == config.consumer_name
        || name
            .strip_prefix(&config.consumer_name)
            .and_then(|rest| rest.strip_prefix("_p"))
            .and_then(|rest| rest.split_once("_of_"))
            .is_some_and(|(k, n)| k.parse::<u32>().is_ok() && n.parse::<u32>().is_ok())
}

/// The consumers this configuration reads from: `consumer_name`, or one per partition.
pub fn wanted_consumers(config: &NatsConfig) -> Vec<String> {
    if config.partitions == 0 {
        return vec![config.consumer_name.clone()];
    }
    (0..config.partitions)
        .map(|k| consumer_name(config, k))
        .collect()
}

fn js_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Transport(format!("JetStream: cannot {what}: {e}"))
}

fn not_set_up(message: String) -> Error {
    Error::connect(ConnectErrorKind::NotSetUp, message)
}

/// Refuses to start beside a live instance that partitions this stream otherwise.
pub async fn check_live_instances(js: &jetstream::Context, config: &NatsConfig) -> Result<()> {
    let Ok(store) = js.get_key_value(bucket_name(config)).await else {
        return Ok(());
    };
    let members = live_members(&store).await?;
    if let Some((n, id)) = members.iter().find(|(n, _)| *n != config.partitions) {
        return Err(not_set_up(format!(
            "observers.nats.partitions is {}, but instance {id} consumes stream `{}` as \
             consumer `{}` with partitions = {n}; every instance must use the same number \
             (see the README, Order across instances)",
            config.partitions, config.stream_name, config.consumer_name
        )));
    }
    Ok(())
}

/// `(partitions, instance id)` of every instance that renewed its membership lately.
async fn live_members(store: &kv::Store) -> Result<Vec<(u32, String)>> {
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| js_error("list the partition leases", e))?
        .try_collect()
        .await
        .map_err(|e| js_error("list the partition leases", e))?;
    Ok(keys
        .iter()
        .filter_map(|k| k.strip_prefix("m."))
        .filter_map(|rest| rest.split_once('.'))
        .filter_map(|(n, id)| Some((n.parse().ok()?, id.to_owned())))
        .collect())
}

/// Deletes this engine's consumers that the configuration no longer reads (another
/// partitioning), once they have nothing left to process. Returns where the stream ended
/// then, for the new consumers to start after it; `None` when there were none.
async fn retire_other_consumers(stream: &Stream, config: &NatsConfig) -> Result<Option<u64>> {
    let wanted = wanted_consumers(config);
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .map_err(|e| js_error("list consumers", e))?;
    let others: Vec<&String> = names
        .iter()
        .filter(|n| of_this_engine(config, n) && !wanted.contains(n))
        .collect();
    if others.is_empty() {
        return Ok(None);
    }
    for name in &others {
        let info = stream
            .consumer_info(name.as_str())
            .await
            .map_err(|e| js_error(&format!("read consumer `{name}`"), e))?;
        let left = info.num_pending + info.num_ack_pending as u64;
        if left > 0 {
            return Err(not_set_up(format!(
                "observers.nats.partitions is {} but consumer `{name}` of stream `{}` (another \
                 partitioning) still has {left} messages to process: run with its setting until \
                 it has none, then change it (see the README, Order across instances)",
                config.partitions, config.stream_name
            )));
        }
    }
    let end = stream
        .get_info()
        .await
        .map_err(|e| js_error("read the stream", e))?
        .state
        .last_sequence;
    for name in others {
        stream
            .delete_consumer(name)
            .await
            .map_err(|e| js_error(&format!("delete consumer `{name}`"), e))?;
        tracing::info!(
            "[observers] consumer `{name}` (another partitioning, nothing left to process) deleted"
        );
    }
    Ok(Some(end))
}

/// The consumers this configuration reads from, created where missing (see the module).
pub async fn ensure_consumers(
    js: &jetstream::Context,
    stream: &Stream,
    config: &NatsConfig,
) -> Result<Vec<PullConsumer>> {
    check_live_instances(js, config).await?;
    let start_after = retire_other_consumers(stream, config).await?;
    let mut consumers = Vec::new();
    for (k, name) in wanted_consumers(config).into_iter().enumerate() {
        let mut want = super::nats::consumer_config(config);
        want.durable_name = Some(name.clone());
        if config.partitions > 0 {
            want.filter_subject = filter_subject(config, u32::try_from(k).unwrap_or(0));
            want.description = Some(format!(
                "fraiseql observers, partition {k} of {}",
                config.partitions
            ));
        }
        if let Some(end) = start_after {
            want.deliver_policy = DeliverPolicy::ByStartSequence {
                start_sequence: end + 1,
            };
        }
        consumers.push(ensure_one(stream, &name, want).await?);
    }
    Ok(consumers)
}

/// Binds to consumer `name`, or creates it with `want`. An existing one keeps where it
/// started (JetStream cannot change that) and takes the configured limits; another instance
/// creating it at the same moment is fine.
async fn ensure_one(stream: &Stream, name: &str, want: pull::Config) -> Result<PullConsumer> {
    let want = match stream.consumer_info(name).await {
        Ok(info) => pull::Config {
            deliver_policy: info.config.deliver_policy,
            ..want
        },
        Err(_) => want,
    };
    match stream.create_consumer(want).await {
        Ok(consumer) => Ok(consumer),
        Err(e) => stream
            .get_consumer(name)
            .await
            .map_err(|_| js_error(&format!("create consumer `{name}`"), e)),
    }
}

/// How many of `count` partitions instance `me` should own among the live `members` of its
/// partitioning: `count / members`, one more for the first `count % members` ids in order.
/// Every instance computes the same split from the same list.
fn share_of(me: &str, count: u32, members: &[(u32, String)]) -> usize {
    let mut ids: Vec<&str> = members
        .iter()
        .filter(|(n, _)| *n == count)
        .map(|(_, id)| id.as_str())
        .collect();
    if !ids.contains(&me) {
        ids.push(me);
    }
    ids.sort_unstable();
    let rank = ids.iter().position(|id| *id == me).unwrap_or(0);
    let (each, extra) = (count as usize / ids.len(), count as usize % ids.len());
    each + usize::from(rank < extra)
}

// ---------------------------------------------------------------------------------------------
// Owning partitions

/// A message pulled from a partition. Holds its partition's count of unsettled messages
/// until it is dropped.
pub struct Pulled {
    pub message: jetstream::Message,
    pub unsettled: Unsettled,
}

/// One of a partition's messages not yet settled; the count goes down when it is dropped.
/// Dropped without [`Unsettled::settled`] (the engine stopped while it ran), the message may
/// be handed out again only after its ack wait, after newer ones handed back with a nak:
/// the partition is then not handed over before that (see [`Puller::run`]).
pub struct Unsettled {
    count: Arc<AtomicUsize>,
    dirty_until: Arc<Mutex<Instant>>,
    ack_wait: Duration,
    settled: bool,
}

impl Unsettled {
    fn new(
        count: &Arc<AtomicUsize>,
        dirty_until: &Arc<Mutex<Instant>>,
        ack_wait: Duration,
    ) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Unsettled {
            count: count.clone(),
            dirty_until: dirty_until.clone(),
            ack_wait,
            settled: false,
        }
    }

    /// Acknowledged, terminated or handed back.
    pub fn settled(&mut self) {
        self.settled = true;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if !self.settled {
            let until = Instant::now() + self.ack_wait + EXPIRY_SLACK;
            let mut dirty = self.dirty_until.lock().expect("dirty lock");
            *dirty = (*dirty).max(until);
        }
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The partitions an instance owns, for `/health`.
pub type Owned = Arc<Mutex<Vec<u32>>>;

/// A running share of the partitions: their messages arrive on `messages`.
pub struct Share {
    pub messages: mpsc::Receiver<Pulled>,
    finish: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Share {
    /// Takes a share of `consumers` (one per partition) and pulls them until `shutdown`;
    /// [`Share::finish`] then releases the leases.
    pub fn start(
        store: kv::Store,
        config: &NatsConfig,
        consumers: Vec<PullConsumer>,
        batch: usize,
        owned: Owned,
        gauge: Gauge,
        shutdown: watch::Receiver<bool>,
    ) -> Share {
        let (tx, messages) = mpsc::channel(batch.max(1));
        let (finish, finished) = watch::channel(false);
        let me = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        tracing::info!(
            "[observers] partitions: {} (instance {me}, leases in bucket `{}`)",
            config.partitions,
            bucket_name(config)
        );
        let owner = Owner {
            store,
            me,
            count: config.partitions,
            ack_wait: Duration::from_secs(config.jetstream.ack_wait_secs.max(1)),
            consumers,
            batch: batch.max(1),
            tx,
            leases: BTreeMap::new(),
            owned,
            gauge,
            over_share: 0,
        };
        let task = tokio::spawn(owner.run(shutdown, finished));
        Share {
            messages,
            finish,
            task,
        }
    }

    /// After the delivery loop stopped: hands back what was pulled and not taken, releases
    /// the leases once every message is settled.
    pub async fn finish(mut self) {
        self.messages.close();
        while let Some(mut pulled) = self.messages.recv().await {
            nak(&pulled.message).await;
            pulled.unsettled.settled();
        }
        let _ = self.finish.send(true);
        let _ = tokio::time::timeout(RELEASE_WAIT * 2, self.task).await;
    }
}

/// Opens the leases' key-value bucket, creating it if missing. The bucket's stream is
/// created here as async-nats would (`kv_to_stream_config`), without its account-info query,
/// whose answer from nats-server 2.9 async-nats cannot parse.
pub async fn open_bucket(js: &jetstream::Context, config: &NatsConfig) -> Result<kv::Store> {
    let name = bucket_name(config);
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    let created = js
        .create_stream(jetstream::stream::Config {
            name: format!("KV_{name}"),
            description: Some("fraiseql: which instance owns which partition".to_owned()),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_bytes: 1 << 20,
            max_age: LEASE_TTL,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            num_replicas: usize::try_from(config.jetstream.replicas.clamp(1, 5)).unwrap_or(1),
            ..Default::default()
        })
        .await;
    // Created by another instance meanwhile, or not at all: look again either way.
    js.get_key_value(&name).await.map_err(|e| match created {
        Err(create) => js_error(&format!("create key-value bucket `{name}`"), create),
        Ok(_) => js_error(&format!("open key-value bucket `{name}`"), e),
    })
}

async fn nak(message: &jetstream::Message) {
    if let Err(e) = message.ack_with(AckKind::Nak(None)).await {
        tracing::debug!("nats: cannot hand a message back: {e}");
    }
}

/// A partition this instance owns.
struct Lease {
    revision: u64,
    renewed: Instant,
    stop: watch::Sender<bool>,
    puller: JoinHandle<()>,
    unsettled: Arc<AtomicUsize>,
    dirty_until: Arc<Mutex<Instant>>,
    /// Over the share: no longer pulled, released once its messages are settled.
    releasing: bool,
}

struct Owner {
    store: kv::Store,
    me: String,
    count: u32,
    ack_wait: Duration,
    consumers: Vec<PullConsumer>,
    batch: usize,
    tx: mpsc::Sender<Pulled>,
    leases: BTreeMap<u32, Lease>,
    owned: Owned,
    gauge: Gauge,
    /// Turns in a row this instance held more than its share.
    over_share: u32,
}

/// Turns in a row over its share before an instance hands partitions over: a membership
/// list read while an instance joins or renews may miss it for a moment, and each handover
/// costs the partition a pause.
const SHED_AFTER_TURNS: u32 = 3;

impl Owner {
    async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut finished: watch::Receiver<bool>,
    ) {
        loop {
            self.turn().await;
            if sleep_or_stop(&mut shutdown, RENEW_EVERY).await {
                break;
            }
        }
        // Stopping: nothing more is pulled; the leases are kept until what was pulled is
        // settled (the delivery loop finishes it, or hands it back).
        for lease in self.leases.values_mut() {
            let _ = lease.stop.send(true);
            lease.releasing = true;
        }
        loop {
            self.renew().await;
            self.publish_owned();
            if sleep_or_stop(&mut finished, RENEW_EVERY).await {
                break;
            }
        }
        let deadline = Instant::now() + RELEASE_WAIT;
        while !self.leases.is_empty() && Instant::now() < deadline {
            self.release_drained().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.store.delete(self.member_key()).await;
        self.publish_owned();
    }

    fn member_key(&self) -> String {
        format!("m.{}.{}", self.count, self.me)
    }

    /// One round: say we are alive, renew, give up what is over the share, take what is
    /// missing.
    async fn turn(&mut self) {
        if let Err(e) = self.store.put(self.member_key(), "".into()).await {
            tracing::warn!("[observers] partitions: cannot renew membership: {e}");
        }
        self.renew().await;
        let share = match live_members(&self.store).await {
            Ok(members) => share_of(&self.me, self.count, &members),
            Err(e) => {
                // Without the list, keep what is held and take nothing more.
                tracing::debug!("{e}");
                self.leases.values().filter(|l| !l.releasing).count()
            }
        };
        self.shed(share);
        self.release_drained().await;
        self.take(share).await;
        self.publish_owned();
    }

    async fn renew(&mut self) {
        let mut lost = Vec::new();
        for (k, lease) in &mut self.leases {
            match self
                .store
                .update(format!("p.{k}"), self.me.clone().into(), lease.revision)
                .await
            {
                Ok(revision) => {
                    lease.revision = revision;
                    lease.renewed = Instant::now();
                }
                Err(e) => {
                    let mut refused = e.kind() == kv::UpdateErrorKind::WrongLastRevision;
                    if refused {
                        // A renewal whose answer was lost (a leader change) did happen: the
                        // lease is still ours, at the revision the server has.
                        if let Ok(Some(entry)) = self.store.entry(format!("p.{k}")).await {
                            if entry.operation == kv::Operation::Put
                                && entry.value == self.me.as_bytes()
                            {
                                lease.revision = entry.revision;
                                lease.renewed = Instant::now();
                                continue;
                            }
                        }
                    }
                    refused |= lease.renewed.elapsed() >= LEASE_TTL - RENEW_EVERY;
                    if refused {
                        tracing::warn!(
                            "[observers] partitions: lost the lease of partition {k} ({e}); \
                             no longer pulling it"
                        );
                        lost.push(*k);
                    }
                }
            }
        }
        for k in lost {
            if let Some(lease) = self.leases.remove(&k) {
                let _ = lease.stop.send(true);
            }
        }
    }

    /// Stops pulling the partitions over `share` (the highest numbers first), once this
    /// instance has been over it for [`SHED_AFTER_TURNS`] turns.
    fn shed(&mut self, share: usize) {
        let active: Vec<u32> = self
            .leases
            .iter()
            .filter(|(_, l)| !l.releasing)
            .map(|(k, _)| *k)
            .collect();
        if active.len() <= share {
            self.over_share = 0;
            return;
        }
        self.over_share += 1;
        if self.over_share < SHED_AFTER_TURNS {
            return;
        }
        self.over_share = 0;
        for k in active.iter().rev().take(active.len().saturating_sub(share)) {
            let lease = self.leases.get_mut(k).expect("listed");
            lease.releasing = true;
            let _ = lease.stop.send(true);
            tracing::info!(
                "[observers] partitions: handing partition {k} over (over this instance's share)"
            );
        }
    }

    /// Releases the partitions being handed over whose messages are all settled.
    async fn release_drained(&mut self) {
        let drained: Vec<u32> = self
            .leases
            .iter()
            .filter(|(_, l)| {
                l.releasing
                    && l.puller.is_finished()
                    && l.unsettled.load(Ordering::SeqCst) == 0
                    && Instant::now() >= *l.dirty_until.lock().expect("dirty lock")
            })
            .map(|(k, _)| *k)
            .collect();
        for k in drained {
            let lease = self.leases.remove(&k).expect("listed");
            match self
                .store
                .update(format!("p.{k}"), "".into(), lease.revision)
                .await
            {
                Ok(_) => tracing::info!("[observers] partitions: released partition {k}"),
                Err(e) => tracing::debug!("partition {k}: release: {e}"),
            }
        }
    }

    /// Takes free partitions up to `share`, starting at a place of this instance's own so
    /// that instances starting together do not all try the same ones.
    async fn take(&mut self, share: usize) {
        let active = self.leases.values().filter(|l| !l.releasing).count();
        let mut missing = share.saturating_sub(active);
        let start = xxhash_rust::xxh3::xxh3_64(self.me.as_bytes()) % u64::from(self.count);
        let start = u32::try_from(start).unwrap_or(0);
        for i in 0..self.count {
            if missing == 0 {
                break;
            }
            let k = (start + i) % self.count;
            if self.leases.contains_key(&k) {
                continue;
            }
            if let Some((revision, released)) = self.acquire(k).await {
                self.own(k, revision, released).await;
                missing -= 1;
            }
        }
    }

    /// The lease of `k` if nobody holds it: its revision, and whether its last owner
    /// released it (rather than letting it expire).
    async fn acquire(&self, k: u32) -> Option<(u64, bool)> {
        let key = format!("p.{k}");
        match self.store.entry(key.as_str()).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                if !entry.value.is_empty() {
                    return None;
                }
                let revision = self
                    .store
                    .update(&key, self.me.clone().into(), entry.revision)
                    .await
                    .ok()?;
                Some((revision, true))
            }
            Ok(_) => {
                let revision = self.store.create(&key, self.me.clone().into()).await.ok()?;
                Some((revision, false))
            }
            Err(e) => {
                tracing::debug!("partition {k}: {e}");
                None
            }
        }
    }

    async fn own(&mut self, k: u32, revision: u64, released: bool) {
        let consumer = self.consumers[k as usize].clone();
        let wait = if released {
            Duration::ZERO
        } else {
            match consumer.get_info().await {
                Ok(info) if info.num_ack_pending > 0 => self.ack_wait,
                Ok(_) => Duration::ZERO,
                Err(_) => self.ack_wait,
            }
        };
        if wait.is_zero() {
            tracing::info!("[observers] partitions: took partition {k}");
        } else {
            tracing::info!(
                "[observers] partitions: took partition {k}; its last owner left messages \
                 unacknowledged: pulling in {wait:?}, when they are handed out again first"
            );
        }
        let (stop, stopped) = watch::channel(false);
        let unsettled = Arc::new(AtomicUsize::new(0));
        let dirty_until = Arc::new(Mutex::new(Instant::now()));
        let puller = Puller {
            consumer,
            k,
            batch: self.batch,
            ack_wait: self.ack_wait,
            tx: self.tx.clone(),
            unsettled: unsettled.clone(),
            dirty_until: dirty_until.clone(),
            stop: stopped,
        };
        let puller = tokio::spawn(puller.run(wait));
        self.leases.insert(
            k,
            Lease {
                revision,
                renewed: Instant::now(),
                stop,
                puller,
                unsettled,
                dirty_until,
                releasing: false,
            },
        );
    }

    fn publish_owned(&self) {
        let owned: Vec<u32> = self.leases.keys().copied().collect();
        self.gauge.set(i64::try_from(owned.len()).unwrap_or(0));
        *self.owned.lock().expect("owned lock") = owned;
    }
}

/// Slack after an ack wait: the server looks for expired deliveries periodically.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// One partition's pulling, run by [`Puller::run`].
struct Puller {
    consumer: PullConsumer,
    k: u32,
    batch: usize,
    ack_wait: Duration,
    tx: mpsc::Sender<Pulled>,
    unsettled: Arc<AtomicUsize>,
    /// Until when deliveries this instance lost or dropped may still be outstanding: the
    /// partition is not handed over before (see [`Puller::run`]).
    dirty_until: Arc<Mutex<Instant>>,
    stop: watch::Receiver<bool>,
}

impl Puller {
    /// Pulls after `wait` until stopped. What a pull brings is all handed on, or back when
    /// stopping: the server counts it as delivered to this instance.
    ///
    /// Deliveries can be lost on the way (a pull cut by a leader change or a reconnect):
    /// the server hands them out again only after their ack wait, and anything pulled
    /// meanwhile would overtake them. A gap in the consumer's delivery sequence shows it;
    /// then what follows the gap is left unacknowledged too, and nothing is pulled until
    /// the ack wait has passed, when the server hands all of them out again, oldest first.
    async fn run(mut self, wait: Duration) {
        if sleep_or_stop(&mut self.stop, wait).await {
            return;
        }
        let mut next_delivery: Option<u64> = None;
        let mut failures = 0u32;
        while !*self.stop.borrow() {
            let pulled = self
                .consumer
                .batch()
                .max_messages(self.batch)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut messages = match pulled {
                Ok(messages) => messages,
                Err(e) => {
                    if self.failed(&e.to_string(), &mut failures).await {
                        return;
                    }
                    continue;
                }
            };
            let mut gap = None;
            while let Some(next) = messages.next().await {
                let message = match next {
                    Ok(message) => message,
                    Err(e) => {
                        // The pull was cut; a lost delivery shows as a gap in the next one.
                        if self.failed(&e.to_string(), &mut failures).await {
                            return;
                        }
                        break;
                    }
                };
                failures = 0;
                let sequence = message.info().map_or(0, |i| i.consumer_sequence);
                if let Some(expected) = next_delivery.filter(|e| *e != sequence) {
                    gap.get_or_insert((expected, sequence));
                }
                next_delivery = Some(sequence + 1);
                if gap.is_none() {
                    self.hand_on(message).await;
                }
            }
            if let Some((expected, got)) = gap {
                tracing::warn!(
                    "[observers] partitions: deliveries {expected}..{got} of partition {} did \
                     not arrive; pausing it for ack_wait ({:?}) so that they are handed out \
                     again before anything newer",
                    self.k,
                    self.ack_wait
                );
                self.dirty(self.ack_wait + EXPIRY_SLACK);
                next_delivery = None;
                if sleep_or_stop(&mut self.stop, self.ack_wait + EXPIRY_SLACK).await {
                    return;
                }
            }
        }
    }

    /// To the delivery loop, even once the partition is being handed over: handing it back
    /// would cost it one of its `max_deliver` deliveries (at the last one the server would
    /// drop it without a word). Only when the delivery loop has stopped (the engine stops)
    /// does it go back to the server, with a nak that puts it first in line for whoever
    /// pulls next, unless deliveries are outstanding that it would overtake (then it waits
    /// for its ack wait with them).
    async fn hand_on(&self, message: jetstream::Message) {
        let pulled = Pulled {
            message,
            unsettled: Unsettled::new(&self.unsettled, &self.dirty_until, self.ack_wait),
        };
        if let Err(back) = self.tx.send(pulled).await {
            let mut pulled = back.0;
            if Instant::now() >= *self.dirty_until.lock().expect("dirty lock") {
                nak(&pulled.message).await;
                pulled.unsettled.settled();
            }
        }
    }

    fn dirty(&self, for_: Duration) {
        *self.dirty_until.lock().expect("dirty lock") = Instant::now() + for_;
    }

    /// A pull failed: waits a little before the next (longer while it keeps failing).
    /// True if stopped meanwhile.
    async fn failed(&mut self, error: &str, failures: &mut u32) -> bool {
        *failures += 1;
        if failures.is_multiple_of(10) {
            tracing::warn!(
                "[observers] partitions: cannot pull partition {} ({failures} tries): {error}",
                self.k
            );
        } else {
            tracing::debug!("partition {}: {error}", self.k);
        }
        let delay = Duration::from_millis(100 * u64::from((*failures).min(20)));
        sleep_or_stop(&mut self.stop, delay).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(partitions: u32) -> NatsConfig {
        NatsConfig {
            partitions,
            consumer_name: "worker".into(),
            stream_name: "events.x".into(),
            ..NatsConfig::default()
        }
    }

    #[test]
    fn partition_consumers_are_named_by_index_and_count() {
        let c = config(4);
        assert_eq!(
            wanted_consumers(&c),
            [
                "worker_p0_of_4",
                "worker_p1_of_4",
                "worker_p2_of_4",
                "worker_p3_of_4"
            ]
        );
        assert_eq!(filter_subject(&c, 3), "fraiseql.mutation.*.*.3");
        assert_eq!(wanted_consumers(&config(0)), ["worker"]);
        assert_eq!(bucket_name(&c), "fraiseql_partitions_events_x_worker");
    }

    #[test]
    fn the_live_instances_split_the_partitions_exactly() {
        let members: Vec<(u32, String)> = ["b", "a", "c"]
            .iter()
            .map(|id| (16, id.to_string()))
            .collect();
        let shares: Vec<usize> = ["a", "b", "c"]
            .iter()
            .map(|me| share_of(me, 16, &members))
            .collect();
        assert_eq!(shares, [6, 5, 5]);
        // Not listed yet (its first renewal was not seen): counted anyway.
        assert_eq!(share_of("d", 16, &members), 4);
        // Members of another partitioning are not counted.
        assert_eq!(share_of("a", 16, &[(8, "z".into())]), 16);
    }

    #[test]
    fn only_this_engines_consumers_are_retired() {
        let c = config(4);
        for mine in ["worker", "worker_p0_of_8", "worker_p7_of_8"] {
            assert!(of_this_engine(&c, mine), "{mine}");
        }
        for other in [
            "worker2",
            "worker_p0",
            "worker_px_of_8",
            "other_p0_of_4",
            "worker_p1_of_x",
        ] {
            assert!(!of_this_engine(&c, other), "{other}");
        }
    }
}
