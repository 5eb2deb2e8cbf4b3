//! Exit-latency profiling: per exit reason, the time inside KVM_RUN (guest
//! running until it exits, plus the kernel's exit and entry path) and the
//! VMM's own handling (KVM_RUN return to the next KVM_RUN). Switched off it
//! costs one branch per exit; switched on, two clock reads and a histogram
//! increment per exit.

use crate::exit::Reason;
use crate::fault::FaultStages;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::sync::Mutex;
use std::time::Duration;

/// Highest latency tracked: 60 s in ns; 3 significant digits.
const MAX_NS: u64 = 60_000_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("static histogram bounds are valid")
}

/// One vCPU's histograms, indexed by `Reason`.
pub struct Recorder {
    kvm_run: Vec<Histogram<u64>>,
    handle: Vec<Histogram<u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        let n = Reason::ALL.len();
        Recorder { kvm_run: (0..n).map(|_| histogram()).collect(), handle: (0..n).map(|_| histogram()).collect() }
    }
}

fn ns(d: Duration) -> u64 {
    (d.as_nanos() as u64).clamp(1, MAX_NS)
}

impl Recorder {
    pub fn record(&mut self, r: Reason, kvm_run: Duration, handle: Duration) {
        self.kvm_run[r as usize].saturating_record(ns(kvm_run));
        self.handle[r as usize].saturating_record(ns(handle));
    }
}

/// Fault stages, in the order a uffd-delivered fault goes through them.
const FAULT_STAGES: [&str; 7] = FaultStages::NAMES;

/// Histograms of all vCPUs; each vCPU locks only its own (uncontended).
/// Fault stages are recorded by the fault-delivery thread (one lock per event).
pub struct Profile {
    pub vcpus: Vec<Mutex<Recorder>>,
    pub stages: Mutex<Vec<Histogram<u64>>>,
}

/// Percentile summary of one histogram, in ns.
fn summary(h: &Histogram<u64>) -> Value {
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "max": h.max(),
    })
}

/// Merged histograms for one exit reason.
pub struct ReasonStats {
    pub reason: Reason,
    pub kvm_run: Histogram<u64>,
    pub handle: Histogram<u64>,
}

impl Profile {
    pub fn new(vcpus: u32) -> Self {
        Profile {
            vcpus: (0..vcpus).map(|_| Mutex::new(Recorder::default())).collect(),
            stages: Mutex::new(FAULT_STAGES.iter().map(|_| histogram()).collect()),
        }
    }

    /// One fault's (or one uffd event's) time per stage; stages it did not
    /// go through (zero) are not recorded, so counts say how often each ran.
    pub fn record_stages(&self, t: &FaultStages) {
        let mut h = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        for (i, d) in t.all().iter().enumerate() {
            if !d.is_zero() {
                h[i].saturating_record(ns(*d));
            }
        }
    }

    pub fn stages_json(&self) -> Value {
        let h = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = Map::new();
        for (i, name) in FAULT_STAGES.iter().enumerate() {
            m.insert((*name).into(), json!({ "count": h[i].len(), "ns": summary(&h[i]) }));
        }
        Value::Object(m)
    }

    /// The fault-stage table `vkvm profile` prints.
    pub fn stages_table(&self) -> String {
        let h = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = format!("{:<14} {:>9}  {:>38}\n", "fault stage", "count", "p50/p90/p99/max (us)");
        for (i, name) in FAULT_STAGES.iter().enumerate() {
            let us = |v: u64| v as f64 / 1000.0;
            let x = &h[i];
            t += &format!(
                "{:<14} {:>9}  {:>8.2} {:>8.2} {:>8.2} {:>9.2}\n",
                name,
                x.len(),
                us(x.value_at_quantile(0.5)),
                us(x.value_at_quantile(0.9)),
                us(x.value_at_quantile(0.99)),
                us(x.max())
            );
        }
        t
    }

