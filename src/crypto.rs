//! Sealing provider configs with NaCl secretbox, Cloud Brain's scheme: a random 24-byte
//! nonce followed by the box, under a 32-byte key given as 64 hex characters.

use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::{Key, Nonce, XSalsa20Poly1305};
use rand::RngCore;

const NONCE_LEN: usize = 24;

/// The key that seals provider configs at rest.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// A sealed value that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("sealed data cannot be opened with this key (wrong CLOUDBRAIN_DATABASE_ENCRYPTION_KEY, or corrupt data)")]
pub struct OpenError;

impl SecretKey {
    /// Reads a key written as 64 hex characters.
    pub fn from_hex(hex_key: &str) -> Result<Self, String> {
        let hex_key = hex_key.trim();
        if hex_key.len() != 64 {
            return Err(format!(
                "must be 64 hex characters (32 bytes), got {} characters",
                hex_key.len()
            ));
        }
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut key)
            .map_err(|_not_hex| "must contain only hex characters 0-9 and a-f".to_owned())?;
        Ok(Self(key))
    }

    /// Seals `plain` under this key with a fresh random nonce.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let cipher = XSalsa20Poly1305::new(Key::from_slice(&self.0));
        // Encryption into a Vec cannot fail: XSalsa20Poly1305 only fails on buffer overflow.
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`SecretKey::seal`] (or Cloud Brain) sealed under this key.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, boxed) = sealed.split_at(NONCE_LEN);
        XSalsa20Poly1305::new(Key::from_slice(&self.0))
            .decrypt(Nonce::from_slice(nonce), boxed)
            .map_err(|_forged_or_wrong_key| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn sealed_config_opens_only_with_its_key() {
        let key = SecretKey::from_hex(KEY).unwrap();
        let sealed = key.seal(br#"{"secret":"x"}"#);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(key.open(&sealed).unwrap(), br#"{"secret":"x"}"#);
        let other = SecretKey::from_hex(&KEY.replace("1f", "ff")).unwrap();
        assert!(other.open(&sealed).is_err());
        assert!(key.open(&sealed[..10]).is_err());
    }

    #[test]
    fn opens_a_box_made_by_libsodium() {
        // crypto_secretbox_easy from PyNaCl with KEY, nonce 24 x 0x07 and message "cloud brain".
        let sealed = hex::decode(LIBSODIUM_BOX).unwrap();
        let key = SecretKey::from_hex(KEY).unwrap();
        assert_eq!(key.open(&sealed).unwrap(), b"cloud brain");
    }

    const LIBSODIUM_BOX: &str = "0707070707070707070707070707070707070707070707078adef861ccdc5943214081fefce2e80877b9803fac47724b812a69";

    #[test]
    fn malformed_keys_are_refused_with_a_reason() {
        assert!(SecretKey::from_hex("abcd").unwrap_err().contains("64 hex"));
        assert!(SecretKey::from_hex(&"zz".repeat(32))
            .unwrap_err()
            .contains("hex"));
    }
}
