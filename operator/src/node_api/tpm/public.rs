//! TPM2B_PUBLIC as the agent sends it: the fields TPM attestation decides on, and the
//! object's Name. Parsing is strict (every byte accounted for), because the Name is a hash
//! over exactly these bytes and the TPM computes it the same way.
//!
//! Layout (TPM 2.0 Part 2, §12.2.4 TPMT_PUBLIC): type, nameAlg, objectAttributes,
//! authPolicy (TPM2B), parameters (by type), unique (by type).

use sha2::{Digest, Sha256};

/// TPM_ALG_RSA.
pub const ALG_RSA: u16 = 0x0001;
/// TPM_ALG_SHA256.
pub const ALG_SHA256: u16 = 0x000B;
/// TPM_ALG_AES.
pub const ALG_AES: u16 = 0x0006;
/// TPM_ALG_NULL.
pub const ALG_NULL: u16 = 0x0010;
/// TPM_ALG_ECC.
pub const ALG_ECC: u16 = 0x0023;
/// TPM_ALG_CFB.
pub const ALG_CFB: u16 = 0x0043;
const ALG_KEYEDHASH: u16 = 0x0008;
const ALG_SYMCIPHER: u16 = 0x0025;
const ALG_ECDAA: u16 = 0x001A;
const ALG_XOR: u16 = 0x000A;

/// TPMA_OBJECT bits (Part 2, §8.3).
pub mod attr {
    /// The object's hierarchy can't be changed (it can't leave this TPM).
    pub const FIXED_TPM: u32 = 1 << 1;
    /// The object can't be re-parented.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM made the sensitive part.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// Signs or decrypts only TPM-generated or TPM-checked data.
    pub const RESTRICTED: u32 = 1 << 16;
    /// A decryption (storage) key.
    pub const DECRYPT: u32 = 1 << 17;
    /// A signing key.
    pub const SIGN: u32 = 1 << 18;
}

/// Largest TPM2B_PUBLIC we accept (a 4096-bit RSA key with a long policy fits easily).
pub const MAX_PUBLIC_LEN: usize = 2048;

/// A parsed TPM public area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    /// TPM_ALG_ID of the key type.
    pub kind: u16,
    /// TPM_ALG_ID of the name algorithm.
    pub name_alg: u16,
    /// TPMA_OBJECT.
    pub attributes: u32,
    /// Symmetric algorithm of a storage key: (algorithm, key bits, mode), or None.
    pub symmetric: Option<(u16, u16, u16)>,
    /// The key itself.
    pub key: PublicKey,
    /// The marshalled TPMT_PUBLIC (the bytes the Name hashes).
    pub tpmt: Vec<u8>,
}

/// The public key of a [`TpmPublic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RSA: modulus (big-endian) and exponent (0 in the TPM means 65537).
    Rsa {
        /// Key size in bits.
        bits: u16,
        /// Public exponent.
        exponent: u32,
        /// Modulus, big-endian.
        modulus: Vec<u8>,
    },
    /// ECC point on `curve` (TPM_ECC_CURVE).
    Ecc {
        /// TPM_ECC_CURVE.
        curve: u16,
        /// X coordinate.
        x: Vec<u8>,
        /// Y coordinate.
        y: Vec<u8>,
    },
}

/// Why a public area is not acceptable as input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublicError {
    /// Ran out of bytes.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// Bytes left over after the structure.
    #[error("{0} trailing bytes after TPMT_PUBLIC")]
    Trailing(usize),
    /// The TPM2B size does not match the bytes sent.
    #[error("TPM2B size {declared} but {actual} bytes follow")]
    SizeMismatch {
        /// Size field.
        declared: usize,
        /// What followed.
        actual: usize,
    },
    /// Too large to be a public area.
    #[error("{0} bytes is larger than any public area ({MAX_PUBLIC_LEN})")]
    TooLarge(usize),
    /// A key type we do not handle (KEYEDHASH, SYMCIPHER or unknown).
    #[error("object type 0x{0:04x} is not an RSA or ECC key")]
    UnsupportedType(u16),
    /// A scheme or symmetric definition we can't parse.
    #[error("unsupported {what} algorithm 0x{alg:04x}")]
    UnsupportedAlgorithm {
        /// Which field.
        what: &'static str,
        /// Its value.
        alg: u16,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PublicError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(PublicError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, PublicError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, PublicError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], PublicError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    /// TPMT_SYM_DEF_OBJECT.
    fn symmetric(&mut self) -> Result<Option<(u16, u16, u16)>, PublicError> {
        let alg = self.u16()?;
        if alg == ALG_NULL {
            return Ok(None);
        }
        if alg == ALG_XOR {
            return Err(PublicError::UnsupportedAlgorithm {
                what: "symmetric",
                alg,
            });
        }
        Ok(Some((alg, self.u16()?, self.u16()?)))
    }
    /// TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_KDF_SCHEME: a scheme and, unless NULL,
    /// its hash (ECDAA also carries a count). RSAES (0x0015) has no details.
    fn scheme(&mut self) -> Result<(), PublicError> {
        let scheme = self.u16()?;
        match scheme {
            ALG_NULL | 0x0015 => {}
            ALG_ECDAA => {
                self.u16()?;
                self.u16()?;
            }
            _ => {
                self.u16()?;
            }
        }
        Ok(())
    }
}

