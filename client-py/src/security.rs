//! TLS and credentials of the client's NATS connection: the `init()` keywords `nats_tls_ca`,
//! `nats_tls_cert`, `nats_tls_key`, `nats_creds` and `nats_nkey` (docs/security.md), checked
//! and turned into async-nats' own `ConnectOptions`. The worker's twin is
//! worker/src/broker/security.rs; the file checks are the protocol's [`NatsFile`].

use std::path::{Path, PathBuf};

use async_nats::ConnectOptions;
use dbtask_protocol::signing::MessageKey;
use dbtask_protocol::{check_together, nkey_seed, NatsFile};

use crate::error::ClientError;

/// The files that secure the connection; every one is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NatsSecurity {
    pub(crate) tls_ca: Option<PathBuf>,
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
    pub(crate) creds: Option<PathBuf>,
    pub(crate) nkey: Option<PathBuf>,
    /// Not of the connection itself: the key task messages are signed with (`message_key=`),
    /// kept here so that `init()` with another key makes a new client.
    pub(crate) message_key: Option<PathBuf>,
}

/// `nats_tls_ca='/x': file not found`. Never quotes a file.
fn bad(setting: NatsFile, path: &Path, problem: impl std::fmt::Display) -> ClientError {
    ClientError::value(format!(
        "{}={:?}: {problem}",
        setting.setting(),
        path.display().to_string()
    ))
}

fn read(setting: NatsFile, path: &Path) -> Result<String, ClientError> {
    setting
        .read(path)
        .map_err(|problem| bad(setting, path, problem))
}

impl NatsSecurity {
    /// From the keywords of the same names (`nats_tls_ca`...).
    pub(crate) fn new(
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        creds: Option<PathBuf>,
        nkey: Option<PathBuf>,
        message_key: Option<PathBuf>,
    ) -> Self {
        NatsSecurity {
            tls_ca,
            tls_cert,
            tls_key,
            creds,
            nkey,
            message_key,
        }
    }

    /// The key of `message_key=`, read from its file; ValueError naming the keyword.
    pub(crate) fn message_key(&self) -> Result<Option<MessageKey>, ClientError> {
        let Some(path) = &self.message_key else {
            return Ok(None);
        };
        MessageKey::from_file(path).map(Some).map_err(|problem| {
            ClientError::value(format!(
                "message_key={:?}: {problem}",
                path.display().to_string()
            ))
        })
    }

    /// Whether TLS is asked for (a CA or a client certificate).
    pub(crate) fn tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some()
    }

    /// `options` with TLS required and the CA, client certificate and credentials set;
    /// ValueError naming the keyword for a file that is missing or holds the wrong thing.
    pub(crate) fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions, ClientError> {
        check_together(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.creds.as_deref(),
            self.nkey.as_deref(),
            NatsFile::setting,
        )
        .map_err(|(setting, path, problem)| bad(setting, path, problem))?;
        if self.tls() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls_ca {
            read(NatsFile::TlsCa, ca)?;
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            read(NatsFile::TlsCert, cert)?;
            read(NatsFile::TlsKey, key)?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(path) = &self.creds {
            let text = read(NatsFile::Creds, path)?;
            // async-nats' parse errors name no secret.
            options = options.credentials(&text).map_err(|e| {
                bad(
                    NatsFile::Creds,
                    path,
                    format!("{e}: expected {}", NatsFile::Creds.expected()),
                )
            })?;
        }
        if let Some(path) = &self.nkey {
            let text = read(NatsFile::Nkey, path)?;
            let seed = nkey_seed(&text).unwrap_or_default();
            if nkeys::KeyPair::from_seed(seed).is_err() {
                return Err(bad(
                    NatsFile::Nkey,
                    path,
                    format!(
                        "its SU line is not a valid nkey seed: expected {}",
                        NatsFile::Nkey.expected()
                    ),
                ));
            }
            options = options.nkey(seed.to_owned());
        }
        Ok(options)
    }

    /// What to check when NATS refuses the connection.
    pub(crate) fn sign_in_hint(&self) -> &'static str {
        match (&self.creds, &self.nkey) {
            (Some(_), _) => "check the nats_creds file: is its user known to the server's operator and account, and not expired?",
            (_, Some(_)) => "check the nats_nkey seed: is its public key (U...) a user in the server's authorization block?",
            _ => "check the user, password or token in the URL, or pass nats_creds or nats_nkey",
        }
    }

    /// What to check when the TLS handshake fails.
    pub(crate) fn tls_hint(&self) -> &'static str {
        match (&self.tls_ca, &self.tls_cert) {
            (None, _) => "the server asks for TLS: pass nats_tls_ca, the CA certificate that signed the server's certificate (and nats_tls_cert/nats_tls_key if it verifies clients)",
            (Some(_), None) => "check nats_tls_ca (the CA that signed the server's certificate, whose names must include the host of the URL); if the server verifies clients, pass nats_tls_cert and nats_tls_key",
            (Some(_), Some(_)) => "check nats_tls_ca (the CA that signed the server's certificate, whose names must include the host of the URL) and that the server trusts the CA of nats_tls_cert",
        }
    }
}
