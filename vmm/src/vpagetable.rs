//! VPAGETABLE windows: guest-physical ranges whose translation to pages of
//! guest RAM (the RAM object) is given by vpte tables the guest writes in
//! its own memory (format: `pager/src/vpte.rs`). The pager walks them on a
//! fault (`pager::vpagetable`); this module lays the windows out, gives
//! them memslots, and serves the `setmap` / `inval` hypercalls.
//!
//! Window page `i` (byte offset `i * 4096` from the window start) is walked
//! with VA-side page index `i`; a vpte frame is a page index in RAM, i.e. a
//! guest-physical page number below the RAM size.

use crate::abi;
use crate::config::{VptSpec, DEFAULT_WINDOWS, MAX_GPA};
use crate::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};

const PS: u64 = 4096;

/// The windows to create: the `--vpt-region`s (checked against RAM, the
/// mapped files and each other), or else the default one if `default` and
/// it fits.
pub fn layout(explicit: &[VptSpec], default: bool, ram: u64, files: &[(u64, u64)]) -> Result<Vec<VptSpec>, Error> {
    let overlaps = |a: u64, al: u64, b: u64, bl: u64| a < b + bl && b < a + al;
    if explicit.is_empty() {
        if !default {
            return Ok(Vec::new());
        }
        let fits = |d: &VptSpec| d.gpa >= ram && !files.iter().any(|&(g, l)| overlaps(d.gpa, d.len, g, l));
        return Ok(DEFAULT_WINDOWS.into_iter().filter(fits).collect());
    }
    let mut out: Vec<VptSpec> = Vec::new();
    for r in explicit {
        let what = format!("--vpt-region {:#x},{:#x}", r.gpa, r.len);
        let end = r.gpa.checked_add(r.len).filter(|&e| e <= MAX_GPA);
        if end.is_none() {
            return Err(Error::Config(format!("{what}: ends beyond the guest-physical space ({:#x})", MAX_GPA)));
        }
        if r.gpa < ram {
            return Err(Error::Config(format!("{what}: overlaps guest RAM (0..{ram:#x})")));
        }
        if let Some((g, _)) = files.iter().find(|&&(g, l)| overlaps(r.gpa, r.len, g, l)) {
            return Err(Error::Config(format!("{what}: overlaps the --map-file at {g:#x}")));
        }
        if let Some(o) = out.iter().find(|o| overlaps(r.gpa, r.len, o.gpa, o.len)) {
            return Err(Error::Config(format!("{what}: overlaps --vpt-region {:#x},{:#x}", o.gpa, o.len)));
        }
        out.push(*r);
    }
    Ok(out)
}

/// A window as the VM runs it.
pub struct Window {
    pub spec: VptSpec,
    pub setmaps: AtomicU64,
    pub invals: AtomicU64,
}

impl Window {
    pub fn new(spec: VptSpec) -> Window {
        Window { spec, setmaps: AtomicU64::new(0), invals: AtomicU64::new(0) }
    }
}

/// `setmap(region, master)` (MADV_SETMAP): store the master vpte and drop
/// every translation of the window. Any master value is accepted: the walk
/// treats it as untrusted like every other vpte.
pub fn setmap(map: &pager::Map, windows: &[Window], region: u64, master: u64) -> i64 {
    let Some(w) = usize::try_from(region).ok().and_then(|i| windows.get(i)) else {
        return -abi::EINVAL;
    };
    match map.setmap(w.spec.gpa, master) {
        Ok(()) => {
            w.setmaps.fetch_add(1, Ordering::Relaxed);
            0
        }
        Err(_) => -abi::EINVAL,
    }
}

/// `inval(region, offset, len)` (MADV_INVAL): drop the translations of
/// `[offset, offset + len)` of the window. Offset and length are page
/// multiples, the length non-zero (else -EINVAL); the range must lie inside
/// the window (else -EFAULT). When this returns no translation made from
/// older vptes remains: the pager's `inval` waits for faults in flight.
pub fn inval(map: &pager::Map, windows: &[Window], region: u64, off: u64, len: u64) -> i64 {
    let Some(w) = usize::try_from(region).ok().and_then(|i| windows.get(i)) else {
        return -abi::EINVAL;
    };
    if len == 0 || !off.is_multiple_of(PS) || !len.is_multiple_of(PS) {
        return -abi::EINVAL;
    }
    if off.checked_add(len).is_none_or(|e| e > w.spec.len) {
        return -abi::EFAULT;
    }
    match map.inval(w.spec.gpa + off, len) {
        Ok(()) => {
            w.invals.fetch_add(1, Ordering::Relaxed);
            0
        }
        Err(_) => -abi::EINVAL,
    }
}

/// The #PF error-code bit set for a frame beyond the backing object.
pub const PF_RSVD: u32 = 1 << 3;

/// Guest command-line word: `vkvm.vpt=GPA:LEN:LEVELS:OBJPAGES,...` (region
/// index = position; OBJPAGES = pages in the backing object, guest RAM).
pub fn guest_cmdline(windows: &[Window], ram_pages: u64) -> String {
    let v: Vec<String> = windows
        .iter()
        .map(|w| format!("{:#x}:{:#x}:{}:{ram_pages:#x}", w.spec.gpa, w.spec.len, w.spec.levels))
        .collect();
    if v.is_empty() {
        String::new()
    } else {
        format!("vkvm.vpt={}", v.join(","))
    }
}

/// The `vpt` object of `--stats-json`.
pub fn stats(windows: &[Window]) -> serde_json::Value {
    serde_json::Value::Array(
        windows
            .iter()
            .map(|w| {
                serde_json::json!({
                    "gpa": w.spec.gpa, "len": w.spec.len, "levels": w.spec.levels,
                    "setmaps": w.setmaps.load(Ordering::Relaxed), "invals": w.invals.load(Ordering::Relaxed),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn layout_checks_overlaps_and_places_the_default() {
        let r = |gpa, len| VptSpec { gpa, len, levels: 4 };
        assert_eq!(layout(&[], true, 256 << 20, &[]).unwrap(), DEFAULT_WINDOWS.to_vec());
        assert!(layout(&[], false, 256 << 20, &[]).unwrap().is_empty());
        // A file over one default window leaves only that one out.
        assert_eq!(layout(&[], true, 256 << 20, &[(0xC100_0000, 4096)]).unwrap(), DEFAULT_WINDOWS[1..].to_vec());
        let e = layout(&[r(0x100_0000, 4096)], true, 256 << 20, &[]).unwrap_err().to_string();
        assert!(e.contains("overlaps guest RAM"), "{e}");
        let e = layout(&[r(0xD000_0000, 8192)], true, 1 << 20, &[(0xD000_1000, 4096)]).unwrap_err().to_string();
        assert!(e.contains("--map-file"), "{e}");
        let e = layout(&[r(0xD000_0000, 8192), r(0xD000_1000, 4096)], true, 1 << 20, &[]).unwrap_err().to_string();
        assert!(e.contains("overlaps --vpt-region"), "{e}");
        let e = layout(&[r(0xEFFF_F000, 8192)], true, 1 << 20, &[]).unwrap_err().to_string();
        assert!(e.contains("beyond"), "{e}");
    }
}
