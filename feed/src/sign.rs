//! Release keys and signatures (ed25519). Text formats, one line each, prefixed so that a
//! secret key is never mistaken for a public one:
//! - secret key file: `kiln-ed25519-secret:<64 hex: the 32-byte seed>`
//! - public key file: `kiln-ed25519:<64 hex>` (device.json holds the bare hex)
//! - signature file (`<channel>.json.sig`): `kiln-signature:<key id>:<128 hex>`, over the exact
//!   bytes of the `.json` file. Key id = the first 8 bytes of sha256(public key), in hex.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::Digest;

const SECRET_PREFIX: &str = "kiln-ed25519-secret:";
const PUBLIC_PREFIX: &str = "kiln-ed25519:";
const SIG_PREFIX: &str = "kiln-signature:";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignatureError {
    #[error("malformed signature file (expected \"kiln-signature:<key id>:<128 hex digits>\")")]
    Malformed,
    #[error("signed by key {0}, which this device does not trust (trusted: {1})")]
    UnknownKey(String, String),
    #[error("bad signature: the metadata was changed after it was signed by key {0}")]
    Bad(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct KeyError(String);

pub struct SecretKey(SigningKey);

#[derive(Clone, Debug, PartialEq)]
pub struct PublicKey(VerifyingKey);

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> std::io::Result<SecretKey> {
        let mut seed = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn parse(text: &str) -> Result<SecretKey, KeyError> {
        let t = text.trim();
        if t.starts_with(PUBLIC_PREFIX) {
            return Err(KeyError("this is a public key; signing needs the secret key file (kiln-release.key)".into()));
        }
        let hex = t
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| KeyError(format!("not a kiln secret key (expected \"{SECRET_PREFIX}<64 hex digits>\")")))?;
        let seed: [u8; 32] = hex::decode(hex)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| KeyError("the secret key is not 64 hex digits".into()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", hex::encode(self.0.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

impl PublicKey {
    /// `kiln-ed25519:<hex>` or the bare 64 hex digits.
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let t = text.trim();
        if t.starts_with(SECRET_PREFIX) {
            return Err(KeyError("this is a secret key; never give it to a device".into()));
        }
        let hex = t.strip_prefix(PUBLIC_PREFIX).unwrap_or(t);
        let bytes: [u8; 32] = hex::decode(hex).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| {
            KeyError(format!("not an ed25519 public key (expected \"{PUBLIC_PREFIX}<64 hex digits>\")"))
        })?;
        VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|_| KeyError("not a valid ed25519 public key".into()))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}\n", self.hex())
    }

    pub fn key_id(&self) -> String {
        hex::encode(&sha2::Sha256::digest(self.0.to_bytes())[..8])
    }
}

/// The signature file's text for `data`.
pub fn sign(key: &SecretKey, data: &[u8]) -> String {
    format!("{SIG_PREFIX}{}:{}\n", key.public().key_id(), hex::encode(key.0.sign(data).to_bytes()))
}

/// Checks `data` against a signature file and the trusted keys; returns the signing key's id.
pub fn verify(data: &[u8], sig_text: &str, keys: &[PublicKey]) -> Result<String, SignatureError> {
    let rest = sig_text.trim().strip_prefix(SIG_PREFIX).ok_or(SignatureError::Malformed)?;
    let (id, sig_hex) = rest.split_once(':').ok_or(SignatureError::Malformed)?;
    let sig: [u8; 64] = hex::decode(sig_hex).ok().and_then(|v| v.try_into().ok()).ok_or(SignatureError::Malformed)?;
    let key = keys.iter().find(|k| k.key_id() == id).ok_or_else(|| {
        SignatureError::UnknownKey(id.into(), keys.iter().map(|k| k.key_id()).collect::<Vec<_>>().join(", "))
    })?;
    key.0
        .verify_strict(data, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| SignatureError::Bad(id.into()))?;
    Ok(id.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_refuse() {
        let k = SecretKey::generate().unwrap();
        let again = SecretKey::parse(&k.to_text()).unwrap();
        assert_eq!(again.public(), k.public());
        let pubk = PublicKey::parse(&k.public().to_text()).unwrap();
        assert_eq!(PublicKey::parse(&pubk.hex()).unwrap(), pubk);
        let sig = sign(&k, b"{\"format\":1}");
        assert_eq!(verify(b"{\"format\":1}", &sig, std::slice::from_ref(&pubk)), Ok(pubk.key_id()));
        assert_eq!(
            verify(b"{\"format\":2}", &sig, std::slice::from_ref(&pubk)),
            Err(SignatureError::Bad(pubk.key_id()))
        );
        let other = SecretKey::generate().unwrap().public();
        assert!(matches!(verify(b"{\"format\":1}", &sig, &[other]), Err(SignatureError::UnknownKey(..))));
        assert_eq!(verify(b"x", "garbage", std::slice::from_ref(&pubk)), Err(SignatureError::Malformed));
        assert!(SecretKey::parse(&pubk.to_text()).is_err());
        assert!(PublicKey::parse(&k.to_text()).is_err());
    }
}
