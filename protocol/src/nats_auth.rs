//! The files that secure a NATS connection: the CA that signed the server's certificate, a
//! client certificate and its key (mutual TLS), a `.creds` file (user JWT and nkey seed) and
//! an nkey seed. One name and one check per setting, shared by the worker's settings
//! (`--nats-tls-ca`...) and the client's `init()` keywords (`nats_tls_ca=`...), so that both
//! refuse the same files with the same words. A problem never quotes the file: it may hold a
//! secret.

use std::path::Path;

/// One of the settings that name a file securing the NATS connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsFile {
    /// PEM certificate(s) of the CA that signed the server's certificate.
    TlsCa,
    /// PEM certificate of this client, for servers that verify clients (mutual TLS).
    TlsCert,
    /// PEM private key of [`NatsFile::TlsCert`].
    TlsKey,
    /// A NATS credentials file: a user JWT and its nkey seed.
    Creds,
    /// A file whose first `SU...` line is an nkey user seed.
    Nkey,
}

impl NatsFile {
    /// The setting's name: the worker's TOML key and the client's `init()` keyword.
    pub fn setting(self) -> &'static str {
        match self {
            NatsFile::TlsCa => "nats_tls_ca",
            NatsFile::TlsCert => "nats_tls_cert",
            NatsFile::TlsKey => "nats_tls_key",
            NatsFile::Creds => "nats_creds",
            NatsFile::Nkey => "nats_nkey",
        }
    }

    /// The worker's command-line flag, e.g. `--nats-tls-ca`.
    pub fn flag(self) -> &'static str {
        match self {
            NatsFile::TlsCa => "--nats-tls-ca",
            NatsFile::TlsCert => "--nats-tls-cert",
            NatsFile::TlsKey => "--nats-tls-key",
            NatsFile::Creds => "--nats-creds",
            NatsFile::Nkey => "--nats-nkey",
        }
    }

    /// What the file must hold, as said in errors.
    pub fn expected(self) -> &'static str {
        match self {
            NatsFile::TlsCa => {
                "the PEM certificate of the CA that signed the NATS server's certificate"
            }
            NatsFile::TlsCert => "this client's PEM certificate (-----BEGIN CERTIFICATE-----)",
            NatsFile::TlsKey => "the PEM private key of the client certificate",
            NatsFile::Creds => {
                "a NATS credentials file: a user JWT and its nkey seed, as `nsc generate creds` writes"
            }
            NatsFile::Nkey => "an nkey user seed (a line starting with SU), as `nk -gen user` writes",
        }
    }

    /// Reads the file and checks that it looks like what [`NatsFile::expected`] says; its
    /// text, or the problem ("file not found", "no PEM certificate in it"...). Looks only:
    /// async-nats parses it when it connects.
    pub fn read(self, path: &Path) -> Result<String, String> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_owned(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied: this process cannot read it".to_owned()
            }
            std::io::ErrorKind::InvalidData => "not a text (PEM) file".to_owned(),
            _ => format!("cannot read it ({e})"),
        })?;
        let fits = match self {
            NatsFile::TlsCa | NatsFile::TlsCert => text.contains("-----BEGIN CERTIFICATE-----"),
            NatsFile::TlsKey => text.contains("PRIVATE KEY-----"),
            NatsFile::Creds => text.contains("NATS USER JWT") && text.contains("NKEY SEED"),
            NatsFile::Nkey => nkey_seed(&text).is_some(),
        };
        if fits {
            Ok(text)
        } else {
            Err(format!("this file does not hold {}", self.expected()))
        }
    }
}

