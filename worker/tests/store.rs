//! The Redis side against a real redis-server: records with their TTL, the done notification
//! published with a ready record, batched writes, and writes that wait out an outage.

mod common;

use std::time::Duration;

use common::{free_port, RedisServer};
use dbtask_protocol::{done_channel, result_key, ResultRecord, TaskError, TaskState};
use dbtask_worker::store::{Store, StoreError, Writer};
use futures::StreamExt;
use serde_json::value::RawValue;

fn record(id: &str, state: TaskState) -> ResultRecord {
    let mut r = ResultRecord::new(id, state);
    r.task = Some("add".into());
    r.attempts = 1;
    r.worker = Some("test:1".into());
    r.queue = Some("default".into());
    r.date_received = Some(dbtask_protocol::now_unix());
    r
}

fn success(id: &str, result: &str) -> ResultRecord {
    let mut r = record(id, TaskState::Success);
    r.result = Some(RawValue::from_string(result.to_owned()).unwrap());
    r
}

async fn raw_get(url: &str, key: &str) -> (Option<Vec<u8>>, i64) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    (value, ttl)
}

#[tokio::test]
async fn records_are_stored_with_their_ttl_and_ready_ones_published() {
    let redis = RedisServer::start();
    let store = Store::connect(&redis.url(), 100).await.unwrap();
    assert!(store
        .server_version()
        .await
        .unwrap()
        .starts_with(|c: char| c.is_ascii_digit()));
    let (writer, writer_loop) = Writer::new(store.clone());
    tokio::spawn(writer_loop);

    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe(done_channel("*")).await.unwrap();

    // STARTED is stored but not announced; SUCCESS and FAILURE are both.
    writer
        .write(&record("t-started", TaskState::Started))
        .await
        .unwrap();
    writer
        .write(&success("t-ok", r#"{"sum": 3}"#))
        .await
        .unwrap();
    let mut failed = record("t-failed", TaskState::Failure);
    failed.error = Some(TaskError {
        exc_type: "ValueError".into(),
        message: "bad".into(),
        traceback: Some("Traceback ...".into()),
    });
    writer.write(&failed).await.unwrap();

    let mut messages = pubsub.on_message();
    for expected in ["t-ok", "t-failed"] {
        let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            msg.get_channel_name(),
            done_channel(expected),
            "STARTED is never published"
        );
        let (stored, ttl) = raw_get(&redis.url(), &result_key(expected)).await;
        let published: Vec<u8> = msg.get_payload().unwrap();
        assert_eq!(
            Some(published),
            stored,
            "the published record is the stored one"
        );
        assert!((1..=100).contains(&ttl), "ttl {ttl}");
    }

    let (started, ttl) = raw_get(&redis.url(), &result_key("t-started")).await;
    assert_eq!(
        ResultRecord::decode(&started.unwrap()).unwrap().state,
        TaskState::Started
    );
    assert!((1..=100).contains(&ttl), "ttl {ttl}");

    let ok = store.get("t-ok").await.unwrap().unwrap();
    assert_eq!(ok.state, TaskState::Success);
    assert_eq!(ok.result.unwrap().get(), r#"{"sum": 3}"#);
    assert_eq!(ok.worker.as_deref(), Some("test:1"));
    let failed = store.get("t-failed").await.unwrap().unwrap();
    assert_eq!(failed.error.unwrap().exc_type, "ValueError");
    assert!(
        store.get("never-ran").await.unwrap().is_none(),
        "PENDING: no record"
    );
}

#[tokio::test]
async fn many_concurrent_writes_all_land() {
    let redis = RedisServer::start();
    let store = Store::connect(&redis.url(), 60).await.unwrap();
    let (writer, writer_loop) = Writer::new(store.clone());
    tokio::spawn(writer_loop);
    let writes = (0..600).map(|i| {
        let writer = writer.clone();
        async move {
            writer
                .write(&success(&format!("many-{i}"), &i.to_string()))
                .await
        }
    });
    for outcome in futures::future::join_all(writes).await {
        outcome.unwrap();
    }
    for i in [0, 299, 599] {
        let r = store.get(&format!("many-{i}")).await.unwrap().unwrap();
        assert_eq!(r.result.unwrap().get(), i.to_string());
    }
}

#[tokio::test]
async fn a_write_waits_for_redis_to_come_back() {
    let mut redis = RedisServer::start();
    let store = Store::connect(&redis.url(), 60).await.unwrap();
    let (writer, writer_loop) = Writer::new(store.clone());
    tokio::spawn(writer_loop);
    writer.write(&success("before", "1")).await.unwrap();

    redis.kill();
    let w = writer.clone();
    let pending = tokio::spawn(async move { w.write(&success("during", "2")).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !pending.is_finished(),
        "a write must not report success while Redis is down"
    );

    redis.restart();
    tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let r = store.get("during").await.unwrap().unwrap();
    assert_eq!(r.result.unwrap().get(), "2");
}

#[tokio::test]
async fn unreachable_redis_is_named_in_the_error() {
    let port = free_port();
    let err = Store::connect(&format!("redis://127.0.0.1:{port}"), 60)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!("cannot reach Redis at redis://127.0.0.1:{port} (connection refused): is redis-server running?")
    );
}

#[tokio::test]
async fn a_redis_password_is_used_and_never_shown() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cr3t"]);
    Store::connect(&format!("redis://:s3cr3t@127.0.0.1:{}", redis.port), 60)
        .await
        .unwrap();
    let err = Store::connect(&format!("redis://:wr0ng@127.0.0.1:{}", redis.port), 60)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Refused { .. }), "{err}");
    let text = err.to_string();
    assert!(!text.contains("wr0ng"), "{text}");
    assert!(
        text.contains(&format!("redis://:***@127.0.0.1:{}", redis.port)),
        "{text}"
    );
}
