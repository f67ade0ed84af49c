//! Just enough of the PE/COFF format to place a unified kernel image's sections after the
//! systemd stub's own sections (new stubs refuse overlapping or out-of-order sections).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StubLayout {
    pub image_base: u64,
    pub section_alignment: u64,
    /// First relative virtual address after the stub's last section, aligned.
    pub end_rva: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("not a PE32+ EFI stub: {0}")]
pub struct PeError(String);

fn u16_at(b: &[u8], o: usize) -> Result<u16, PeError> {
    b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or_else(|| PeError(format!("truncated at {o}")))
}

fn u32_at(b: &[u8], o: usize) -> Result<u32, PeError> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| PeError(format!("truncated at {o}")))
}

fn u64_at(b: &[u8], o: usize) -> Result<u64, PeError> {
    Ok(u32_at(b, o)? as u64 | (u32_at(b, o + 4)? as u64) << 32)
}

pub fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Reads the stub's image base, section alignment and where its sections end.
pub fn stub_layout(pe: &[u8]) -> Result<StubLayout, PeError> {
    if pe.get(0..2) != Some(b"MZ") {
        return Err(PeError("no MZ signature".into()));
    }
    let lfanew = u32_at(pe, 0x3c)? as usize;
    if pe.get(lfanew..lfanew + 4) != Some(b"PE\0\0") {
        return Err(PeError("no PE signature".into()));
    }
    let coff = lfanew + 4;
    let nsections = u16_at(pe, coff + 2)? as usize;
    let opt_size = u16_at(pe, coff + 16)? as usize;
    let opt = coff + 20;
    if u16_at(pe, opt)? != 0x20b {
        return Err(PeError("not PE32+ (64-bit)".into()));
    }
    let image_base = u64_at(pe, opt + 24)?;
    let section_alignment = u32_at(pe, opt + 32)? as u64;
    if section_alignment == 0 {
        return Err(PeError("section alignment is 0".into()));
    }
    let table = opt + opt_size;
    let mut end = 0u64;
    for i in 0..nsections {
        let s = table + i * 40;
        let vsize = u32_at(pe, s + 8)? as u64;
        let vaddr = u32_at(pe, s + 12)? as u64;
        end = end.max(vaddr + vsize);
    }
    Ok(StubLayout { image_base, section_alignment, end_rva: align_up(end, section_alignment) })
}

/// Virtual addresses (absolute, for `objcopy --change-section-vma`) for sections of the given
/// sizes, placed in order after the stub.
pub fn place_sections(stub: StubLayout, sizes: &[u64]) -> Vec<u64> {
    let mut rva = stub.end_rva;
    sizes
        .iter()
        .map(|size| {
            let at = rva;
            rva = align_up(rva + size.max(&1), stub.section_alignment);
            stub.image_base + at
        })
        .collect()
}

/// Makes a PE image reproducible: sets the COFF TimeDateStamp (objcopy writes the clock there)
/// and recomputes the optional header's CheckSum.
pub fn set_timestamp(pe: &mut [u8], timestamp: u32) -> Result<(), PeError> {
    let lfanew = u32_at(pe, 0x3c)? as usize;
    if pe.get(lfanew..lfanew + 4) != Some(b"PE\0\0") {
        return Err(PeError("no PE signature".into()));
    }
    let stamp = lfanew + 8;
    let checksum = lfanew + 4 + 20 + 64;
    if pe.len() < checksum + 4 {
        return Err(PeError("truncated headers".into()));
    }
    pe[stamp..stamp + 4].copy_from_slice(&timestamp.to_le_bytes());
    pe[checksum..checksum + 4].fill(0);
    let sum = pe_checksum(pe, checksum);
    pe[checksum..checksum + 4].copy_from_slice(&sum.to_le_bytes());
    Ok(())
}

/// The PE checksum: 16-bit one's-complement-style sum of the file (the checksum field taken as
/// zero), folded, plus the file length.
fn pe_checksum(pe: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, chunk) in pe.chunks(2).enumerate() {
        let off = i * 2;
        if off >= checksum_at && off < checksum_at + 4 {
            continue;
        }
        let word = chunk[0] as u64 | (*chunk.get(1).unwrap_or(&0) as u64) << 8;
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(pe.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ header with two sections.
    fn fake_stub() -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        b[coff + 2..coff + 4].copy_from_slice(&2u16.to_le_bytes());
        b[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = coff + 20;
        b[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        b[opt + 24..opt + 32].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        b[opt + 32..opt + 36].copy_from_slice(&0x1000u32.to_le_bytes());
        let t = opt + 240;
        for (i, (va, vs)) in [(0x1000u32, 0x2345u32), (0x4000, 0x10)].iter().enumerate() {
            let s = t + i * 40;
            b[s + 8..s + 12].copy_from_slice(&vs.to_le_bytes());
            b[s + 12..s + 16].copy_from_slice(&va.to_le_bytes());
        }
        b
    }

    #[test]
    fn timestamp_is_set_and_checksum_recomputed() {
        let mut a = fake_stub();
        let mut b = fake_stub();
        b[0x88] = 0x55; // a different build time
        set_timestamp(&mut a, 42).unwrap();
        set_timestamp(&mut b, 42).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a[0x88..0x8c], &42u32.to_le_bytes());
        let c = u32::from_le_bytes(a[0x84 + 20 + 64..0x84 + 20 + 68].try_into().unwrap());
        assert_ne!(c, 0);
    }

    #[test]
    fn sections_go_after_the_stub_in_order() {
        let l = stub_layout(&fake_stub()).unwrap();
        assert_eq!(l, StubLayout { image_base: 0x1_0000_0000, section_alignment: 0x1000, end_rva: 0x5000 });
        let v = place_sections(l, &[100, 0x1000, 0x1001]);
        assert_eq!(v, vec![0x1_0000_5000, 0x1_0000_6000, 0x1_0000_7000]);
        assert!(stub_layout(b"MZnot").is_err());
    }
}
