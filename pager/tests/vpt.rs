//! VPAGETABLE walk tests.
mod common;
use ::pager::vpte::*;
use ::pager::*;
use common::*;
use std::sync::Arc;

const R: u64 = 0x1000_0000;
const V: u64 = 0x8000_0000;
const OBJ_PAGES: u64 = 1024;

struct T {
    vm: Arc<Vm>,
    m: SoftMachine,
}

fn setup(levels: u32) -> T {
    let vm = vm(4096);
    let m = machine(&vm);
    let o = vm.anonymous(OBJ_PAGES);
    m.map.map_object(R, OBJ_PAGES * PS, o, 0, Prot::ALL, Prot::ALL, Inherit::Share, false).unwrap();
    m.map.map_vpagetable(V, 64 * PS, R, OBJ_PAGES, levels).unwrap();
    for p in [105u64, 205, 300, 301, 305, 405] {
        m.write_u64(R + p * PS, marker(p)).unwrap();
    }
    T { vm, m }
}

fn marker(p: u64) -> u64 {
    0xAB00_0000 + p
}

fn ent(t: &T, table: u64, idx: u64) -> u64 {
    t.m.read_u64(R + table * PS + idx * 8).unwrap()
}

fn set_ent(t: &T, table: u64, idx: u64, v: u64) {
    t.m.write_u64(R + table * PS + idx * 8, v).unwrap();
}

/// Tables at pages 1..=levels leading VA page `va` to `leaf`; `dir_flags`
/// for the directory entries.
fn build(t: &T, levels: u32, va: u64, leaf: Vpte, dir_flags: Vpte) {
    for k in 1..=levels as u64 {
        let shift = 9 * (levels as u64 - k);
        let idx = (va >> shift) & 511;
        let v = if k == levels as u64 { leaf } else { vpte_make(k + 1, dir_flags) };
        set_ent(t, k, idx, v);
    }
    t.m.map.setmap(V, vpte_make(1, dir_flags)).unwrap();
}

#[test]
fn vpt_unset_master_fails_until_setmap() {
    let t = setup(2);
    assert_eq!(fault(&t.m.map, V, Prot::READ, FaultFlags::NONE).unwrap_err(), FaultError::InvalidVpte);
}

#[test]
fn vpt_linear_via_ps_at_master() {
    let t = setup(4);
    t.m.map.setmap(V, vpte_make(100, VPTE_V | VPTE_RW | VPTE_PS)).unwrap();
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(105));
    t.m.write_u64(V + 5 * PS + 8, 0x1234).unwrap();
    assert_eq!(t.m.read_u64(R + 105 * PS + 8).unwrap(), 0x1234, "same host page as the RAM view");
    assert_eq!(t.m.pmap.extract(V + 5 * PS), t.m.pmap.extract(R + 105 * PS));
}

#[test]
fn vpt_linear_via_ps_at_levels_1_to_3() {
    for (lvl, frame) in [(1u64, 200u64), (2, 300), (3, 400)] {
        let t = setup(4);
        for p in [205u64, 305, 405] {
            t.m.write_u64(R + p * PS, marker(p)).unwrap();
        }
        // Directory entries down to level `lvl`, PS there.
        for k in 1..lvl {
            set_ent(&t, k, 0, vpte_make(k + 1, VPTE_V | VPTE_RW));
        }
        set_ent(&t, lvl, 0, vpte_make(frame, VPTE_V | VPTE_RW | VPTE_PS));
        t.m.map.setmap(V, vpte_make(1, VPTE_V | VPTE_RW)).unwrap();
        assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(frame + 5), "PS at level {lvl}");
    }
}

#[test]
fn vpt_walks_2_3_4_levels() {
    for levels in [2u32, 3, 4] {
        let t = setup(levels);
        build(&t, levels, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
        assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300), "{levels} levels");
        // A different VA page index uses a different leaf slot.
        set_ent(&t, levels as u64, 6, vpte_make(301, VPTE_V | VPTE_RW));
        assert_eq!(t.m.read_u64(V + 6 * PS).unwrap(), marker(301));
    }
    // One level: the master points at the only table.
    let t = setup(1);
    set_ent(&t, 1, 5, vpte_make(305, VPTE_V));
    t.m.map.setmap(V, vpte_make(1, VPTE_V | VPTE_RW)).unwrap();
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(305));
}

