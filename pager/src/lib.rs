//! The BSD VM core of vkvm: maps, objects and shadow chains, pagers,
//! `vm_fault`, the VPAGETABLE walk and pageout. No KVM here: translations go
//! through the `Pmap` trait (the VMM implements it with host mappings;
//! `SoftPmap` is the software model used by the tests).
//!
//! ```
//! use ::pager::*; // everything a VMM needs is at the root
//! let vm = Vm::new(Config { store_bytes: 1 << 30, max_resident: 256, swap_bytes: 1 << 20, ..Default::default() }).unwrap();
//! let pmap = SoftPmap::new();
//! let map = Map::new(&vm, pmap.clone());
//! map.map_anon(0x1000_0000, 16 * 4096, Prot::RW).unwrap();
//! // A guest write to an unmapped page: resolve it, then map `r.frame` (and
//! // `r.prefault`) with `r.prot` (a `Pmap` implementation does the mapping).
//! let r = fault(&map, 0x1000_0000, Prot::WRITE, FaultFlags::NONE).unwrap();
//! assert_eq!(r.kind, FaultKind::ZeroFill);
//! assert_eq!(pmap.extract(0x1000_0000), Some(r.frame));
//! // The VMM's own access to guest memory (hypercall buffers):
//! write_guest(&map, 0x1000_0010, b"hello").unwrap();
//! let mut b = [0u8; 5];
//! read_guest(&map, 0x1000_0010, &mut b).unwrap();
//! assert_eq!(&b, b"hello");
//! // Keep resident frames within budget in the background.
//! let _daemon = PageoutDaemon::start(&vm).unwrap();
//! ```

#![warn(missing_docs)]

// Internals: the VMM uses what is re-exported below, plus the two public
// modules `stages` (profiler timing) and `vpte` (the guest includes it).
mod fault;
mod frame;
mod map;
mod object;
mod page;
mod pageout;
mod pager;
mod pmap;
pub mod stages;
mod vm;
mod vpagetable;
pub mod vpte;

pub use fault::{
    access, fault, fault_range, quick_fault, read_guest, write_guest, FaultError, FaultFlags, FaultKind, Held, Resolved,
};
pub use frame::{Frame, FramePool, PoolError, PAGE_SIZE};
pub use map::{Behavior, EntryInfo, FileMode, Inherit, Map, MapError, MapType, MAX_ADDRESS};
pub use object::{collapse, ObjHandle, Object, ObjectKind};
pub use page::{Page, Queue};
pub use pageout::{run_once, PageoutDaemon, PageoutReport};
pub use pager::mem::{GetCall, MemPager};
pub use pager::swap::SwapPager;
pub use pager::{FailHook, FailMode, PageIo, Pager, PagerError};
pub use pmap::{Pmap, SoftMachine, SoftPmap, SoftPte};
pub use stages::Stage;
pub use vm::{Config, Prot, RateLimit, Stats, StatsSnapshot, Vm, VmError};

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn core_types_are_send_and_sync() {
        send_sync::<crate::Vm>();
        send_sync::<crate::Map>();
        send_sync::<crate::ObjHandle>();
        send_sync::<crate::Resolved>();
        send_sync::<crate::FramePool>();
    }
}
