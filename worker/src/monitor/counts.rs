//! Connection trouble, counted where it happens (cold paths only: a lost connection, a
//! failed attempt, a reconnection) and read by `/metrics`. Process-wide: one worker per
//! process, and a relaxed atomic add on a rare event costs nothing worth switching off.

use std::sync::atomic::{AtomicU64, Ordering};

/// Errors and reconnections of one kind of server connection.
#[derive(Debug)]
pub struct ConnectionCounts {
    errors: AtomicU64,
    reconnects: AtomicU64,
}

impl ConnectionCounts {
    const fn new() -> Self {
        ConnectionCounts {
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    /// A connection was lost, or an attempt to (re)connect or a command failed on the
    /// connection itself (not a refused command).
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection came back (or was made anew) after a loss.
    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// The worker's NATS connection (async-nats reconnects it by itself).
pub static NATS: ConnectionCounts = ConnectionCounts::new();
/// The worker's Redis connections: the shared command connection and the revocations'
/// subscription.
pub static REDIS: ConnectionCounts = ConnectionCounts::new();
