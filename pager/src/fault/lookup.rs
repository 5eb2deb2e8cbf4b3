//! The lookup step (`vm_map_lookup`): the entry at the faulting address,
//! the access checks, the needs-copy shadow, and for a VPAGETABLE window
//! the walk (`vm_fault_vpagetable`) to the `Normal` entry its vptes name.

use super::{FaultError, FaultState, Retry};
use crate::map::{MapEntry, MapInner, MapType};
use crate::object::Object;
use crate::stages::{self, Stage};
use crate::vm::Prot;
use crate::vpagetable;
use std::sync::Arc;

/// What `vm_fault_object` resolves: the seed's `fs->first_object`,
/// `first_pindex`, `fs->first_prot` and `fault_type`, with the `Normal`
/// entry whose chain it is.
pub(crate) struct FirstObject<'g> {
    /// The `Normal` entry (read-ahead behaviour, `lastr`).
    pub(crate) entry: &'g MapEntry,
    /// `fs->first_object`.
    pub(crate) object: Arc<Object>,
    /// `first_pindex`.
    pub(crate) pindex: u64,
    /// `fs->first_prot`.
    pub(crate) prot: Prot,
    /// The access to resolve for: the fault's, or `RW`/`READ` for a
    /// VPAGETABLE table page.
    pub(crate) fault_type: Prot,
    /// The address a COW copy will be entered at: the copy removes every
    /// other mapping this map has of the old frame, not this one.
    pub(crate) keep: Option<u64>,
}

/// One pass's lookup, valid while the pass holds the map read lock (the
/// seed's `lookup_still_valid`).
pub(crate) struct Lookup<'g> {
    /// The entry the address is in (`fs->entry`): a window's for VPAGETABLE.
    pub(crate) entry: &'g MapEntry,
    /// What to resolve.
    pub(crate) first: FirstObject<'g>,
    /// The address of the page in its `Normal` entry: the faulting address,
    /// or for a window the address its vptes name.
    pub(crate) target_addr: u64,
}

/// The lookup step: `vm_map_lookup` and the checks after it in `vm_fault`.
/// A write to a needs-copy entry (or a wiring of a writable one) first gets
/// its shadow (`Retry::NeedsCopy`); a read maps the backing page read-only.
#[inline]
pub(super) fn lookup<'g>(fs: &mut FaultState, g: &'g MapInner) -> Result<Lookup<'g>, Retry> {
    fs.begin_pass(g.timestamp);
    let vaddr = fs.vaddr;
    let Some(e) = stages::timed(Stage::Lookup, || g.lookup(vaddr)) else {
        return Err(FaultError::NotMapped.into());
    };
    fs.wired = e.wired_count > 0;
    if !e.protection.contains(fs.access) {
        return Err(FaultError::Protection.into());
    }
    // Wired entries fault with their own protection.
    fs.fault_type = if fs.wired { e.protection } else { fs.access };
    if matches!(e.maptype, MapType::VPageTable { .. }) {
        return window(fs, g, e);
    }
    let mut prot = e.protection;
    if e.needs_copy {
        if fs.access.writable() || (fs.wired && e.protection.writable()) {
            return Err(Retry::NeedsCopy(vaddr));
        }
        prot = prot.without(Prot::WRITE);
    }
    let first = FirstObject {
        entry: e,
        object: e.object.arc().clone(),
        pindex: e.pindex(vaddr),
        prot,
        fault_type: fs.fault_type,
        keep: Some(vaddr),
    };
    Ok(Lookup { entry: e, first, target_addr: vaddr })
}

/// A fault in the VPAGETABLE window `e`: walk its vptes
/// (`vm_fault_vpagetable`, the walk kept in `fs.walk` for the A/M update),
/// then resolve the page they name through the `Normal` entry there,
/// exactly as a fault at that address.
fn window<'g>(fs: &mut FaultState, g: &'g MapInner, e: &'g MapEntry) -> Result<Lookup<'g>, Retry> {
    let w = vpagetable::walk(fs, g, e)?;
    let (re, addr) = vpagetable::target_entry(g, e, w.frame)?;
    let mut first = lookup_normal(re, addr, fs.fault_type, w.prot)?;
    first.keep = Some(fs.vaddr);
    fs.walk = Some(w);
    Ok(Lookup { entry: e, first, target_addr: addr })
}

/// The first object, page index and protection for a fault needing
/// `access` at `addr` of the `Normal` entry `re` (`vm_map_lookup`), at most
/// `prot`: a write to a needs-copy entry first gets its shadow
/// (`Retry::NeedsCopy`).
pub(crate) fn lookup_normal<'g>(
    re: &'g MapEntry,
    addr: u64,
    access: Prot,
    prot: Prot,
) -> Result<FirstObject<'g>, Retry> {
    if !re.protection.contains(access) {
        return Err(FaultError::Protection.into());
    }
    let mut prot = prot & re.protection;
    if re.needs_copy {
        if access.writable() {
            return Err(Retry::NeedsCopy(addr));
        }
        prot = prot.without(Prot::WRITE);
    }
    let object = re.object.arc().clone();
    Ok(FirstObject { entry: re, object, pindex: re.pindex(addr), prot, fault_type: access, keep: None })
}
