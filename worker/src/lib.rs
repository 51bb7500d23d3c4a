//! dbtask worker: fetches task messages from NATS JetStream, runs them in embedded CPython,
//! stores outcomes in Redis, then acks.

pub mod python;
