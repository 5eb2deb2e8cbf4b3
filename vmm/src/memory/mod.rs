//! Guest RAM as a pager map: one anonymous (zero-fill) object mapped over
//! the whole RAM range, shown to KVM through a `View`. No guest page is
//! populated before the guest (or the VMM on its behalf) touches it.

use crate::config::{FileMap, FileMode, SwapFault, VptSpec, MAX_GPA};
use crate::error::Error;
use crate::pmap::{Delivery, View};
use crate::uffd::{self, Uffd};
use log::info;
use pager::{FaultError, Map, Prot, Vm};

mod resolve;
pub use resolve::{Access, DeliveryStats, GuestFault, Unresolved};
use std::path::PathBuf;
use std::sync::Arc;

/// A mapped file region, as the guest and the stats see it.
#[derive(Clone)]
pub struct Region {
    pub gpa: u64,
    pub len: u64,
    pub mode: FileMode,
    pub object: pager::ObjHandle,
}

/// What the user chose for guest memory.
#[derive(Clone, Debug)]
pub struct MemConfig {
    pub size: u64,
    pub files: Vec<FileMap>,
    pub delivery: Delivery,
    /// Resident page budget in bytes (`--phys-mem`); default: all of RAM.
    pub phys_mem: Option<u64>,
    pub swap: Option<PathBuf>,
    /// `--swap-reuse`: an existing non-empty `swap` may be overwritten.
    pub swap_reuse: bool,
    pub swap_size: Option<u64>,
    /// Test only: failures injected into swap I/O.
    pub swap_fault: Option<SwapFault>,
    /// `--vpt-region`s; none: the default windows (`config::DEFAULT_WINDOWS`)
    /// if `default_vpt` (the bundled guest).
    pub vpt: Vec<VptSpec>,
    pub default_vpt: bool,
    /// `--clones`: VMs that will share this pager (and its swap) besides the first.
    pub clones: u32,
}

/// Default swap: twice RAM for each VM that may share it (the VM and its
/// `--clones`), since every clone can write all of its RAM. The file is
/// sparse: only what is paged out takes disk space.
pub fn default_swap_size(ram: u64, clones: u32) -> u64 {
    ram.saturating_mul(2).saturating_mul(1 + clones as u64)
}

pub struct GuestRam {
    pub vm: Arc<Vm>,
    pub map: Arc<Map>,
    pub view: Arc<View>,
    pub uffd: Option<Arc<Uffd>>,
    pub size: u64,
    /// `--map-file` regions, in command-line order.
    pub files: Vec<Region>,
    /// VPAGETABLE windows over guest RAM; region index = position.
    pub vpt: Vec<crate::vpagetable::Window>,
    /// Guest faults delivered to this memory (this VM's, not its clones').
    pub delivery: DeliveryStats,
    ram_object: pager::ObjHandle,
    _pageout: Option<pager::PageoutDaemon>,
    /// The `--swap` file's lock, held for the run (see `inputs::lock_swap`).
    _swap_lock: Option<std::fs::File>,
}

