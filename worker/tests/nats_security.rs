//! The broker over TLS, mutual TLS and with an nkey user, against real nats-servers configured
//! for each (docs/security.md). Certificates come from the `openssl` command, the nkey user
//! from the nkeys crate; the end-to-end tests of worker and client are tests/test_security.py.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{nats_server_bin, NatsServer};
use dbtask_worker::broker::{Broker, BrokerError, NatsSecurity};
use dbtask_worker::Config;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("these tests make their certificates with the openssl command");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name.pem`/`name.key`.
fn ca(dir: &Path, name: &str) {
    let subject = format!("/CN=dbtask test {name}");
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `name.pem`/`name.key` signed by the CA `ca`.
fn leaf(dir: &Path, name: &str, ca: &str, usage: &str, san: Option<&str>) {
    let subject = format!("/CN=dbtask test {name}");
    let (key, csr, pem, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ],
    );
    let mut text = format!(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
    );
    if let Some(san) = san {
        text += &format!("subjectAltName={san}\n");
    }
    std::fs::write(dir.join(&ext), text).unwrap();
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-set_serial",
            "4242",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path(), "ca");
        ca(dir.path(), "other-ca");
        leaf(
            dir.path(),
            "server",
            "ca",
            "serverAuth",
            Some("IP:127.0.0.1,DNS:localhost"),
        );
        leaf(dir.path(), "client", "ca", "clientAuth", None);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A nats-server whose config file holds `block`.
    fn server(&self, name: &str, block: &str) -> NatsServer {
        let conf = self.path(&format!("{name}.conf"));
        std::fs::write(&conf, block).unwrap();
        NatsServer::start_with(&nats_server_bin(), true, &["-c", conf.to_str().unwrap()])
    }

    fn tls_block(&self, verify: bool) -> String {
        let mut block = format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n",
            self.path("server.pem"),
            self.path("server.key")
        );
        if verify {
            block += &format!("  ca_file: {:?}\n  verify: true\n", self.path("ca.pem"));
        }
        block + "}\n"
    }
}

async fn connect(nats: &NatsServer, security: &NatsSecurity) -> Result<Broker, BrokerError> {
    Broker::connect_with(&nats.url(), security, "test:1").await
}

fn config(nats: &NatsServer) -> Config {
    Config {
        nats_url: nats.url(),
        apps: vec!["tasks".into()],
        ..Config::default()
    }
}

#[tokio::test]
async fn tls_and_mutual_tls_serve_jetstream_and_a_wrong_ca_names_the_setting() {
    let pki = Pki::new();
    let tls = pki.server("tls", &pki.tls_block(false));
    let with_ca = NatsSecurity {
        tls_ca: Some(pki.path("ca.pem")),
        ..Default::default()
    };
    let broker = connect(&tls, &with_ca).await.unwrap();
    broker.ensure_stream(&config(&tls)).await.unwrap();

    // Without the CA, and with another CA: a TLS error that says which setting to fix.
    let err = connect(&tls, &NatsSecurity::default()).await.err().unwrap();
    assert!(matches!(err, BrokerError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("give --nats-tls-ca"), "{err}");
    let wrong = NatsSecurity {
        tls_ca: Some(pki.path("other-ca.pem")),
        ..Default::default()
    };
    let err = connect(&tls, &wrong).await.err().unwrap().to_string();
    assert!(
        err.starts_with("TLS with NATS at nats://127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(err.contains("check --nats-tls-ca"), "{err}");

    // Mutual TLS: the client certificate is needed, and enough.
    let mtls = pki.server("mtls", &pki.tls_block(true));
    let err = connect(&mtls, &with_ca).await.err().unwrap();
    assert!(matches!(err, BrokerError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("--nats-tls-cert"), "{err}");
    let with_cert = NatsSecurity {
        tls_cert: Some(pki.path("client.pem")),
        tls_key: Some(pki.path("client.key")),
        ..with_ca
    };
    let broker = connect(&mtls, &with_cert).await.unwrap();
    broker.ensure_stream(&config(&mtls)).await.unwrap();
}

#[tokio::test]
async fn an_nkey_user_serves_jetstream_and_a_stranger_is_refused_without_its_seed_shown() {
    let pki = Pki::new();
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let nats = pki.server(
        "nkey",
        &format!(
            "authorization {{\n  users: [ {{ nkey: {:?} }} ]\n}}\n",
            user.public_key()
        ),
    );
    std::fs::write(pki.path("user.nk"), user.seed().unwrap() + "\n").unwrap();
    std::fs::write(pki.path("stranger.nk"), stranger.seed().unwrap() + "\n").unwrap();

    let security = NatsSecurity {
        nkey: Some(pki.path("user.nk")),
        ..Default::default()
    };
    let broker = connect(&nats, &security).await.unwrap();
    broker.ensure_stream(&config(&nats)).await.unwrap();

    let err = connect(
        &nats,
        &NatsSecurity {
            nkey: Some(pki.path("stranger.nk")),
            ..Default::default()
        },
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, BrokerError::Refused { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("check the --nats-nkey seed"), "{text}");
    assert!(!text.contains(&stranger.seed().unwrap()), "{text}");
}
