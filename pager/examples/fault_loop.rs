//! A fixed number of faults of one kind, for deterministic instruction
//! counts under valgrind (wall-clock benches on a shared 2-core machine
//! vary by tens of percent; instruction counts do not):
//!
//! ```text
//! cargo build --release -p pager --example fault_loop
//! for n in 4096 8192; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/fault_loop refault $n 2>&1 | grep Collected; done
//! ```
//! (the difference divided by 4096 is the cost of one fault). Kinds:
//! `refault` (resident, `NO_PREFAULT`), `zero`, `copy` (COW copy after a
//! fork), `rename` (COW rename), `swapin` (`Random`, after a pageout); the
//! set-up of each is the bench's (`benches/fault.rs`).

use ::pager::*;

const B: u64 = 0x1000_0000;
const PS: u64 = 4096;
/// Pages per map, as the bench's chunks.
const CHUNK: u64 = 2048;

fn vm(swap_bytes: u64, auto_collapse: bool) -> std::sync::Arc<Vm> {
    let c = Config {
        store_bytes: 1 << 30,
        max_resident: 1 << 16,
        swap_bytes,
        ratelimit: false,
        prefault: 0,
        auto_collapse,
        ..Default::default()
    };
    Vm::new(c).expect("vm")
}

fn chunk(kind: &str, k: u64) {
    match kind {
        "zero" => {
            let m = SoftMachine::new(&vm(0, true));
            m.map.map_anon(B, k * PS, Prot::RW).unwrap();
            for i in 0..k {
                fault(&m.map, B + i * PS, Prot::WRITE, FaultFlags::NO_PREFAULT).unwrap();
            }
        }
        "copy" => {
            let p = SoftMachine::new(&vm(0, true));
            p.map.map_anon(B, k * PS, Prot::RW).unwrap();
            for i in 0..k {
                p.write(B + i * PS, &[7; 64]).unwrap();
            }
            let cp = SoftPmap::new();
            let child = SoftMachine::with(p.map.fork(cp.clone()).unwrap(), cp);
            for i in 0..k {
                fault(&child.map, B + i * PS, Prot::WRITE, FaultFlags::NO_PREFAULT).unwrap();
            }
        }
        "rename" => {
            let v = vm(0, false);
            let a = SoftMachine::new(&v);
            let o = a.map.map_anon(B, k * PS, Prot::RW).unwrap();
            for i in 0..k {
                a.write(B + i * PS, &[7; 64]).unwrap();
            }
            let m = SoftMachine::new(&v);
            m.map.map_object(B, k * PS, o.shadow(k, 0), 0, Prot::RW, Prot::ALL, Inherit::Copy, false).unwrap();
            drop(a);
            for i in 0..k {
                let r = fault(&m.map, B + i * PS, Prot::WRITE, FaultFlags::NO_PREFAULT).unwrap();
                assert_eq!(r.kind, FaultKind::CowRename);
            }
        }
        "swapin" => {
            let v = vm(64 << 20, true);
            let m = SoftMachine::new(&v);
            m.map.map_anon(B, k * PS, Prot::RW).unwrap();
            m.map.madvise(B, k * PS, Behavior::Random).unwrap();
            for i in 0..k {
                m.write(B + i * PS, &[9; 64]).unwrap();
            }
            run_once(&v, 1 << 20);
            for i in 0..k {
                fault(&m.map, B + i * PS, Prot::READ, FaultFlags::NO_PREFAULT).unwrap();
            }
        }
        other => panic!("unknown kind {other}"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_else(|| "refault".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    if kind == "refault" {
        let m = SoftMachine::new(&vm(0, true));
        m.map.map_anon(B, PS, Prot::RW).unwrap();
        m.write(B, &[1]).unwrap();
        for _ in 0..n {
            std::hint::black_box(fault(&m.map, B, Prot::READ, FaultFlags::NO_PREFAULT).unwrap());
        }
    } else {
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            chunk(&kind, k);
            left -= k;
        }
    }
    println!("{n} {kind} faults");
}