impl GuestRam {
    pub fn new(cfg: &MemConfig) -> Result<GuestRam, Error> {
        let pcfg = pager_config(cfg);
        let budget = pcfg.max_resident;
        // Checked and locked before the pager truncates it.
        let swap_lock = match (&cfg.swap, cfg.phys_mem) {
            (Some(p), Some(_)) => Some(crate::inputs::lock_swap(p, cfg.swap_reuse)?),
            _ => None,
        };
        let vm = Vm::new(pcfg).map_err(|e| Error::Crash(format!("cannot create the pager: {e}")))?;
        let uffd = open_uffd(cfg.delivery).map_err(|e| match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM) => Error::Crash(format!("cannot open a userfaultfd: {e}")),
            _ => Error::Config(format!(
                "userfaultfd is not usable here ({e}); use --fault-delivery exit or run as root / set vm.unprivileged_userfaultfd=1"
            )),
        })?;
        let ram = vm.anonymous(cfg.size / 4096);
        let files = open_files(&vm, cfg)?;
        let spans: Vec<(u64, u64)> = files.iter().map(|(f, len, _)| (f.gpa, *len)).collect();
        let vpt = crate::vpagetable::layout(&cfg.vpt, cfg.default_vpt, cfg.size, &spans)?;
        let window =
            spans.iter().map(|&(g, l)| g + l).chain(vpt.iter().map(|w| w.gpa + w.len)).fold(cfg.size, u64::max);
        let view = view_over(&vm, window, cfg.delivery, uffd.clone())
            .map_err(|e| Error::Crash(format!("cannot reserve the guest-physical view: {e}")))?;
        let view = Arc::new(view);
        let map = Map::new(&vm, view.clone());
        let regions = map_regions(&view, &map, cfg.size, &ram, files, &vpt)?;
        let pageout = if cfg.phys_mem.is_some() {
            Some(pager::PageoutDaemon::start(&vm).map_err(Error::io("cannot start the pageout daemon"))?)
        } else {
            None
        };
        info!("guest RAM: {} MiB, {:?} delivery, budget {} pages", cfg.size >> 20, cfg.delivery, budget);
        Ok(GuestRam {
            vm,
            map,
            view,
            uffd,
            size: cfg.size,
            files: regions,
            vpt: vpt.into_iter().map(crate::vpagetable::Window::new).collect(),
            delivery: DeliveryStats::default(),
            ram_object: ram,
            _pageout: pageout,
            _swap_lock: swap_lock,
        })
    }

    /// Every backed range of the guest-physical space, each with its own
    /// memory slot: (gpa, len, the object's first preferred frame). RAM and
    /// files are laid out in place; VPAGETABLE windows show RAM frames,
    /// remapped page by page.
    pub fn regions(&self) -> impl Iterator<Item = (u64, u64, Option<pager::Frame>)> + '_ {
        let first = |o: &pager::ObjHandle| o.preferred_frames().map(|(b, _)| b);
        std::iter::once((0, self.size, first(&self.ram_object)))
            .chain(self.files.iter().map(move |r| (r.gpa, r.len, first(&r.object))))
            .chain(self.vpt.iter().map(|w| (w.spec.gpa, w.spec.len, None)))
    }

    /// A copy-on-write clone of this guest memory for a VM clone: a new view
    /// (and userfaultfd) over the same frame pool, and the pager map forked
    /// onto it (`vmspace_fork`: entries become copy-on-write and this view is
    /// write-protected). Costs O(map entries + present pages to write-protect),
    /// never a copy of guest memory.
    pub fn fork(&self) -> Result<GuestRam, Error> {
        let delivery = self.view.delivery();
        let uffd = open_uffd(delivery).map_err(|e| Error::Crash(format!("userfaultfd for a clone: {e}")))?;
        let view = view_over(&self.vm, self.view.window(), delivery, uffd.clone())
            .map_err(|e| Error::Crash(format!("cannot reserve a clone's view: {e}")))?;
        let crash = |e: &dyn std::fmt::Display| Error::Crash(format!("cannot map a clone's memory: {e}"));
        for (gpa, len, first) in self.regions() {
            view.add_region(gpa, len, first).map_err(|e| crash(&e))?;
        }
        let view = Arc::new(view);
        // The caller runs the parent's write-protection (`view.run_deferred`)
        // once the clone is started, before the parent runs again.
        self.view.defer_protect();
        let map = self.map.fork(view.clone());
        if map.is_err() {
            self.view.run_deferred();
        }
        let map = map.map_err(|e| crash(&e))?;
        Ok(GuestRam {
            vm: self.vm.clone(),
            map,
            view,
            uffd,
            size: self.size,
            files: self.files.clone(),
            vpt: self.vpt.iter().map(|w| crate::vpagetable::Window::new(w.spec)).collect(),
            delivery: DeliveryStats::default(),
            ram_object: self.ram_object.clone(),
            _pageout: None,
            _swap_lock: None,
        })
    }

    /// Bytes of guest data the host holds in the frame pool (st_blocks of
    /// its memfd): what one host page shared by many guest pages counts once.
    pub fn pool_resident_bytes(&self) -> u64 {
        // SAFETY: fstat on the pool's memfd into a local struct.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(self.vm.pool().fd(), &mut st) == 0 {
                st.st_blocks as u64 * 512
            } else {
                0
            }
        }
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

    /// Is `[gpa, gpa + len)` inside RAM or one mapped file?
    pub fn contains(&self, gpa: u64, len: usize) -> bool {
        self.check(gpa, len).is_ok()
    }

    /// Guest accesses by the VMM stay inside RAM or one mapped file.
    fn check(&self, gpa: u64, len: usize) -> Result<(), FaultError> {
        let end = gpa.checked_add(len as u64).ok_or(FaultError::NotMapped)?;
        let inside = |s: u64, l: u64| gpa >= s && end <= s + l;
        if inside(0, self.size) || self.files.iter().any(|r| inside(r.gpa, r.len)) {
            Ok(())
        } else {
            Err(FaultError::NotMapped)
        }
    }

    /// Write shared file mappings back to their files (at exit), each file
    /// object once.
    pub fn sync_files(&self) -> Result<(), Error> {
        let mut synced = Vec::new();
        for r in self.files.iter().filter(|r| r.mode == FileMode::Shared) {
            if synced.contains(&r.object.id()) {
                continue;
            }
            synced.push(r.object.id());
            r.object.sync().map_err(|e| Error::Crash(format!("cannot write back the file at {:#x}: {e:?}", r.gpa)))?;
        }
        Ok(())
    }

    /// The index of the first file region over the same file object as
    /// region `i` (its own index if it is the first).
    fn file_id(&self, i: usize) -> usize {
        let id = self.files[i].object.id();
        self.files.iter().position(|r| r.object.id() == id).unwrap_or(i)
    }

    /// Guest command-line words telling the guest where files are mapped:
    /// `vkvm.files=GPA:LEN:MODE:FILE,...`, FILE = the index of the first
    /// region that maps the same host file.
    pub fn guest_cmdline(&self) -> String {
        let v: Vec<String> = (0..self.files.len())
            .map(|i| {
                let r = &self.files[i];
                format!("{:#x}:{:#x}:{}:{}", r.gpa, r.len, r.mode.name(), self.file_id(i))
            })
            .collect();
        let files = if v.is_empty() { String::new() } else { format!("vkvm.files={}", v.join(",")) };
        let vpt = crate::vpagetable::guest_cmdline(&self.vpt, self.size / 4096);
        [files, vpt].join(" ").trim().to_string()
    }

    /// Bring every page of `[gpa, gpa + len)` in, writable.
    pub fn populate(&self, gpa: u64, len: u64) -> Result<(), Unresolved> {
        self.check(gpa, len as usize).map_err(Unresolved::Refused)?;
        let mut a = gpa & !0xfff;
        while a < gpa + len {
            self.fill(a, Access::Write)?;
            a += 4096;
        }
        Ok(())
    }

    /// Populate every page now (`--prefault`); `check` runs every 1024
    /// pages and may stop it (the run's timeout, a signal).
    pub fn prefault_all(&self, check: impl Fn() -> Result<(), Error>) -> Result<(), Error> {
        for a in (0..self.size).step_by(4096) {
            if (a >> 12).is_multiple_of(1024) {
                check()?;
            }
            self.fill(a, Access::Write).map_err(|u| {
                let why = match u {
                    Unresolved::Fatal(f) => f.why,
                    Unresolved::Refused(e) => e.to_string(),
                };
                Error::Crash(format!("--prefault: guest page {a:#x}: {why}"))
            })?;
        }
        Ok(())
    }
}

