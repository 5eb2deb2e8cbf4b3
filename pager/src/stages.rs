//! Optional timing of a fault's stages, for the VMM's profiler: map lookup,
//! shadow-chain walk, pager I/O, copy/zero, and pmap install. Off (the
//! default) it costs one thread-local flag check per stage; on, the times
//! accumulate per thread until `take` hands them over and resets them.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// A stage of `fault()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Map lookup and entry checks (`vm_map_lookup`).
    Lookup = 0,
    /// Walking the shadow chain to the page (copy/zero excluded).
    ChainWalk = 1,
    /// The pager's I/O (`vm_pager_get_pages`).
    PagerIo = 2,
    /// Copying a page (COW) or allocating a zero page.
    CopyZero = 3,
    /// Entering the page (and prefaulted neighbours) in the pmap.
    Install = 4,
}

/// Number of stages.
pub const STAGES: usize = 5;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static ACC: Cell<[u64; STAGES]> = const { Cell::new([0; STAGES]) };
}

/// Turn stage timing on or off for the calling thread.
pub fn enable(on: bool) {
    ON.with(|c| c.set(on));
}

/// The stage times accumulated on this thread since the last `take`.
pub fn take() -> [Duration; STAGES] {
    let a = ACC.with(|c| c.replace([0; STAGES]));
    // The chain walk's time includes the copy/zero done inside it.
    let mut out = a.map(Duration::from_nanos);
    out[Stage::ChainWalk as usize] = out[Stage::ChainWalk as usize].saturating_sub(out[Stage::CopyZero as usize]);
    out
}

/// Run `f`, adding its time to `stage` when timing is on.
#[inline]
pub(crate) fn timed<R>(stage: Stage, f: impl FnOnce() -> R) -> R {
    if !ON.with(|c| c.get()) {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let ns = t0.elapsed().as_nanos() as u64;
    ACC.with(|c| {
        let mut a = c.get();
        a[stage as usize] += ns;
        c.set(a);
    });
    r
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn stages_accumulate_only_when_enabled_and_take_resets() {
        timed(Stage::Lookup, || std::thread::sleep(Duration::from_millis(1)));
        assert_eq!(take(), [Duration::ZERO; STAGES]);
        enable(true);
        timed(Stage::ChainWalk, || timed(Stage::CopyZero, || std::thread::sleep(Duration::from_millis(2))));
        timed(Stage::Install, || std::thread::sleep(Duration::from_millis(1)));
        let t = take();
        enable(false);
        assert!(t[Stage::CopyZero as usize] >= Duration::from_millis(2));
        assert!(t[Stage::ChainWalk as usize] < Duration::from_millis(1), "copy time not subtracted: {t:?}");
        assert!(t[Stage::Install as usize] >= Duration::from_millis(1));
        assert_eq!(take(), [Duration::ZERO; STAGES]);
    }
}
