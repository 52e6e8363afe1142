//! [`Codec`]: how the generic key/value adapters turn keys and values into bytes.
//!
//! The codec table is in the [`stores`](crate::stores#codecs) docs.
//!
//! # Examples
//! ```
//! use writebehind::stores::{Codec, Raw};
//!
//! let bytes = Raw.encode(&42u64).unwrap();
//! assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 42]);
//! assert_eq!(Codec::<u64>::decode(&Raw, &bytes).unwrap(), 42);
//!
//! // i64 keys sort in numeric order as bytes, negative ones first.
//! assert!(Raw.encode(&-1i64).unwrap() < Raw.encode(&0i64).unwrap());
//! ```

/// What a codec fails with: any error, boxed. Adapters report it as
/// [`StoreError::Rejected`](crate::StoreError::Rejected) for that record.
pub type CodecError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Two-way mapping between `T` and the bytes stored in a key or value column.
///
/// Implementations must be deterministic and `decode(encode(x)) == x`; for keys, equal keys
/// must give equal bytes (the database compares the bytes, not the Rust values).
///
/// # Examples
/// A codec for keys that are `u32`, stored as 4 big-endian bytes:
/// ```
/// use writebehind::stores::{Codec, CodecError};
///
/// struct U32Be;
///
/// impl Codec<u32> for U32Be {
///     fn encode(&self, value: &u32) -> Result<Vec<u8>, CodecError> {
///         Ok(value.to_be_bytes().to_vec())
///     }
///     fn decode(&self, bytes: &[u8]) -> Result<u32, CodecError> {
///         let arr: [u8; 4] = bytes.try_into().map_err(|_| "expected 4 bytes")?;
///         Ok(u32::from_be_bytes(arr))
///     }
/// }
///
/// assert_eq!(U32Be.decode(&U32Be.encode(&7).unwrap()).unwrap(), 7);
/// assert!(U32Be.decode(&[1, 2]).is_err());
/// ```
pub trait Codec<T>: Send + Sync + 'static {
    /// The bytes to store for `value`.
    ///
    /// # Errors
    /// When `value` cannot be represented; the adapter rejects that record.
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError>;

    /// Appends the bytes of `value` to `out` (what [`encode`](Self::encode) returns). The
    /// journal encodes every write into a reused buffer through this; override it to skip
    /// `encode`'s allocation. On an error, what was appended is discarded.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    fn encode_into(&self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend_from_slice(&self.encode(value)?);
        Ok(())
    }

    /// The value stored as `bytes`.
    ///
    /// # Errors
    /// When `bytes` are not a valid encoding (a row written by something else); the adapter
    /// reports [`StoreError::Rejected`](crate::StoreError::Rejected).
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// The plain codec for bytes, strings and 64-bit integers (see
/// [Codecs](crate::stores#codecs)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Raw;

impl Codec<Vec<u8>> for Raw {
    fn encode(&self, value: &Vec<u8>) -> Result<Vec<u8>, CodecError> {
        Ok(value.clone())
    }

    fn encode_into(&self, value: &Vec<u8>, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend_from_slice(value);
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        Ok(bytes.to_vec())
    }
}

impl Codec<String> for Raw {
    fn encode(&self, value: &String) -> Result<Vec<u8>, CodecError> {
        Ok(value.as_bytes().to_vec())
    }

    fn encode_into(&self, value: &String, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend_from_slice(value.as_bytes());
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<String, CodecError> {
        Ok(String::from_utf8(bytes.to_vec())?)
    }
}

fn eight_bytes(bytes: &[u8]) -> Result<[u8; 8], CodecError> {
    bytes
        .try_into()
        .map_err(|_| format!("expected an 8-byte integer, found {} bytes", bytes.len()).into())
}

impl Codec<u64> for Raw {
    fn encode(&self, value: &u64) -> Result<Vec<u8>, CodecError> {
        Ok(value.to_be_bytes().to_vec())
    }

    fn encode_into(&self, value: &u64, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend_from_slice(&value.to_be_bytes());
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(eight_bytes(bytes)?))
    }
}

/// Flipping the sign bit maps `i64::MIN..=i64::MAX` onto `0..=u64::MAX` in order.
const SIGN: u64 = 1 << 63;

impl Codec<i64> for Raw {
    fn encode(&self, value: &i64) -> Result<Vec<u8>, CodecError> {
        Ok(((*value as u64) ^ SIGN).to_be_bytes().to_vec())
    }