/// The pager's configuration for `cfg`.
fn pager_config(cfg: &MemConfig) -> pager::Config {
    // Without --phys-mem there is no memory pressure to model: the budget
    // leaves room for COW copies of clones, and nothing is throttled.
    let budget = match cfg.phys_mem {
        Some(b) => b / 4096,
        None => cfg.size / 4096 * 4,
    };
    pager::Config {
        ratelimit: cfg.phys_mem.is_some(),
        // Pageout keeps 2x this free: 1/16 of the budget keeps the load
        // under the rate limiter's threshold while pageout keeps up.
        free_target: (budget / 32).max(16),
        // Allocation already waits for pageout; the seed's throttle (up to
        // 100 ms per sleep) is kept only as a brake for a VM that outruns
        // the daemon, so that thrashing guests still make progress.
        ratelimit_load: 980,
        ratelimit_max_sleep: std::time::Duration::from_millis(1),
        // Room for RAM, its shadows after clones, and general frames.
        store_bytes: (cfg.size * 8).max(1 << 30),
        max_resident: budget,
        swap_path: cfg.swap.clone(),
        swap_bytes: if cfg.phys_mem.is_some() {
            cfg.swap_size.unwrap_or(default_swap_size(cfg.size, cfg.clones))
        } else {
            0
        },
        swap_hook: cfg.swap_fault.map(|f| {
            let hook = pager::FailHook::new();
            match f {
                SwapFault::ReadEio => hook.set_read(pager::FailMode::Eio),
                SwapFault::ShortRead => hook.set_read(pager::FailMode::ShortRead),
                SwapFault::WriteEio => hook.set_write(pager::FailMode::Eio),
                SwapFault::Nospace => hook.set_write(pager::FailMode::NoSpace),
            }
            hook
        }),
        ..pager::Config::default()
    }
}

