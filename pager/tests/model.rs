//! Property test: random sequences of map operations against a plain model
//! of what every address must read.
mod common;
use ::pager::*;
use common::*;
use proptest::prelude::*;
use std::sync::Arc;

const PAGES: u64 = 12;
const MAX_MAPS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    Write(usize, u64, u8),
    Read(usize, u64),
    Clone(usize),
    DropMap(usize),
    Unmap(usize, u64),
    Protect(usize, u64, bool),
    Wire(usize, u64),
    Unwire(usize, u64),
    Pageout,
    Collapse(usize),
    GuestRead(usize, u64),
    GuestWrite(usize, u64, u8),
    Advise(usize, u8),
    SharedWrite(usize, u64, u8),
    SharedRead(usize, u64),
    FileWrite(usize, u64, u8),
    FileRead(usize, u64),
}

/// A private mapping of a host file (file object under an anonymous shadow).
const FP: u64 = 0x3000_0000;
const FP_PAGES: u64 = 4;

/// A region mapped shared (`Inherit::Share`): clones see each other's writes.
const SH: u64 = 0x2000_0000;
const SH_PAGES: u64 = 4;

fn op() -> impl Strategy<Value = Op> {
    let m = 0..MAX_MAPS;
    let p = 0..PAGES;
    prop_oneof![
        6 => (m.clone(), p.clone(), any::<u8>()).prop_map(|(a, b, c)| Op::Write(a, b, c)),
        4 => (m.clone(), p.clone()).prop_map(|(a, b)| Op::Read(a, b)),
        2 => m.clone().prop_map(Op::Clone),
        1 => m.clone().prop_map(Op::DropMap),
        1 => (m.clone(), p.clone()).prop_map(|(a, b)| Op::Unmap(a, b)),
        1 => (m.clone(), p.clone(), any::<bool>()).prop_map(|(a, b, c)| Op::Protect(a, b, c)),
        1 => (m.clone(), p.clone()).prop_map(|(a, b)| Op::Wire(a, b)),
        1 => (m.clone(), p.clone()).prop_map(|(a, b)| Op::Unwire(a, b)),
        1 => Just(Op::Pageout),
        1 => m.clone().prop_map(Op::Collapse),
        2 => (m.clone(), p.clone()).prop_map(|(a, b)| Op::GuestRead(a, b)),
        2 => (m.clone(), p.clone(), any::<u8>()).prop_map(|(a, b, c)| Op::GuestWrite(a, b, c)),
        1 => (m.clone(), 0..3u8).prop_map(|(a, b)| Op::Advise(a, b)),
        2 => (m.clone(), 0..SH_PAGES, any::<u8>()).prop_map(|(a, b, c)| Op::SharedWrite(a, b, c)),
                2 => (m.clone(), 0..SH_PAGES).prop_map(|(a, b)| Op::SharedRead(a, b)),
        2 => (m.clone(), 0..FP_PAGES, any::<u8>()).prop_map(|(a, b, c)| Op::FileWrite(a, b, c)),
        2 => (m, 0..FP_PAGES).prop_map(|(a, b)| Op::FileRead(a, b)),
    ]
}

#[derive(Clone)]
struct ModelPage {
    byte: u8,
    writable: bool,
    wired: bool,
}

struct World {
    vm: Arc<Vm>,
    maps: Vec<(SoftMachine, Vec<ModelPage>)>,
}

fn fresh() -> Vec<ModelPage> {
    let mut v = vec![ModelPage { byte: 0, writable: true, wired: false }; PAGES as usize];
    for q in 0..FP_PAGES {
        v.push(ModelPage { byte: 0xF0 + q as u8, writable: true, wired: false });
    }
    v
}

fn check_page(m: &SoftMachine, p: u64, want: u8) -> Result<(), TestCaseError> {
    check_page_at(m, B + p * PS, want)
}

fn check_page_at(m: &SoftMachine, a: u64, want: u8) -> Result<(), TestCaseError> {
    let got = page_bytes(m, a);
    prop_assert!(all(&got, want), "page {:#x} reads {:#x}.. want {:#x}", a, got[0], want);
    Ok(())
}

