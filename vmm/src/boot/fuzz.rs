//! Property tests ("fuzzing kept in the tree") of the loaders: the ELF
//! reader, the PVH checks and loader, and the Multiboot checks and loader,
//! on ELF files built from hostile field values and then mutated byte by
//! byte. Nothing may panic; whatever is accepted must load and lie where
//! the checks promise. 64 cases per property by default (CI);
//! `PROPTEST_CASES=N` runs more.

use super::{elf, multiboot, pvh};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// Values that break naive arithmetic: small, around 1 MiB, 4 GiB, 2^64.
fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x2_0000,
        0xf_0000u64..0x30_0000,
        0xffff_0000u64..0x1_0001_0000,
        (u64::MAX - 0x40_0000)..=u64::MAX,
        any::<u64>(),
    ]
}

#[derive(Clone, Debug)]
struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Mostly plausible (a loadable piece of the file at a RAM address, low or
/// high), else hostile values in every field.
fn phdr() -> impl Strategy<Value = Phdr> {
    let paddr = prop_oneof![(0u64..24).prop_map(|k| k * 0x1000), (0u64..64).prop_map(|k| 0x10_0000 + k * 0x2_0000)];
    let plausible = (0u64..512, paddr, 0u64..256, 0u64..0x1_0000).prop_map(|(offset, paddr, filesz, extra)| Phdr {
        kind: 1,
        offset,
        paddr,
        filesz,
        memsz: filesz + extra,
    });
    let hostile =
        (prop_oneof![Just(1u32), Just(4u32), any::<u32>()], interesting(), interesting(), interesting(), interesting())
            .prop_map(|(kind, offset, paddr, filesz, memsz)| Phdr { kind, offset, paddr, filesz, memsz });
    prop_oneof![3 => plausible, 1 => hostile]
}

/// Multiboot header flags: mostly ones vkvm supports (with and without
/// the address fields of flag 16), sometimes anything.
fn mb_flags() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(3), Just(3 | 1 << 16), Just(1 << 16), any::<u32>()]
}

/// An ELF file: header, program headers, an optional Multiboot header and
/// a PVH note, padding; then byte mutations.
#[derive(Clone, Debug)]
struct Image {
    elf64: bool,
    entry: u64,
    /// Put the entry inside the first segment instead.
    entry_in_first: bool,
    phdrs: Vec<Phdr>,
    mb_flags: Option<(u32, bool, [u32; 5])>,
    pvh_note: Option<u32>,
    pad: usize,
    mutations: Vec<(usize, u8)>,
    cut: Option<usize>,
}

fn image() -> impl Strategy<Value = Image> {
    (
        any::<bool>(),
        (interesting(), prop::bool::weighted(0.8)),
        prop::collection::vec(phdr(), 0..4),
        prop::option::weighted(0.9, (mb_flags(), prop::bool::weighted(0.8), any::<[u32; 5]>())),
        prop::option::of(any::<u32>()),
        0usize..8192,
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        prop::option::of(any::<usize>()),
    )
        .prop_map(|(elf64, (entry, entry_in_first), phdrs, mb_flags, pvh_note, pad, mutations, cut)| Image {
            elf64,
            entry,
            entry_in_first,
            phdrs,
            mb_flags,
            pvh_note,
            pad,
            mutations,
            cut,
        })
}

