//! The run's configuration values, a leaf module (it imports nothing from
//! the rest of vkvm): the guest-physical layout's limits and defaults, the
//! value types of the command line, and the parsers of their text. The
//! command line (`cli.rs`), guest memory and the loaders all take them from
//! here, so none of them has to import another to learn a limit.

use std::path::PathBuf;

/// RAM stays below the 32-bit MMIO hole.
pub const MAX_MEMORY: u64 = 3 << 30;
/// Mapped files and windows must end below the local APIC, I/O APIC and firmware.
pub const MAX_GPA: u64 = 0xF000_0000;
/// Guest page size.
const PS: u64 = 4096;
/// Smallest resident budget: the guest image, its stacks and page tables.
pub const MIN_PHYS_MEM: u64 = 4 << 20;
/// Smallest `--swap-size`: below it pageout has nowhere to go.
pub const MIN_SWAP: u64 = 1 << 20;
/// Longest `--timeout` (30 days): beyond it a timer is no limit at all, and
/// absurd values (1e300) cannot make a Duration.
pub const MAX_TIMEOUT: f64 = 30.0 * 24.0 * 3600.0;

/// Parse `--timeout`: positive, finite, at most [`MAX_TIMEOUT`] seconds.
pub fn parse_timeout(s: &str) -> Result<f64, String> {
    let t: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(t > 0.0 && t <= MAX_TIMEOUT) {
        return Err(format!("'{s}': give more than 0 and at most {MAX_TIMEOUT} seconds (30 days)"));
    }
    Ok(t)
}

/// Parse a guest-physical address: `0x...`, decimal, or a size (`3G`).
pub fn parse_addr(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).map_err(|_| format!("'{s}' is not a hex address")),
        None => parse_size(s),
    }
}

/// Parse `K/N` (0 <= K < N).
pub fn parse_slice(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("'{s}': expected K/N with 0 <= K < N, e.g. 0/8");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (usize, usize) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if k >= n {
        return Err(bad());
    }
    Ok((k, n))
}