impl TpmPublic {
    /// Parses a marshalled TPM2B_PUBLIC (size, then TPMT_PUBLIC).
    pub fn from_tpm2b(bytes: &[u8]) -> Result<Self, PublicError> {
        if bytes.len() > MAX_PUBLIC_LEN + 2 {
            return Err(PublicError::TooLarge(bytes.len()));
        }
        let (size, body) = bytes
            .split_first_chunk::<2>()
            .ok_or(PublicError::Truncated(0))?;
        let declared = u16::from_be_bytes(*size) as usize;
        if declared != body.len() {
            return Err(PublicError::SizeMismatch {
                declared,
                actual: body.len(),
            });
        }
        Self::from_tpmt(body)
    }

    /// Parses a marshalled TPMT_PUBLIC.
    pub fn from_tpmt(bytes: &[u8]) -> Result<Self, PublicError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let kind = r.u16()?;
        let name_alg = r.u16()?;
        let attributes = r.u32()?;
        r.tpm2b()?; // authPolicy
        let (symmetric, key) = match kind {
            ALG_RSA => {
                let symmetric = r.symmetric()?;
                r.scheme()?;
                let bits = r.u16()?;
                let exponent = r.u32()?;
                let modulus = r.tpm2b()?.to_vec();
                (
                    symmetric,
                    PublicKey::Rsa {
                        bits,
                        exponent,
                        modulus,
                    },
                )
            }
            ALG_ECC => {
                let symmetric = r.symmetric()?;
                r.scheme()?;
                let curve = r.u16()?;
                r.scheme()?; // kdf
                let x = r.tpm2b()?.to_vec();
                let y = r.tpm2b()?.to_vec();
                (symmetric, PublicKey::Ecc { curve, x, y })
            }
            ALG_KEYEDHASH | ALG_SYMCIPHER => return Err(PublicError::UnsupportedType(kind)),
            other => return Err(PublicError::UnsupportedType(other)),
        };
        if r.pos != bytes.len() {
            return Err(PublicError::Trailing(bytes.len() - r.pos));
        }
        Ok(Self {
            kind,
            name_alg,
            attributes,
            symmetric,
            key,
            tpmt: bytes.to_vec(),
        })
    }

    /// The object's Name: nameAlg || H_nameAlg(TPMT_PUBLIC). Only SHA-256 names are
    /// supported (None otherwise).
    pub fn name(&self) -> Option<Vec<u8>> {
        if self.name_alg != ALG_SHA256 {
            return None;
        }
        let mut name = ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(&Sha256::digest(&self.tpmt));
        Some(name)
    }

    /// Whether every bit of `mask` is set.
    pub fn has(&self, mask: u32) -> bool {
        self.attributes & mask == mask
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The TCG default RSA-2048 EK template (EK Credential Profile, template L-1) with a
    /// fake modulus.
    pub(crate) fn ek_tpmt(modulus: &[u8]) -> Vec<u8> {
        let mut v = vec![];
        v.extend(ALG_RSA.to_be_bytes());
        v.extend(ALG_SHA256.to_be_bytes());
        v.extend(0x0003_00b2u32.to_be_bytes());
        v.extend(32u16.to_be_bytes());
        v.extend([0x83; 32]);
        v.extend(ALG_AES.to_be_bytes());
        v.extend(128u16.to_be_bytes());
        v.extend(ALG_CFB.to_be_bytes());
        v.extend(ALG_NULL.to_be_bytes());
        v.extend(2048u16.to_be_bytes());
        v.extend(0u32.to_be_bytes());
        v.extend((modulus.len() as u16).to_be_bytes());
        v.extend(modulus);
        v
    }

    #[test]
    fn parses_an_rsa_ek_template_and_names_it() {
        let tpmt = ek_tpmt(&[7; 256]);
        let mut tpm2b = (tpmt.len() as u16).to_be_bytes().to_vec();
        tpm2b.extend(&tpmt);
        let p = TpmPublic::from_tpm2b(&tpm2b).unwrap();
        assert_eq!(p.kind, ALG_RSA);
        assert_eq!(p.symmetric, Some((ALG_AES, 128, ALG_CFB)));
        assert!(p.has(attr::FIXED_TPM | attr::FIXED_PARENT | attr::RESTRICTED | attr::DECRYPT));
        assert!(!p.has(attr::SIGN));
        assert!(
            matches!(p.key, PublicKey::Rsa { bits: 2048, exponent: 0, ref modulus } if modulus == &[7; 256])
        );
        let name = p.name().unwrap();
        assert_eq!(&name[..2], &[0x00, 0x0b]);
        assert_eq!(name[2..], Sha256::digest(&tpmt)[..]);
    }

    #[test]
    fn refuses_truncated_trailing_and_mis_sized_input() {
        let tpmt = ek_tpmt(&[7; 256]);
        for cut in [0, 1, 5, 10, 40, tpmt.len() - 1] {
            assert!(
                matches!(
                    TpmPublic::from_tpmt(&tpmt[..cut]),
                    Err(PublicError::Truncated(_))
                ),
                "cut at {cut}"
            );
        }
        let mut long = tpmt.clone();
        long.push(0);
        assert_eq!(TpmPublic::from_tpmt(&long), Err(PublicError::Trailing(1)));
        let mut bad = 10u16.to_be_bytes().to_vec();
        bad.extend(&tpmt);
        assert!(matches!(
            TpmPublic::from_tpm2b(&bad),
            Err(PublicError::SizeMismatch { declared: 10, .. })
        ));
        let mut keyed = tpmt;
        keyed[1] = 0x08;
        assert_eq!(
            TpmPublic::from_tpmt(&keyed),
            Err(PublicError::UnsupportedType(0x0008))
        );
    }
}