/// Show RAM (`size` bytes of `ram`), the files and the windows in `view`
/// and map them in `map`; the file regions as the guest and stats see them.
fn map_regions(
    view: &View,
    map: &Map,
    size: u64,
    ram: &pager::ObjHandle,
    files: Vec<(FileMap, u64, pager::ObjHandle)>,
    vpt: &[VptSpec],
) -> Result<Vec<Region>, Error> {
    let crash = |what: &str, e: &dyn std::fmt::Display| Error::Crash(format!("cannot map {what}: {e}"));
    view.add_region(0, size, ram.preferred_frames().map(|(b, _)| b)).map_err(|e| crash("guest RAM", &e))?;
    map.map_object(0, size, ram.clone(), 0, Prot::ALL, Prot::ALL, pager::Inherit::Copy, false)
        .map_err(|e| crash("guest RAM", &e))?;
    let mut regions = Vec::new();
    for (f, len, obj) in files {
        let what = f.path.display().to_string();
        // Private mappings show the anonymous shadow's pages once written,
        // so only the file object's frames are laid out in place.
        view.add_region(f.gpa, len, obj.preferred_frames().map(|(b, _)| b)).map_err(|e| crash(&what, &e))?;
        let mode = match f.mode {
            FileMode::ReadOnly => pager::FileMode::ReadOnly,
            FileMode::Shared => pager::FileMode::Shared,
            FileMode::Private => pager::FileMode::Private,
        };
        map.map_file(f.gpa, len, &obj, 0, mode).map_err(|e| crash(&what, &e))?;
        regions.push(Region { gpa: f.gpa, len, mode: f.mode, object: obj });
    }
    // A window shows RAM frames wherever the guest's vptes point, so it
    // has no frames laid out in place: every page is mapped on a fault.
    // Its vpte frame i is guest RAM page i as this VM (or clone) sees it.
    for w in vpt {
        let what = format!("the VPAGETABLE window at {:#x}", w.gpa);
        view.add_region(w.gpa, w.len, None).map_err(|e| crash(&what, &e))?;
        map.map_vpagetable(w.gpa, w.len, 0, size / 4096, w.levels).map_err(|e| crash(&what, &e))?;
    }
    Ok(regions)
}

/// A small guest memory for unit tests (no KVM needed): `size` bytes of
/// RAM, exit delivery, these VPAGETABLE windows.
#[cfg(test)]
pub fn test_ram(size: u64, vpt: &[VptSpec]) -> Arc<GuestRam> {
    let cfg = MemConfig {
        size,
        files: Vec::new(),
        delivery: Delivery::Exit,
        phys_mem: None,
        swap: None,
        swap_reuse: false,
        swap_size: None,
        swap_fault: None,
        vpt: vpt.to_vec(),
        default_vpt: false,
        clones: 0,
    };
    Arc::new(GuestRam::new(&cfg).expect("test guest memory"))
}

