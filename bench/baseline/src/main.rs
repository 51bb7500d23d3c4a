//! The yardstick of `make bench`: what JetStream + Redis give on this machine with no Python and
//! no dbtask code. The same work as dbtask's hot path, done the simplest fast way:
//!
//! - enqueue: publish N task-like JSON messages (with a `Nats-Msg-Id` header, as dbtask does),
//!   keeping a window of confirmations pending; and one at a time (publish, await the ack);
//! - drain: pull in batches of 500, decode each body, compute `x + y`, store every result with
//!   one Redis pipeline (`SET key value EX ttl` + `PUBLISH done:<id>` per message, as the dbtask
//!   worker does), then ack the batch;
//! - round trip: a client publishes one message and waits on a Redis notification that a
//!   consumer task (same process, own connections) publishes after storing the result.
//!
//! Each subject's consumer exists before anything is published to it, as on a queue whose
//! workers are set up: JetStream signals a stream's consumers of every message it stores, which
//! costs nats-server about 1 µs per message here (7-8 µs without a consumer, 8.5 with one).
//! dbtask's W1 runs on a stream whose consumers exist, so the yardstick does too.
//!
//! Usage: `dbtask-bench-baseline NATS_URL REDIS_URL [COUNT]`. Prints one JSON object on stdout;
//! every result is read back and checked (exit 1 on a missing or wrong one).

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

const STREAM: &str = "DBTASK_BASELINE";
const WINDOW: usize = 4096;
const BATCH: usize = 500;
const SEQUENTIAL: usize = 5_000;
const ROUND_TRIPS: usize = 1_000;
const TTL: u64 = 3600;

fn body(id: &str, i: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"{id}","task":"bench_tasks.add","args":[{i},{i}],"kwargs":{{}},"sent_at":1.0}}"#
    ))
}

fn headers(id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    h
}