/// The settings that go together: a client certificate and its key both or neither, and not
/// both a `.creds` file and an nkey seed. The first rule broken, as the setting at fault, its
/// path and the problem, each setting named by `name` ([`NatsFile::setting`] for the client's
/// keywords, [`NatsFile::flag`] for the worker's flags).
pub fn check_together<'a>(
    tls_cert: Option<&'a Path>,
    tls_key: Option<&'a Path>,
    creds: Option<&'a Path>,
    nkey: Option<&'a Path>,
    name: impl Fn(NatsFile) -> &'static str,
) -> Result<(), (NatsFile, &'a Path, String)> {
    match (tls_cert, tls_key) {
        (Some(cert), None) => {
            return Err((
                NatsFile::TlsCert,
                cert,
                format!(
                    "a client certificate needs its key: give {} too",
                    name(NatsFile::TlsKey)
                ),
            ))
        }
        (None, Some(key)) => {
            return Err((
                NatsFile::TlsKey,
                key,
                format!(
                    "a key needs its client certificate: give {} too",
                    name(NatsFile::TlsCert)
                ),
            ))
        }
        _ => {}
    }
    if let (Some(_), Some(nkey)) = (creds, nkey) {
        return Err((
            NatsFile::Nkey,
            nkey,
            format!(
                "give {} or {}, not both (a .creds file holds its own nkey)",
                name(NatsFile::Creds),
                name(NatsFile::Nkey)
            ),
        ));
    }
    Ok(())
}

/// The nkey user seed in the text of an nkey file: its first line starting with `SU`.
pub fn nkey_seed(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|line| line.starts_with("SU") && line.len() > 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> (std::path::PathBuf, impl Drop) {
        struct Gone(std::path::PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let path = std::env::temp_dir().join(format!(
            "dbtask-nats-auth-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        (path.clone(), Gone(path))
    }

    #[test]
    fn certificate_and_key_go_together_creds_and_nkey_do_not() {
        let (cert, key, creds, nkey) = (
            Path::new("c.pem"),
            Path::new("k.pem"),
            Path::new("u.creds"),
            Path::new("u.nk"),
        );
        let flag = NatsFile::flag;
        assert!(check_together(Some(cert), Some(key), Some(creds), None, flag).is_ok());
        assert!(check_together(None, None, None, Some(nkey), flag).is_ok());
        let (at, path, why) = check_together(Some(cert), None, None, None, flag).unwrap_err();
        assert_eq!((at, path), (NatsFile::TlsCert, cert));
        assert!(why.ends_with("give --nats-tls-key too"), "{why}");
        let (at, _, why) =
            check_together(None, Some(key), None, None, NatsFile::setting).unwrap_err();
        assert_eq!(at, NatsFile::TlsKey);
        assert!(why.ends_with("give nats_tls_cert too"), "{why}");
        let (at, _, why) = check_together(None, None, Some(creds), Some(nkey), flag).unwrap_err();
        assert_eq!(at, NatsFile::Nkey);
        assert!(
            why.starts_with("give --nats-creds or --nats-nkey, not both"),
            "{why}"
        );
    }

    #[test]
    fn a_missing_file_says_so() {
        let err = NatsFile::TlsCa
            .read(Path::new("/nonexistent/ca.pem"))
            .unwrap_err();
        assert_eq!(err, "file not found");
    }

    #[test]
    fn a_wrong_file_says_what_was_expected_and_never_quotes_it() {
        let (path, _gone) = file("SUSECRETSEEDWHICHMUSTNOTSHOW\n");
        let err = NatsFile::TlsCa.read(&path).unwrap_err();
        assert!(err.contains("PEM certificate of the CA"), "{err}");
        assert!(!err.contains("SUSECRET"), "{err}");
        let err = NatsFile::Creds.read(&path).unwrap_err();
        assert!(err.contains("credentials file"), "{err}");
        assert!(!err.contains("SUSECRET"), "{err}");
        assert!(NatsFile::Nkey.read(&path).is_ok());
    }

    #[test]
    fn the_seed_is_the_first_su_line() {
        assert_eq!(nkey_seed("# user\n  SUABC \nUDEF\n"), Some("SUABC"));
        assert_eq!(nkey_seed("UDEF\n"), None);
    }
}
