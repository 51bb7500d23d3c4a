//! TLS and credentials of the worker's NATS connection (docs/security.md): the settings
//! `nats_tls_ca`, `nats_tls_cert`, `nats_tls_key`, `nats_creds` and `nats_nkey`, checked
//! and turned into async-nats' own [`ConnectOptions`].

use std::path::{Path, PathBuf};

use async_nats::ConnectOptions;
use dbtask_protocol::{check_together, nkey_seed, NatsFile};

/// The files that secure the connection; every one is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsSecurity {
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub creds: Option<PathBuf>,
    pub nkey: Option<PathBuf>,
}

/// A setting that cannot be used: `--nats-tls-ca /x: file not found`. Never quotes a file.
#[derive(Debug, thiserror::Error)]
#[error("{} {}: {problem}", .setting.flag(), .path.display())]
pub struct SecurityError {
    pub setting: NatsFile,
    pub path: PathBuf,
    pub problem: String,
}

impl NatsSecurity {
    /// Whether TLS is asked for (a CA or a client certificate).
    pub fn tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some()
    }

    /// Whether the worker signs in with a `.creds` file or an nkey.
    pub fn signs_in(&self) -> bool {
        self.creds.is_some() || self.nkey.is_some()
    }

    fn files(&self) -> impl Iterator<Item = (NatsFile, &Path)> {
        [
            (NatsFile::TlsCa, &self.tls_ca),
            (NatsFile::TlsCert, &self.tls_cert),
            (NatsFile::TlsKey, &self.tls_key),
            (NatsFile::Creds, &self.creds),
            (NatsFile::Nkey, &self.nkey),
        ]
        .into_iter()
        .filter_map(|(setting, path)| path.as_deref().map(|p| (setting, p)))
    }

    /// Checks that the settings go together and that each file is readable and looks right.
    pub fn check(&self) -> Result<(), SecurityError> {
        let pair = |setting: NatsFile, path: &Path, problem: &str| SecurityError {
            setting,
            path: path.to_owned(),
            problem: problem.to_owned(),
        };
        check_together(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.creds.as_deref(),
            self.nkey.as_deref(),
            NatsFile::flag,
        )
        .map_err(|(setting, path, problem)| pair(setting, path, &problem))?;
        for (setting, path) in self.files() {
            setting.read(path).map_err(|problem| SecurityError {
                setting,
                path: path.to_owned(),
                problem,
            })?;
        }
        Ok(())
    }

    /// `options` with TLS required and the CA, client certificate and credentials set.
    /// async-nats reads the certificate files again at each (re)connection.
    pub fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions, SecurityError> {
        self.check()?;
        if self.tls() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(path) = &self.creds {
            let text = read(NatsFile::Creds, path)?;
            // async-nats' own parse errors name no secret ("cannot parse nkey from the
            // credentials file").
            options = options.credentials(&text).map_err(|e| SecurityError {
                setting: NatsFile::Creds,
                path: path.clone(),
                problem: format!("{e}: expected {}", NatsFile::Creds.expected()),
            })?;
        }
        if let Some(path) = &self.nkey {
            let text = read(NatsFile::Nkey, path)?;
            let seed = nkey_seed(&text).unwrap_or_default();
            if nkeys::KeyPair::from_seed(seed).is_err() {
                return Err(SecurityError {
                    setting: NatsFile::Nkey,
                    path: path.clone(),
                    problem: format!(
                        "its SU line is not a valid nkey seed: expected {}",
                        NatsFile::Nkey.expected()
                    ),
                });
            }
            options = options.nkey(seed.to_owned());
        }
        Ok(options)
    }

    /// The settings to check when NATS refuses the connection.
    pub fn sign_in_hint(&self) -> &'static str {
        match (&self.creds, &self.nkey) {
            (Some(_), _) => "check the --nats-creds file: is its user known to the server's operator and account, and not expired?",
            (_, Some(_)) => "check the --nats-nkey seed: is its public key (U...) a user in the server's authorization block?",
            _ => "check the user and password (or token) in the NATS URL, or give --nats-creds or --nats-nkey",
        }
    }

    /// The settings to check when the TLS handshake fails.
    pub fn tls_hint(&self) -> &'static str {
        match (&self.tls_ca, &self.tls_cert) {
            (None, _) => "the server asks for TLS: give --nats-tls-ca, the CA certificate that signed the server's certificate (and --nats-tls-cert/--nats-tls-key if it verifies clients)",
            (Some(_), None) => "check --nats-tls-ca (the CA that signed the server's certificate, whose names must include the host of the URL); if the server verifies clients, give --nats-tls-cert and --nats-tls-key",
            (Some(_), Some(_)) => "check --nats-tls-ca (the CA that signed the server's certificate, whose names must include the host of the URL) and that the server trusts the CA of --nats-tls-cert",
        }
    }
}

fn read(setting: NatsFile, path: &Path) -> Result<String, SecurityError> {
    setting.read(path).map_err(|problem| SecurityError {
        setting,
        path: path.to_owned(),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_flag_and_the_path() {
        let s = NatsSecurity {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert_eq!(
            s.check().unwrap_err().to_string(),
            "--nats-tls-ca /nonexistent/ca.pem: file not found"
        );
        let s = NatsSecurity {
            tls_cert: Some("/c.pem".into()),
            ..Default::default()
        };
        assert!(s
            .check()
            .unwrap_err()
            .to_string()
            .contains("give --nats-tls-key too"));
    }
}
