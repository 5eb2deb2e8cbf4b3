//! Injected pager failures and concurrency.
mod common;
use ::pager::*;
use common::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn hooked(max: u64, swap_bytes: u64) -> (Arc<Vm>, Arc<FailHook>) {
    let hook = FailHook::new();
    let vm = Vm::new(Config { swap_hook: Some(hook.clone()), swap_bytes, ..cfg(max) }).unwrap();
    (vm, hook)
}

fn swapped_out(vm: &Arc<Vm>) -> (SoftMachine, ObjHandle) {
    let m = machine(vm);
    let o = m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    for i in 0..4 {
        fill(&m, B + i * PS, 0x10 + i as u8);
    }
    evict_all(vm);
    assert_eq!(o.resident(), 0);
    (m, o)
}

#[test]
fn injected_swap_eio_is_failure_and_object_consistent() {
    let (vm, hook) = hooked(64, 1 << 20);
    let (m, o) = swapped_out(&vm);
    hook.set_read(FailMode::Eio);
    assert_eq!(m.read_u8(B + PS).unwrap_err(), FaultError::Failure);
    assert_eq!(o.resident(), 0, "no half-read page left");
    assert_eq!(vm.swap().unwrap().object_slots(o.id()), 4, "swap copy kept");
    hook.set_read(FailMode::None);
    for i in 0..4 {
        assert!(all(&page_bytes(&m, B + i * PS), 0x10 + i as u8));
    }
}

#[test]
fn injected_short_read_never_zeros_or_other_bytes() {
    let (vm, hook) = hooked(64, 1 << 20);
    let (m, o) = swapped_out(&vm);
    hook.set_read(FailMode::ShortRead);
    let mut buf = vec![0u8; 4096];
    assert_eq!(read_guest(&m.map, B + 2 * PS, &mut buf).unwrap_err(), FaultError::Failure);
    assert_eq!(o.resident(), 0);
    hook.set_read(FailMode::None);
    read_guest(&m.map, B + 2 * PS, &mut buf).unwrap();
    assert!(all(&buf, 0x12));
    // File pager short read too.
    let fh = FailHook::new();
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&[0x61; 8192]).unwrap();
    let fo = vm.file_object(f, false, Some(fh.clone())).unwrap();
    let fm = machine(&vm);
    fm.map.map_file(B, 2 * PS, &fo, 0, FileMode::ReadOnly).unwrap();
    fh.set_read(FailMode::ShortRead);
    // The cluster is pages 0-1; half of it arrives: page 1 (asked for) fails,
    // page 0 (complete) may stay, with its right bytes.
    assert_eq!(fm.read_u8(B + PS).unwrap_err(), FaultError::Failure);
    assert!(fo.with_page(1, |_| ()).is_none());
    fh.set_read(FailMode::Eio);
    assert_eq!(fm.read_u8(B + PS).unwrap_err(), FaultError::Failure);
    fh.set_read(FailMode::None);
    assert!(all(&page_bytes(&fm, B + PS), 0x61));
    assert!(all(&page_bytes(&fm, B), 0x61));
}

#[test]
fn injected_enospc_keeps_dirty_pages_resident() {
    let (vm, hook) = hooked(64, 1 << 20);
    let m = machine(&vm);
    let o = m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    for i in 0..4 {
        fill(&m, B + i * PS, 0x20 + i as u8);
    }
    hook.set_write(FailMode::NoSpace);
    evict_all(&vm);
    assert!(vm.stats().snapshot().pageout_errors > 0);
    assert_eq!(o.resident(), 4, "pages whose write failed stay");
    for i in 0..4 {
        assert!(all(&page_bytes(&m, B + i * PS), 0x20 + i as u8));
    }
    hook.set_write(FailMode::Eio);
    evict_all(&vm);
    assert_eq!(o.resident(), 4);
    hook.set_write(FailMode::None);
    evict_all(&vm);
    assert_eq!(o.resident(), 0);
    for i in 0..4 {
        assert!(all(&page_bytes(&m, B + i * PS), 0x20 + i as u8));
    }
}

#[test]
fn real_swap_full_is_enospc_and_loses_nothing() {
    let (vm, _hook) = hooked(64, 2 * PS);
    let m = machine(&vm);
    m.map.map_anon(B, 8 * PS, Prot::RW).unwrap();
    for i in 0..8 {
        fill(&m, B + i * PS, 0x40 + i as u8);
    }
    evict_all(&vm);
    assert!(vm.stats().snapshot().pageout_errors > 0);
    assert_eq!(vm.swap().unwrap().used_slots(), 2);
    for i in 0..8 {
        assert!(all(&page_bytes(&m, B + i * PS), 0x40 + i as u8));
    }
}