/// Parse a duration: `90`, `90s`, `10m`, `2h` (at most a week).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration (examples: 90s, 10m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m or h)")),
    };
    if secs == 0 || secs > 7 * 24 * 3600 {
        return Err(format!("'{s}': a duration from 1 s to a week"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// Parse `64M`, `1G`, `4096K` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 64M, 1G, 1048576)"))?;
    let mult = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 1u64,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("'{s}': unknown size suffix '{suffix}' (use K, M or G)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// `n` bytes in MiB, exactly (up to 8 decimals, no trailing zeros).
pub fn mib(n: u64) -> String {
    let s = format!("{:.8}", n as f64 / (1u64 << 20) as f64);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SwapFault {
    ReadEio,
    ShortRead,
    WriteEio,
    Nospace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultDelivery {
    Auto,
    Uffd,
    Exit,
}

/// A host file mapped into guest-physical space (`--map-file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMap {
    pub path: PathBuf,
    pub gpa: u64,
    /// Bytes to map (page multiple); default the file size rounded up.
    pub len: Option<u64>,
    pub mode: FileMode,
}

/// `--map-file` modes (the pager's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileMode {
    ReadOnly,
    Shared,
    Private,
}

impl FileMode {
    pub fn name(self) -> &'static str {
        match self {
            FileMode::ReadOnly => "ro",
            FileMode::Shared => "shared",
            FileMode::Private => "private",
        }
    }
}

/// Parse `PATH@GPA[,size=LEN][,ro|shared|private]`.
pub fn parse_map_file(s: &str) -> Result<FileMap, String> {
    let (path, rest) =
        s.rsplit_once('@').ok_or_else(|| format!("'{s}': expected PATH@GPA[,size=LEN][,ro|shared|private]"))?;
    let mut parts = rest.split(',');
    let gpa_s = parts.next().unwrap_or_default();
    let gpa = parse_addr(gpa_s).map_err(|e| format!("'{s}': {e}"))?;
    let mut fm = FileMap { path: PathBuf::from(path), gpa, len: None, mode: FileMode::ReadOnly };
    for p in parts {
        match p {
            "ro" => fm.mode = FileMode::ReadOnly,
            "shared" => fm.mode = FileMode::Shared,
            "private" => fm.mode = FileMode::Private,
            _ if p.starts_with("size=") => fm.len = Some(parse_size(&p[5..])?),
            _ => return Err(format!("'{s}': unknown option '{p}' (ro, shared, private, size=LEN)")),
        }
    }
    if path.is_empty() {
        return Err(format!("'{s}': empty file name"));
    }
    if gpa % 4096 != 0 || fm.len.is_some_and(|l| l == 0 || l % 4096 != 0) {
        return Err(format!("'{s}': the address and size must be multiples of 4 KiB"));
    }
    Ok(fm)
}

/// The windows vkvm creates for the bundled guest when no `--vpt-region` is
/// given, so that every bundled VPAGETABLE test finds what it needs: 64 MiB
/// with 4 levels at 3 GiB (region 0, the one most tests use), then 16 MiB
/// with 2 and with 3 levels (for `vpt-levels`). All lie above the largest
/// RAM (3 GiB) and below the 4 GiB the bundled guest identity-maps. A window
/// that a `--map-file` overlaps is left out; other kernels get none (they
/// would not know them).
pub const DEFAULT_WINDOWS: [VptSpec; 3] = [
    VptSpec { gpa: 0xC000_0000, len: 64 << 20, levels: 4 },
    VptSpec { gpa: 0xC400_0000, len: 16 << 20, levels: 2 },
    VptSpec { gpa: 0xC500_0000, len: 16 << 20, levels: 3 },
];

/// `--vpt-region GPA,SIZE[,levels=N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VptSpec {
    pub gpa: u64,
    pub len: u64,
    /// Table levels below the master entry, 1..=4.
    pub levels: u32,
}

/// Parse `GPA,SIZE[,levels=N]` (levels default 4).
pub fn parse_vpt_region(s: &str) -> Result<VptSpec, String> {
    let mut parts = s.split(',');
    let (Some(gpa_s), Some(len_s)) = (parts.next(), parts.next()) else {
        return Err(format!("'{s}': expected GPA,SIZE[,levels=N]"));
    };
    let gpa = parse_addr(gpa_s).map_err(|e| format!("'{s}': {e}"))?;
    let len = parse_size(len_s).map_err(|e| format!("'{s}': {e}"))?;
    let mut levels = 4;
    for p in parts {
        let Some(v) = p.strip_prefix("levels=") else {
            return Err(format!("'{s}': unknown option '{p}' (levels=N)"));
        };
        levels = v.parse().map_err(|_| format!("'{s}': levels '{v}' is not a number"))?;
    }
    if !(1..=pager::vpte::VPTE_MAX_LEVELS).contains(&levels) {
        return Err(format!("'{s}': levels={levels} is out of range (1 to 4)"));
    }
    if !gpa.is_multiple_of(PS) || !len.is_multiple_of(PS) || len == 0 {
        return Err(format!("'{s}': the address and size must be non-zero multiples of 4 KiB"));
    }
    Ok(VptSpec { gpa, len, levels })
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn timeouts_are_positive_finite_and_capped() {
        assert_eq!(parse_timeout("1.5"), Ok(1.5));
        for bad in ["0", "-1", "nan", "inf", "1e300", "2592001", "soon"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(mib(3 << 30), "3072");
        assert_eq!(mib((3 << 30) + 4096), "3072.00390625");
    }

    #[test]
    fn slices_and_durations_parse() {
        use super::{parse_duration, parse_slice};
        assert_eq!(parse_slice("0/8"), Ok((0, 8)));
        assert!(parse_slice("8/8").is_err() && parse_slice("1").is_err() && parse_slice("a/2").is_err());
        assert_eq!(parse_duration("10m").map(|d| d.as_secs()), Ok(600));
        assert_eq!(parse_duration("90").map(|d| d.as_secs()), Ok(90));
        assert!(parse_duration("0s").is_err() && parse_duration("5d").is_err() && parse_duration("9999h").is_err());
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn regions_parse_and_bad_ones_are_named() {
        assert_eq!(parse_vpt_region("0xc0000000,16M"), Ok(VptSpec { gpa: 0xc000_0000, len: 16 << 20, levels: 4 }));
        assert_eq!(parse_vpt_region("3G,8K,levels=2").map(|r| r.levels), Ok(2));
        assert!(parse_vpt_region("3G").unwrap_err().contains("GPA,SIZE"));
        assert!(parse_vpt_region("3G,8K,levels=5").unwrap_err().contains("out of range"));
        assert!(parse_vpt_region("3G,8K,levels=0").unwrap_err().contains("out of range"));
        assert!(parse_vpt_region("0xc0000100,8K").unwrap_err().contains("multiples of 4 KiB"));
        assert!(parse_vpt_region("3G,0").unwrap_err().contains("multiples of 4 KiB"));
        assert!(parse_vpt_region("3G,8K,big").unwrap_err().contains("unknown option"));
    }
}
