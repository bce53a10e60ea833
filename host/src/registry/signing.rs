//! Publisher signatures: ed25519 over the component *and its manifest*.
//!
//! The manifest says what the module is called, who wrote it and which
//! budgets it asks for, so a signature over the component alone would let
//! anyone republish a signed component under another name, a spoofed
//! author and maximum budgets. The signed message ([`signed_message`]) binds
//! both: a domain tag, then the sha256 of the component and the sha256 of
//! the manifest text, byte for byte.
//!
//! A publisher makes a key pair once (`tessera modules keygen`), signs each
//! module (`tessera modules sign x.wasm`, which reads `x.toml` beside it and
//! writes `x.wasm.sig`), and gives the operator the public key. The operator trusts it by putting it in
//! the registry's `trusted-keys/` folder (`tessera modules trust`).
//!
//! The rule is simple on purpose: when the operator trusts any key, every
//! publish must carry a signature that one of them verifies; when the
//! operator trusts none, signatures are not required, and one that is sent
//! anyway is refused rather than silently ignored (there is nothing to
//! check it against). Keys and signatures are stored as hex text.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::Error;

/// The operator's trusted publisher keys.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
}

fn parse_hex<const N: usize>(text: &str, what: &str, file: &Path) -> Result<[u8; N], Error> {
    let bytes =
        hex::decode(text.trim()).map_err(|e| Error::config(format!("{}: not a hex {what}: {e}", file.display())))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        Error::config(format!(
            "{}: a {what} is {N} bytes, this is {} (make one with `tessera modules keygen`)",
            file.display(),
            b.len()
        ))
    })
}

impl TrustedKeys {
    /// Reads every `*.pub` file in `dir` (a missing folder trusts nobody).
    /// A malformed key file is an error naming it: an operator who meant to
    /// trust a key must not end up trusting none.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let mut keys = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(Self::default());
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pub"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| Error::config(format!("{}: {e}", f.display())))?;
            let bytes = parse_hex::<32>(&text, "public key", &f)?;
            let key = VerifyingKey::from_bytes(&bytes)
                .map_err(|e| Error::config(format!("{}: not an ed25519 public key: {e}", f.display())))?;
            keys.push((hex::encode(bytes), key));
        }
        Ok(TrustedKeys { keys })
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted (signatures not required).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Applies the rule above to one publish. Returns the hex key that
    /// verified, or `None` when no signature is required and none was sent.
    pub fn check(&self, wasm: &[u8], manifest_toml: &str, signature: Option<&[u8]>) -> Result<Option<String>, Error> {
        let bad = |message: String| Error::InvalidModule {
            path: "(upload)".into(),
            message,
        };
        match (signature, self.keys.is_empty()) {
            (None, true) => Ok(None),
            (None, false) => Err(bad(
                "this registry accepts only signed modules: sign it with `tessera modules sign` and send the signature"
                    .into(),
            )),
            (Some(_), true) => Err(bad(
                "the module is signed but the operator trusts no publisher key: add the publisher's key with `tessera modules trust KEY.pub`, or publish without a signature".into(),
            )),
            (Some(sig), false) => {
                let text = std::str::from_utf8(sig).map_err(|_| bad("the signature is not hex text".into()))?;
                let bytes: [u8; 64] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| bad("the signature is not 64 bytes of hex (as `tessera modules sign` writes)".into()))?;
                let sig = Signature::from_bytes(&bytes);
                let message = signed_message(wasm, manifest_toml);
                self.keys
                    .iter()
                    .find(|(_, k)| k.verify(&message, &sig).is_ok())
                    .map(|(hex, _)| Some(hex.clone()))
                    .ok_or_else(|| {
                        bad("the signature does not verify against any trusted publisher key: the component or its manifest was changed after signing, or it was signed with a key the operator does not trust".into())
                    })
            }
        }
    }
}

/// Why a text is not a usable publisher key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not hexadecimal.
    #[error("not hex: {0}")]
    NotHex(String),
    /// The text decodes to the wrong number of bytes.
    #[error("a public key is 32 bytes, this is {0}")]
    Length(usize),
    /// The 32 bytes are not a point of the curve.
    #[error("not an ed25519 public key: {0}")]
    NotAKey(String),
}

