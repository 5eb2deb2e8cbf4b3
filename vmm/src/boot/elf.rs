//! Just enough ELF (32- and 64-bit, little-endian x86) to find the boot
//! protocol and the loadable segments, with every offset checked: a
//! malformed file gives `None`, never a panic.

pub const PT_LOAD: u32 = 1;
pub const PT_NOTE: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Elf32,
    Elf64,
}

#[derive(Clone, Copy, Debug)]
pub struct Phdr {
    pub kind: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

pub struct ElfInfo {
    pub class: Class,
    pub machine: u16,
    pub entry: u64,
    pub phdrs: Vec<Phdr>,
}

fn rd(image: &[u8], off: u64, n: usize) -> Option<u64> {
    let off = usize::try_from(off).ok()?;
    let b = image.get(off..off.checked_add(n)?)?;
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(b);
    Some(u64::from_le_bytes(v))
}

pub fn is_elf(image: &[u8]) -> bool {
    image.len() >= 52 && image[..4] == *b"\x7fELF"
}

/// Parse the ELF header and program headers; `None` if anything is out of
/// the file or not little-endian.
pub fn parse(image: &[u8]) -> Option<ElfInfo> {
    if !is_elf(image) || image[5] != 1 {
        return None;
    }
    let class = match image[4] {
        1 => Class::Elf32,
        2 => Class::Elf64,
        _ => return None,
    };
    let machine = rd(image, 18, 2)? as u16;
    let (entry, phoff, phentsize, phnum, min_ent) = match class {
        Class::Elf32 => (rd(image, 24, 4)?, rd(image, 28, 4)?, rd(image, 42, 2)?, rd(image, 44, 2)?, 32),
        Class::Elf64 => (rd(image, 24, 8)?, rd(image, 32, 8)?, rd(image, 54, 2)?, rd(image, 56, 2)?, 56),
    };
    if phnum > 0 && phentsize < min_ent {
        return None;
    }
    let mut phdrs = Vec::new();
    for i in 0..phnum {
        let p = phoff.checked_add(i.checked_mul(phentsize)?)?;
        // Field at `off` of this header, `n` bytes; offsets near 2^64 give None.
        let f = |off: u64, n: usize| rd(image, p.checked_add(off)?, n);
        let ph = match class {
            Class::Elf32 => {
                Phdr { kind: f(0, 4)? as u32, offset: f(4, 4)?, paddr: f(12, 4)?, filesz: f(16, 4)?, memsz: f(20, 4)? }
            }
            Class::Elf64 => {
                Phdr { kind: f(0, 4)? as u32, offset: f(8, 8)?, paddr: f(24, 8)?, filesz: f(32, 8)?, memsz: f(40, 8)? }
            }
        };
        phdrs.push(ph);
    }
    Some(ElfInfo { class, machine, entry, phdrs })
}

/// Whether the image carries a PVH entry note ("Xen", type 18) in a PT_NOTE
/// segment, which is where linux-loader and QEMU look for it.
pub fn has_pvh_note(image: &[u8]) -> bool {
    let Some(info) = parse(image) else {
        return false;
    };
    info.phdrs.iter().filter(|p| p.kind == PT_NOTE).any(|p| notes_have_pvh(image, p.offset, p.filesz))
}

fn notes_have_pvh(image: &[u8], start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    let mut off = start;
    while off.saturating_add(12) <= end {
        let (Some(namesz), Some(descsz), Some(kind)) =
            (rd(image, off, 4), rd(image, off + 4, 4), rd(image, off + 8, 4))
        else {
            return false;
        };
        let name = off + 12;
        if namesz == 4 && kind == 18 && rd(image, name, 4) == Some(u32::from_le_bytes(*b"Xen\0") as u64) {
            return true;
        }
        // Sizes are u32s, so this only overflows for a note near 2^64.
        let Some(next) = name.checked_add(namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4) else {
            return false;
        };
        off = next;
    }
    false
}

#[cfg(test)]
mod test {
    use super::*;

    /// Program headers placed near 2^64 make a malformed file. (The field
    /// offsets are now added with checks; before, only the order of the
    /// reads kept `p + 40` from wrapping.)
    #[test]
    fn program_headers_near_2_pow_64_are_malformed() {
        let mut f = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
        f.extend_from_slice(&[2, 0, 62, 0, 1, 0, 0, 0]);
        for v in [0x10_0000u64, u64::MAX - 8, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&[0; 4]);
        for v in [64u16, 56, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.resize(256, 0);
        assert!(parse(&f).is_none());
        assert!(!has_pvh_note(&f));
    }
}