async fn fresh_stream(js: &jetstream::Context) -> Result<stream::Stream, Error> {
    let _ = js.delete_stream(STREAM).await;
    Ok(js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["baseline.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?)
}

/// Publishes `count` messages on `subject` keeping up to `window` confirmations pending.
async fn publish_window(
    js: &jetstream::Context,
    subject: &str,
    run: &str,
    count: u64,
    window: usize,
) -> Result<f64, Error> {
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..count {
        if pending.len() >= window {
            if let Some(ack) = pending.next().await {
                let _: jetstream::publish::PublishAck = ack?;
            }
        }
        let id = format!("{run}-{i}");
        let ack = js
            .publish_with_headers(subject.to_owned(), headers(&id), body(&id, i))
            .await?;
        pending.push(ack.into_future());
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(start.elapsed().as_secs_f64())
}

#[derive(Debug)]
struct Task {
    id: String,
    x: i64,
    y: i64,
}

fn decode(payload: &[u8]) -> Result<Task, Error> {
    let v: serde_json::Value = serde_json::from_slice(payload)?;
    let id = v["id"].as_str().ok_or("no id")?.to_owned();
    let x = v["args"][0].as_i64().ok_or("no x")?;
    let y = v["args"][1].as_i64().ok_or("no y")?;
    Ok(Task { id, x, y })
}

fn record(t: &Task) -> String {
    format!(
        r#"{{"id":"{}","state":"SUCCESS","result":{}}}"#,
        t.id,
        t.x + t.y
    )
}

async fn drain(
    consumer: &consumer::PullConsumer,
    redis: &mut redis::aio::MultiplexedConnection,
    count: usize,
) -> Result<f64, Error> {
    let start = Instant::now();
    let mut done = 0;
    while done < count {
        let mut batch = consumer
            .batch()
            .max_messages(BATCH)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        let mut msgs = Vec::with_capacity(BATCH);
        while let Some(msg) = batch.next().await {
            msgs.push(msg?);
        }
        if msgs.is_empty() {
            return Err(format!("drain: nothing more to pull after {done} of {count}").into());
        }
        let mut pipe = redis::pipe();
        for m in &msgs {
            let t = decode(&m.payload)?;
            let rec = record(&t);
            pipe.set_ex(format!("baseline:result:{}", t.id), &rec, TTL)
                .ignore()
                .publish(format!("baseline:done:{}", t.id), &rec)
                .ignore();
        }
        let () = pipe.query_async(redis).await?;
        for m in &msgs {
            m.ack().await?;
        }
        done += msgs.len();
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Reads back every result of run `run` and checks it.
async fn check(
    redis: &mut redis::aio::MultiplexedConnection,
    run: &str,
    count: u64,
) -> Result<usize, Error> {
    let mut checked = 0;
    for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|i| format!("baseline:result:{run}-{i}"))
            .collect();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(redis).await?;
        for (i, v) in chunk.iter().zip(values) {
            let want = format!(r#""result":{}}}"#, 2 * i);
            match v {
                Some(v) if v.ends_with(&want) => checked += 1,
                other => return Err(format!("baseline result {run}-{i} is {other:?}").into()),
            }
        }
    }
    Ok(checked)
}

/// A consumer loop for the round trips: pull, store, notify, ack, one message at a time.
/// A durable pull consumer of `filter`, made before anything is published to it.
async fn pull_consumer(
    stream: &stream::Stream,
    name: &str,
    filter: &str,
) -> Result<consumer::PullConsumer, Error> {
    Ok(stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            filter_subject: filter.into(),
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?)
}

async fn responder(consumer: consumer::PullConsumer, redis_url: String) -> Result<(), Error> {
    let mut redis = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let t = decode(&msg.payload)?;
        let rec = record(&t);
        let () = redis::pipe()
            .set_ex(format!("baseline:result:{}", t.id), &rec, TTL)
            .ignore()
            .publish(format!("baseline:done:{}", t.id), &rec)
            .ignore()
            .query_async(&mut redis)
            .await?;
        msg.ack().await?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

async fn round_trips(
    js: &jetstream::Context,
    redis_client: &redis::Client,
) -> Result<(f64, f64), Error> {
    let mut pubsub = redis_client.get_async_pubsub().await?;
    pubsub.psubscribe("baseline:done:rt-*").await?;
    let mut notes = pubsub.on_message();
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS as u64 {
        let id = format!("rt-{i}");
        let start = Instant::now();
        js.publish_with_headers("baseline.rt", headers(&id), body(&id, i))
            .await?
            .await?;
        let channel = format!("baseline:done:{id}");
        loop {
            let note = tokio::time::timeout(Duration::from_secs(10), notes.next())
                .await
                .map_err(|_| format!("round trip {id}: no notification within 10 s"))?
                .ok_or("pub/sub closed")?;
            if note.get_channel_name() == channel {
                let payload: String = note.get_payload()?;
                if !payload.ends_with(&format!(r#""result":{}}}"#, 2 * i)) {
                    return Err(format!("round trip {id}: wrong record {payload}").into());
                }
                break;
            }
        }
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

async fn run(nats_url: &str, redis_url: &str, count: u64) -> Result<serde_json::Value, Error> {
    let nats = async_nats::ConnectOptions::new()
        .client_capacity(16_384)
        .connect(nats_url)
        .await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(32_768)
        .backpressure_on_inflight(true)
        .build(nats.clone());
    let redis_client = redis::Client::open(redis_url)?;
    let mut redis = redis_client.get_multiplexed_async_connection().await?;
    let stream = fresh_stream(&js).await?;
    let drainer = pull_consumer(&stream, "drain", "baseline.drain").await?;
    let _sequential = pull_consumer(&stream, "seq", "baseline.seq").await?;
    let round_trip = pull_consumer(&stream, "rt", "baseline.rt").await?;

    let windowed = publish_window(&js, "baseline.drain", "w", count, WINDOW).await?;
    let drained = drain(&drainer, &mut redis, count as usize).await?;
    let mut checked = check(&mut redis, "w", count).await?;

    let sequential = publish_window(&js, "baseline.seq", "s", SEQUENTIAL as u64, 1).await?;
    let responder = tokio::spawn(responder(round_trip, redis_url.to_owned()));
    let (p50, p99) = round_trips(&js, &redis_client).await?;
    checked += ROUND_TRIPS;
    responder.abort();

    js.delete_stream(STREAM).await?;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut redis).await?;
    Ok(serde_json::json!({
        "enqueue_window_per_s": count as f64 / windowed,
        "enqueue_sequential_per_s": SEQUENTIAL as f64 / sequential,
        "drain_per_s": count as f64 / drained,
        "rt_p50_ms": p50,
        "rt_p99_ms": p99,
        "checked": checked,
    }))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: {} NATS_URL REDIS_URL [COUNT]", args[0]);
        std::process::exit(2);
    }
    let count = args
        .get(3)
        .map(|c| c.parse().expect("COUNT must be a number"))
        .unwrap_or(20_000);
    match run(&args[1], &args[2], count).await {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("baseline failed: {e}");
            std::process::exit(1);
        }
    }
}
