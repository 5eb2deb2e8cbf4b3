//! One test per fault-path behaviour.
mod common;
use ::pager::*;
use common::*;
use std::io::{Read, Seek, Write};
use std::sync::Arc;

#[test]
fn shadow_chain_first_hit_wins() {
    let vm = vm(1024);
    let (o, mp) = mem_object(&vm, 16, 16, (0, 0));
    let s = o.shadow(16, 0);
    let m = machine(&vm);
    m.map.map_object(B, 16 * PS, s.clone(), 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
    // Page 3 gets its own copy in S (COW from O); page 5 stays in O.
    fill(&m, B + 3 * PS, 0xBB);
    let t = s.clone().shadow(16, 0);
    let m2 = machine(&vm);
    m2.map.map_object(B, 16 * PS, t, 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
    let calls = mp.calls.lock().len();
    assert!(all(&page_bytes(&m2, B + 3 * PS), 0xBB), "S's page must win over O's");
    assert_eq!(mp.calls.lock().len(), calls, "O's pager must not be asked for a page S has");
    assert!(all(&page_bytes(&m2, B + 5 * PS), 5));
    drop(s);
}

#[test]
fn zero_fill_in_top_object() {
    let vm = vm(1024);
    let o = vm.anonymous(8);
    let s = o.clone().shadow(8, 0);
    let t = s.clone().shadow(8, 0);
    let m = machine(&vm);
    m.map.map_object(B, 8 * PS, t.clone(), 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
    let r = fault(&m.map, B + 2 * PS, Prot::READ, FaultFlags::NONE).unwrap();
    assert_eq!(r.kind, FaultKind::ZeroFill);
    assert!(all(&page_bytes(&m, B + 2 * PS), 0));
    assert_eq!(t.resident(), 1);
    assert_eq!(s.resident(), 0);
    assert_eq!(o.resident(), 0);
    assert_eq!(vm.stats().snapshot().zero_fill, 1);
}

#[test]
fn read_fault_on_backing_maps_readonly_shared() {
    let vm = vm(1024);
    let m = machine(&vm);
    m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    fill(&m, B, 0x11);
    let parent_frame = m.pmap.extract(B).unwrap();
    let cp = SoftPmap::new();
    let child = SoftMachine::with(m.map.fork(cp.clone()).unwrap(), cp);
    let r = fault(&child.map, B, Prot::READ, FaultFlags::NONE).unwrap();
    assert!(!r.prot.writable(), "backing page must be mapped read-only");
    assert_eq!(r.frame, parent_frame, "and shared (same frame)");
    assert!(all(&page_bytes(&child, B), 0x11));
    // The parent was write-protected by the clone.
    assert!(!m.pmap.pte(B).unwrap().prot.writable());
}

#[test]
fn write_fault_cow_copy() {
    let vm = vm(1024);
    let m = machine(&vm);
    m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    fill(&m, B, 0x11);
    let cp = SoftPmap::new();
    let child = SoftMachine::with(m.map.fork(cp.clone()).unwrap(), cp);
    let r = fault(&child.map, B, Prot::WRITE, FaultFlags::NONE).unwrap();
    assert_eq!(r.kind, FaultKind::CowCopy);
    assert_ne!(r.frame, m.pmap.extract(B).unwrap());
    fill(&child, B, 0x22);
    assert!(all(&page_bytes(&m, B), 0x11));
    assert!(all(&page_bytes(&child, B), 0x22));
    fill(&m, B, 0x33);
    assert!(all(&page_bytes(&child, B), 0x22));
    let s = vm.stats().snapshot();
    assert!(s.cow_copy >= 1);
    assert_eq!(s.cow_rename, 0);
}

#[test]
fn write_fault_cow_rename() {
    let vm = Vm::new(Config { auto_collapse: false, ..cfg(1024) }).unwrap();
    let a = machine(&vm);
    let o = a.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    fill(&a, B, 0x44);
    let frame = a.pmap.extract(B).unwrap();
    let s = o.shadow(4, 0);
    let b = machine(&vm);
    b.map.map_object(B, 4 * PS, s.clone(), 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
    a.map.unmap(B, 4 * PS).unwrap();
    let (back, _) = s.backing().unwrap();
    assert_eq!(back.ref_count(), 1);
    assert_eq!(back.shadow_count(), 1);
    let r = fault(&b.map, B, Prot::WRITE, FaultFlags::NONE).unwrap();
    assert_eq!(r.kind, FaultKind::CowRename);
    assert_eq!(r.frame, frame, "rename moves the frame, no copy");
    assert!(all(&page_bytes(&b, B), 0x44));
    assert_eq!(back.resident(), 0);
    let st = vm.stats().snapshot();
    assert_eq!(st.cow_rename, 1);
    assert_eq!(st.cow_copy, 0);
}

fn calls_after(
    vm: &Arc<Vm>,
    size: u64,
    limit: (u32, u32),
    behavior: Behavior,
    pages: &[u64],
) -> Vec<(u64, usize, usize)> {
    let (o, mp) = mem_object(vm, size, size, limit);
    let m = machine(vm);
    m.map.map_object(B, size * PS, o, 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    m.map.madvise(B, size * PS, behavior).unwrap();
    for &p in pages {
        fault(&m.map, B + p * PS, Prot::READ, FaultFlags::NONE).unwrap();
    }
    let c = mp.calls.lock().clone();
    c
}

#[test]
fn read_ahead_8_behind_7_clipped_by_pager_and_size() {
    let vm = vm(4096);
    assert_eq!(calls_after(&vm, 64, (100, 100), Behavior::Normal, &[20]), vec![(13, 16, 7)]);
    // Clipped by what the pager reports.
    assert_eq!(calls_after(&vm, 64, (2, 3), Behavior::Normal, &[20]), vec![(18, 6, 2)]);
    // Clipped by the object size.
    assert_eq!(calls_after(&vm, 24, (100, 100), Behavior::Normal, &[22]), vec![(15, 9, 7)]);
    // And at the start of the object.
    assert_eq!(calls_after(&vm, 64, (100, 100), Behavior::Normal, &[3]), vec![(0, 12, 3)]);
}

#[test]
fn random_disables_clustering() {
    let vm = vm(4096);
    assert_eq!(calls_after(&vm, 64, (100, 100), Behavior::Random, &[20, 21]), vec![(20, 1, 0), (21, 1, 0)]);
}

#[test]
fn sequential_and_lastr_promote() {
    let vm = vm(4096);
    assert_eq!(calls_after(&vm, 64, (100, 100), Behavior::Sequential, &[20]), vec![(20, 16, 0)]);
    // Normal: the first fault sets lastr = 0 + 9; a fault inside
    // [lastr, lastr + 16) promotes behind into ahead.
    let c = calls_after(&vm, 64, (100, 100), Behavior::Normal, &[0, 12]);
    assert_eq!(c, vec![(0, 9, 0), (12, 16, 0)]);
    // Outside the window: normal clustering.
    let c = calls_after(&vm, 64, (100, 100), Behavior::Normal, &[0, 40]);
    assert_eq!(c, vec![(0, 9, 0), (33, 16, 7)]);
}

#[test]
fn resident_neighbour_stops_cluster() {
    let vm = vm(4096);
    let (o, mp) = mem_object(&vm, 64, 64, (100, 100));
    let m = machine(&vm);
    m.map.map_object(B, 64 * PS, o, 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    m.map.madvise(B, 64 * PS, Behavior::Random).unwrap();
    // (30 last, so lastr = 31 and 26 is outside the sequential window.)
    fault(&m.map, B + 22 * PS, Prot::READ, FaultFlags::NONE).unwrap();
    fault(&m.map, B + 30 * PS, Prot::READ, FaultFlags::NONE).unwrap();
    m.map.madvise(B, 64 * PS, Behavior::Normal).unwrap();
    fault(&m.map, B + 26 * PS, Prot::READ, FaultFlags::NONE).unwrap();
    // Behind stops after 22, ahead stops before 30.
    assert_eq!(mp.calls.lock()[2], (23, 7, 3));
}

#[test]
fn pager_io_error_is_failure() {
    let vm = vm(1024);
    let (o, mp) = mem_object(&vm, 8, 8, (0, 0));
    let m = machine(&vm);
    m.map.map_object(B, 8 * PS, o.clone(), 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    *mp.fail.lock() = Some(PagerError::Error);
    assert_eq!(fault(&m.map, B + PS, Prot::READ, FaultFlags::NONE).unwrap_err(), FaultError::Failure);
    assert_eq!(o.resident(), 0, "no placeholder left behind");
    assert!(m.pmap.extract(B + PS).is_none());
    *mp.fail.lock() = None;
    assert!(all(&page_bytes(&m, B + PS), 1));
}

#[test]
fn pager_bad_and_beyond_size_is_protection() {
    let vm = vm(1024);
    let (o, mp) = mem_object(&vm, 4, 4, (0, 0));
    let m = machine(&vm);
    m.map.map_object(B, 8 * PS, o.clone(), 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    *mp.fail.lock() = Some(PagerError::Bad);
    assert_eq!(fault(&m.map, B, Prot::READ, FaultFlags::NONE).unwrap_err(), FaultError::Protection);
    *mp.fail.lock() = None;
    assert_eq!(fault(&m.map, B + 5 * PS, Prot::READ, FaultFlags::NONE).unwrap_err(), FaultError::Protection);
    // Write to a read-only entry, and an unmapped address.
    assert_eq!(fault(&m.map, B, Prot::WRITE, FaultFlags::NONE).unwrap_err(), FaultError::Protection);
    assert_eq!(fault(&m.map, 0x10, Prot::READ, FaultFlags::NONE).unwrap_err(), FaultError::NotMapped);
    assert_eq!(o.resident(), 0);
}

#[test]
fn generation_change_retries() {
    let vm = vm(1024);
    let (o, mp) = mem_object(&vm, 8, 8, (0, 0));
    let m = machine(&vm);
    m.map.map_object(B, 8 * PS, o, 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    m.map.map_anon(B + 64 * PS, PS, Prot::RW).unwrap();
    let map2 = m.map.clone();
    *mp.on_get.lock() = Some(Arc::new(move || {
        // The map changes while the pager sleeps.
        map2.madvise(B + 64 * PS, PS, Behavior::Random).unwrap();
    }));
    let before = vm.stats().snapshot().retries;
    assert!(all(&page_bytes(&m, B + 2 * PS), 2));
    assert!(vm.stats().snapshot().retries > before);
    *mp.on_get.lock() = None;
}

#[test]
fn wired_entry_faults_with_own_prot_never_paged_out() {
    let vm = vm(64);
    let m = machine(&vm);
    let o = m.map.map_anon(B, 8 * PS, Prot::RW).unwrap();
    m.map.wire(B, 8 * PS).unwrap();
    assert_eq!(o.resident(), 8);
    for i in 0..8 {
        assert!(m.pmap.pte(B + i * PS).unwrap().prot.writable(), "wired fault uses the entry's protection");
        assert_eq!(o.with_page(i, |p| p.wire_count()), Some(1));
    }
    fill(&m, B, 0x5A);
    let other = machine(&vm);
    other.map.map_anon(B, 200 * PS, Prot::RW).unwrap();
    for i in 0..200 {
        fill(&other, B + i * PS, i as u8);
    }
    evict_all(&vm);
    assert_eq!(o.resident(), 8, "wired pages are never paged out");
    assert!(all(&page_bytes(&m, B), 0x5A));
    m.map.unwire(B, 8 * PS).unwrap();
    assert_eq!(o.with_page(0, |p| p.wire_count()), Some(0));
    evict_all(&vm);
    assert!(o.resident() < 8);
    assert!(all(&page_bytes(&m, B), 0x5A));
}

#[test]
fn single_ref_middle_object_collapses() {
    let vm = vm(1024);
    let a = machine(&vm);
    a.map.map_anon(B, 8 * PS, Prot::RW).unwrap();
    for i in 0..8 {
        fill(&a, B + i * PS, i as u8);
    }
    for gen in 0..5u8 {
        let cp = SoftPmap::new();
        let child = SoftMachine::with(a.map.fork(cp.clone()).unwrap(), cp);
        fill(&child, B, 0xC0 | gen);
        fill(&a, B + PS, 0xA0 | gen);
        drop(child);
    }
    let top = a.map.object_at(B).unwrap();
    assert!(top.arc().chain_len() <= 2, "chain stays short, got {}", top.arc().chain_len());
    assert!(vm.stats().snapshot().collapses >= 1);
    assert!(all(&page_bytes(&a, B), 0));
    assert!(all(&page_bytes(&a, B + PS), 0xA4));
    for i in 2..8 {
        assert!(all(&page_bytes(&a, B + i * PS), i as u8));
    }
    // Explicit collapse with auto collapse off.
    let vm2 = Vm::new(Config { auto_collapse: false, ..cfg(1024) }).unwrap();
    let o = vm2.anonymous(4);
    let s = o.clone().shadow(4, 0);
    drop(o);
    assert_eq!(s.arc().chain_len(), 2);
    assert_eq!(collapse(s.arc()), 1);
    assert_eq!(s.arc().chain_len(), 1);
}

#[test]
fn sequential_stream_frees_behind() {
    let vm = vm(96);
    let (o, _mp) = mem_object(&vm, 512, 512, (100, 100));
    let m = machine(&vm);
    m.map.map_object(B, 512 * PS, o.clone(), 0, Prot::RW, Prot::ALL, Inherit::Share, false).unwrap();
    m.map.madvise(B, 512 * PS, Behavior::Sequential).unwrap();
    // Two dirty pages in the stream's path.
    fill(&m, B + 2 * PS, 0xD0);
    fill(&m, B + 3 * PS, 0xD1);
    // A hot working set, touched between stream reads.
    let hot = machine(&vm);
    let ho = hot.map.map_anon(B, 16 * PS, Prot::RW).unwrap();
    for i in 0..16 {
        fill(&hot, B + i * PS, 0xEE);
    }
    for p in 0..40 {
        assert_eq!(
            m.read_u8(B + p * PS + 7).unwrap(),
            if p == 2 {
                0xD0
            } else if p == 3 {
                0xD1
            } else {
                p as u8
            }
        );
    }
    // Behind the stream: clean pages cached and unmapped, dirty ones unmapped
    // and deactivated.
    assert_eq!(o.with_page(10, |p| p.queue()), Some(Queue::Cache));
    assert!(m.pmap.extract(B + 10 * PS).is_none());
    assert_eq!(o.with_page(2, |p| (p.queue(), p.is_dirty())), Some((Queue::Inactive, true)));
    assert!(m.pmap.extract(B + 2 * PS).is_none());
    for p in 40..512 {
        assert_eq!(m.read_u8(B + p * PS).unwrap(), p as u8);
        if p % 8 == 0 {
            for i in 0..16 {
                assert_eq!(hot.read_u8(B + i * PS).unwrap(), 0xEE);
            }
        }
    }
    assert_eq!(ho.resident(), 16, "the stream must not evict the hot set");
    assert_eq!(vm.swap().unwrap().object_slots(ho.id()), 0);
    assert!(vm.pool().resident() <= 96);
}

#[test]
fn major_vs_minor_counted() {
    let vm = vm(1024);
    let (o, _mp) = mem_object(&vm, 8, 8, (0, 0));
    let m = machine(&vm);
    m.map.map_object(B, 8 * PS, o, 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    m.map.map_anon(B + 64 * PS, PS, Prot::RW).unwrap();
    let s0 = vm.stats().snapshot();
    let r = fault(&m.map, B, Prot::READ, FaultFlags::NONE).unwrap();
    assert_eq!(r.kind, FaultKind::PagerIn);
    m.pmap.remove(B, B + PS);
    let r = fault(&m.map, B, Prot::READ, FaultFlags::NONE).unwrap();
    assert_eq!(r.kind, FaultKind::Soft);
    fault(&m.map, B + 64 * PS, Prot::READ, FaultFlags::NONE).unwrap();
    let s1 = vm.stats().snapshot();
    assert_eq!(s1.pager_in - s0.pager_in, 1);
    assert_eq!((s1.faults - s1.pager_in) - (s0.faults - s0.pager_in), 2);
    assert_eq!(vm.stats().minor(), s1.faults - s1.pager_in);
}

#[test]
fn wire_unwire_range() {
    let vm = vm(1024);
    let m = machine(&vm);
    let o = m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    m.map.wire(B + PS, 2 * PS).unwrap();
    assert_eq!(o.resident(), 2);
    assert_eq!(o.with_page(1, |p| p.wire_count()), Some(1));
    assert_eq!(m.map.entries().iter().filter(|e| e.wired_count == 1).count(), 1);
    m.map.unwire(B + PS, 2 * PS).unwrap();
    assert_eq!(o.with_page(1, |p| p.wire_count()), Some(0));
    assert!(m.map.unwire(B + PS, PS).is_err(), "unwire of an unwired range fails");
    // Failure part-way unwires what was wired.
    let (fo, _) = mem_object(&vm, 2, 2, (0, 0));
    m.map.map_object(B + 64 * PS, 4 * PS, fo.clone(), 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    assert!(m.map.wire(B + 64 * PS, 4 * PS).is_err());
    assert_eq!(fo.with_page(0, |p| p.wire_count()), Some(0));
    assert_eq!(fo.with_page(1, |p| p.wire_count()), Some(0));
    assert!(m.map.entries().iter().all(|e| e.wired_count == 0));
}

#[test]
fn clone_copies_wired_entry_eagerly() {
    let vm = vm(1024);
    let m = machine(&vm);
    let o = m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    for i in 0..4 {
        fill(&m, B + i * PS, 0x70 + i as u8);
    }
    m.map.wire(B, 4 * PS).unwrap();
    let cp = SoftPmap::new();
    let child = SoftMachine::with(m.map.fork(cp.clone()).unwrap(), cp.clone());
    let co = child.map.object_at(B).unwrap();
    assert_ne!(co.id(), o.id());
    assert_eq!(co.resident(), 4, "copied at clone time");
    assert_eq!(cp.len(), 4, "and entered in the child's pmap");
    fill(&m, B, 0x99);
    for i in 0..4 {
        assert!(all(&page_bytes(&child, B + i * PS), 0x70 + i as u8));
    }
}

#[test]
fn quick_fault_brings_in_swapped_page() {
    let vm = vm(64);
    let m = machine(&vm);
    let o = m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    fill(&m, B + PS, 0x42);
    evict_all(&vm);
    assert_eq!(o.resident(), 0);
    assert_eq!(o.kind(), ObjectKind::Swap);
    let mut buf = vec![0u8; 100];
    read_guest(&m.map, B + PS + 50, &mut buf).unwrap();
    assert!(all(&buf, 0x42), "never zeros for a swapped-out page");
    write_guest(&m.map, B + 2 * PS - 10, &[7u8; 20]).unwrap();
    quick_fault(&m.map, B + 3 * PS, true).unwrap();
    evict_all(&vm);
    let mut b2 = [0u8; 20];
    read_guest(&m.map, B + 2 * PS - 10, &mut b2).unwrap();
    assert_eq!(b2, [7u8; 20]);
}

#[test]
fn fault_rate_limit_throttles() {
    let vm = Vm::new(Config {
        ratelimit: true,
        ratelimit_load: 500,
        ratelimit_max_sleep: std::time::Duration::from_millis(2),
        ..cfg(64)
    })
    .unwrap();
    let m = machine(&vm);
    m.map.map_anon(B, 60 * PS, Prot::RW).unwrap();
    for i in 0..60 {
        fill(&m, B + i * PS, 1);
    }
    assert!(vm.stats().snapshot().throttled > 0);
    assert!(vm.pool().resident() <= 64);
}

#[test]
fn swap_slots_freed_on_page_and_object_death() {
    let vm = vm(64);
    let swap = vm.swap().unwrap().clone();
    let m = machine(&vm);
    let o = m.map.map_anon(B, 8 * PS, Prot::RW).unwrap();
    for i in 0..8 {
        fill(&m, B + i * PS, i as u8);
    }
    evict_all(&vm);
    assert_eq!(swap.object_slots(o.id()), 8);
    assert_eq!(m.read_u8(B).unwrap(), 0);
    assert_eq!(swap.object_slots(o.id()), 8, "a clean swap-in keeps its slot");
    fill(&m, B, 9);
    assert_eq!(swap.object_slots(o.id()), 7, "dirtying frees the slot");
    let id = o.id();
    drop(o);
    m.map.unmap(B, 8 * PS).unwrap();
    assert_eq!(swap.object_slots(id), 0);
    assert_eq!(swap.used_slots(), 0);
}

fn temp_file(pages: u64) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    for p in 0..pages {
        f.write_all(&[p as u8 + 1; 4096]).unwrap();
    }
    f
}

#[test]
fn file_pager_ro_shared_private() {
    let vm = vm(1024);
    let f = temp_file(4);
    let mut reader = f.try_clone().unwrap();
    let fo = vm.file_object(f, true, None).unwrap();
    let m = machine(&vm);
    // Read-only.
    m.map.map_file(B, 4 * PS, &fo, 0, FileMode::ReadOnly).unwrap();
    assert!(all(&page_bytes(&m, B + PS), 2));
    assert_eq!(m.write(B, &[1]).unwrap_err(), FaultError::Protection);
    // Private: writes go to a shadow; the file and other mappings keep theirs.
    m.map.map_file(B + 16 * PS, 4 * PS, &fo, 0, FileMode::Private).unwrap();
    fill(&m, B + 16 * PS, 0x77);
    assert!(all(&page_bytes(&m, B), 1));
    // Shared: writes reach the file on sync.
    m.map.map_file(B + 32 * PS, 4 * PS, &fo, 0, FileMode::Shared).unwrap();
    fill(&m, B + 33 * PS, 0x55);
    assert!(all(&page_bytes(&m, B + PS), 0x55), "shared with the read-only view");
    assert_eq!(fo.sync().unwrap(), 1);
    assert!(!m.pmap.pte(B + 33 * PS).unwrap().prot.writable(), "cleaning write-protects");
    let mut buf = vec![0u8; 4096 * 4];
    reader.seek(std::io::SeekFrom::Start(0)).unwrap();
    reader.read_exact(&mut buf).unwrap();
    assert!(all(&buf[..4096], 1), "private write never reaches the file");
    assert!(all(&buf[4096..8192], 0x55));
    assert!(all(&page_bytes(&m, B + 16 * PS), 0x77));
    // Pageout of a dirty shared page writes it back.
    fill(&m, B + 34 * PS, 0x66);
    evict_all(&vm);
    reader.seek(std::io::SeekFrom::Start(2 * 4096)).unwrap();
    reader.read_exact(&mut buf[..4096]).unwrap();
    assert!(all(&buf[..4096], 0x66));
    assert!(all(&page_bytes(&m, B + 16 * PS), 0x77));
}

#[test]
fn device_pager_fixed_no_cluster() {
    let vm = vm(64);
    let (dev, frames) = vm.device_object(4).unwrap();
    vm.pool().write(frames[1], 0, &[0xDE; 4096]).unwrap();
    let m = machine(&vm);
    m.map.map_object(B, 4 * PS, dev.clone(), 0, Prot::RW, Prot::ALL, Inherit::Share, false).unwrap();
    let r = fault(&m.map, B + PS, Prot::READ, FaultFlags::NONE).unwrap();
    assert_eq!(r.frame, frames[1]);
    assert_eq!(dev.resident(), 1, "no clustering for devices");
    assert!(all(&page_bytes(&m, B + PS), 0xDE));
    let other = machine(&vm);
    other.map.map_anon(B, 100 * PS, Prot::RW).unwrap();
    for i in 0..100 {
        fill(&other, B + i * PS, 1);
    }
    evict_all(&vm);
    assert_eq!(dev.with_page(1, |p| p.frame()), Some(frames[1]), "device pages are never paged out");
}

#[test]
fn anonymous_becomes_swap_on_pageout() {
    let vm = vm(64);
    let m = machine(&vm);
    let o = m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    fill(&m, B, 3);
    assert_eq!(o.kind(), ObjectKind::Anonymous);
    evict_all(&vm);
    assert_eq!(o.kind(), ObjectKind::Swap);
    assert!(all(&page_bytes(&m, B), 3));
}

#[test]
fn pageout_keeps_budget() {
    let vm = vm(32);
    let m = machine(&vm);
    m.map.map_anon(B, 128 * PS, Prot::RW).unwrap();
    for i in 0..128 {
        fill(&m, B + i * PS, i as u8);
        assert!(vm.pool().resident() <= 32);
    }
    for i in 0..128 {
        assert!(all(&page_bytes(&m, B + i * PS), i as u8));
        assert!(vm.pool().resident() <= 32);
    }
    assert!(vm.stats().snapshot().pages_out > 0);
}

#[test]
fn pageout_skips_wired_and_busy() {
    let vm = vm(256);
    let m = machine(&vm);
    let w = m.map.map_anon(B, 4 * PS, Prot::RW).unwrap();
    m.map.wire(B, 4 * PS).unwrap();
    let (o, mp) = mem_object(&vm, 8, 8, (0, 0));
    m.map.map_object(B + 64 * PS, 8 * PS, o.clone(), 0, Prot::READ, Prot::ALL, Inherit::Copy, false).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let rx = parking_lot::Mutex::new(rx);
    *mp.on_get.lock() = Some(Arc::new(move || {
        let _ = started_tx.send(());
        let _ = rx.lock().recv();
    }));
    let map = m.map.clone();
    let t = std::thread::spawn(move || fault(&map, B + 64 * PS, Prot::READ, FaultFlags::NONE).map(|r| r.kind));
    started_rx.recv().unwrap();
    assert!(o.with_page(0, |p| p.is_busy()).unwrap());
    run_once(&vm, 256);
    assert!(o.with_page(0, |p| p.is_busy()).unwrap(), "busy page skipped");
    assert_eq!(w.resident(), 4, "wired pages skipped");
    tx.send(()).unwrap();
    assert_eq!(t.join().unwrap(), Ok(FaultKind::PagerIn));
}

#[test]
fn pageout_dirty_written_before_freed() {
    let vm = vm(256);
    let mp = Arc::new(MemPager::new(0, 0));
    let o = vm.with_pager(ObjectKind::Swap, 8, mp.clone(), None);
    let m = machine(&vm);
    m.map.map_object(B, 8 * PS, o.clone(), 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
    for i in 0..8 {
        fill(&m, B + i * PS, 0x30 + i as u8);
    }
    let pm = m.pmap.clone();
    let unmapped_first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let u2 = unmapped_first.clone();
    *mp.on_put.lock() = Some(Arc::new(move |pages: &[PageIo]| {
        for p in pages {
            if pm.extract(B + p.pindex * PS).is_some() {
                u2.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }));
    evict_all(&vm);
    assert!(unmapped_first.load(std::sync::atomic::Ordering::SeqCst), "unmapped before written");
    assert_eq!(o.resident(), 0);
    assert_eq!(mp.pages.lock().len(), 8, "every dirty page written");
    for i in 0..8 {
        assert!(all(&page_bytes(&m, B + i * PS), 0x30 + i as u8));
    }
}

#[test]
fn prefault_maps_resident_neighbours() {
    let vm = vm(1024);
    let m = machine(&vm);
    m.map.map_anon(B, 16 * PS, Prot::RW).unwrap();
    for i in 0..16 {
        fill(&m, B + i * PS, 1);
    }
    m.pmap.remove(B, B + 16 * PS);
    let r = fault(&m.map, B + 8 * PS, Prot::READ, FaultFlags::NONE).unwrap();
    assert_eq!(r.prefault.len(), 8);
    let rr = fault_range(&m.map, B, 16, Prot::READ).unwrap();
    assert_eq!(rr.len(), 16 - 9);
}

#[test]
fn preferred_frames_keep_object_pages_contiguous() {
    let vm = vm(1024);
    let m = machine(&vm);
    m.map.map_anon(B, 16 * PS, Prot::RW).unwrap();
    for i in [3u64, 0, 9, 1, 2] {
        fill(&m, B + i * PS, 1);
    }
    let f0 = m.pmap.extract(B).unwrap();
    for i in [1u64, 2, 3, 9] {
        assert_eq!(m.pmap.extract(B + i * PS).unwrap(), f0 + i, "page {i} in its preferred frame");
    }
    // A COW copy lands in the shadow's own range; a rename keeps its frame.
    let cp = SoftPmap::new();
    let child = SoftMachine::with(m.map.fork(cp.clone()).unwrap(), cp);
    fill(&child, B + PS, 2);
    fill(&child, B + 2 * PS, 2);
    assert_eq!(child.pmap.extract(B + 2 * PS).unwrap(), child.pmap.extract(B + PS).unwrap() + 1);
}

#[test]
fn fork_cost_independent_of_resident_pages() {
    // Clone does no per-page work: it touches no page of the object.
    let vm = vm(4096);
    let m = machine(&vm);
    let o = m.map.map_anon(B, 512 * PS, Prot::RW).unwrap();
    for i in 0..512 {
        m.write(B + i * PS, &[1]).unwrap();
    }
    let gen = o.generation();
    let before = vm.stats().snapshot();
    let cp = SoftPmap::new();
    let child = m.map.fork(cp.clone()).unwrap();
    assert_eq!(o.generation(), gen);
    assert_eq!(vm.stats().snapshot(), before);
    assert_eq!(cp.len(), 0, "nothing entered in the child");
    assert_eq!(o.resident(), 512);
    drop(child);
}