    /// Per-reason histograms merged over the vCPUs, reasons with exits only.
    pub fn merged(&self) -> Vec<ReasonStats> {
        let mut out = Vec::new();
        for &r in Reason::ALL.iter() {
            let (mut k, mut h) = (histogram(), histogram());
            for v in &self.vcpus {
                let v = v.lock().unwrap_or_else(|e| e.into_inner());
                // Same bounds on both sides: adding cannot fail.
                let _ = k.add(&v.kvm_run[r as usize]);
                let _ = h.add(&v.handle[r as usize]);
            }
            if !k.is_empty() {
                out.push(ReasonStats { reason: r, kvm_run: k, handle: h });
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for s in self.merged() {
            m.insert(
                s.reason.name().into(),
                json!({ "count": s.kvm_run.len(), "kvm_run_ns": summary(&s.kvm_run), "handle_ns": summary(&s.handle) }),
            );
        }
        Value::Object(m)
    }

    /// The table `vkvm profile` prints.
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:<14} {:>9}  {:>38}  {:>38}\n",
            "exit reason", "count", "KVM_RUN p50/p90/p99/max (us)", "VMM handling p50/p90/p99/max (us)"
        );
        let q = |h: &Histogram<u64>| {
            let us = |v: u64| v as f64 / 1000.0;
            format!(
                "{:>8.2} {:>8.2} {:>8.2} {:>9.2}",
                us(h.value_at_quantile(0.5)),
                us(h.value_at_quantile(0.9)),
                us(h.value_at_quantile(0.99)),
                us(h.max())
            )
        };
        for s in self.merged() {
            t += &format!(
                "{:<14} {:>9}  {:>38}  {:>38}\n",
                s.reason.name(),
                s.kvm_run.len(),
                q(&s.kvm_run),
                q(&s.handle)
            );
        }
        t
    }
}

/// Draw every histogram on one chart: x = latency (log scale), y = share
/// of that reason's exits per bucket (buckets grow by 2^(1/4)).
pub fn write_svg(path: &std::path::Path, series: &[(String, &Histogram<u64>)]) -> Result<(), String> {
    use plotters::prelude::*;
    let buckets = |h: &hdrhistogram::Histogram<u64>| -> Vec<(f64, f64)> {
        let total = h.len().max(1) as f64;
        let mut pts = Vec::new();
        let mut lo = 100.0f64; // 100 ns
        while lo < MAX_NS as f64 && lo <= h.max() as f64 * 1.2 {
            let hi = lo * 2f64.powf(0.25);
            let c = h.count_between(lo as u64, hi as u64) as f64;
            pts.push(((lo * hi).sqrt() / 1000.0, c / total));
            lo = hi;
        }
        pts
    };
    let all: Vec<(String, Vec<(f64, f64)>)> = series.iter().map(|(n, h)| (n.clone(), buckets(h))).collect();
    let xmax = all.iter().flat_map(|(_, p)| p.iter().map(|&(x, _)| x)).fold(1.0f64, f64::max) * 1.5;
    let ymax = all.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y)).fold(0.01f64, f64::max) * 1.1;
    let root = SVGBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("vkvm exit and fault-stage latency histograms", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((0.1f64..xmax).log_scale(), 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("latency (us, log scale)")
        .y_desc("share of samples per bucket (each series sums to 1)")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (name, pts)) in all.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn merged_percentiles_and_json_reflect_recorded_exits() {
        let p = Profile::new(2);
        for i in 1..=100u64 {
            p.vcpus[(i % 2) as usize].lock().unwrap().record(
                Reason::IoOut,
                Duration::from_micros(i),
                Duration::from_nanos(500),
            );
        }
        let j = p.to_json();
        assert_eq!(j["io_out"]["count"], 100);
        let p50 = j["io_out"]["kvm_run_ns"]["p50"].as_u64().unwrap();
        assert!((49_000..=51_000).contains(&p50), "{p50}");
        assert!(j.get("io_in").is_none());
        assert!(p.table().contains("io_out"));
    }

    #[test]
    fn svg_is_written_with_labels() {
        let p = Profile::new(1);
        p.vcpus[0].lock().unwrap().record(Reason::IoOut, Duration::from_micros(25), Duration::from_micros(2));
        let m = p.merged();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.svg");
        write_svg(&f, &[("io_out kvm_run".into(), &m[0].kvm_run), ("io_out handle".into(), &m[0].handle)]).unwrap();
        let s = std::fs::read_to_string(&f).unwrap();
        assert!(s.starts_with("<svg") && s.contains("io_out kvm_run") && s.contains("log scale"), "{}", &s[..200]);
    }
}
