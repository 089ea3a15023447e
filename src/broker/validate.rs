//! Checks of what clients send, before any of it is stored or handed to a cloud.

use base64::Engine;

use super::BrokerError;

/// Longest image name accepted.
pub const MAX_IMAGE_LEN: usize = 255;
/// Longest provider name accepted.
pub const MAX_PROVIDER_LEN: usize = 255;
/// Longest instance type name accepted.
pub const MAX_INSTANCE_TYPE_LEN: usize = 64;
/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Longest SSH public key line accepted (a 16384-bit RSA key is about 2.8 KiB).
pub const MAX_SSH_KEY_LEN: usize = 8192;

/// Key types OpenSSH writes into `.pub` files.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// True for characters no stored text may hold: control characters (NUL among them,
/// which Postgres cannot store), and the Unicode bidirectional embeddings, overrides and
/// isolates (U+202A–U+202E, U+2066–U+2069), which make text read differently from what
/// it is.
pub fn is_forbidden_char(c: char) -> bool {
    c.is_control()
        || ('\u{202A}'..='\u{202E}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// The characters [`is_forbidden_char`] refuses, as a regular expression class body (the
/// ECMA-262 dialect of JSON Schema, which Python and Rust's regex read alike).
const FORBIDDEN_CLASS: &str = r"\u0000-\u001F\u007F-\u009F\u202A-\u202E\u2066-\u2069";

/// Whitespace `str::trim` removes that is not a control character.
const SPACE_CLASS: &str = r" \u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";

/// A string `str::trim` leaves empty: what an optional field may hold to say "none".
pub const BLANK_PATTERN: &str =
    r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$";

/// What [`required_text`] accepts, as a pattern: some non-blank character, none forbidden.
pub fn required_text_pattern() -> String {
    format!("^[^{FORBIDDEN_CLASS}]*[^{FORBIDDEN_CLASS}{SPACE_CLASS}][^{FORBIDDEN_CLASS}]*$")
}

/// The base64 alphabet, one character.
const B64: &str = "[A-Za-z0-9+/]";

/// The base64 alphabet, in the order of the 6-bit values it stands for.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The characters whose 6 bits start with `high` (the top `bits` of them) and end freely.
fn b64_class(high: u8, bits: u32) -> String {
    let chars: String = ALPHABET
        .iter()
        .enumerate()
        .filter(|(i, _)| (*i as u8) >> (6 - bits) == high)
        .map(|(_, c)| *c as char)
        .collect();
    format!("[{chars}]")
}

/// Canonical base64 (padded, no stray bits) of `min` or more arbitrary bytes.
fn b64_bytes(at_least_one: bool) -> String {
    // A last group of one byte leaves 4 zero bits, of two bytes 2 zero bits.
    let one = format!("{B64}{}==", b64_zero_low(4));
    let two = format!("{B64}{B64}{}=", b64_zero_low(2));
    let tail = format!("(?:{B64}{{4}}|{two}|{one})");
    if at_least_one {
        format!("(?:{B64}{{4}})*{tail}")
    } else {
        format!("(?:{B64}{{4}})*(?:{two}|{one})?")
    }
}

/// The characters whose low `bits` bits are zero.
fn b64_zero_low(bits: u32) -> String {
    let chars: String = ALPHABET
        .iter()
        .enumerate()
        .filter(|(i, _)| i % (1 << bits) == 0)
        .map(|(_, c)| *c as char)
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!("[{chars}]")
}

/// Canonical base64 of the bytes `prefix` followed by one or more arbitrary bytes.
fn b64_with_prefix(prefix: &[u8]) -> String {
    use base64::Engine;
    let whole = prefix.len() / 3 * 3;
    let fixed = base64::engine::general_purpose::STANDARD.encode(&prefix[..whole]);
    let rest = &prefix[whole..];
    let free = |chars: usize| format!("{B64}{{{chars}}}");
    match *rest {
        [] => format!("{fixed}{}", b64_bytes(true)),
        [a] => {
            // a + d1 (+ d2): the first character is a's top 6 bits, the second starts
            // with a's low 2 bits.
            let c1 = base64::engine::general_purpose::STANDARD.encode([a, 0, 0]);
            let c1 = &c1[..1];
            let c2 = b64_class(a & 0b11, 2);
            format!(
                "{fixed}{c1}{c2}(?:{}=|{}{})",
                b64_zero_low(2),
                free(2),
                b64_bytes(false)
            )
        }
        [a, b, ..] => {
            let c12 = base64::engine::general_purpose::STANDARD.encode([a, b, 0]);
            let c12 = &c12[..2];
            let c3 = b64_class(b & 0b1111, 4);
            format!("{fixed}{c12}{c3}{B64}{}", b64_bytes(false))
        }
    }
}

/// What [`ssh_public_key`] accepts, as a pattern: one known key type, a blob that is
/// canonical base64 of an SSH string naming that type followed by key data, an optional
/// comment, spaces around it, and one optional trailing newline.
pub fn ssh_public_key_pattern() -> String {
    let keys: Vec<String> = SSH_KEY_TYPES
        .iter()
        .map(|kind| {
            let mut prefix = (kind.len() as u32).to_be_bytes().to_vec();
            prefix.extend_from_slice(kind.as_bytes());
            format!("{} {}", kind.replace('.', "\\."), b64_with_prefix(&prefix))
        })
        .collect();
    format!(
        "^[{SPACE_CLASS}]*(?:{})(?: [^{FORBIDDEN_CLASS}]*)?[{SPACE_CLASS}]*\n?$",
        keys.join("|")
    )
}

/// Declares a validated input: a string that got in only through `parse`, which applies
/// the check given, so a signature taking one cannot be handed an unchecked string.
macro_rules! validated {
    ($(#[$meta:meta])* $name:ident, $check:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            /// Checks `value`; the error names the request field.
            pub fn parse(value: &str) -> Result<Self, BrokerError> {
                let check: fn(&str) -> Result<(), BrokerError> = $check;
                check(value)?;
                Ok(Self(value.to_owned()))
            }

            /// The value, as checked.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

validated!(
    /// A provider config's name as a request gives it.
    ProviderName,
    |v| required_text("provider", v, MAX_PROVIDER_LEN)
);
validated!(
    /// An image name as a request gives it.
    ImageName,
    |v| required_text("image", v, MAX_IMAGE_LEN)
);
validated!(
    /// An instance type name as a request gives it.
    InstanceTypeName,
    |v| required_text("instance_type", v, MAX_INSTANCE_TYPE_LEN)
);
validated!(
    /// One OpenSSH public key line, checked by [`ssh_public_key`].
    SshPublicKey,
    ssh_public_key
);
validated!(
    /// A pool's name, checked by [`pool_name`].
    PoolName,
    pool_name
);
validated!(
    /// An `Idempotency-Key` header, checked by [`idempotency_key`].
    IdempotencyKey,
    idempotency_key
);

impl PoolName {
    /// A pool's name as another request field gives it (a filter's `pool`): the same rule,
    /// the error naming `field`.
    pub fn parse_as(field: &'static str, value: &str) -> Result<Self, BrokerError> {
        Self::parse(value).map_err(|error| match error {
            BrokerError::Invalid { message, .. } => BrokerError::Invalid { field, message },
            other => other,
        })
    }
}

/// The longest lifetime a request may ask for when the broker sets no bound: a year.
pub const MAX_TTL_SECONDS: u64 = 366 * 24 * 3600;

/// How long an instance lives: what its request asked for (`ttl_seconds`), within the
/// longest lifetime the broker gives, or that longest lifetime when it asked for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime(std::time::Duration);

impl Lifetime {
    /// The lifetime of a request asking for `ttl_seconds` where the longest is `longest`
    /// (`None`: no bound and no default); `None` when the instance never expires.
    pub fn parse(
        ttl_seconds: Option<u64>,
        longest: Option<std::time::Duration>,
    ) -> Result<Option<Self>, BrokerError> {
        let Some(asked) = ttl_seconds else {
            return Ok(longest.map(Self));
        };
        let most = Self::most_seconds(longest);
        if !(1..=most).contains(&asked) {
            let why = if longest.is_some() {
                "the longest lifetime this broker gives"
            } else {
                "a year"
            };
            return Err(BrokerError::invalid(
                "ttl_seconds",
                format!("ttl_seconds must be from 1 to {most} ({why})"),
            ));
        }
        Ok(Some(Self(std::time::Duration::from_secs(asked))))
    }

    /// Checks a pool's or a provider's longest lifetime `secs` (its `field`) against the
    /// broker's longest, `broker`.
    pub fn check_bound(
        field: &'static str,
        secs: u64,
        broker: Option<std::time::Duration>,
    ) -> Result<(), BrokerError> {
        Self::parse(Some(secs), broker)
            .map(|_| ())
            .map_err(|_out_of_range| {
                BrokerError::invalid(
                    field,
                    format!("{field} must be from 1 to {}", Self::most_seconds(broker)),
                )
            })
    }

    /// The longest an instance lives under the bounds of its pool and its provider (in
    /// seconds; the shorter wins), else under the broker's, `broker`.
    pub fn longest(
        pool: Option<u64>,
        provider: Option<u64>,
        broker: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        match (pool, provider) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(std::time::Duration::from_secs)
        .or(broker)
    }

    /// The largest `ttl_seconds` a request may ask for where the longest lifetime is
    /// `longest`.
    pub fn most_seconds(longest: Option<std::time::Duration>) -> u64 {
        longest.map_or(MAX_TTL_SECONDS, |l| l.as_secs().clamp(1, MAX_TTL_SECONDS))
    }

    /// The lifetime as a Postgres interval, to add to a row's creation time.
    pub fn interval(self) -> diesel::pg::data_types::PgInterval {
        let micros = i64::try_from(self.0.as_micros()).unwrap_or(i64::MAX);
        diesel::pg::data_types::PgInterval::from_microseconds(micros)
    }
}

/// What a pool's name may be: a letter or digit, then up to 62 letters, digits, `.`, `_`
/// or `-` (it is a path segment of `/pools/<name>`).
pub const POOL_NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$";

fn pool_name(value: &str) -> Result<(), BrokerError> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok && value.len() <= 63 {
        Ok(())
    } else {
        Err(BrokerError::invalid(
            "name",
            "a pool's name is a letter or digit, then up to 62 letters, digits, '.', '_' or '-'",
        ))
    }
}

/// A required text field: present, not blank, not too long, no control characters.
fn required_text(field: &'static str, value: &str, max: usize) -> Result<(), BrokerError> {
    if value.trim().is_empty() {
        return Err(BrokerError::invalid(
            field,
            format!("{field} must not be empty"),
        ));
    }
    if value.chars().count() > max {
        return Err(BrokerError::invalid(
            field,
            format!("{field} must be at most {max} characters"),
        ));
    }
    if value.chars().any(is_forbidden_char) {
        return Err(BrokerError::invalid(
            field,
            format!("{field} must not contain control or bidirectional-override characters"),
        ));
    }
    Ok(())
}

/// An `Idempotency-Key`: 1 to 255 printable ASCII characters.
fn idempotency_key(value: &str) -> Result<(), BrokerError> {
    if value.is_empty()
        || value.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(BrokerError::invalid(
            "Idempotency-Key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
            ),
        ));
    }
    Ok(())
}

/// A single OpenSSH public key line: `<type> <base64 key blob> [comment]`, nothing more.
///
/// The key ends up in a cloud's metadata or cloud-init, so options (`command="…"`), extra
/// lines and control characters are refused, and the blob must decode and name the same
/// key type as the line does.
fn ssh_public_key(value: &str) -> Result<(), BrokerError> {
    let invalid = |why: &str| {
        BrokerError::invalid(
            "public_ssh_key",
            format!("public_ssh_key must be one OpenSSH public key line ({why})"),
        )
    };
    if value.chars().count() > MAX_SSH_KEY_LEN {
        return Err(invalid("too long"));
    }
    let line = value.strip_suffix('\n').unwrap_or(value);
    if line.chars().any(is_forbidden_char) {
        return Err(invalid("it has line breaks or control characters"));
    }
    let mut parts = line.trim().splitn(3, ' ');
    let key_type = parts.next().unwrap_or_default();
    let blob = parts.next().unwrap_or_default();
    if !SSH_KEY_TYPES.contains(&key_type) {
        return Err(invalid(
            "unknown key type; expected e.g. ssh-ed25519 or ssh-rsa",
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_not_base64| invalid("the key is not valid base64"))?;
    // The blob starts with the key type as an SSH string: u32 length, then the bytes.
    let named = decoded
        .get(..4)
        .map(|len| u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
        .and_then(|len| decoded.get(4..4 + len));
    if named != Some(key_type.as_bytes()) || decoded.len() <= 4 + key_type.len() {
        return Err(invalid("the key data does not match its type"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifetime_is_what_was_asked_within_the_longest_or_the_longest() {
        let hours = |h: u64| Some(std::time::Duration::from_secs(h * 3600));
        let asked = |s: u64| Some(Lifetime(std::time::Duration::from_secs(s)));
        assert_eq!(Lifetime::parse(None, hours(3)).unwrap(), asked(3 * 3600));
        assert_eq!(Lifetime::parse(Some(60), hours(3)).unwrap(), asked(60));
        assert_eq!(
            Lifetime::parse(Some(3 * 3600), hours(3)).unwrap(),
            asked(3 * 3600)
        );
        assert_eq!(Lifetime::parse(None, None).unwrap(), None);
        assert_eq!(Lifetime::parse(Some(86_400), None).unwrap(), asked(86_400));
        for (ttl, longest) in [
            (0, hours(3)),
            (3 * 3600 + 1, hours(3)),
            (MAX_TTL_SECONDS + 1, None),
            (u64::MAX, None),
        ] {
            let err = Lifetime::parse(Some(ttl), longest).unwrap_err();
            assert!(
                matches!(
                    err,
                    BrokerError::Invalid {
                        field: "ttl_seconds",
                        ..
                    }
                ),
                "{ttl}: {err}"
            );
        }
        let minute = Lifetime::parse(Some(60), None).unwrap().unwrap();
        assert_eq!(minute.interval().microseconds, 60_000_000);
    }

    /// The patterns the OpenAPI document states say yes and no exactly where the checks do.
    #[test]
    fn the_documented_patterns_agree_with_the_checks() {
        use base64::Engine;
        let key_pattern = regex::Regex::new(&ssh_public_key_pattern()).unwrap();
        let text_pattern = regex::Regex::new(&required_text_pattern()).unwrap();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut candidates: Vec<String> = vec![
            ED25519.to_owned(),
            format!("{ED25519}\n"),
            format!("  {ED25519}  "),
            format!("\u{a0}{ED25519}\u{3000}"),
            format!("\t{ED25519}"),
            format!("{ED25519}\n\n"),
            format!("{ED25519} two words\u{202e}"),
            ED25519.replace(' ', "  "),
            String::new(),
            " ".to_owned(),
        ];
        // Every key type, with blobs of every length and padding, right and wrong.
        for kind in SSH_KEY_TYPES {
            for other in ["ssh-ed25519", "ssh-rsa", kind] {
                let mut blob = (other.len() as u32).to_be_bytes().to_vec();
                blob.extend_from_slice(other.as_bytes());
                for extra in 0..5u8 {
                    let mut full = blob.clone();
                    full.extend((0..extra).map(|i| i.wrapping_mul(97).wrapping_add(13)));
                    let encoded = b64(&full);
                    candidates.push(format!("{kind} {encoded}"));
                    candidates.push(format!("{kind} {encoded} user@host"));
                    candidates.push(format!("{kind} {}", encoded.trim_end_matches('=')));
                    // A stray bit in the last character: not canonical base64.
                    if let Some(last) = encoded.trim_end_matches('=').chars().last() {
                        if encoded.ends_with('=') && last != 'z' {
                            let bumped = ((last as u8) + 1) as char;
                            let stray = format!(
                                "{}{bumped}{}",
                                &encoded[..encoded.trim_end_matches('=').len() - 1],
                                &encoded[encoded.trim_end_matches('=').len()..]
                            );
                            candidates.push(format!("{kind} {stray}"));
                        }
                    }
                }
            }
        }
        for candidate in &candidates {
            let line = candidate.as_str();
            assert_eq!(
                key_pattern.is_match(line),
                ssh_public_key(line).is_ok(),
                "{line:?}"
            );
        }
        let blank = regex::Regex::new(BLANK_PATTERN).unwrap();
        for text in ["", " \t\n", "\u{85}\u{3000}", "\u{1c}", "a", " a "] {
            assert_eq!(blank.is_match(text), text.trim().is_empty(), "{text:?}");
        }
        for text in [
            "ubuntu",
            " ubuntu ",
            "",
            " ",
            "\u{a0}",
            "ü",
            "a\u{0}",
            "a\u{202a}",
            "a\u{85}",
            "a\tb",
            "\u{2028}x",
        ] {
            assert_eq!(
                text_pattern.is_match(text),
                required_text("f", text, 1000).is_ok(),
                "{text:?}"
            );
        }
    }

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host";

    #[test]
    fn accepts_an_openssh_key_line() {
        ssh_public_key(ED25519).unwrap();
        ssh_public_key(&format!("{ED25519}\n")).unwrap();
        ssh_public_key(ED25519.rsplit_once(' ').unwrap().0).unwrap();
    }

    #[test]
    fn refuses_anything_that_could_smuggle_more() {
        for bad in [
            "",
            "hello",
            &format!("command=\"rm -rf /\" {ED25519}"),
            &format!("{ED25519}\nssh-ed25519 AAAA"),
            &format!("{ED25519}\r"),
            "ssh-ed25519 !!!notbase64",
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
            &format!("{ED25519} #!/bin/sh\u{7}"),
        ] {
            assert!(ssh_public_key(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn text_fields_name_themselves() {
        let err = required_text("image", "", 255).unwrap_err();
        assert_eq!(err.to_string(), "image: image must not be empty");
        assert!(required_text("image", &"x".repeat(256), 255).is_err());
        assert!(required_text("image", "ubuntu\u{0}", 255).is_err());
        for bidi in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
            assert!(required_text("image", &format!("ubuntu{bidi}"), 255).is_err());
        }
        required_text("image", "ubuntu-24.04-ü", 255).unwrap();
        required_text("image", "ubuntu-24.04", 255).unwrap();
    }
}
