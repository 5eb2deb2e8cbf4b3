//! Zero-fill (FreeBSD's `vm_fault_zerofill`; in the seed the end of the
//! chain in `vm_fault_object`, `vm_page_zero_fill`, `v_zfod`): nobody down
//! the chain has the page, so it is a new zero page in the first object.

use super::object::{Chain, Found};
use super::{FaultKind, FaultState, Retry};
use crate::page::{pf, Page};
use crate::vm::Prot;

/// A fresh frame in the first object (`chain[0]`). A fresh frame is a hole,
/// so it is already zero; it is dirty (no copy exists anywhere).
pub(super) fn zerofill(fs: &mut FaultState, chain: &mut Chain, prot: Prot) -> Result<Found, Retry> {
    fs.ratelimit()?;
    chain.truncate(1);
    let Some((obj, mut g, pindex)) = chain.pop() else {
        return Err(Retry::Again);
    };
    let Some(fr) = fs.vm.pool.alloc(obj.pref_frame(pindex)) else {
        return Err(Retry::NoMemory);
    };
    g.pages.insert(pindex, Page::new(fr, pf::VALID | pf::DIRTY | pf::ZERO));
    Ok(Found { g, obj, pindex, prot, kind: FaultKind::ZeroFill })
}
