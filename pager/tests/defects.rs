//! Regression tests for pager defects found by review (issue 11 item 3):
//! each failed before its fix.
mod common;
use ::pager::vpte::*;
use ::pager::*;
use common::*;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

/// A pmap that runs a hook when prefault asks about the armed address
/// (just before it locks that page's top object).
struct HookPmap {
    inner: Arc<SoftPmap>,
    armed: parking_lot::Mutex<Option<(u64, Hook)>>,
}

type Hook = Box<dyn FnOnce() + Send>;

impl Pmap for HookPmap {
    fn enter(&self, addr: u64, frame: Frame, prot: Prot, wired: bool) {
        self.inner.enter(addr, frame, prot, wired)
    }
    fn remove(&self, s: u64, e: u64) {
        self.inner.remove(s, e)
    }
    fn protect(&self, s: u64, e: u64, p: Prot) {
        self.inner.protect(s, e, p)
    }
    fn extract(&self, a: u64) -> Option<Frame> {
        let hook = {
            let mut g = self.armed.lock();
            if g.as_ref().is_some_and(|(x, _)| *x == a) {
                g.take()
            } else {
                None
            }
        };
        if let Some((_, f)) = hook {
            f();
        }
        self.inner.extract(a)
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: plain syscalls on the calling thread with a local cpu set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn set_nice(n: i32) {
    // SAFETY: changes the calling thread's priority only.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, n) };
}

/// A read fault's prefault walks a neighbour's chain while a write to that
/// neighbour copies it into the top object: prefault must not enter the old
/// backing frame over the copy. The reader (low priority) and the writer
/// share one CPU and queue on the top object's lock (held by a third
/// thread), reader first: when prefault releases the top object to go down
/// the chain, it wakes the writer, which preempts it there. Walking hand
/// over hand, prefault then entered the old frame over the writer's copy.
#[test]
fn prefault_never_enters_a_stale_backing_frame() {
    const ROUNDS: u64 = 100;
    let vm = Vm::new(Config { prefault: 4, ..cfg(1 << 16) }).unwrap();
    let p = machine(&vm);
    p.map.map_anon(B, ROUNDS * 16 * PS, Prot::RW).unwrap();
    for i in 0..ROUNDS * 16 {
        p.write_u64(B + i * PS, i).unwrap();
    }
    let pm = Arc::new(HookPmap { inner: SoftPmap::new(), armed: Default::default() });
    let c = p.map.fork(pm.clone()).unwrap();
    fault(&c, B, Prot::WRITE, FaultFlags::NONE).unwrap(); // the clone's shadow
    let top = c.object_at(B).unwrap().arc().clone();
    let cpu = 0;
    let mut stale = 0;
    for r in 1..ROUNDS {
        let base = B + r * 16 * PS;
        let (go, held, writer_go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let (t, g, h, w) = (top.clone(), go.clone(), held.clone(), writer_go.clone());
        let holder = std::thread::spawn(move || {
            g.wait();
            t.with_page(0, |_| {
                h.wait();
                std::thread::sleep(std::time::Duration::from_millis(3));
                w.wait();
                std::thread::sleep(std::time::Duration::from_millis(3));
            });
        });
        let (c2, w2) = (c.clone(), writer_go.clone());
        let writer = std::thread::spawn(move || {
            pin_to_cpu(cpu);
            w2.wait();
            fault(&c2, base + 9 * PS, Prot::WRITE, FaultFlags::NO_PREFAULT).unwrap();
        });
        let (c3, pm3, g3, h3) = (c.clone(), pm.clone(), go.clone(), held.clone());
        let reader = std::thread::spawn(move || {
            pin_to_cpu(cpu);
            set_nice(19);
            let hook = move || {
                g3.wait();
                h3.wait();
            };
            *pm3.armed.lock() = Some((base + 9 * PS, Box::new(hook)));
            fault(&c3, base + 8 * PS, Prot::READ, FaultFlags::NONE).unwrap();
            if let Some((_, f)) = pm3.armed.lock().take() {
                f(); // prefault did not ask about the page: keep the others going
            }
        });
        reader.join().unwrap();
        holder.join().unwrap();
        writer.join().unwrap();
        let (_, _, frame) = c.resident_page(base + 9 * PS).unwrap();
        if pm.inner.extract(base + 9 * PS).is_some_and(|f| f != frame) {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "{stale} of {} rounds left a stale translation of the old backing frame", ROUNDS - 1);
}

#[test]
fn fork_shares_a_wired_shared_entry() {
    let vm = vm(1024);
    let m = machine(&vm);
    let o = vm.anonymous(4);
    m.map.map_object(B, 4 * PS, o.clone(), 0, Prot::RW, Prot::ALL, Inherit::Share, false).unwrap();
    fill(&m, B, 0x11);
    m.map.wire(B, 4 * PS).unwrap();
    let cp = SoftPmap::new();
    let c = SoftMachine::with(m.map.fork(cp.clone()).unwrap(), cp);
    assert_eq!(c.map.object_at(B).unwrap().id(), o.id(), "a shared entry stays shared when wired");
    fill(&c, B, 0x22);
    assert!(all(&page_bytes(&m, B), 0x22), "the clone's write is not seen through the shared entry");
}

#[test]
fn unwiring_a_window_unwires_the_translated_page() {
    const R: u64 = 0x1000_0000;
    const V: u64 = 0x8000_0000;
    let vm = vm(4096);
    let m = machine(&vm);
    let ram = vm.anonymous(512);
    m.map.map_object(R, 512 * PS, ram.clone(), 0, Prot::ALL, Prot::ALL, Inherit::Copy, false).unwrap();
    m.map.map_vpagetable(V, 16 * PS, R, 512, 1).unwrap();
    m.write_u64(R + PS + 5 * 8, vpte_make(300, VPTE_V | VPTE_RW)).unwrap();
    m.map.setmap(V, vpte_make(1, VPTE_V | VPTE_RW)).unwrap();
    m.map.wire(V + 5 * PS, PS).unwrap();
    assert_eq!(ram.with_page(300, |p| p.wire_count()), Some(1));
    // The guest may repoint the vpte meanwhile: unwire still finds the page wiring wired.
    m.write_u64(R + PS + 5 * 8, vpte_make(301, VPTE_V | VPTE_RW)).unwrap();
    m.map.unwire(V + 5 * PS, PS).unwrap();
    assert_eq!(ram.with_page(300, |p| p.wire_count()), Some(0), "the translated page stayed wired");
    // Unmapping a wired window unwires too.
    m.map.wire(V + 5 * PS, PS).unwrap();
    assert_eq!(ram.with_page(301, |p| p.wire_count()), Some(1));
    m.map.unmap(V, 16 * PS).unwrap();
    assert_eq!(ram.with_page(301, |p| p.wire_count()), Some(0));
}

#[test]
fn terminating_a_shared_file_object_writes_dirty_pages_back() {
    let mut f = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut f, &[1u8; 4 * 4096]).unwrap();
    let vm = vm(1024);
    {
        let obj = vm.file_object(f.try_clone().unwrap(), true, None).unwrap();
        let m = machine(&vm);
        m.map.map_file(B, 4 * PS, &obj, 0, FileMode::Shared).unwrap();
        fill(&m, B + PS, 0x5A);
        // No sync: the map and the last reference go away.
    }
    let mut b = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 4096).unwrap();
    assert!(all(&b, 0x5A), "a guest write to a shared file was lost at termination");
}

#[test]
fn offsets_whose_page_index_overflows_are_refused() {
    let vm = vm(1024);
    let m = machine(&vm);
    let o = vm.anonymous(16);
    m.map.map_object(B, 16 * PS, o.clone(), 0, Prot::RW, Prot::ALL, Inherit::Share, false).unwrap();
    fill(&m, B + 2 * PS, 0x33);
    let top = u64::MAX - (PS - 1);
    for (off, len) in [(top, PS), (top - PS, 4 * PS)] {
        let r = m.map.map_object(B + 64 * PS, len, o.clone(), off, Prot::RW, Prot::ALL, Inherit::Copy, false);
        assert_eq!(r, Err(MapError::BadRange), "offset {off:#x} + {len:#x} wraps");
    }
    // The last page that fits is fine.
    m.map.map_object(B + 64 * PS, PS, o.clone(), top - PS, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
    // A shadow whose offset overflows the backing index: no wrap-around to page 2.
    let s = o.clone().shadow(16, u64::MAX - 2);
    m.map.map_object(B + 128 * PS, 16 * PS, s, 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
    assert!(m.map.resident_page(B + 128 * PS + 5 * PS).is_none());
    assert!(all(&page_bytes(&m, B + 128 * PS + 5 * PS), 0), "a wrapped index read the backing object's page 2");
}

#[test]
fn cow_copies_are_rate_limited() {
    let vm = Vm::new(Config {
        ratelimit: true,
        ratelimit_load: 500,
        ratelimit_max_sleep: std::time::Duration::from_millis(1),
        ..cfg(256)
    })
    .unwrap();
    let p = machine(&vm);
    p.map.map_anon(B, 100 * PS, Prot::RW).unwrap();
    for i in 0..100 {
        fill(&p, B + i * PS, 1);
    }
    assert_eq!(vm.stats().snapshot().throttled, 0, "below the load threshold");
    let cp = SoftPmap::new();
    let c = SoftMachine::with(p.map.fork(cp.clone()).unwrap(), cp);
    for i in 0..100 {
        fill(&c, B + i * PS, 2);
    }
    let s = vm.stats().snapshot();
    assert!(s.cow_copy >= 90, "{s:?}");
    assert!(s.throttled > 0, "COW copies past the load threshold were never throttled: {s:?}");
}

#[test]
fn concurrent_unwires_never_strip_another_wiring() {
    let vm = vm(1024);
    let a = Arc::new(machine(&vm));
    let b = machine(&vm);
    let o = vm.anonymous(1);
    for m in [&*a, &b] {
        m.map.map_object(B, PS, o.clone(), 0, Prot::RW, Prot::ALL, Inherit::Share, false).unwrap();
    }
    b.map.wire(B, PS).unwrap();
    for round in 0..20 {
        a.map.wire(B, PS).unwrap();
        assert_eq!(o.with_page(0, |p| p.wire_count()), Some(2));
        // Hold the page's object while both unwires start, so both pass
        // their checks before either changes a count.
        let hold = Arc::new(Barrier::new(2));
        let (o2, h2) = (o.arc().clone(), hold.clone());
        let holder = std::thread::spawn(move || {
            o2.with_page(0, |_| {
                h2.wait();
                std::thread::sleep(std::time::Duration::from_millis(20));
            })
        });
        hold.wait();
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || a.map.unwire(B, PS).is_ok())
            })
            .collect();
        let ok = ts.into_iter().map(|t| t.join().unwrap()).filter(|&x| x).count();
        holder.join().unwrap();
        assert_eq!(ok, 1, "round {round}: both unwires of a single wiring succeeded");
        assert_eq!(o.with_page(0, |p| p.wire_count()), Some(1), "round {round}: the other map's wiring was stripped");
    }
}

/// A pmap that, like the VMM's, writes zeros into a hole it maps read-only.
struct PopulatingPmap {
    inner: Arc<SoftPmap>,
    vm: Arc<Vm>,
}

impl Pmap for PopulatingPmap {
    fn enter(&self, addr: u64, frame: Frame, prot: Prot, wired: bool) {
        if !prot.writable() {
            self.vm.pool().zero(frame).unwrap();
        }
        self.inner.enter(addr, frame, prot, wired)
    }
    fn remove(&self, s: u64, e: u64) {
        self.inner.remove(s, e)
    }
    fn protect(&self, s: u64, e: u64, p: Prot) {
        self.inner.protect(s, e, p)
    }
    fn extract(&self, a: u64) -> Option<Frame> {
        self.inner.extract(a)
    }
}

fn frame_has_data(vm: &Vm, f: Frame) -> bool {
    // SAFETY: lseek on the pool's memfd.
    let r = unsafe { libc::lseek(vm.pool().fd().as_raw_fd(), (f * PS) as libc::off_t, libc::SEEK_DATA) };
    r == (f * PS) as libc::off_t
}

#[test]
fn a_read_only_zero_fill_frame_is_punched_when_freed() {
    let vm = vm(1024);
    let pm = Arc::new(PopulatingPmap { inner: SoftPmap::new(), vm: vm.clone() });
    let map = Map::new(&vm, pm.clone());
    map.map_anon(B, 4 * PS, Prot::READ).unwrap();
    let r = fault(&map, B, Prot::READ, FaultFlags::NO_PREFAULT).unwrap();
    assert_eq!(r.kind, FaultKind::ZeroFill);
    assert!(!r.prot.writable());
    assert!(frame_has_data(&vm, r.frame), "the pmap populated the host page");
    map.unmap(B, 4 * PS).unwrap();
    assert!(!frame_has_data(&vm, r.frame), "the freed frame keeps its host page (no hole punched)");
}

#[test]
fn fault_range_with_a_hostile_size_does_not_allocate_it() {
    let vm = vm(1024);
    let m = machine(&vm);
    m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    let r = fault_range(&m.map, B, u64::MAX, Prot::READ).unwrap();
    assert_eq!(r.len(), 4, "resolves the mapped run, stops at its end");
    let r = fault_range(&m.map, !(PS - 1), u64::MAX, Prot::READ);
    assert!(r.is_err());
}

/// A pmap that, on its first `extract` while armed, replaces a vpte (as a
/// guest on another vCPU would) between the walk and the A/M update.
struct EditingPmap {
    inner: Arc<SoftPmap>,
    vm: Arc<Vm>,
    edit: parking_lot::Mutex<Option<(Frame, usize, u64)>>,
}

impl Pmap for EditingPmap {
    fn enter(&self, addr: u64, frame: Frame, prot: Prot, wired: bool) {
        self.inner.enter(addr, frame, prot, wired)
    }
    fn remove(&self, s: u64, e: u64) {
        self.inner.remove(s, e)
    }
    fn protect(&self, s: u64, e: u64, p: Prot) {
        self.inner.protect(s, e, p)
    }
    fn extract(&self, a: u64) -> Option<Frame> {
        if let Some((f, idx, v)) = self.edit.lock().take() {
            self.vm.pool().atomic_u64(f, idx * 8).unwrap().store(v, Ordering::Release);
        }
        self.inner.extract(a)
    }
}

#[test]
fn accessed_modified_go_only_into_the_vpte_the_walk_read() {
    const R: u64 = 0x1000_0000;
    const V: u64 = 0x8000_0000;
    let vm = vm(4096);
    let pm = Arc::new(EditingPmap { inner: SoftPmap::new(), vm: vm.clone(), edit: Default::default() });
    let map = Map::new(&vm, pm.clone());
    let base = vm.anonymous(512);
    write_guest_obj(&vm, &base);
    // RAM is a shadow over `base`: data page 300 is a backing page, so a
    // write through the window copies it (and looks up this map's mappings).
    let ram = base.clone().shadow(512, 0);
    map.map_object(R, 512 * PS, ram, 0, Prot::ALL, Prot::ALL, Inherit::Copy, false).unwrap();
    map.map_vpagetable(V, 16 * PS, R, 512, 1).unwrap();
    write_guest(&map, R + PS + 5 * 8, &vpte_make(300, VPTE_V | VPTE_RW).to_le_bytes()).unwrap();
    let mut b = [0u8; 8];
    read_guest(&map, R + 300 * PS, &mut b).unwrap(); // read-shared: in this map's rmap
    map.setmap(V, vpte_make(1, VPTE_V | VPTE_RW)).unwrap();
    let (_, _, table) = map.resident_page(R + PS).unwrap();
    let replaced = vpte_make(301, VPTE_V | VPTE_RW);
    *pm.edit.lock() = Some((table, 5, replaced));
    fault(&map, V + 5 * PS, Prot::WRITE, FaultFlags::NONE).unwrap();
    let now = vm.pool().atomic_u64(table, 5 * 8).unwrap().load(Ordering::Acquire);
    assert!(pm.edit.lock().is_none(), "the edit hook did not run");
    assert_eq!(now, replaced, "A/M were set on a vpte the guest had replaced: {now:#x}");
}

fn write_guest_obj(vm: &Arc<Vm>, o: &ObjHandle) {
    let m = machine(vm);
    m.map.map_object(B, 512 * PS, o.clone(), 0, Prot::RW, Prot::ALL, Inherit::Share, false).unwrap();
    m.write_u64(B + 300 * PS, 300).unwrap();
    m.write_u64(B + 301 * PS, 301).unwrap();
}