#[test]
fn vpt_off_path_edit_changes_nothing_and_inval_is_needed() {
    let t = setup(2);
    build(&t, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    // Off the path: another slot in the same tables.
    set_ent(&t, 2, 7, vpte_make(301, VPTE_V));
    set_ent(&t, 1, 3, vpte_make(9, VPTE_V));
    t.m.map.inval(V, 64 * PS).unwrap();
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    // On the path: stale until inval, new after.
    set_ent(&t, 2, 5, vpte_make(301, VPTE_V | VPTE_RW));
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    t.m.map.inval(V + 5 * PS, PS).unwrap();
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(301));
    // setmap drops every translation of the entry.
    t.m.map.setmap(V, vpte_make(100, VPTE_V | VPTE_RW | VPTE_PS)).unwrap();
    assert!(t.m.pmap.extract(V + 5 * PS).is_none());
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(105));
}

#[test]
fn vpt_rw_and_nx_anded_across_levels() {
    let t = setup(2);
    // Directory without RW above a RW|M leaf.
    build(&t, 2, 5, vpte_make(300, VPTE_V | VPTE_RW | VPTE_M), VPTE_V);
    assert_eq!(t.m.write_u64(V + 5 * PS, 1).unwrap_err(), FaultError::InvalidVpte);
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    assert!(!t.m.pmap.pte(V + 5 * PS).unwrap().prot.writable(), "leaf-only upgrade is not taken");
    // NX on the directory: exec fails, read maps without EXEC.
    let t = setup(2);
    build(&t, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW | VPTE_NX);
    assert_eq!(t.m.exec(V + 5 * PS).unwrap_err(), FaultError::InvalidVpte);
    t.m.read_u64(V + 5 * PS).unwrap();
    assert!(!t.m.pmap.pte(V + 5 * PS).unwrap().prot.contains(Prot::EXEC));
    let t = setup(2);
    build(&t, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    t.m.exec(V + 5 * PS).unwrap();
}

#[test]
fn vpt_accessed_modified_rules() {
    let t = setup(2);
    let master = vpte_make(1, VPTE_V | VPTE_RW);
    build(&t, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    // Read: A on every in-memory entry, no M; RW leaf without M maps read-only.
    t.m.read_u64(V + 5 * PS).unwrap();
    assert_eq!(ent(&t, 1, 0) & (VPTE_A | VPTE_M), VPTE_A);
    assert_eq!(ent(&t, 2, 5) & (VPTE_A | VPTE_M), VPTE_A);
    assert!(!t.m.pmap.pte(V + 5 * PS).unwrap().prot.writable());
    // Write: faults again, sets M|A everywhere, maps writable.
    t.m.write_u64(V + 5 * PS, 7).unwrap();
    assert_eq!(ent(&t, 1, 0) & (VPTE_A | VPTE_M), VPTE_A | VPTE_M);
    assert_eq!(ent(&t, 2, 5) & (VPTE_A | VPTE_M), VPTE_A | VPTE_M);
    assert!(t.m.pmap.pte(V + 5 * PS).unwrap().prot.writable());
    // The master is never written.
    let e = t.m.map.entries().into_iter().find(|e| e.start == V).unwrap();
    assert_eq!(e.maptype, MapType::VPageTable { master, levels: 2, target: R, target_pages: OBJ_PAGES });
    // RW|M already set: a read fault maps writable.
    set_ent(&t, 2, 6, vpte_make(301, VPTE_V | VPTE_RW | VPTE_M));
    t.m.read_u64(V + 6 * PS).unwrap();
    assert!(t.m.pmap.pte(V + 6 * PS).unwrap().prot.writable());
    // Clearing M needs an inval for the host to set it again.
    set_ent(&t, 2, 5, ent(&t, 2, 5) & !VPTE_M);
    t.m.write_u64(V + 5 * PS, 8).unwrap();
    assert_eq!(ent(&t, 2, 5) & VPTE_M, 0, "no fault, no M: the documented contract");
    t.m.map.inval(V + 5 * PS, PS).unwrap();
    t.m.write_u64(V + 5 * PS, 9).unwrap();
    assert_eq!(ent(&t, 2, 5) & VPTE_M, VPTE_M);
    // A failed write (leaf without RW) sets nothing.
    set_ent(&t, 2, 8, vpte_make(301, VPTE_V));
    assert!(t.m.write_u64(V + 8 * PS, 1).is_err());
    assert_eq!(ent(&t, 2, 8) & (VPTE_A | VPTE_M), 0);
}

#[test]
fn vpt_invalid_at_any_level_fails() {
    let t = setup(3);
    build(&t, 3, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    // Master.
    t.m.map.setmap(V, vpte_make(1, VPTE_RW)).unwrap();
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap_err(), FaultError::InvalidVpte);
    // Each table level.
    for lvl in 1..=3u64 {
        build(&t, 3, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
        let idx = if lvl == 3 { 5 } else { 0 };
        let old = ent(&t, lvl, idx);
        set_ent(&t, lvl, idx, old & !VPTE_V & !VPTE_A);
        t.m.map.inval(V, 64 * PS).unwrap();
        assert_eq!(t.m.read_u64(V + 5 * PS).unwrap_err(), FaultError::InvalidVpte, "level {lvl}");
        assert_eq!(ent(&t, lvl, idx) & VPTE_A, 0, "no A written into an invalid entry");
    }
}

#[test]
fn vpt_frame_beyond_object_is_protection() {
    let t = setup(2);
    build(&t, 2, 5, vpte_make(OBJ_PAGES + 10, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap_err(), FaultError::Protection);
    // A table page beyond the object too.
    t.m.map.setmap(V, vpte_make(OBJ_PAGES + 1, VPTE_V | VPTE_RW)).unwrap();
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap_err(), FaultError::Protection);
}

/// The RW|M rule holds for a page that was paged out and comes back clean:
/// the read enters it writable (and dirty), so a write does not fault again
/// and re-set A (seen by the soak: vpt-am under a small --phys-mem).
#[test]
fn vpt_rw_m_leaf_maps_a_paged_in_page_writable_on_a_read() {
    let t = setup(2);
    build(&t, 2, 6, vpte_make(301, VPTE_V | VPTE_RW | VPTE_M), VPTE_V | VPTE_RW);
    evict_all(&t.vm);
    t.m.map.inval(V, 64 * PS).unwrap();
    assert_eq!(t.m.read_u64(V + 6 * PS).unwrap(), marker(301));
    assert!(t.vm.stats().snapshot().pager_in > 0, "the data page came back from swap");
    assert!(t.m.pmap.pte(V + 6 * PS).unwrap().prot.writable(), "RW|M: writable on a read");
    // The guest clears A; the write must not fault (no A again).
    set_ent(&t, 2, 6, ent(&t, 2, 6) & !VPTE_A);
    t.m.write_u64(V + 6 * PS, 5).unwrap();
    assert_eq!(ent(&t, 2, 6) & VPTE_A, 0, "the write faulted again");
    // The write went to the page (dirty: its swap copy is stale).
    evict_all(&t.vm);
    t.m.map.inval(V, 64 * PS).unwrap();
    assert_eq!(t.m.read_u64(R + 301 * PS).unwrap(), 5);
}

#[test]
fn vpt_tables_paged_in_through_object_path() {
    let t = setup(3);
    build(&t, 3, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    evict_all(&t.vm);
    t.m.map.inval(V, 64 * PS).unwrap();
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    assert!(t.vm.stats().snapshot().pager_in > 0);
    assert_eq!(ent(&t, 3, 5) & VPTE_A, VPTE_A);
}

#[test]
fn vpt_no_stale_translation_after_inval() {
    let t = Arc::new(setup(2));
    build(&t, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (t2, s2) = (t.clone(), stop.clone());
    let reader = std::thread::spawn(move || {
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = t2.m.read_u64(V + 5 * PS);
        }
    });
    for i in 0..200u64 {
        let f = if i.is_multiple_of(2) { 301 } else { 300 };
        // Guest protocol: swap the entry, then inval.
        set_ent(&t, 2, 5, vpte_make(f, VPTE_V | VPTE_RW));
        t.m.map.inval(V + 5 * PS, PS).unwrap();
        if let Some(fr) = t.m.pmap.extract(V + 5 * PS) {
            assert_eq!(Some(fr), t.m.pmap.extract(R + f * PS), "stale translation survived inval");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
}

#[test]
fn vpt_walk_under_pageout_and_inval() {
    let vm = Vm::new(Config { free_target: 8, ..cfg(48) }).unwrap();
    let m = Arc::new(machine(&vm));
    let o = vm.anonymous(OBJ_PAGES);
    m.map.map_object(R, OBJ_PAGES * PS, o, 0, Prot::ALL, Prot::ALL, Inherit::Share, false).unwrap();
    m.map.map_vpagetable(V, 64 * PS, R, OBJ_PAGES, 3).unwrap();
    let t = T { vm: vm.clone(), m: SoftMachine::with(m.map.clone(), m.pmap.clone()) };
    for p in [300u64, 301] {
        t.m.write_u64(R + p * PS, marker(p)).unwrap();
    }
    build(&t, 3, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    let daemon = PageoutDaemon::start(&vm).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bad = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    {
        let (m, s, b) = (m.clone(), stop.clone(), bad.clone());
        threads.push(std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match m.read_u64(V + 5 * PS) {
                    Ok(v) if v == marker(300) || v == marker(301) => {}
                    _ => b.store(true, std::sync::atomic::Ordering::SeqCst),
                }
            }
        }));
    }
    {
        // Memory pressure through the RAM view.
        let (m, s) = (m.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = m.write_u64(R + (400 + i % 200) * PS, i);
                i += 1;
            }
        }));
    }
    // Pressure up front too, so pageout has surely run.
    for p in 600..700u64 {
        t.m.write_u64(R + p * PS, p).unwrap();
    }
    let t0 = std::time::Instant::now();
    let mut i = 0u64;
    while i < 300 || (vm.stats().snapshot().pages_out < 150 && t0.elapsed().as_secs() < 5) {
        i += 1;
        let f = if i.is_multiple_of(2) { 301 } else { 300 };
        set_ent(&t, 3, 5, vpte_make(f, VPTE_V | VPTE_RW));
        t.m.map.inval(V + 5 * PS, PS).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    drop(daemon);
    assert!(!bad.load(std::sync::atomic::Ordering::SeqCst), "a walk read wrong data");
    assert!(vm.stats().snapshot().pages_out > 0);
    assert!(vm.pool().resident() <= 48);
}

/// A pmap that, when a window page is entered, reads the leaf vpte of it:
/// the guest may run the moment its page is in, so A/M must be there by then.
struct LeafAtEnter {
    vm: Arc<Vm>,
    leaf: parking_lot::Mutex<Option<(Frame, usize)>>,
    seen: parking_lot::Mutex<Vec<u64>>,
}

impl Pmap for LeafAtEnter {
    fn enter(&self, addr: u64, _frame: Frame, _prot: Prot, _wired: bool) {
        if addr < V {
            return;
        }
        if let Some((f, idx)) = *self.leaf.lock() {
            let v = self.vm.pool().atomic_u64(f, idx * 8).unwrap().load(std::sync::atomic::Ordering::Acquire);
            self.seen.lock().push(v);
        }
    }
    fn remove(&self, _: u64, _: u64) {}
    fn protect(&self, _: u64, _: u64, _: Prot) {}
    fn extract(&self, _: u64) -> Option<Frame> {
        None
    }
}

#[test]
fn vpt_accessed_and_modified_are_set_before_the_page_is_entered() {
    let vm = vm(4096);
    let pmap = Arc::new(LeafAtEnter { vm: vm.clone(), leaf: Default::default(), seen: Default::default() });
    let map = Map::new(&vm, pmap.clone());
    let o = vm.anonymous(OBJ_PAGES);
    map.map_object(R, OBJ_PAGES * PS, o, 0, Prot::ALL, Prot::ALL, Inherit::Share, false).unwrap();
    map.map_vpagetable(V, 64 * PS, R, OBJ_PAGES, 1).unwrap();
    // One level: the master points at table page 1, whose entry 3 maps page 300.
    write_guest(&map, R + PS + 3 * 8, &vpte_make(300, VPTE_V | VPTE_RW).to_le_bytes()).unwrap();
    write_guest(&map, R + 300 * PS, &marker(300).to_le_bytes()).unwrap();
    let (_, _, table) = map.resident_page(R + PS).unwrap();
    *pmap.leaf.lock() = Some((table, 3));
    map.setmap(V, vpte_make(1, VPTE_V | VPTE_RW)).unwrap();
    fault(&map, V + 3 * PS, Prot::READ, FaultFlags::NONE).unwrap();
    fault(&map, V + 3 * PS, Prot::WRITE, FaultFlags::NONE).unwrap();
    let seen = pmap.seen.lock().clone();
    assert_eq!(seen.len(), 2, "{seen:x?}");
    assert_eq!(seen[0] & (VPTE_A | VPTE_M), VPTE_A, "read: A before the enter, no M: {seen:x?}");
    assert_eq!(seen[1] & (VPTE_A | VPTE_M), VPTE_A | VPTE_M, "write: M|A before the enter: {seen:x?}");
}

// ---- Windows after a fork: each VM's window translates within its own RAM.

/// Maps the window at `V` over the RAM mapped at `R` (`OBJ_PAGES` pages).
fn map_window(map: &Map, levels: u32) {
    map.map_vpagetable(V, 64 * PS, R, OBJ_PAGES, levels).unwrap();
}

/// A VM as the VMM makes it: RAM copy-on-write on a fork, a window over it.
fn setup_cow(levels: u32) -> T {
    let vm = vm(4096);
    let m = machine(&vm);
    let o = vm.anonymous(OBJ_PAGES);
    m.map.map_object(R, OBJ_PAGES * PS, o, 0, Prot::ALL, Prot::ALL, Inherit::Copy, false).unwrap();
    map_window(&m.map, levels);
    for p in [105u64, 205, 300, 301, 305, 405] {
        m.write_u64(R + p * PS, marker(p)).unwrap();
    }
    T { vm, m }
}

fn fork_of(t: &T) -> T {
    let cp = SoftPmap::new();
    T { vm: t.vm.clone(), m: SoftMachine::with(t.m.map.fork(cp.clone()).unwrap(), cp) }
}

#[test]
fn vpt_clone_write_through_window_stays_in_the_clone() {
    let p = setup_cow(2);
    build(&p, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    let c = fork_of(&p);
    c.m.write_u64(V + 5 * PS, 0xC1).unwrap();
    assert_eq!(c.m.read_u64(R + 300 * PS).unwrap(), 0xC1, "the clone's RAM shows its window write");
    assert_eq!(p.m.read_u64(R + 300 * PS).unwrap(), marker(300), "the parent's RAM does not");
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), marker(300), "nor does the parent's window");
    // And the other way round.
    p.m.write_u64(V + 5 * PS, 0xD0).unwrap();
    assert_eq!(p.m.read_u64(R + 300 * PS).unwrap(), 0xD0);
    assert_eq!(c.m.read_u64(R + 300 * PS).unwrap(), 0xC1);
    assert_eq!(c.m.read_u64(V + 5 * PS).unwrap(), 0xC1);
}

#[test]
fn vpt_parent_window_sees_its_ram_writes_after_a_fork() {
    let p = setup_cow(3);
    build(&p, 3, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    let c = fork_of(&p);
    p.m.write_u64(R + 300 * PS, 0xAA).unwrap();
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), 0xAA, "stale window translation in the parent");
    assert_eq!(c.m.read_u64(V + 5 * PS).unwrap(), marker(300), "the clone keeps the snapshot");
    c.m.write_u64(R + 300 * PS, 0xBB).unwrap();
    assert_eq!(c.m.read_u64(V + 5 * PS).unwrap(), 0xBB);
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), 0xAA);
}