impl Image {
    fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::new();
        let (ehsize, phsize) = if self.elf64 { (64u16, 56u16) } else { (52, 32) };
        f.extend_from_slice(b"\x7fELF");
        f.extend_from_slice(&[if self.elf64 { 2 } else { 1 }, 1, 1]);
        f.resize(16, 0);
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&(if self.elf64 { 62u16 } else { 3 }).to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        let n = self.phdrs.len() as u16;
        let entry = match self.phdrs.first() {
            Some(p) if self.entry_in_first => p.paddr.wrapping_add(p.memsz / 2),
            _ => self.entry,
        };
        if self.elf64 {
            for v in [entry, ehsize as u64, 0] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            for v in [entry as u32, ehsize as u32, 0] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        }
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [ehsize, phsize, n, 0, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        for p in &self.phdrs {
            if self.elf64 {
                f.extend_from_slice(&p.kind.to_le_bytes());
                f.extend_from_slice(&7u32.to_le_bytes());
                for v in [p.offset, p.paddr, p.paddr, p.filesz, p.memsz, 4096] {
                    f.extend_from_slice(&v.to_le_bytes());
                }
            } else {
                for v in
                    [p.kind, p.offset as u32, p.paddr as u32, p.paddr as u32, p.filesz as u32, p.memsz as u32, 7, 4096]
                {
                    f.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        if let Some((flags, good, addr)) = self.mb_flags {
            let magic = multiboot::HEADER_MAGIC;
            let sum = 0u32.wrapping_sub(magic).wrapping_sub(flags).wrapping_add(if good { 0 } else { 1 });
            for v in [magic, flags, sum].into_iter().chain(addr) {
                f.extend_from_slice(&v.to_le_bytes());
            }
        }
        if let Some(desc) = self.pvh_note {
            for v in [4u32, 4, 18] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            f.extend_from_slice(b"Xen\0");
            f.extend_from_slice(&desc.to_le_bytes());
        }
        f.resize(f.len() + self.pad, 0x90);
        for &(at, b) in &self.mutations {
            let len = f.len();
            f[at % len] = b;
        }
        if let Some(c) = self.cut {
            f.truncate(c % (f.len() + 1));
        }
        f
    }
}

const MEM: u64 = 64 << 20;

fn scratch() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

#[test]
fn elf_reader_never_panics_and_keeps_headers_in_the_file() {
    TestRunner::new(config())
        .run(&image(), |img| {
            let b = img.bytes();
            if let Some(info) = elf::parse(&b) {
                prop_assert!(info.phdrs.len() <= 0xffff);
            }
            let _ = elf::has_pvh_note(&b);
            let _ = multiboot::find_header(&b);
            Ok(())
        })
        .unwrap();
}

#[test]
fn pvh_accepts_only_what_fits_and_loads_it() {
    let mem = scratch();
    TestRunner::new(config())
        .run(&image(), |img| {
            let b = img.bytes();
            if pvh::check_elf(&b, "k", MEM).is_ok() {
                // Accepted: every loadable segment ends inside --memory.
                let info = elf::parse(&b).expect("accepted images parse");
                for p in info.phdrs.iter().filter(|p| p.kind == elf::PT_LOAD) {
                    prop_assert!(p.paddr.checked_add(p.memsz).is_some_and(|e| e <= MEM), "{p:?}");
                }
                // linux-loader may still refuse it; it must not panic.
                let _ = pvh::load_pvh(&mem, &b, "k", "console", MEM);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_bundled_guest_mutated_never_panics_the_pvh_loader() {
    let mem = scratch();
    let strat = prop::collection::vec((0usize..4096, any::<u8>()), 1..6);
    TestRunner::new(config())
        .run(&strat, |muts| {
            let mut b = crate::guest_image::BUNDLED.to_vec();
            for (at, v) in muts {
                b[at] = v;
            }
            if super::prepare(&b, "k", super::BootMode::Auto, MEM, &[]).is_ok() {
                let _ = pvh::load_pvh(&mem, &b, "k", "console", MEM);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn multiboot_accepts_only_safe_layouts_and_loads_them() {
    let mem = scratch();
    let module_sizes = prop::collection::vec(0usize..(3 << 20), 0..3);
    TestRunner::new(config())
        .run(&(image(), module_sizes), |(img, sizes)| {
            let b = img.bytes();
            let mods: Vec<multiboot::Module> =
                sizes.iter().map(|&n| multiboot::Module { string: "m".into(), data: vec![7; n] }).collect();
            if let Ok(k) = multiboot::prepare(&b, "k", MEM, mods) {
                let placed = k.placed();
                for &(s, e) in &placed {
                    prop_assert!(s <= e && e <= MEM, "[{s:#x}, {e:#x})");
                    for (a, z, what) in multiboot::BOOT_RANGES {
                        prop_assert!(e <= a || z <= s, "[{s:#x}, {e:#x}) overlaps {what}");
                    }
                }
                let e = u64::from(k.entry());
                prop_assert!(placed.iter().any(|&(s, z)| e >= s && e < z));
                multiboot::load(&k, &mem, &b, "k A B", MEM).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Ok(())
        })
        .unwrap();
}
