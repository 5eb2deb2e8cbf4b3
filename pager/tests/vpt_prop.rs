//! Property test of the vpte walker: random (hostile) tables, masters,
//! levels and bounds over guest RAM; the walk must never panic, never reach
//! outside RAM, and agree with a plain model of the translation (V, RW
//! combined across levels, NX, PS at any level, the M rule for read faults,
//! frame bounds). Default 1000 cases (well under a second in release); PROPTEST_CASES overrides.
mod common;
use ::pager::vpte::*;
use ::pager::*;
use common::*;
use proptest::prelude::*;

const R: u64 = 0x1000_0000;
const V: u64 = 0x8000_0000;
/// Pages of RAM (the window's target).
const P: u64 = 48;
/// Pages of the window.
const W: u64 = 1024;

#[derive(Debug, Clone)]
struct Path {
    va: u64,
    /// Table pages below the master (the first is replaced by the master's).
    tables: Vec<u64>,
    leaf: u64,
    /// Flags of the entries at levels 1..=levels.
    flags: Vec<Vpte>,
}

#[derive(Debug, Clone)]
struct Case {
    levels: u32,
    bound: u64,
    master: Vpte,
    /// Walk paths written into the tables (later ones may overwrite earlier
    /// ones' entries).
    paths: Vec<Path>,
    /// Hostile words anywhere in RAM: (page, index, value).
    noise: Vec<(u64, usize, Vpte)>,
    /// (path index or random page, offset -1..=1, access 0 read / 1 write / 2 exec).
    accesses: Vec<(prop::sample::Index, Option<u64>, i8, u8)>,
}

fn flags_strategy() -> impl Strategy<Value = Vpte> {
    let any_flags = prop::sample::subsequence(vec![VPTE_V, VPTE_RW, VPTE_PS, VPTE_NX, VPTE_M, VPTE_A, VPTE_U], 0..=7)
        .prop_map(|f| f.into_iter().fold(0, |a, b| a | b));
    prop_oneof![
        16 => Just(VPTE_V | VPTE_RW),
        1 => Just(VPTE_V),
        1 => Just(VPTE_V | VPTE_RW | VPTE_M),
        1 => Just(VPTE_V | VPTE_RW | VPTE_NX),
        2 => any_flags,
    ]
}

fn vpte_strategy() -> impl Strategy<Value = Vpte> {
    prop_oneof![
        3 => (0..P + 8, flags_strategy()).prop_map(|(p, f)| vpte_make(p, f)),
        1 => any::<u64>(),
        1 => any::<u64>().prop_map(|x| x | VPTE_V),
    ]
}

fn path_strategy() -> impl Strategy<Value = Path> {
    (
        0..W,
        prop::collection::vec(prop_oneof![8 => 0..P, 1 => P..P + 8], 4),
        prop_oneof![8 => 0..P, 1 => P..P + 8, 1 => any::<u64>().prop_map(|x| x >> 12)],
        prop::collection::vec(flags_strategy(), 4),
    )
        .prop_map(|(va, tables, leaf, flags)| Path { va, tables, leaf, flags })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1u32..=4,
        prop_oneof![2 => Just(P), 1 => 1..P + 16],
        prop_oneof![6 => (0..P, flags_strategy()).prop_map(|(p, f)| vpte_make(p, f)), 1 => vpte_strategy()],
        prop::collection::vec(path_strategy(), 1..6),
        prop::collection::vec((0..P, 0usize..512, vpte_strategy()), 0..16),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                prop::option::weighted(0.1, 0..W),
                prop_oneof![6 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)],
                0u8..3,
            ),
            1..24,
        ),
    )
        .prop_map(|(levels, bound, master, paths, noise, accesses)| Case {
            levels,
            bound,
            master,
            paths,
            noise,
            accesses,
        })
}

/// Writes the paths' entries, then the noise.
fn write_tables(map: &Map, c: &Case) {
    let put = |page: u64, idx: u64, v: Vpte| {
        if page < P {
            write_guest(map, R + page * PS + idx * 8, &v.to_le_bytes()).unwrap();
        }
    };
    for p in &c.paths {
        let mut table = vpte_pindex(c.master);
        for k in 1..=c.levels as usize {
            let idx = (p.va >> (9 * (c.levels as usize - k))) & 511;
            let next = if k == c.levels as usize { p.leaf } else { p.tables[k] };
            put(table, idx, vpte_make(next, p.flags[k - 1]));
            table = next;
        }
    }
    for &(page, idx, v) in &c.noise {
        put(page, idx as u64, v);
    }
}

