//! The VMM's own touches of guest memory through the fault path:
//! `fault_range` (fault-around), `quick_fault` (`vm_fault_quick`), and
//! `access`/`read_guest`/`write_guest` (hypercall buffers).

use super::{fault, FaultError, FaultFlags, Resolved, PS};
use crate::frame::PAGE_SIZE;
use crate::map::Map;
use crate::vm::Prot;

/// Resolves a run of `npages` pages from `addr` in one call (fault-around
/// for the VMM). Pages already mapped are skipped for reads. Stops at the
/// first error after the first page.
pub fn fault_range(map: &Map, addr: u64, npages: u64, access: Prot) -> Result<Vec<Resolved>, FaultError> {
    let base = addr & !(PS - 1);
    // `npages` is the caller's (possibly hostile) number: grow as pages resolve.
    let mut out = Vec::with_capacity(npages.min(64) as usize);
    for i in 0..npages {
        let Some(a) = i.checked_mul(PS).and_then(|o| base.checked_add(o)) else {
            if i == 0 {
                return Err(FaultError::NotMapped);
            }
            break;
        };
        if !access.writable() && map.pmap.extract(a).is_some() {
            continue;
        }
        match fault(map, a, access, FaultFlags::NO_PREFAULT) {
            Ok(r) => out.push(r),
            Err(e) if i == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// Faults one page in without holding it (`vm_fault_quick`).
pub fn quick_fault(map: &Map, addr: u64, write: bool) -> Result<(), FaultError> {
    fault(map, addr, if write { Prot::WRITE } else { Prot::READ }, FaultFlags::NO_PREFAULT).map(|_| ())
}

/// Lets the VMM touch guest memory `[addr, addr+len)`: each page is brought
/// in through `fault()` (never read as zeros when swapped out), held, and
/// `f(offset_in_range, bytes)` is called with the map unchanged meanwhile.
pub fn access(
    map: &Map,
    addr: u64,
    len: usize,
    write: bool,
    mut f: impl FnMut(usize, &mut [u8]),
) -> Result<(), FaultError> {
    let want = if write { Prot::WRITE } else { Prot::READ };
    let mut done = 0usize;
    while done < len {
        let a = addr.checked_add(done as u64).ok_or(FaultError::NotMapped)?;
        let off = (a & (PS - 1)) as usize;
        let n = (PAGE_SIZE - off).min(len - done);
        let mut tries = 0;
        loop {
            tries += 1;
            if tries > 64 {
                return Err(FaultError::Failure);
            }
            let r = fault(map, a, want, FaultFlags::HOLD | FaultFlags::NO_PREFAULT)?;
            let g = map.inner.read();
            if g.timestamp != r.generation {
                continue;
            }
            let p = map.vm.pool.frame_ptr(r.frame);
            if p.is_null() {
                return Err(FaultError::Failure);
            }
            // SAFETY: the page is held (pageout will not free it) and the map
            // generation is unchanged (no clone/COW can redirect it) while we
            // hold the map read lock.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p.add(off), n) };
            f(done, bytes);
            drop(g);
            drop(r);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Reads guest memory through the pager.
pub fn read_guest(map: &Map, addr: u64, buf: &mut [u8]) -> Result<(), FaultError> {
    let len = buf.len();
    access(map, addr, len, false, |o, b| buf[o..o + b.len()].copy_from_slice(b))
}

/// Writes guest memory through the pager.
pub fn write_guest(map: &Map, addr: u64, buf: &[u8]) -> Result<(), FaultError> {
    access(map, addr, buf.len(), true, |o, b| b.copy_from_slice(&buf[o..o + b.len()]))
}