/// Open every `--map-file`, check sizes and overlaps: (file, bytes, object).
/// One host file is one object however often it is mapped (BSD's one vnode
/// object per vnode): two `,shared` maps of a file see each other's writes
/// and write back one set of pages, so no guest write can be lost to a
/// second copy; a `,private` map of it is a shadow over the same object.
fn open_files(vm: &Arc<Vm>, cfg: &MemConfig) -> Result<Vec<(FileMap, u64, pager::ObjHandle)>, Error> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<(FileMap, u64, pager::ObjHandle)> = Vec::new();
    // (device, inode) -> the object of that file.
    let mut opened: Vec<((u64, u64), pager::ObjHandle)> = Vec::new();
    for f in &cfg.files {
        let p = f.path.display();
        // Writable if any map of this file is shared.
        let shared = cfg.files.iter().any(|g| g.mode == FileMode::Shared && same_file(&g.path, &f.path));
        let (file, flen) = crate::inputs::open_regular(&f.path, "--map-file", shared)?;
        let meta = file.metadata().map_err(|e| Error::Config(format!("--map-file {p}: {e}")))?;
        if flen == 0 {
            return Err(Error::Config(format!("--map-file {p}: the file is empty")));
        }
        let len = match f.len {
            Some(l) if l > flen.div_ceil(4096) * 4096 => {
                return Err(Error::Config(format!(
                    "--map-file {p}: the file is {flen} bytes, shorter than the {l} asked"
                )))
            }
            Some(l) => l,
            None => flen.div_ceil(4096) * 4096,
        };
        let end = f.gpa.checked_add(len).filter(|&e| e <= MAX_GPA).ok_or_else(|| {
            Error::Config(format!("--map-file {p}: {:#x}+{len:#x} is beyond the guest-physical space", f.gpa))
        })?;
        if f.gpa < cfg.size {
            return Err(Error::Config(format!("--map-file {p}: {:#x} overlaps guest RAM (0..{:#x})", f.gpa, cfg.size)));
        }
        if let Some((o, _, _)) = out.iter().find(|(o, l, _)| f.gpa < o.gpa + l && o.gpa < end) {
            return Err(Error::Config(format!("--map-file {p} overlaps --map-file {}", o.path.display())));
        }
        let key = (meta.dev(), meta.ino());
        let obj = match opened.iter().find(|(k, _)| *k == key) {
            Some((_, obj)) => obj.clone(),
            None => {
                let obj =
                    vm.file_object(file, shared, None).map_err(|e| Error::Config(format!("--map-file {p}: {e}")))?;
                opened.push((key, obj.clone()));
                obj
            }
        };
        out.push((f.clone(), len, obj));
    }
    Ok(out)
}

/// Do two paths name one file (device and inode)?
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// A userfaultfd for a view, when faults are delivered that way.
fn open_uffd(delivery: Delivery) -> std::io::Result<Option<Arc<Uffd>>> {
    match delivery {
        Delivery::Uffd => Ok(Some(Arc::new(Uffd::new(uffd_features())?))),
        Delivery::Exit => Ok(None),
    }
}

/// An empty guest-physical view of `window` bytes over `vm`'s frame pool.
fn view_over(vm: &Arc<Vm>, window: u64, delivery: Delivery, uffd: Option<Arc<Uffd>>) -> std::io::Result<View> {
    let zvm = vm.clone();
    View::new(window, vm.pool().fd(), delivery, uffd, Box::new(move |f| zvm.pool().zero(f).is_ok()))
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
        // Out of descriptors or memory says nothing about userfaultfd:
        // keep it, and let the real open report the host failure.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)) => Delivery::Uffd,
        Err(e) => {
            log::warn!("userfaultfd unavailable ({e}): using exit delivery");
            Delivery::Exit
        }
    }
}
