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
        let ph = match class {
            Class::Elf32 => Phdr {
                kind: rd(image, p, 4)? as u32,
                offset: rd(image, p + 4, 4)?,
                paddr: rd(image, p + 12, 4)?,
                filesz: rd(image, p + 16, 4)?,
                memsz: rd(image, p + 20, 4)?,
            },
            Class::Elf64 => Phdr {
                kind: rd(image, p, 4)? as u32,
                offset: rd(image, p + 8, 8)?,
                paddr: rd(image, p + 24, 8)?,
                filesz: rd(image, p + 32, 8)?,
                memsz: rd(image, p + 40, 8)?,
            },
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
        off = name + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
    }
    false
}