    fn encode_into(&self, value: &i64, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend_from_slice(&((*value as u64) ^ SIGN).to_be_bytes());
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<i64, CodecError> {
        Ok((u64::from_be_bytes(eight_bytes(bytes)?) ^ SIGN) as i64)
    }
}

/// A codec for any serde type, stored as JSON (feature `serde`).
///
/// # Examples
/// ```
/// use serde::{Deserialize, Serialize};
/// use writebehind::stores::{Codec, SerdeJson};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Profile { name: String, visits: u64 }
///
/// let p = Profile { name: "ada".into(), visits: 3 };
/// let bytes = SerdeJson.encode(&p).unwrap();
/// assert_eq!(bytes, br#"{"name":"ada","visits":3}"#);
/// assert_eq!(SerdeJson.decode(&bytes).ok(), Some(p));
/// ```
#[cfg(feature = "serde")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SerdeJson;

#[cfg(feature = "serde")]
impl<T> Codec<T> for SerdeJson
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        Ok(serde_json::to_vec(value)?)
    }

    fn encode_into(&self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        Ok(serde_json::to_writer(out, value)?)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trips() {
        for v in [0u64, 1, 255, 256, u64::MAX] {
            assert_eq!(
                Codec::<u64>::decode(&Raw, &Raw.encode(&v).unwrap()).unwrap(),
                v
            );
        }
        for v in [i64::MIN, -1, 0, 1, i64::MAX] {
            assert_eq!(
                Codec::<i64>::decode(&Raw, &Raw.encode(&v).unwrap()).unwrap(),
                v
            );
        }
        let s = "grüße".to_string();
        assert_eq!(
            Codec::<String>::decode(&Raw, &Raw.encode(&s).unwrap()).unwrap(),
            s
        );
        let b = vec![0u8, 1, 2, 255];
        assert_eq!(
            Codec::<Vec<u8>>::decode(&Raw, &Raw.encode(&b).unwrap()).unwrap(),
            b
        );
    }

    /// `encode_into` appends exactly what `encode` returns.
    fn appends_like_encode<T: 'static>(c: &dyn Codec<T>, v: &T) {
        let mut out = b"prefix".to_vec();
        c.encode_into(v, &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(out[6..], c.encode(v).unwrap()[..]);
    }

    #[test]
    fn encode_into_appends_what_encode_returns() {
        appends_like_encode::<u64>(&Raw, &0x0102_0304_0506_0708);
        appends_like_encode::<i64>(&Raw, &-5);
        appends_like_encode::<String>(&Raw, &"grüße".to_string());
        appends_like_encode::<Vec<u8>>(&Raw, &vec![0, 1, 255]);
        #[cfg(feature = "serde")]
        appends_like_encode::<Vec<(u32, String)>>(&SerdeJson, &vec![(1, "a".into())]);
        // A codec with only `encode` gets the default.
        struct Be;
        impl Codec<u32> for Be {
            fn encode(&self, v: &u32) -> Result<Vec<u8>, CodecError> {
                Ok(v.to_be_bytes().to_vec())
            }
            fn decode(&self, _: &[u8]) -> Result<u32, CodecError> {
                Err("unused".into())
            }
        }
        appends_like_encode::<u32>(&Be, &7);
    }

    #[test]
    fn integer_bytes_sort_like_numbers() {
        let i: Vec<Vec<u8>> = [i64::MIN, -2, -1, 0, 1, i64::MAX]
            .iter()
            .map(|v| Raw.encode(v).unwrap())
            .collect();
        assert!(i.windows(2).all(|w| w[0] < w[1]));
        let u: Vec<Vec<u8>> = [0u64, 1, 256, u64::MAX]
            .iter()
            .map(|v| Raw.encode(v).unwrap())
            .collect();
        assert!(u.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn raw_rejects_bad_bytes() {
        assert!(Codec::<u64>::decode(&Raw, &[1, 2, 3]).is_err());
        assert!(Codec::<i64>::decode(&Raw, &[0; 9]).is_err());
        assert!(Codec::<String>::decode(&Raw, &[0xff, 0xfe]).is_err());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_json_round_trips_and_rejects_garbage() {
        let v: Vec<(u32, String)> = vec![(1, "a".into())];
        let bytes = SerdeJson.encode(&v).unwrap();
        let back: Vec<(u32, String)> = SerdeJson.decode(&bytes).unwrap();
        assert_eq!(back, v);
        assert!(Codec::<Vec<(u32, String)>>::decode(&SerdeJson, b"{not json").is_err());
    }
}
