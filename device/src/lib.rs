//! The typed contract between kiln's builder, which bakes an image, and `kiln-agent`, which
//! reads it back on the device: `device.json` ([`DeviceConfig`] and its parts), slots, GPT and
//! DOS partition tables (one writer and one reader each),
//! the boot-medium files (autoboot.txt, cmdline.txt, UKI names with boot counters), partition
//! ids, and the atomic file writes both sides rely on. Nothing here runs a process.

pub mod boot;
pub mod config;
pub mod fs;
pub mod gpt;
pub mod mbr;
pub mod parttable;
pub mod wifi;

pub use config::*;

use std::fmt;

/// A 128-bit id (partition or filesystem UUID) derived deterministically from a seed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A version-4-shaped UUID derived from sha256(seed || label): stable across builds with
    /// the same inputs, different for every label.
    pub fn derive(seed: &str, label: &str) -> Uuid {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("{seed}\0{label}").as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[..16]);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid(b)
    }

    /// The first 128 bits of a dm-verity root hash, as systemd's convention for the
    /// partition UUID of a verity-protected partition (no version bits are changed).
    pub fn from_root_hash(h: &[u8; 32]) -> Uuid {
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[..16]);
        Uuid(b)
    }

    pub fn parse(s: &str) -> Option<Uuid> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        let v = hex::decode(hex).ok()?;
        Some(Uuid(v.try_into().ok()?))
    }

    /// The mixed-endian byte order GPT stores GUIDs in.
    pub fn to_gpt_bytes(self) -> [u8; 16] {
        let b = self.0;
        [b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]
    }

    /// A FAT volume id (32 bits) taken from the uuid.
    pub fn fat_volume_id(self) -> String {
        hex::encode_upper(&self.0[..4])
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(f, "{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }
}
