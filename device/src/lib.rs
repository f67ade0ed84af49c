//! The typed contract between kiln's builder, which bakes an image, and `kiln-agent`, which
//! reads it back on the device: `device.json` ([`DeviceConfig`] and its parts), slots, GPT and
//! DOS partition tables (one writer and one reader each),
//! the boot-medium files (autoboot.txt, cmdline.txt, UKI names with boot counters), partition
//! ids, and the atomic file writes both sides rely on. Nothing here runs a process.

pub mod base64;
pub mod boot;
pub mod config;
pub mod fs;
pub mod gpt;
pub mod mbr;
pub mod parttable;
pub mod wifi;

pub use config::*;

use std::fmt;

/// The size of a root image whose EROFS data ends (4 KiB aligned) at `hash_offset`: the data,
/// then dm-verity's superblock and hash tree as `veritysetup format` lays them out with 4 KiB
/// data and hash blocks and sha256 (128 hashes a block; the levels up to a single block). The
/// builder checks every root image it makes against this; the agent uses it to know how much of
/// the running root partition is its image (the partition is larger), from the kernel's
/// `kiln.verity_offset=`.
pub fn verity_image_size(hash_offset: u64) -> u64 {
    const BLOCK: u64 = 4096;
    let mut level = hash_offset.div_ceil(BLOCK);
    let mut tree = 0;
    loop {
        level = level.div_ceil(BLOCK / 32);
        tree += level;
        if level <= 1 {
            break;
        }
    }
    hash_offset + BLOCK + tree * BLOCK
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn the_verity_layout_is_data_superblock_and_each_level() {
        // 1000 data blocks: 8 hash blocks, then 1; after the data, the superblock and those 9.
        assert_eq!(super::verity_image_size(1000 * 4096), (1000 + 1 + 8 + 1) * 4096);
        // One block of hashes is the top already.
        assert_eq!(super::verity_image_size(128 * 4096), (128 + 1 + 1) * 4096);
        assert_eq!(super::verity_image_size(129 * 4096), (129 + 1 + 2 + 1) * 4096);
    }
}
