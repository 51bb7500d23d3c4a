//! Server URLs as they may be printed, and the credentials in them. The worker and the client
//! both name servers in logs, errors and `--print-config` ([`redact_url`] decides what of a
//! URL is a secret), and both hand a URL's user and password to async-nats, which does not read
//! them from the URL ([`percent_decode`]).

/// `url` with its secrets replaced by `***`: a password becomes `user:***`, and a lone user
/// name (which NATS reads as a token) becomes `***`. Comma-separated server lists are redacted
/// one by one. The user info is taken to end at the last `@` before any `?` or `#`, so a
/// password with an unencoded `/` or `@` is hidden too; text that is not a URL but holds an `@`
/// loses everything before it.
pub fn redact_url(url: &str) -> String {
    if !url.contains('@') {
        return url.to_owned();
    }
    split_servers(url)
        .into_iter()
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

/// The servers of a comma-separated list (`nats://a:4222,nats://b:4222`), as written (spaces
/// kept). A part that starts with no scheme but holds an `@`, after a part with a scheme and no
/// `@`, is taken to continue it: a password holding an unencoded comma (`nats://u:pa,ss@h`)
/// stays whole, and hidden, rather than making a server of its second half.
pub fn split_servers(list: &str) -> Vec<&str> {
    let mut parts: Vec<&str> = Vec::new();
    let mut start = 0;
    for (i, _) in list.match_indices(',') {
        let current = &list[start..i];
        let next = list[i + 1..].split(',').next().unwrap_or("");
        let continues = current.contains("://")
            && !current.contains('@')
            && !next.contains("://")
            && next.contains('@');
        if !continues {
            parts.push(current);
            start = i + 1;
        }
    }
    parts.push(&list[start..]);
    parts
}

fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return url.to_owned();
    };
    let hidden = match rest[..at].split_once(':') {
        Some((user, _password)) if !user.contains('/') => format!("{user}:***"),
        _ => "***".to_owned(),
    };
    format!("{scheme}{hidden}{}", &rest[at..])
}

/// Percent-decodes URL user info (`p%40ss` -> `p@ss`); an invalid escape stays as it is.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::{percent_decode, redact_url, split_servers};

    #[test]
    fn user_info_is_percent_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw"), "p@ss:w");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn urls_without_secrets_are_unchanged() {
        for url in [
            "nats://127.0.0.1:4222",
            "redis://h:6379/0",
            "rediss://h:6380/1?insecure=true",
            "not a url",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn passwords_and_tokens_are_hidden() {
        assert_eq!(
            redact_url("redis://:s3cret@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            redact_url("nats://bob:s3cret@h:4222"),
            "nats://bob:***@h:4222"
        );
        assert_eq!(redact_url("nats://tok3n@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("redis://alice@h"), "redis://***@h");
        assert_eq!(redact_url("not a url://a:b@c"), "not a url://a:***@c");
        assert_eq!(redact_url("user:pw@host"), "user:***@host");
    }

    #[test]
    fn unencoded_separators_in_a_password_do_not_leak_it() {
        assert_eq!(
            redact_url("redis://:pa/ss@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://:p@ss@h:6379"), "redis://:***@h:6379");
        assert_eq!(redact_url("nats://u:a:b@h"), "nats://u:***@h");
        assert_eq!(
            redact_url("rediss://a:b@c@h/1?x=y"),
            "rediss://a:***@h/1?x=y"
        );
        assert_eq!(redact_url("nats://h/x:y@z"), "nats://***@z");
    }

    #[test]
    fn each_server_of_a_list_is_redacted() {
        assert_eq!(
            redact_url("nats://u:p1@a:4222, nats://b:4222,nats://tok@c:4222"),
            "nats://u:***@a:4222, nats://b:4222,nats://***@c:4222"
        );
    }

    #[test]
    fn a_comma_inside_a_password_does_not_split_the_server() {
        assert_eq!(redact_url("nats://u:pa,ss@h:4222"), "nats://u:***@h:4222");
        assert_eq!(
            redact_url("nats://u:pa,ss@h:4222,nats://h2:4222"),
            "nats://u:***@h:4222,nats://h2:4222"
        );
        assert_eq!(
            split_servers("nats://a:1, nats://b:2"),
            ["nats://a:1", " nats://b:2"]
        );
        assert_eq!(split_servers("a:1,b:2"), ["a:1", "b:2"]);
        assert_eq!(split_servers(""), [""]);
    }
}
