#![allow(dead_code)]
use ::pager::*;
use std::sync::Arc;

pub const B: u64 = 0x1000_0000;
pub const PS: u64 = 4096;

pub fn cfg(max_resident: u64) -> Config {
    Config { store_bytes: 1 << 30, max_resident, swap_bytes: 16 << 20, ratelimit: false, ..Default::default() }
}

pub fn vm(max_resident: u64) -> Arc<Vm> {
    Vm::new(cfg(max_resident)).expect("vm")
}

pub fn machine(vm: &Arc<Vm>) -> SoftMachine {
    SoftMachine::new(vm)
}

pub fn fill(m: &SoftMachine, addr: u64, byte: u8) {
    m.write(addr, &[byte; 4096]).expect("write");
}

pub fn page_bytes(m: &SoftMachine, addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    m.read(addr, &mut b).expect("read");
    b
}

pub fn all(b: &[u8], v: u8) -> bool {
    b.iter().all(|&x| x == v)
}

/// A MemPager-backed object of `size` pages with pages `0..filled` = pindex as byte.
pub fn mem_object(vm: &Arc<Vm>, size: u64, filled: u64, limit: (u32, u32)) -> (ObjHandle, Arc<MemPager>) {
    let mp = Arc::new(MemPager::new(limit.0, limit.1));
    for p in 0..filled {
        mp.put(p, p as u8);
    }
    let o = vm.with_pager(ObjectKind::File, size, mp.clone(), Some(1));
    (o, mp)
}

/// Pushes everything out: shrink the budget, run pageout, restore.
pub fn evict_all(vm: &Arc<Vm>) {
    let max = vm.pool().max_resident();
    for _ in 0..8 {
        run_once(vm, max);
    }
}
