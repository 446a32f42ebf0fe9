//! Transports feed events to the engine. Each source — `memory` (the in-process queue used for
//! tests and embedding), `postgres`, `nats`, `redis` — implements [`delivery::Source`] and is
//! driven by the one loop, [`delivery::run`]: bounded concurrency, acknowledgement only after
//! the engine finished or dead-lettered, the same handling of bad input everywhere.

pub mod delivery;
pub mod memory;
pub mod nats;
pub mod nats_auth;
pub mod postgres;
pub mod redis;
