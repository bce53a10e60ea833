//! Persisted `fit` state: any serde type, encoded compactly with postcard.
//! The host stores the bytes and hands them back in `Request::state`; a
//! strategy that changes its state type should bump `version` so that old
//! bytes are reported instead of misread.

use serde::{de::DeserializeOwned, Serialize};

use crate::Error;

/// Encodes `value` with a leading format `version`.
pub fn save<T: Serialize>(version: u8, value: &T) -> Result<Vec<u8>, Error> {
    let mut out = vec![version];
    let body = postcard::to_allocvec(value).map_err(|e| Error::ModuleFailed(format!("encoding state: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes state saved by [`save`] with the same `version`. `None` bytes
/// (never fitted) give `Ok(None)`; bytes of another version or shape give an
/// `invalid-params` error that says to run `fit` again.
pub fn load<T: DeserializeOwned>(version: u8, bytes: Option<&[u8]>) -> Result<Option<T>, Error> {
    let Some(bytes) = bytes else { return Ok(None) };
    match bytes.split_first() {
        Some((&v, body)) if v == version => postcard::from_bytes(body)
            .map(Some)
            .map_err(|e| Error::InvalidParams(format!("stored fit state does not decode ({e}); run fit again"))),
        _ => Err(Error::InvalidParams(format!(
            "stored fit state is not version {version}; run fit again"
        ))),
    }
}

/// A 64-bit FNV-1a fingerprint of `parts` (each one length-prefixed, so
/// `["ab", "c"]` and `["a", "bc"]` differ): a stable, short name for what a
/// `fit` was given, e.g. to name the member it keeps so that an identical
/// fit finds it again. Not a cryptographic hash.
pub fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for p in parts {
        eat(&(p.len() as u64).to_le_bytes());
        eat(p);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_versions() {
        let v = vec![("a".to_string(), 1.5f32)];
        let b = save(3, &v).unwrap();
        assert_eq!(load::<Vec<(String, f32)>>(3, Some(&b)).unwrap(), Some(v));
        assert!(load::<Vec<(String, f32)>>(4, Some(&b)).is_err());
        assert_eq!(load::<u8>(3, None).unwrap(), None);
    }

    #[test]
    fn fingerprints_are_stable_and_separate_their_parts() {
        let a = fingerprint([b"ab".as_slice(), b"c"]);
        assert_eq!(a, fingerprint([b"ab".as_slice(), b"c"]));
        assert_ne!(a, fingerprint([b"a".as_slice(), b"bc"]));
    }
}