#[test]
fn vpt_table_edits_after_a_fork_are_walked() {
    let p = setup_cow(2);
    build(&p, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    let c = fork_of(&p);
    // The clone repoints the leaf in its own RAM; the parent keeps its own.
    set_ent(&c, 2, 5, vpte_make(301, VPTE_V | VPTE_RW));
    c.m.map.inval(V, 64 * PS).unwrap();
    assert_eq!(c.m.read_u64(V + 5 * PS).unwrap(), marker(301), "the clone's walk read old tables");
    p.m.map.inval(V, 64 * PS).unwrap();
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    set_ent(&p, 2, 5, vpte_make(305, VPTE_V | VPTE_RW));
    p.m.map.inval(V + 5 * PS, PS).unwrap();
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), marker(305), "the parent's walk read old tables");
    c.m.map.inval(V, 64 * PS).unwrap();
    assert_eq!(c.m.read_u64(V + 5 * PS).unwrap(), marker(301));
}

#[test]
fn vpt_accessed_modified_bits_stay_in_their_vm() {
    let p = setup_cow(2);
    build(&p, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    let c = fork_of(&p);
    c.m.read_u64(V + 5 * PS).unwrap();
    c.m.write_u64(V + 5 * PS, 1).unwrap();
    assert_eq!(ent(&c, 1, 0) & (VPTE_A | VPTE_M), VPTE_A | VPTE_M);
    assert_eq!(ent(&c, 2, 5) & (VPTE_A | VPTE_M), VPTE_A | VPTE_M);
    assert_eq!(ent(&p, 1, 0) & (VPTE_A | VPTE_M), 0, "the clone's A/M leaked into the parent's tables");
    assert_eq!(ent(&p, 2, 5) & (VPTE_A | VPTE_M), 0, "the clone's A/M leaked into the parent's tables");
    // A second clone of the parent sees clean tables too.
    let c2 = fork_of(&p);
    assert_eq!(ent(&c2, 2, 5) & (VPTE_A | VPTE_M), 0);
    p.m.read_u64(V + 5 * PS).unwrap();
    assert_eq!(ent(&p, 2, 5) & (VPTE_A | VPTE_M), VPTE_A);
    assert_eq!(ent(&c2, 2, 5) & (VPTE_A | VPTE_M), 0, "the parent's A leaked into its clone's tables");
    assert_eq!(ent(&c, 2, 5) & (VPTE_A | VPTE_M), VPTE_A | VPTE_M);
}

#[test]
fn vpt_cow_leaves_no_stale_translation_of_the_old_frame() {
    let p = setup_cow(2);
    build(&p, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    set_ent(&p, 2, 6, vpte_make(300, VPTE_V | VPTE_RW));
    let _c = fork_of(&p);
    // Read-shared through both window pages and RAM: one frame, the snapshot's.
    assert_eq!(p.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    assert_eq!(p.m.read_u64(V + 6 * PS).unwrap(), marker(300));
    assert_eq!(p.m.read_u64(R + 300 * PS).unwrap(), marker(300));
    let old = p.m.pmap.extract(R + 300 * PS).unwrap();
    // A COW through RAM: no window page may keep showing the old frame.
    p.m.write_u64(R + 300 * PS, 0x77).unwrap();
    for a in [V + 5 * PS, V + 6 * PS] {
        assert_ne!(p.m.pmap.extract(a), Some(old), "stale window translation at {a:#x}");
        assert_eq!(p.m.read_u64(a).unwrap(), 0x77);
    }
    // A COW through a window page: neither RAM nor the alias keeps the old one.
    let p = setup_cow(2);
    build(&p, 2, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    set_ent(&p, 2, 6, vpte_make(300, VPTE_V | VPTE_RW));
    let _c = fork_of(&p);
    assert_eq!(p.m.read_u64(V + 6 * PS).unwrap(), marker(300));
    assert_eq!(p.m.read_u64(R + 300 * PS).unwrap(), marker(300));
    let old = p.m.pmap.extract(R + 300 * PS).unwrap();
    p.m.write_u64(V + 5 * PS, 0x88).unwrap();
    for a in [R + 300 * PS, V + 6 * PS] {
        assert_ne!(p.m.pmap.extract(a), Some(old), "stale translation at {a:#x}");
        assert_eq!(p.m.read_u64(a).unwrap(), 0x88);
    }
}

#[test]
fn vpt_frames_outside_normal_entries_are_protection() {
    let vm = vm(4096);
    let m = machine(&vm);
    let o = vm.anonymous(OBJ_PAGES);
    m.map.map_object(R, OBJ_PAGES * PS, o, 0, Prot::ALL, Prot::ALL, Inherit::Copy, false).unwrap();
    // The bound allows more than RAM: frames past RAM name unmapped
    // addresses; a second window at the end of RAM is not RAM either.
    m.map.map_vpagetable(V, 64 * PS, R, OBJ_PAGES + 64, 1).unwrap();
    m.map.map_vpagetable(R + OBJ_PAGES * PS, 16 * PS, R, OBJ_PAGES, 1).unwrap();
    let t = T { vm, m };
    set_ent(&t, 1, 1, vpte_make(OBJ_PAGES - 1, VPTE_V | VPTE_RW));
    set_ent(&t, 1, 2, vpte_make(OBJ_PAGES, VPTE_V | VPTE_RW));
    set_ent(&t, 1, 3, vpte_make(OBJ_PAGES + 20, VPTE_V | VPTE_RW));
    set_ent(&t, 1, 4, vpte_make(VPTE_FRAME >> 12, VPTE_V | VPTE_RW | VPTE_PS));
    t.m.map.setmap(V, vpte_make(1, VPTE_V | VPTE_RW)).unwrap();
    assert_eq!(t.m.read_u64(V + PS).unwrap(), 0);
    assert_eq!(t.m.read_u64(V + 2 * PS).unwrap_err(), FaultError::Protection, "a window is no Normal entry");
    assert_eq!(t.m.read_u64(V + 3 * PS).unwrap_err(), FaultError::Protection, "nothing mapped there");
    assert_eq!(t.m.read_u64(V + 4 * PS).unwrap_err(), FaultError::Protection, "beyond the bound");
    // A large page whose frame plus index overflows: no wrap-around.
    t.m.map.setmap(V, vpte_make(VPTE_FRAME >> 12, VPTE_V | VPTE_RW | VPTE_PS)).unwrap();
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap_err(), FaultError::Protection);
    // Table pages are bounded the same way.
    t.m.map.setmap(V, vpte_make(OBJ_PAGES + 1, VPTE_V | VPTE_RW)).unwrap();
    assert_eq!(t.m.read_u64(V + PS).unwrap_err(), FaultError::Protection);
    // A bad target range is refused.
    assert_eq!(t.m.map.map_vpagetable(V + 128 * PS, PS, 1, 1, 1).unwrap_err(), MapError::BadRange);
    assert_eq!(t.m.map.map_vpagetable(V + 128 * PS, PS, R, u64::MAX / 2, 1).unwrap_err(), MapError::BadRange);
}

#[test]
fn vpt_swap_error_on_a_table_page_is_a_failure_not_an_invalid_vpte() {
    // A swap read error while the walk brings a table page in is the
    // pager's failure (the VMM stops the VM), never the guest's invalid
    // vpte (which the VMM reports to the guest as a page fault).
    let hook = FailHook::new();
    let vm = Vm::new(Config { swap_hook: Some(hook.clone()), ..cfg(48) }).unwrap();
    let m = machine(&vm);
    let o = vm.anonymous(OBJ_PAGES);
    m.map.map_object(R, OBJ_PAGES * PS, o, 0, Prot::ALL, Prot::ALL, Inherit::Copy, false).unwrap();
    map_window(&m.map, 3);
    let t = T { vm: vm.clone(), m };
    t.m.write_u64(R + 300 * PS, marker(300)).unwrap();
    build(&t, 3, 5, vpte_make(300, VPTE_V | VPTE_RW), VPTE_V | VPTE_RW);
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300));
    evict_all(&vm);
    t.m.map.inval(V, 64 * PS).unwrap();
    hook.set_read(FailMode::Eio);
    assert_eq!(fault(&t.m.map, V + 5 * PS, Prot::READ, FaultFlags::NONE).unwrap_err(), FaultError::Failure);
    hook.set_read(FailMode::None);
    assert_eq!(t.m.read_u64(V + 5 * PS).unwrap(), marker(300), "nothing lost");
    assert_eq!(t.m.read_u64(V + 6 * PS).unwrap_err(), FaultError::InvalidVpte);
}

#[test]
fn map_tells_window_addresses_from_others() {
    let t = setup(2);
    assert!(t.m.map.in_window(V));
    assert!(t.m.map.in_window(V + 64 * PS - 1));
    assert!(!t.m.map.in_window(V + 64 * PS), "past the window");
    assert!(!t.m.map.in_window(R), "RAM is a Normal entry");
    assert!(!t.m.map.in_window(0), "unmapped");
}