#[test]
fn concurrent_faults_with_pageout_no_deadlock_no_lost_write() {
    const PAGES: u64 = 32;
    let iters_n = iters(12);
    let vm = Vm::new(Config { free_target: 8, ..cfg(72) }).unwrap();
    let daemon = PageoutDaemon::start(&vm).unwrap();
    let parent = Arc::new(machine(&vm));
    parent.map.map_anon(B, PAGES * PS, Prot::RW).unwrap();
    for p in 0..PAGES {
        parent.write_u64(B + p * PS + 512, p).unwrap();
    }
    assert_eq!(vm.stats().snapshot().zero_fill, PAGES);
    let children: Vec<Arc<SoftMachine>> = (0..2)
        .map(|_| {
            let cp = SoftPmap::new();
            Arc::new(SoftMachine::with(parent.map.fork(cp.clone()).unwrap(), cp))
        })
        .collect();
    let failed = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // Four threads share the parent's pages, each owning one word per page.
    for t in 0..4u64 {
        let (m, f) = (parent.clone(), failed.clone());
        threads.push(std::thread::spawn(move || {
            for it in 1..=iters_n {
                for p in 0..PAGES {
                    let p = (p + t * 7) % PAGES;
                    if m.write_u64(B + p * PS + t * 8, it << 16 | p).is_err() {
                        f.store(true, Ordering::SeqCst);
                    }
                    if m.read_u64(B + p * PS + 512).ok() != Some(p) {
                        f.store(true, Ordering::SeqCst);
                    }
                    if m.map.vm().pool().resident() > 72 {
                        f.store(true, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    // Each private clone writes its own pattern.
    for (c, m) in children.iter().enumerate() {
        let (m, f) = (m.clone(), failed.clone());
        threads.push(std::thread::spawn(move || {
            for it in 1..=iters_n {
                for p in 0..PAGES {
                    if m.write_u64(B + p * PS + 1024, (c as u64) << 32 | it << 16 | p).is_err() {
                        f.store(true, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(!failed.load(Ordering::SeqCst), "a fault failed or a read saw wrong data");
    for p in 0..PAGES {
        for t in 0..4u64 {
            assert_eq!(parent.read_u64(B + p * PS + t * 8).unwrap(), iters_n << 16 | p, "lost write");
        }
        assert_eq!(parent.read_u64(B + p * PS + 1024).unwrap(), 0, "a clone's write leaked into the parent");
        for (c, m) in children.iter().enumerate() {
            assert_eq!(m.read_u64(B + p * PS + 1024).unwrap(), (c as u64) << 32 | iters_n << 16 | p);
            assert_eq!(m.read_u64(B + p * PS).unwrap(), 0, "the parent's post-clone write leaked into a clone");
            assert_eq!(m.read_u64(B + p * PS + 512).unwrap(), p);
        }
    }
    let s = vm.stats().snapshot();
    assert_eq!(s.zero_fill, PAGES, "each page zero-filled once");
    assert_eq!(s.cow_copy + s.cow_rename, 3 * PAGES, "each page copied once per object");
    assert!(s.pages_out > 0, "pageout ran concurrently");
    assert!(vm.pool().resident() <= 72);
    drop(daemon);
}

#[test]
fn same_page_faulted_by_many_threads_is_resolved_once() {
    let vm = vm(1024);
    let (o, mp) = mem_object(&vm, 8, 8, (0, 0));
    *mp.on_get.lock() = Some(Arc::new(|| std::thread::sleep(std::time::Duration::from_millis(30))));
    let m = Arc::new(machine(&vm));
    m.map.map_object(B, 8 * PS, o.clone(), 0, Prot::RW, Prot::ALL, Inherit::Share, false).unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (m, b) = (m.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                fault(&m.map, B + 3 * PS, Prot::READ, FaultFlags::NONE).map(|r| r.frame)
            })
        })
        .collect();
    let frames: Vec<_> = threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
    assert_eq!(mp.calls.lock().len(), 1, "one pager read for the page");
    assert!(frames.iter().all(|&f| f == frames[0]), "everyone sees the first thread's page");
    assert!(vm.stats().snapshot().busy_waits >= 1);
    assert_eq!(o.with_page(3, |p| p.hold_count()), Some(0), "holds released");
}

#[test]
fn cow_rename_frees_backing_swap_slot() {
    let vm = Vm::new(Config { auto_collapse: false, ..cfg(64) }).unwrap();
    let swap = vm.swap().unwrap().clone();
    let a = machine(&vm);
    let o = a.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    fill(&a, B, 0x44);
    evict_all(&vm);
    assert_eq!(swap.object_slots(o.id()), 1);
    let oid = o.id();
    let s = o.shadow(4, 0);
    let b = machine(&vm);
    b.map.map_object(B, 4 * PS, s, 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
    a.map.unmap(B, 4 * PS).unwrap();
    let r = fault(&b.map, B, Prot::WRITE, FaultFlags::NONE).unwrap();
    assert_eq!(r.kind, FaultKind::CowRename);
    assert_eq!(vm.stats().snapshot().cow_rename, 1);
    assert_eq!(swap.object_slots(oid), 0, "the backing object's slot is freed by the rename");
    assert!(all(&page_bytes(&b, B), 0x44));
}

fn iters(default: u64) -> u64 {
    std::env::var("STRESS_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn clone_while_faulting_keeps_snapshots() {
    const PAGES: u64 = 24;
    let n = iters(10);
    let vm = Vm::new(Config { free_target: 8, ..cfg(64) }).unwrap();
    let daemon = PageoutDaemon::start(&vm).unwrap();
    let parent = Arc::new(machine(&vm));
    parent.map.map_anon(B, PAGES * PS, Prot::RW).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..3u64 {
        let (m, f) = (parent.clone(), failed.clone());
        writers.push(std::thread::spawn(move || {
            for it in 1..=n {
                for p in 0..PAGES {
                    if m.write_u64(B + p * PS + t * 8, it << 16 | p).is_err() {
                        f.store(true, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    // Clone repeatedly while the writers run: a clone's view must never
    // change afterwards, and every word must be one the parent wrote.
    let (m, f, d) = (parent.clone(), failed.clone(), done.clone());
    let cloner = std::thread::spawn(move || {
        let mut clones = 0;
        while !d.load(Ordering::SeqCst) || clones < 3 {
            let cp = SoftPmap::new();
            let child = SoftMachine::with(m.map.fork(cp.clone()).unwrap(), cp);
            let snap: Vec<u64> =
                (0..PAGES * 3).map(|i| child.read_u64(B + (i / 3) * PS + (i % 3) * 8).unwrap()).collect();
            for (i, &v) in snap.iter().enumerate() {
                let p = i as u64 / 3;
                if v != 0 && (v & 0xffff != p || v >> 16 > n) {
                    f.store(true, Ordering::SeqCst);
                }
            }
            std::thread::yield_now();
            for (i, &v) in snap.iter().enumerate() {
                if child.read_u64(B + (i as u64 / 3) * PS + (i as u64 % 3) * 8).unwrap() != v {
                    f.store(true, Ordering::SeqCst);
                }
            }
            clones += 1;
        }
        clones
    });
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    assert!(cloner.join().unwrap() >= 3);
    assert!(!failed.load(Ordering::SeqCst), "a clone's snapshot changed or a write failed");
    for p in 0..PAGES {
        for t in 0..3u64 {
            assert_eq!(parent.read_u64(B + p * PS + t * 8).unwrap(), n << 16 | p, "lost write");
        }
    }
    let top = parent.map.object_at(B).unwrap();
    assert!(top.arc().chain_len() <= 3, "collapse keeps the chain short: {}", top.arc().chain_len());
    drop(daemon);
}

#[test]
fn injected_file_writeback_failure_keeps_page_dirty() {
    let vm = vm(256);
    let hook = FailHook::new();
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&[1u8; 8192]).unwrap();
    let mut reader = f.try_clone().unwrap();
    let fo = vm.file_object(f, true, Some(hook.clone())).unwrap();
    let m = machine(&vm);
    m.map.map_file(B, 2 * PS, &fo, 0, FileMode::Shared).unwrap();
    fill(&m, B, 0x5C);
    hook.set_write(FailMode::NoSpace);
    assert_eq!(fo.sync(), Err(PagerError::NoSpace));
    assert_eq!(fo.with_page(0, |p| p.is_dirty()), Some(true));
    evict_all(&vm);
    assert_eq!(fo.with_page(0, |p| p.is_dirty()), Some(true), "pageout keeps it too");
    hook.set_write(FailMode::None);
    assert_eq!(fo.sync(), Ok(1));
    let mut buf = vec![0u8; 4096];
    use std::io::{Read, Seek};
    reader.seek(std::io::SeekFrom::Start(0)).unwrap();
    reader.read_exact(&mut buf).unwrap();
    assert!(all(&buf, 0x5C));
    assert!(all(&page_bytes(&m, B), 0x5C));
}

/// Each thread runs random operations on its own clone of a common parent
/// (so the objects underneath are shared through COW chains that change
/// under everyone: shadows, renames, collapses, pageout) and checks every
/// read against its own model.
#[test]
fn concurrent_random_ops_on_sibling_clones() {
    const PAGES: u64 = 16;
    let steps = iters(400);
    let vm = Vm::new(Config { free_target: 8, ..cfg(40) }).unwrap();
    let daemon = PageoutDaemon::start(&vm).unwrap();
    let parent = machine(&vm);
    parent.map.map_anon(B, PAGES * PS, Prot::RW).unwrap();
    for p in 0..PAGES {
        fill(&parent, B + p * PS, p as u8);
    }
    let mut threads = Vec::new();
    for t in 0..3u64 {
        let cp = SoftPmap::new();
        let mine = SoftMachine::with(parent.map.fork(cp.clone()).unwrap(), cp);
        let vm = vm.clone();
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            let mut model: Vec<u8> = (0..PAGES as u8).collect();
            let mut m = mine;
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            for step in 0..steps {
                let p = rnd() % PAGES;
                match rnd() % 10 {
                    0..=3 => {
                        let b = rnd() as u8;
                        m.write(B + p * PS, &[b; 4096]).map_err(|e| format!("write: {e}"))?;
                        model[p as usize] = b;
                    }
                    4..=6 => {
                        let got = page_bytes(&m, B + p * PS);
                        if !all(&got, model[p as usize]) {
                            return Err(format!(
                                "thread {t} step {step} page {p}: {:#x} want {:#x}",
                                got[0], model[p as usize]
                            ));
                        }
                    }
                    7 => {
                        // Replace my map by a clone of it (the old one dies).
                        let cp = SoftPmap::new();
                        let child = SoftMachine::with(m.map.fork(cp.clone()).unwrap(), cp);
                        m = child;
                    }
                    8 => {
                        run_once(&vm, 20);
                    }
                    _ => {
                        if let Some(o) = m.map.object_at(B) {
                            collapse(o.arc());
                        }
                    }
                }
            }
            for p in 0..PAGES {
                if !all(&page_bytes(&m, B + p * PS), model[p as usize]) {
                    return Err(format!("thread {t} final page {p}"));
                }
            }
            Ok(())
        }));
    }
    for th in threads {
        th.join().unwrap().unwrap();
    }
    for p in 0..PAGES {
        assert!(all(&page_bytes(&parent, B + p * PS), p as u8), "the parent never changes");
    }
    assert!(vm.pool().resident() <= 40);
    drop(daemon);
}

#[test]
fn faults_on_other_pages_proceed_during_pager_io() {
    let vm = vm(1024);
    let (o, mp) = mem_object(&vm, 64, 64, (0, 0));
    let m = Arc::new(machine(&vm));
    m.map.map_object(B, 64 * PS, o, 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    m.map.map_anon(B + 128 * PS, 4 * PS, Prot::RW).unwrap();
    m.map.madvise(B, 64 * PS, Behavior::Random).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let rx = parking_lot::Mutex::new(rx);
    let first = AtomicBool::new(true);
    *mp.on_get.lock() = Some(Arc::new(move || {
        if first.swap(false, Ordering::SeqCst) {
            let _ = started_tx.send(());
            let _ = rx.lock().recv_timeout(std::time::Duration::from_secs(10));
        }
    }));
    let m2 = m.clone();
    let slow = std::thread::spawn(move || fault(&m2.map, B + 10 * PS, Prot::READ, FaultFlags::NONE).map(|r| r.kind));
    started_rx.recv().unwrap();
    // The slow page-in holds no map or object lock: another page of the same
    // object, an anonymous page and a map change all go through meanwhile.
    let t0 = std::time::Instant::now();
    assert_eq!(fault(&m.map, B + 20 * PS, Prot::READ, FaultFlags::NONE).unwrap().kind, FaultKind::PagerIn);
    assert_eq!(fault(&m.map, B + 128 * PS, Prot::WRITE, FaultFlags::NONE).unwrap().kind, FaultKind::ZeroFill);
    m.map.protect(B + 128 * PS, PS, Prot::READ).unwrap();
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    tx.send(()).unwrap();
    assert_eq!(slow.join().unwrap(), Ok(FaultKind::PagerIn));
    assert!(vm.stats().snapshot().retries >= 1, "the slow fault saw the map change");
}

#[test]
fn access_holds_page_while_accessed() {
    let vm = vm(64);
    let m = machine(&vm);
    let o = m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    fill(&m, B + PS, 0x31);
    evict_all(&vm);
    assert_eq!(o.resident(), 0);
    let vm2 = vm.clone();
    let mut seen = Vec::new();
    access(&m.map, B + PS, 64, false, |_, bytes| {
        // Pageout runs while the VMM looks at the page: it must stay.
        evict_all(&vm2);
        seen.extend_from_slice(bytes);
    })
    .unwrap();
    assert!(all(&seen, 0x31));
    assert_eq!(o.with_page(1, |p| p.hold_count()), Some(0), "released afterwards");
    evict_all(&vm);
    assert!(o.with_page(1, |_| ()).is_none(), "pageable again");
}