fn run(ops: Vec<Op>, collapse_auto: bool) -> Result<(), TestCaseError> {
    let vm = Vm::new(Config { auto_collapse: collapse_auto, ..cfg(40) }).unwrap();
    let first = machine(&vm);
    first.map.map_anon(B, PAGES * PS, Prot::RW).unwrap();
    let sh = vm.anonymous(SH_PAGES);
    first.map.map_object(SH, SH_PAGES * PS, sh, 0, Prot::RW, Prot::ALL, Inherit::Share, false).unwrap();
    let mut shared = [0u8; SH_PAGES as usize];
    let mut file = tempfile::tempfile().unwrap();
    for q in 0..FP_PAGES {
        std::io::Write::write_all(&mut file, &[0xF0 + q as u8; 4096]).unwrap();
    }
    let fo = vm.file_object(file, false, None).unwrap();
    first.map.map_file(FP, FP_PAGES * PS, &fo, 0, FileMode::Private).unwrap();
    drop(fo);
    let mut w = World { vm, maps: vec![(first, fresh())] };
    for op in ops {
        let n = w.maps.len();
        match op {
            Op::Write(i, p, b) => {
                let (m, model) = &mut w.maps[i % n];
                let r = m.write(B + p * PS, &[b; 4096]);
                if model[p as usize].writable {
                    prop_assert!(r.is_ok(), "write failed: {:?}", r);
                    model[p as usize].byte = b;
                } else {
                    prop_assert_eq!(r, Err(FaultError::Protection));
                }
            }
            Op::Read(i, p) => {
                let (m, model) = &w.maps[i % n];
                check_page(m, p, model[p as usize].byte)?;
            }
            Op::Clone(i) => {
                if n < MAX_MAPS {
                    let (m, model) = &w.maps[i % n];
                    let cp = SoftPmap::new();
                    let child = SoftMachine::with(m.map.fork(cp.clone()).unwrap(), cp);
                    let cm: Vec<ModelPage> = model.iter().map(|x| ModelPage { wired: false, ..x.clone() }).collect();
                    w.maps.push((child, cm));
                }
            }
            Op::DropMap(i) => {
                if n > 1 {
                    w.maps.remove(i % n);
                }
            }
            Op::Unmap(i, p) => {
                let (m, model) = &mut w.maps[i % n];
                m.map.unmap(B + p * PS, PS).unwrap();
                m.map.map_anon(B + p * PS, PS, Prot::RW).unwrap();
                model[p as usize] = ModelPage { byte: 0, writable: true, wired: false };
            }
            Op::Protect(i, p, rw) => {
                let (m, model) = &mut w.maps[i % n];
                m.map.protect(B + p * PS, PS, if rw { Prot::RW } else { Prot::READ }).unwrap();
                model[p as usize].writable = rw;
            }
            Op::Wire(i, p) => {
                let (m, model) = &mut w.maps[i % n];
                let wired = model.iter().filter(|x| x.wired).count();
                if !model[p as usize].wired && wired < 4 {
                    m.map.wire(B + p * PS, PS).unwrap();
                    model[p as usize].wired = true;
                }
            }
            Op::Unwire(i, p) => {
                let (m, model) = &mut w.maps[i % n];
                let r = m.map.unwire(B + p * PS, PS);
                prop_assert_eq!(r.is_ok(), model[p as usize].wired);
                model[p as usize].wired = false;
            }
            Op::Pageout => {
                run_once(&w.vm, if w.maps.len().is_multiple_of(2) { 40 } else { 12 });
            }
            Op::GuestRead(i, p) => {
                let p = p % (PAGES - 1);
                let (m, model) = &w.maps[i % n];
                let mut buf = vec![0u8; 100];
                read_guest(&m.map, B + p * PS + 4000, &mut buf).unwrap();
                prop_assert!(all(&buf[..96], model[p as usize].byte));
                prop_assert!(all(&buf[96..], model[p as usize + 1].byte));
            }
            Op::GuestWrite(i, p, b) => {
                let (m, model) = &mut w.maps[i % n];
                let r = write_guest(&m.map, B + p * PS, &[b; 4096]);
                if model[p as usize].writable {
                    prop_assert!(r.is_ok(), "guest write failed: {:?}", r);
                    model[p as usize].byte = b;
                } else {
                    prop_assert_eq!(r, Err(FaultError::Protection));
                }
            }
            Op::Advise(i, b) => {
                let (m, _) = &w.maps[i % n];
                let beh = [Behavior::Normal, Behavior::Random, Behavior::Sequential][b as usize % 3];
                m.map.madvise(B, PAGES * PS, beh).unwrap();
            }
            Op::SharedWrite(i, p, b) => {
                let (m, _) = &w.maps[i % n];
                m.write(SH + p * PS, &[b; 4096]).unwrap();
                shared[p as usize] = b;
            }
            Op::SharedRead(i, p) => {
                let (m, _) = &w.maps[i % n];
                check_page_at(m, SH + p * PS, shared[p as usize])?;
            }
            Op::FileWrite(i, q, b) => {
                let (m, model) = &mut w.maps[i % n];
                m.write(FP + q * PS, &[b; 4096]).unwrap();
                model[(PAGES + q) as usize].byte = b;
            }
            Op::FileRead(i, q) => {
                let (m, model) = &w.maps[i % n];
                check_page_at(m, FP + q * PS, model[(PAGES + q) as usize].byte)?;
            }
            Op::Collapse(i) => {
                let (m, _) = &w.maps[i % n];
                for e in m.map.entries() {
                    if let Some(o) = m.map.object_at(e.start) {
                        collapse(o.arc());
                    }
                }
            }
        }
        prop_assert!(w.vm.pool().resident() <= 40);
    }
    for (m, model) in &w.maps {
        for p in 0..PAGES {
            check_page(m, p, model[p as usize].byte)?;
        }
        for p in 0..SH_PAGES {
            check_page_at(m, SH + p * PS, shared[p as usize])?;
        }
        for q in 0..FP_PAGES {
            check_page_at(m, FP + q * PS, model[(PAGES + q) as usize].byte)?;
        }
    }
    Ok(())
}

fn cases() -> u32 {
    // Default here; PROPTEST_CASES overrides.
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn model_random_ops(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, true)?;
    }
    #[test]
    fn model_random_ops_no_auto_collapse(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, false)?;
    }
}
