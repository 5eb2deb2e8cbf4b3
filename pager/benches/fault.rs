//! Fault path benchmarks: resident re-fault, zero-fill, COW copy, COW rename,
//! swap-in of a page in the host page cache; prints metadata bytes per page.

use ::pager::*;
use criterion::{criterion_group, criterion_main, Criterion};
use std::sync::Arc;
use std::time::{Duration, Instant};

const B: u64 = 0x1000_0000;
const PS: u64 = 4096;
const CHUNK: u64 = 2048;

fn vm(auto_collapse: bool) -> Arc<Vm> {
    Vm::new(Config {
        store_bytes: 64 << 30,
        max_resident: 1 << 20,
        swap_bytes: 64 << 20,
        ratelimit: false,
        auto_collapse,
        prefault: 0,
        ..Default::default()
    })
    .expect("vm")
}

/// Runs `iters` timed faults in chunks: `setup(n)` (untimed) returns the
/// state, `run(&state, i)` is timed per chunk.
fn chunked<S>(iters: u64, mut setup: impl FnMut(u64) -> S, mut run: impl FnMut(&S, u64)) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let s = setup(n);
        let t = Instant::now();
        for i in 0..n {
            run(&s, i);
        }
        total += t.elapsed();
        drop(s);
        left -= n;
    }
    total
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));

    let v = vm(true);
    let m = SoftMachine::new(&v);
    m.map.map_anon(B, PS, Prot::RW).unwrap();
    m.write(B, &[1]).unwrap();
    g.bench_function("resident_refault", |b| b.iter(|| fault(&m.map, B, Prot::READ, FaultFlags::NO_PREFAULT).unwrap()));

    g.bench_function("zero_fill", |b| {
        b.iter_custom(|iters| {
            chunked(
                iters,
                |n| {
                    let m = SoftMachine::new(&v);
                    m.map.map_anon(B, n * PS, Prot::RW).unwrap();
                    m
                },
                |m, i| {
                    fault(&m.map, B + i * PS, Prot::WRITE, FaultFlags::NO_PREFAULT).unwrap();
                },
            )
        })
    });

    g.bench_function("cow_copy", |b| {
        b.iter_custom(|iters| {
            chunked(
                iters,
                |n| {
                    let p = SoftMachine::new(&v);
                    p.map.map_anon(B, n * PS, Prot::RW).unwrap();
                    for i in 0..n {
                        p.write(B + i * PS, &[7; 64]).unwrap();
                    }
                    let cp = SoftPmap::new();
                    let child = SoftMachine::with(p.map.fork(cp.clone()).unwrap(), cp);
                    (p, child)
                },
                |(_, child), i| {
                    fault(&child.map, B + i * PS, Prot::WRITE, FaultFlags::NO_PREFAULT).unwrap();
                },
            )
        })
    });

    let vr = vm(false);
    g.bench_function("cow_rename", |b| {
        b.iter_custom(|iters| {
            chunked(
                iters,
                |n| {
                    let a = SoftMachine::new(&vr);
                    let o = a.map.map_anon(B, n * PS, Prot::RW).unwrap();
                    for i in 0..n {
                        a.write(B + i * PS, &[7; 64]).unwrap();
                    }
                    let s = o.shadow(n, 0);
                    let m = SoftMachine::new(&vr);
                    m.map.map_object(B, n * PS, s, 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
                    drop(a);
                    m
                },
                |m, i| {
                    let r = fault(&m.map, B + i * PS, Prot::WRITE, FaultFlags::NO_PREFAULT).unwrap();
                    debug_assert_eq!(r.kind, FaultKind::CowRename);
                },
            )
        })
    });

    let vs = Vm::new(Config {
        store_bytes: 64 << 30,
        max_resident: 1 << 20,
        swap_bytes: 256 << 20,
        ratelimit: false,
        prefault: 0,
        ..Default::default()
    })
    .expect("vm");
    g.bench_function("swap_in_page_cache", |b| {
        b.iter_custom(|iters| {
            chunked(
                iters,
                |n| {
                    let m = SoftMachine::new(&vs);
                    m.map.map_anon(B, n * PS, Prot::RW).unwrap();
                    m.map.madvise(B, n * PS, Behavior::Random).unwrap();
                    for i in 0..n {
                        m.write(B + i * PS, &[9; 64]).unwrap();
                    }
                    run_once(&vs, 1 << 20);
                    m
                },
                |m, i| {
                    fault(&m.map, B + i * PS, Prot::READ, FaultFlags::NO_PREFAULT).unwrap();
                },
            )
        })
    });
    g.finish();
    let s = vs.stats().snapshot();
    println!("swap-in bench: {} major faults, {} pages read, {} written", s.pager_in, s.pages_in, s.pages_out);

    let page = std::mem::size_of::<Page>();
    let entry = std::mem::size_of::<(u64, Page)>();
    // hashbrown: one control byte per bucket, load factor <= 7/8.
    let per = (entry as f64 + 1.0) * 8.0 / 7.0;
    println!("metadata: Page {page} B, map entry {entry} B, ~{per:.1} B per resident page at the worst load factor (rmap with one mapping inline)");
}

criterion_group!(fault_benches, benches);
criterion_main!(fault_benches);
