//! What `sigil-agent` and its TPM helper `sigil-agent-tpm` say to each other.
//!
//! The agent does not link the TPM libraries (libtss2 and the libcrypto it needs): on a
//! node that attests with a TPM it runs the helper as a child process, which owns the TPM
//! connection, and speaks to it over the helper's stdin and stdout. A node without a TPM
//! never maps those libraries (docs/tpm.md, "The TPM helper").
//!
//! One JSON object per line, byte strings in standard base64:
//! - the helper's first line is its [`Reply::Identity`] (or a [`Reply::Error`], and it
//!   exits);
//! - then, for each [`Request::Activate`] line on its stdin, one [`Reply::Secret`] or
//!   [`Reply::Error`] line;
//! - the agent closing the helper's stdin ends it: it flushes its keys from the TPM and
//!   exits 0.
//!
//! Lines are bounded by [`MAX_LINE`] on both sides.

use std::io::{self, BufRead, Read, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The longest line either side reads: an EK certificate of a few KiB, base64-encoded,
/// with room to spare.
pub const MAX_LINE: usize = 64 * 1024;

/// What the agent sends the operator about its TPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmIdentity {
    /// EK certificate (DER).
    #[serde(with = "b64")]
    pub ek_certificate: Vec<u8>,
    /// TPM2B_PUBLIC of the EK.
    #[serde(with = "b64")]
    pub ek_public: Vec<u8>,
    /// TPM2B_PUBLIC of the AK.
    #[serde(with = "b64")]
    pub ak_public: Vec<u8>,
}

/// A line from the agent to the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// TPM2_ActivateCredential of the operator's challenge with the helper's AK and EK.
    Activate {
        /// The challenge's credential blob (TPM2B_ID_OBJECT).
        #[serde(with = "b64")]
        credential_blob: Vec<u8>,
        /// The challenge's encrypted seed (TPM2B_ENCRYPTED_SECRET).
        #[serde(with = "b64")]
        encrypted_secret: Vec<u8>,
    },
}

/// A line from the helper to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// The TPM is open, its EK and a fresh AK are loaded (the first line).
    Identity(TpmIdentity),
    /// The secret an [`Request::Activate`] recovered.
    Secret(#[serde(with = "b64")] Vec<u8>),
    /// What failed, for the agent's log and its attestation error.
    Error(String),
}

/// `message` as one line, with its newline.
pub fn encode_line<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these types to JSON cannot fail: no maps with non-string keys, no
    // fallible Serialize impls.
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Decodes one line as read up to and including its newline, from a reader limited to
/// [`MAX_LINE`]` + 1` bytes. A line without its newline (over [`MAX_LINE`] bytes, or cut
/// short by the end of the stream), or one that is not a `T`, is an `InvalidData` error.
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> io::Result<T> {
    if line.last() != Some(&b'\n') {
        let why = if line.len() > MAX_LINE {
            format!("a line longer than {MAX_LINE} bytes")
        } else {
            "a line cut short by the end of the stream".to_owned()
        };
        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
    }
    serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes `message` as one line and flushes it.
pub fn write_line<T: Serialize>(out: &mut impl Write, message: &T) -> io::Result<()> {
    out.write_all(&encode_line(message))?;
    out.flush()
}

/// Reads one line and decodes it ([`decode_line`]); `None` at the end of the stream.
pub fn read_line<T: DeserializeOwned>(input: &mut impl BufRead) -> io::Result<Option<T>> {
    let mut line = Vec::new();
    // One byte past the bound tells a line of exactly MAX_LINE from a longer one.
    let read = (&mut *input)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    decode_line(&line).map(Some)
}

mod b64 {
    use super::{Engine, STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let mut wire = Vec::new();
        let identity = Reply::Identity(TpmIdentity {
            ek_certificate: vec![0x30, 0x82, 0],
            ek_public: vec![1; 300],
            ak_public: vec![],
        });
        write_line(&mut wire, &identity).unwrap();
        write_line(&mut wire, &Reply::Secret(vec![7; 32])).unwrap();
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 2);
        let mut input = wire.as_slice();
        assert_eq!(read_line::<Reply>(&mut input).unwrap(), Some(identity));
        assert_eq!(
            read_line::<Reply>(&mut input).unwrap(),
            Some(Reply::Secret(vec![7; 32]))
        );
        assert_eq!(read_line::<Reply>(&mut input).unwrap(), None);
    }

    #[test]
    fn oversized_cut_and_foreign_lines_are_refused() {
        let long = format!("{{\"error\":\"{}\"}}\n", "x".repeat(MAX_LINE));
        let err = read_line::<Reply>(&mut long.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("longer than 65536"), "{err}");
        let err = read_line::<Reply>(&mut &b"{\"secret\":\"AA==\"}"[..]).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        let err = read_line::<Request>(&mut &b"{\"run\":\"sh\"}\n"[..]).unwrap_err();
        assert!(err.to_string().contains("unknown variant"), "{err}");
        let err = read_line::<Reply>(&mut &b"{\"secret\":\"not base64!\"}\n"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
