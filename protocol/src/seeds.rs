//! The NATS servers to connect to (feature `nats`), for the worker's `--nats-url` and the
//! client's `init(nats_url=...)` alike: one URL or a comma-separated list of seeds
//! (`nats://n1:4222,nats://n2:4222,nats://n3:4222`). async-nats connects to any seed that
//! answers, learns the rest of the cluster from it, and moves to another server when its own
//! goes away; what is left to dbtask is reading the list and its credentials.
//!
//! async-nats signs in to every server with one set of credentials (from its
//! `ConnectOptions`) and ignores those written in a URL, so the user and password (or token)
//! of the list are taken out of the URLs: seeds that carry some must carry the same, and seeds
//! that carry none use them too. A URL with its credentials left in would also show them in
//! async-nats' debug logs.

use async_nats::{ConnectOptions, ServerAddr};

use crate::{percent_decode, redact_url, split_servers};

/// The user and password, or the token, of a seed list.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    UserPassword {
        user: String,
        password: String,
    },
    /// A lone user name in a URL (`nats://TOKEN@host`), which NATS reads as a token.
    Token(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::UserPassword { user, .. } => write!(f, "UserPassword({user}:***)"),
            Credentials::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// The servers of a seed list, without credentials, and the credentials they carried.
#[derive(Debug, Clone)]
pub struct Seeds {
    pub servers: Vec<ServerAddr>,
    pub credentials: Option<Credentials>,
}

/// Why a seed list cannot be used. Every URL in it is shown with [`redact_url`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    #[error(
        "no server given: give a URL such as nats://127.0.0.1:4222, or several separated by commas"
    )]
    Empty,
    #[error("{seed} is not a NATS server URL ({reason}): write nats://host:port (or tls://, ws://, wss://)")]
    Invalid { seed: String, reason: String },
    #[error("{first} and {other} carry different credentials: async-nats signs in to every server with one user and password (or token), so give the same ones in each URL, or in the first only")]
    DifferentCredentials { first: String, other: String },
}

impl Seeds {
    /// `ConnectOptions` carrying the list's credentials (none: plain options), to which the
    /// caller adds TLS, credential files and its own settings; connect with
    /// `options.connect(seeds.servers)`.
    pub fn options(&self) -> ConnectOptions {
        match &self.credentials {
            Some(Credentials::UserPassword { user, password }) => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Some(Credentials::Token(token)) => ConnectOptions::with_token(token.clone()),
            None => ConnectOptions::new(),
        }
    }
}

/// Reads a seed list: URLs separated by commas (spaces around them are ignored), each with
/// the scheme `nats`, `tls`, `ws` or `wss` (`nats://` when left out) and a host.
pub fn seeds(list: &str) -> Result<Seeds, SeedError> {
    let mut servers = Vec::new();
    // The first seed with credentials, shown redacted, and its credentials.
    let mut found: Option<(String, Credentials)> = None;
    for seed in split_servers(list)
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let shown = redact_url(seed);
        let invalid = |reason: String| SeedError::Invalid {
            seed: shown.clone(),
            reason,
        };
        let addr: ServerAddr = seed.parse().map_err(|e: std::io::Error| {
            // async-nats' message repeats that the URL is invalid; keep what follows.
            let text = e.to_string();
            invalid(
                text.strip_prefix("NATS server URL is invalid: ")
                    .unwrap_or(&text)
                    .to_owned(),
            )
        })?;
        let mut url = addr.into_inner();
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host".into()));
        }
        let user = percent_decode(url.username());
        let password = url.password().map(percent_decode);
        let credentials = match (user.is_empty(), password) {
            (_, Some(password)) => Some(Credentials::UserPassword { user, password }),
            (false, None) => Some(Credentials::Token(user)),
            (true, None) => None,
        };
        if let Some(credentials) = credentials {
            match &found {
                Some((first, known)) if *known != credentials => {
                    return Err(SeedError::DifferentCredentials {
                        first: first.clone(),
                        other: shown,
                    })
                }
                Some(_) => {}
                None => found = Some((shown.clone(), credentials)),
            }
            let _ = url.set_username("");
            let _ = url.set_password(None);
        }
        servers.push(ServerAddr::from_url(url).map_err(|e| invalid(e.to_string()))?);
    }
    if servers.is_empty() {
        return Err(SeedError::Empty);
    }
    Ok(Seeds {
        servers,
        credentials: found.map(|(_, c)| c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(seeds: &Seeds) -> Vec<String> {
        seeds
            .servers
            .iter()
            .map(|s| s.as_url_str().to_owned())
            .collect()
    }

    #[test]
    fn one_url_or_a_list_of_seeds() {
        let one = seeds("nats://127.0.0.1:4222").unwrap();
        assert_eq!(hosts(&one), ["nats://127.0.0.1:4222"]);
        assert_eq!(one.credentials, None);
        let three = seeds("nats://a:1, tls://b:2 ,c:3,").unwrap();
        assert_eq!(hosts(&three), ["nats://a:1", "tls://b:2", "nats://c:3"]);
    }

    #[test]
    fn credentials_leave_every_url_and_apply_to_every_seed() {
        let s = seeds("nats://bob:p%40ss@a:1,nats://b:2,nats://bob:p%40ss@c:3").unwrap();
        assert_eq!(hosts(&s), ["nats://a:1", "nats://b:2", "nats://c:3"]);
        assert_eq!(
            s.credentials,
            Some(Credentials::UserPassword {
                user: "bob".into(),
                password: "p@ss".into()
            })
        );
        let t = seeds("nats://a:1,nats://s3cret@b:2").unwrap();
        assert_eq!(t.credentials, Some(Credentials::Token("s3cret".into())));
        assert_eq!(hosts(&t), ["nats://a:1", "nats://b:2"]);
        assert!(!format!("{:?}", t).contains("s3cret"));
    }

    #[test]
    fn bad_lists_are_refused_without_showing_a_password() {
        assert_eq!(seeds(" , ").unwrap_err(), SeedError::Empty);
        let err = seeds("nats://a:1,http://u:pw@b:2").unwrap_err().to_string();
        assert!(err.contains("http://u:***@b:2"), "{err}");
        assert!(err.contains("invalid scheme"), "{err}");
        assert!(seeds("nats://").is_err());
        let err = seeds("nats://u:pw1@a:1,nats://u:pw2@b:2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nats://u:***@a:1 and nats://u:***@b:2"),
            "{err}"
        );
        assert!(!err.contains("pw1") && !err.contains("pw2"), "{err}");
    }
}
