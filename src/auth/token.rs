//! The token format `<id>-<32 hex>` and Cloud Brain's scrypt hash of it.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;

/// Length of a token's secret in bytes (32 hex characters).
pub const SECRET_LEN: usize = 16;
/// Length of the scrypt salt in bytes.
pub const SALT_LEN: usize = 32;
/// Length of the scrypt output in bytes.
pub const HASH_LEN: usize = 32;

/// A token as a client presents it: the row id and the 16 secret bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The `auth_tokens` row id.
    pub id: crate::ids::TokenId,
    /// The secret whose scrypt hash the row stores.
    pub secret: [u8; SECRET_LEN],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret, not even in a debug log.
        write!(f, "Token({}-…)", self.id)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.id, hex::encode(self.secret))
    }
}

/// Why a presented token could not even be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("token must look like <id>-<32 hex characters>")]
pub struct MalformedToken;

impl FromStr for Token {
    type Err = MalformedToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, secret_hex) = s.trim().split_once('-').ok_or(MalformedToken)?;
        if id.is_empty() || id.len() > 10 || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MalformedToken);
        }
        let id: i32 = id.parse().map_err(|_not_a_number| MalformedToken)?;
        if id <= 0 || secret_hex.len() != SECRET_LEN * 2 {
            return Err(MalformedToken);
        }
        let mut secret = [0u8; SECRET_LEN];
        hex::decode_to_slice(secret_hex, &mut secret).map_err(|_not_hex| MalformedToken)?;
        Ok(Self {
            id: crate::ids::TokenId(id),
            secret,
        })
    }
}

/// A fresh random secret and salt, and the hash to store for them.
pub struct NewSecret {
    /// The 16 secret bytes, shown to the operator once.
    pub secret: [u8; SECRET_LEN],
    /// The random salt to store.
    pub salt: [u8; SALT_LEN],
    /// The hash to store.
    pub hash: [u8; HASH_LEN],
}

/// Draws a secret and a salt from the OS's generator and hashes them (slow: runs scrypt).
pub fn generate_secret() -> NewSecret {
    let mut secret = [0u8; SECRET_LEN];
    let mut salt = [0u8; SALT_LEN];
    let mut rng = rand::rng();
    rng.fill_bytes(&mut secret);
    rng.fill_bytes(&mut salt);
    let hash = hash_secret(&secret, &salt);
    NewSecret { secret, salt, hash }
}

/// Cloud Brain's hash: scrypt(N=16384, r=8, p=1) of the raw secret bytes, 32 bytes out.
///
/// Deliberately slow (tens of milliseconds): call it off the async executor.
pub fn hash_secret(secret: &[u8], salt: &[u8]) -> [u8; HASH_LEN] {
    let mut out = [0u8; HASH_LEN];
    // log2(16384) = 14. These parameters are valid, so neither call can fail; a failure
    // would leave `out` zeroed, which no stored hash equals.
    if let Ok(params) = scrypt::Params::new(14, 8, 1, HASH_LEN) {
        let _ = scrypt::scrypt(secret, salt, &params, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_cloud_brain_format() {
        let token: Token = "42-00112233445566778899aabbccddeeff".parse().unwrap();
        assert_eq!(token.id, crate::ids::TokenId(42));
        assert_eq!(token.secret[0], 0x00);
        assert_eq!(token.secret[15], 0xff);
        assert_eq!(token.to_string(), "42-00112233445566778899aabbccddeeff");
        assert_eq!(format!("{token:?}"), "Token(42-…)");
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            "",
            "42",
            "42-",
            "-00112233445566778899aabbccddeeff",
            "0-00112233445566778899aabbccddeeff",
            "+4-00112233445566778899aabbccddeeff",
            "99999999999-00112233445566778899aabbccddeeff",
            "42-00112233445566778899aabbccddeef",
            "42-00112233445566778899aabbccddeeffaa",
            "42-zz112233445566778899aabbccddeeff",
            "4 2-00112233445566778899aabbccddeeff",
        ] {
            assert_eq!(bad.parse::<Token>(), Err(MalformedToken), "{bad:?}");
        }
    }
}
