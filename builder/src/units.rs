//! Newtypes for sizes and hashes, with parsing from profile/image text ("256MiB").

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// A size in bytes; written in TOML as an integer or a string with a binary unit ("1GiB").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Bytes(pub u64);

pub const MIB: u64 = 1024 * 1024;

impl Bytes {
    pub fn parse(s: &str) -> Result<Bytes, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("expected a size like \"512MiB\", found {s:?}"))?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1024,
            "MiB" | "M" => MIB,
            "GiB" | "G" => 1024 * MIB,
            "TiB" | "T" => 1024 * 1024 * MIB,
            other => return Err(format!("unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB or TiB)")),
        };
        n.checked_mul(mult).map(Bytes).ok_or_else(|| format!("size {s:?} is too large"))
    }

    pub fn mib(self) -> u64 {
        self.0 / MIB
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1024 * MIB && b % (1024 * MIB) == 0 {
            write!(f, "{}GiB", b / (1024 * MIB))
        } else if b >= MIB && b % MIB == 0 {
            write!(f, "{}MiB", b / MIB)
        } else if b >= 10 * MIB {
            write!(f, "{:.1}MiB", b as f64 / MIB as f64)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a size: an integer of bytes or a string like \"512MiB\""))?
        {
            Raw::Int(n) => Ok(Bytes(n)),
            Raw::Str(s) => Bytes::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A SHA-256 digest, shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn of(data: &[u8]) -> Sha256 {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(data).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.hex())
    }
}

impl From<Sha256> for String {
    fn from(h: Sha256) -> String {
        h.hex()
    }
}

impl TryFrom<String> for Sha256 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        kiln_device::fs::parse_sha256(&s).map(Sha256)
    }
}

/// Hashes a file in a streaming way.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<Sha256> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256(h.finalize().into()))
}

pub use kiln_device::Uuid;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(Bytes::parse("256MiB").unwrap(), Bytes(256 * MIB));
        assert_eq!(Bytes::parse("1GiB").unwrap(), Bytes(1024 * MIB));
        assert_eq!(Bytes::parse("4096").unwrap(), Bytes(4096));
        assert!(Bytes::parse("1GB").unwrap_err().contains("unknown size unit \"GB\""));
        assert!(Bytes::parse("lots").is_err());
        assert_eq!(Bytes(256 * MIB).to_string(), "256MiB");
    }

    #[test]
    fn uuids_are_stable_and_formatted() {
        let a = Uuid::derive("seed", "root-a");
        assert_eq!(a, Uuid::derive("seed", "root-a"));
        assert_ne!(a, Uuid::derive("seed", "root-b"));
        let s = a.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_eq!(Uuid::parse(&s), Some(a));
        let g = Uuid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").unwrap().to_gpt_bytes();
        assert_eq!(&g[..4], &[0x28, 0x73, 0x2a, 0xc1]);
    }
}
