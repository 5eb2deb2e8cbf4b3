//! The BSD VM core of vkvm: maps, objects and shadow chains, pagers,
//! `vm_fault`, the VPAGETABLE walk and pageout. No KVM here: translations go
//! through the `Pmap` trait (the VMM implements it with host mappings;
//! `SoftPmap` is the software model used by the tests).

#![warn(missing_docs)]

pub mod fault;
pub mod frame;
pub mod map;
pub mod object;
pub mod page;
pub mod pageout;
pub mod pager;
pub mod pmap;
pub mod vm;
pub mod vpagetable;
pub mod vpte;

pub use fault::{
    access, fault, fault_range, quick_fault, read_guest, write_guest, FaultError, FaultFlags, FaultKind, Held, Resolved,
};
pub use frame::{Frame, FramePool, PAGE_SIZE};
pub use map::{Behavior, FileMode, Inherit, Map, MapError, MapType};
pub use object::{collapse, ObjHandle, Object, ObjectKind};
pub use pageout::{run_once, PageoutDaemon, PageoutReport};
pub use pager::{FailHook, FailMode, PageIo, Pager, PagerError};
pub use pmap::{Pmap, SoftMachine, SoftPmap};
pub use vm::{Config, Prot, Stats, StatsSnapshot, Vm, VmError};
