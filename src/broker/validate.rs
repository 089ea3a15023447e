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

/// A required text field: present, not blank, not too long, no control characters.
pub fn required_text(field: &'static str, value: &str, max: usize) -> Result<(), BrokerError> {
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
pub fn idempotency_key(value: &str) -> Result<(), BrokerError> {
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
pub fn ssh_public_key(value: &str) -> Result<(), BrokerError> {
    let invalid = |why: &str| {
        BrokerError::invalid(
            "public_ssh_key",
            format!("public_ssh_key must be one OpenSSH public key line ({why})"),
        )
    };
    if value.len() > MAX_SSH_KEY_LEN {
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
        .map_err(|_| invalid("the key is not valid base64"))?;
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