/// Checks that `text` is an ed25519 public key in hex, as a `.pub` file
/// holds it; the error says what is wrong.
pub fn check_public_key(text: &str) -> Result<(), KeyError> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .map_err(|e| KeyError::NotHex(e.to_string()))?
        .try_into()
        .map_err(|b: Vec<u8>| KeyError::Length(b.len()))?;
    VerifyingKey::from_bytes(&bytes)
        .map(|_| ())
        .map_err(|e| KeyError::NotAKey(e.to_string()))
}

/// A new key pair: `(secret hex, public hex)`.
pub fn keygen() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    (hex::encode(seed), hex::encode(key.verifying_key().to_bytes()))
}

/// What a publisher signs: a domain tag, the sha256 of the component and
/// the sha256 of the manifest text. Changing either invalidates the
/// signature.
pub fn signed_message(wasm: &[u8], manifest_toml: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut m = b"tessera-module-signature-v2\0".to_vec();
    m.extend_from_slice(&Sha256::digest(wasm));
    m.extend_from_slice(&Sha256::digest(manifest_toml.as_bytes()));
    m
}

/// Signs the module (`wasm` with `manifest_toml`) with the secret key in
/// `key_file`; the signature as hex.
pub fn sign(wasm: &[u8], manifest_toml: &str, key_file: &Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(key_file).map_err(|e| Error::config(format!("{}: {e}", key_file.display())))?;
    let seed = parse_hex::<32>(&text, "secret key", key_file)?;
    let message = signed_message(wasm, manifest_toml);
    Ok(hex::encode(SigningKey::from_bytes(&seed).sign(&message).to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted_with(public: &str) -> TrustedKeys {
        let bytes: [u8; 32] = hex::decode(public).unwrap().try_into().unwrap();
        TrustedKeys {
            keys: vec![(public.to_string(), VerifyingKey::from_bytes(&bytes).unwrap())],
        }
    }

    #[test]
    fn a_signature_verifies_and_a_changed_module_or_manifest_does_not() {
        let dir = std::env::temp_dir().join(format!("tessera-sign-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (secret, public) = keygen();
        let key_file = dir.join("k.key");
        std::fs::write(&key_file, &secret).unwrap();
        let manifest = "name = 'alice-vote'\nauthor = 'alice'\n";
        let sig = sign(b"component bytes", manifest, &key_file).unwrap();
        let trusted = trusted_with(&public);
        assert_eq!(
            trusted
                .check(b"component bytes", manifest, Some(sig.as_bytes()))
                .unwrap(),
            Some(public)
        );
        let err = trusted
            .check(b"component bytez", manifest, Some(sig.as_bytes()))
            .unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        // The same component under another name, author or budgets: refused.
        let spoofed = "name = 'other-vote'\nauthor = 'mallory'\n[budgets]\nhost_calls = 1024\n";
        let err = trusted
            .check(b"component bytes", spoofed, Some(sig.as_bytes()))
            .unwrap_err();
        assert!(err.to_string().contains("manifest"), "{err}");
        let err = trusted.check(b"component bytes", manifest, None).unwrap_err();
        assert!(err.to_string().contains("only signed modules"), "{err}");
        // Nobody trusted: unsigned is fine, signed is refused with the fix.
        assert_eq!(TrustedKeys::default().check(b"x", manifest, None).unwrap(), None);
        let err = TrustedKeys::default()
            .check(b"x", manifest, Some(sig.as_bytes()))
            .unwrap_err();
        assert!(err.to_string().contains("modules trust"), "{err}");
    }

    #[test]
    fn a_malformed_key_file_is_named() {
        let dir = std::env::temp_dir().join(format!("tessera-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.pub"), "abcd").unwrap();
        let err = TrustedKeys::load(&dir).unwrap_err().to_string();
        assert!(err.contains("bad.pub") && err.contains("32 bytes"), "{err}");
    }
}