/// What the walk must give: the RAM page and whether it is mapped writable
/// and executable, or the error.
fn model(read: &dyn Fn(u64, usize) -> Vpte, c: &Case, va: u64, access: Prot) -> Result<(u64, bool, bool), FaultError> {
    let (write, exec) = (access.writable(), access.contains(Prot::EXEC));
    let ram = |f: u64| f < c.bound && f < P;
    let mut vpte = c.master;
    let mut shift = 9 * c.levels;
    let (mut write_ok, mut nx) = (true, false);
    loop {
        if vpte & VPTE_V == 0 {
            return Err(FaultError::InvalidVpte);
        }
        if vpte & VPTE_RW == 0 {
            write_ok = false;
            if write {
                return Err(FaultError::InvalidVpte);
            }
        }
        if vpte & VPTE_NX != 0 {
            nx = true;
            if exec {
                return Err(FaultError::InvalidVpte);
            }
        }
        if vpte & VPTE_PS != 0 || shift == 0 {
            break;
        }
        let f = vpte_pindex(vpte);
        if !ram(f) {
            return Err(FaultError::Protection);
        }
        shift -= 9;
        vpte = read(f, ((va >> shift) & 511) as usize);
    }
    let frame = vpte_pindex(vpte) + (va & ((1u64 << shift) - 1));
    if !ram(frame) {
        return Err(FaultError::Protection);
    }
    let writable = write_ok && (write || vpte & (VPTE_RW | VPTE_M) == VPTE_RW | VPTE_M);
    Ok((frame, writable, !nx))
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn vpte_walk_agrees_with_the_model(c in case_strategy()) {
        let vm = vm(4096);
        let m = machine(&vm);
        let ram = vm.anonymous(P);
        m.map.map_object(R, P * PS, ram.clone(), 0, Prot::ALL, Prot::ALL, Inherit::Copy, false).unwrap();
        m.map.map_vpagetable(V, W * PS, R, c.bound, c.levels).unwrap();
        write_tables(&m.map, &c);
        m.map.setmap(V, c.master).unwrap();
        for (pi, random, delta, a) in &c.accesses {
            let va = random.unwrap_or_else(|| pi.get(&c.paths).va).saturating_add_signed(*delta as i64).min(W - 1);
            let access = [Prot::READ, Prot::WRITE, Prot::EXEC][*a as usize];
            // The tables as they are now (earlier walks set A/M in them).
            let read = |f: u64, i: usize| {
                let mut b = [0u8; 8];
                read_guest(&m.map, R + f * PS + i as u64 * 8, &mut b).unwrap();
                u64::from_le_bytes(b)
            };
            let want = model(&read, &c, va, access);
            let got = fault(&m.map, V + va * PS, access, FaultFlags::NONE);
            match (want, got) {
                (Err(w), Err(g)) => prop_assert_eq!(w, g, "va page {} {:?}", va, access),
                (Ok((frame, wr, ex)), Ok(r)) => {
                    let (owner, _, f) = m.map.resident_page(R + frame * PS).expect("the RAM page is resident");
                    prop_assert_eq!(owner.id(), m.map.object_at(R).unwrap().id(), "RAM's own page");
                    prop_assert_eq!(r.frame, f, "va page {} -> RAM page {}", va, frame);
                    prop_assert_eq!(r.prot.writable(), wr, "write permission, va page {} {:?}", va, access);
                    prop_assert_eq!(r.prot.contains(Prot::EXEC), ex, "exec permission, va page {}", va);
                }
                (w, g) => prop_assert!(false, "va page {} {:?}: model {:?}, walk {:?}", va, access, w, g.map(|r| r.frame)),
            }
        }
        // Nothing outside RAM was touched through the window.
        prop_assert!(ram.resident_pindexes().iter().all(|&p| p < P));
        let top = m.map.object_at(R).unwrap();
        prop_assert!(top.resident_pindexes().iter().all(|&p| p < P));
    }
}
