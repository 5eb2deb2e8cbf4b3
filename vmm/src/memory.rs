//! Guest RAM as a pager map: one anonymous (zero-fill) object mapped over
//! the whole RAM range, shown to KVM through a `View`. No guest page is
//! populated before the guest (or the VMM on its behalf) touches it.

use crate::error::Error;
use crate::pmap::{Delivery, View};
use crate::uffd::{self, Uffd};
use log::info;
use pager::{FaultError, Map, Prot, Vm};
use std::path::PathBuf;
use std::sync::Arc;

/// What the user chose for guest memory.
#[derive(Clone, Debug)]
pub struct MemConfig {
    pub size: u64,
    pub delivery: Delivery,
    /// Resident page budget in bytes (`--phys-mem`); default: all of RAM.
    pub phys_mem: Option<u64>,
    pub swap: Option<PathBuf>,
}

pub struct GuestRam {
    pub vm: Arc<Vm>,
    pub map: Arc<Map>,
    pub view: Arc<View>,
    pub uffd: Option<Arc<Uffd>>,
    pub size: u64,
    _ram: pager::ObjHandle,
    _pageout: Option<pager::PageoutDaemon>,
}

impl GuestRam {
    pub fn new(cfg: &MemConfig) -> Result<GuestRam, Error> {
        let pages = cfg.size / 4096;
        // Without --phys-mem there is no memory pressure to model: the budget
        // leaves room for COW copies of clones, and nothing is throttled.
        let budget = match cfg.phys_mem {
            Some(b) => b / 4096,
            None => pages * 4,
        };
        let pcfg = pager::Config {
            ratelimit: cfg.phys_mem.is_some(),
            // Room for RAM, its shadows after clones, and general frames.
            store_bytes: (cfg.size * 8).max(1 << 30),
            max_resident: budget,
            swap_path: cfg.swap.clone(),
            swap_bytes: if cfg.phys_mem.is_some() { cfg.size * 2 } else { 0 },
            ..pager::Config::default()
        };
        let vm = Vm::new(pcfg).map_err(|e| Error::Crash(format!("cannot create the pager: {e}")))?;
        let uffd = match cfg.delivery {
            Delivery::Uffd => Some(Arc::new(Uffd::new(uffd_features()).map_err(|e| {
                Error::Config(format!(
                    "userfaultfd is not usable here ({e}); use --fault-delivery exit or run as root / set vm.unprivileged_userfaultfd=1"
                ))
            })?)),
            Delivery::Exit => None,
        };
        let ram = vm.anonymous(pages);
        let first = ram.preferred_frames().map(|(b, _)| b);
        let zvm = vm.clone();
        let view = View::new(
            cfg.size,
            vm.pool().fd(),
            first,
            cfg.delivery,
            uffd.clone(),
            Box::new(move |f| zvm.pool().zero(f).is_ok()),
        )
        .map_err(|e| Error::Crash(format!("cannot map the guest RAM view: {e}")))?;
        let view = Arc::new(view);
        let map = Map::new(&vm, view.clone());
        map.map_object(0, cfg.size, ram.clone(), 0, Prot::ALL, Prot::ALL, pager::Inherit::Copy, false)
            .map_err(|e| Error::Crash(format!("cannot map guest RAM: {e:?}")))?;
        let pageout = if cfg.phys_mem.is_some() {
            Some(pager::PageoutDaemon::start(&vm).map_err(Error::io("cannot start the pageout daemon"))?)
        } else {
            None
        };
        info!("guest RAM: {} MiB, {:?} delivery, budget {} pages", cfg.size >> 20, cfg.delivery, budget);
        Ok(GuestRam { vm, map, view, uffd, size: cfg.size, _ram: ram, _pageout: pageout })
    }

    /// Read guest memory through the pager (brings pages in, never zeros
    /// in place of swapped-out data).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), FaultError> {
        self.check(gpa, buf.len())?;
        pager::read_guest(&self.map, gpa, buf)
    }

    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), FaultError> {
        self.check(gpa, buf.len())?;
        pager::write_guest(&self.map, gpa, buf)
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), FaultError> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(FaultError::NotMapped),
        }
    }

    /// Populate every page now (`--prefault`).
    pub fn prefault_all(&self) -> Result<(), Error> {
        for a in (0..self.size).step_by(4096) {
            pager::fault(&self.map, a, Prot::WRITE, pager::FaultFlags::NO_PREFAULT)
                .map_err(|e| Error::Crash(format!("--prefault: guest page {a:#x}: {e}")))?;
        }
        Ok(())
    }
}

pub fn uffd_features() -> u64 {
    uffd::FEATURE_MISSING_SHMEM
        | uffd::FEATURE_MINOR_SHMEM
        | uffd::FEATURE_PAGEFAULT_FLAG_WP
        | uffd::FEATURE_WP_HUGETLBFS_SHMEM
        | uffd::FEATURE_THREAD_ID
}

/// `auto`: userfaultfd when it works here, else exits.
pub fn pick_delivery() -> Delivery {
    match Uffd::new(uffd_features()) {
        Ok(_) => Delivery::Uffd,
        Err(e) => {
            log::warn!("userfaultfd unavailable ({e}): using exit delivery");
            Delivery::Exit
        }
    }
}
