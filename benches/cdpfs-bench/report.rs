//! Measuring one side of a case (elapsed time, what the origin sent, CPU time) and turning the
//! runs' samples into rows of a markdown table: medians, ratio to the raw baseline, bytes
//! fetched / bytes wanted, CPU seconds per GB (of the measured process, and of all taking part).

use std::collections::BTreeMap;
use std::time::Instant;

use crate::origin::OriginProcess;
use crate::raw;

/// One measurement of cdpfs or of the raw baseline.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Elapsed time (for latency cases, the median latency).
    pub seconds: f64,
    /// Bytes the reader asked for.
    pub wanted: u64,
    /// Body bytes the origin sent meanwhile.
    pub fetched: u64,
    /// GETs the origin answered meanwhile.
    pub gets: u64,
    /// LIST pages the origin answered meanwhile.
    pub lists: u64,
    /// CPU seconds of the measured process (cdpfs, or the bench process for raw GETs).
    pub cpu: f64,
    /// CPU seconds of every process taking part: the origin, the measured process and, when
    /// that is cdpfs, the bench process reading through the mount. The machine's cores are
    /// shared by all three, so when they are all busy this bounds the throughput.
    pub machine_cpu: f64,
    /// Which variant this was (e.g. the raw setting that won).
    pub note: String,
}

impl Sample {
    pub fn noted(self, note: impl Into<String>) -> Sample {
        Sample { note: note.into(), ..self }
    }
}

/// Runs `work`, and measures it: elapsed time, the origin's GETs and bytes, and the CPU time
/// `cpu` reports (a process's total so far) over it.
pub fn measure<T>(
    origin: &OriginProcess,
    cpu: Option<&dyn Fn() -> f64>,
    wanted: u64,
    work: impl FnOnce() -> T,
) -> (Sample, T) {
    // The measured process: another one (cdpfs), or this one (`None`: the raw client).
    let measured = || cpu.map_or(0.0, |cpu| cpu());
    let (counters, cpu_before, own_before, started) =
        (origin.counters(), measured(), raw::cpu_seconds(), Instant::now());
    let out = work();
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_after, own_after, after) = (measured(), raw::cpu_seconds(), origin.counters());
    let own = own_after - own_before;
    let sample = Sample {
        seconds,
        wanted,
        fetched: after.bytes - counters.bytes,
        gets: after.gets - counters.gets,
        lists: after.lists - counters.lists,
        cpu: if cpu.is_some() { cpu_after - cpu_before } else { own },
        machine_cpu: (after.cpu - counters.cpu) + (cpu_after - cpu_before) + own,
        note: String::new(),
    };
    (sample, out)
}

/// The fastest of `samples`, noted with its variant.
pub fn best(samples: Vec<Sample>) -> Sample {
    samples.into_iter().min_by(|a, b| a.seconds.total_cmp(&b.seconds)).expect("at least one variant")
}

/// What a row's headline number is.
#[derive(Clone, Copy, Debug)]
pub enum Unit {
    /// Throughput: bytes wanted / elapsed.
    MBps,
    Seconds,
    Millis,
}

impl Unit {
    fn value(self, sample: &Sample) -> f64 {
        match self {
            Unit::MBps => sample.wanted as f64 / sample.seconds / 1e6,
            Unit::Seconds => sample.seconds,
            Unit::Millis => sample.seconds * 1e3,
        }
    }

    fn show(self, value: f64) -> String {
        match self {
            Unit::MBps => format!("{value:.0} MB/s"),
            Unit::Seconds => format!("{value:.2} s"),
            Unit::Millis => format!("{value:.1} ms"),
        }
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of `f` over `samples`.
fn median_of(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(samples.iter().map(f).collect())
}

/// CPU seconds of the measured process per GB wanted.
fn cpu_per_gb(sample: &Sample) -> f64 {
    sample.cpu / (sample.wanted as f64 / 1e9)
}

/// CPU seconds of all processes taking part per GB wanted.
fn machine_cpu_per_gb(sample: &Sample) -> f64 {
    sample.machine_cpu / (sample.wanted as f64 / 1e9)
}

/// `value` with `digits` decimals and `suffix`, or "-" when it is not a number (nothing
/// wanted, no samples).
fn shown(value: f64, digits: usize, suffix: &str) -> String {
    if value.is_finite() {
        format!("{value:.digits$}{suffix}")
    } else {
        "-".into()
    }
}

/// How often each note occurs: "32 in flight" or "32 in flight 2/3, 16 in flight 1/3".
fn tally(samples: &[Sample]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for sample in samples.iter().filter(|s| !s.note.is_empty()) {
        *counts.entry(&sample.note).or_default() += 1;
    }
    match counts.len() {
        0 => String::new(),
        1 => counts.into_keys().next().unwrap().to_owned(),
        _ => counts.iter().map(|(note, n)| format!("{note} {n}/{}", samples.len())).collect::<Vec<_>>().join(", "),
    }
}

/// "N GETs", with ", N LISTs" when there were any (medians).
fn requests(samples: &[Sample]) -> String {
    let (gets, lists) = (median_of(samples, |s| s.gets as f64), median_of(samples, |s| s.lists as f64));
    if lists > 0.0 {
        format!("{gets:.0} GETs, {lists:.0} LISTs")
    } else {
        format!("{gets:.0} GETs")
    }
}

/// One line of the table.
pub struct Row {
    case: String,
    cdpfs: String,
    raw: String,
    ratio: String,
    fetched: String,
    cpu: String,
    raw_cpu: String,
    machine_cpu: String,
    target: String,
}

impl Row {
    /// cdpfs against the raw baseline of the same runs (`raw` may be empty: no baseline).
    pub fn compare(case: impl Into<String>, unit: Unit, cdpfs: &[Sample], raw: &[Sample], target: &str) -> Row {
        let c = median_of(cdpfs, |s| unit.value(s));
        let r = median_of(raw, |s| unit.value(s));
        let note = tally(cdpfs);
        let requests = requests(cdpfs);
        let raw_note = tally(raw);
        Row {
            case: case.into(),
            cdpfs: format!("{}, {requests}{}", unit.show(c), if note.is_empty() { note } else { format!("; {note}") }),
            raw: if raw.is_empty() {
                "-".into()
            } else {
                format!("{}{}", unit.show(r), if raw_note.is_empty() { raw_note } else { format!(" ({raw_note})") })
            },
            ratio: shown(c / r, 2, "x"),
            fetched: shown(median_of(cdpfs, |s| s.fetched as f64 / s.wanted as f64), 2, ""),
            cpu: shown(median_of(cdpfs, cpu_per_gb), 2, ""),
            raw_cpu: shown(median_of(raw, cpu_per_gb), 2, ""),
            machine_cpu: match (median_of(cdpfs, machine_cpu_per_gb), median_of(raw, machine_cpu_per_gb)) {
                (c, r) if c.is_finite() || r.is_finite() => format!("{} / {}", shown(c, 2, ""), shown(r, 2, "")),
                _ => "-".into(),
            },
            target: target.into(),
        }
    }

    /// A row of two cdpfs settings against each other, e.g. disk tier on vs off.
    pub fn versus(
        case: impl Into<String>,
        unit: Unit,
        a: (&str, &[Sample]),
        b: (&str, &[Sample]),
        target: &str,
    ) -> Row {
        let (va, vb) = (median_of(a.1, |s| unit.value(s)), median_of(b.1, |s| unit.value(s)));
        Row {
            case: case.into(),
            cdpfs: format!("{} {}", unit.show(va), a.0),
            raw: format!("{} {}", unit.show(vb), b.0),
            ratio: shown(va / vb, 2, "x"),
            fetched: "-".into(),
            cpu: "-".into(),
            raw_cpu: "-".into(),
            machine_cpu: "-".into(),
            target: target.into(),
        }
    }

    /// Adds a remark to the cdpfs cell.
    pub fn with(mut self, remark: &str) -> Row {
        self.cdpfs = format!("{}; {remark}", self.cdpfs);
        self
    }
}

pub fn print_table(rows: &[Row]) {
    println!(
        "| case | cdpfs | raw baseline | ratio | fetched / wanted | cdpfs CPU s/GB | raw CPU s/GB | all processes' CPU s/GB, cdpfs / raw | target |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.case, r.cdpfs, r.raw, r.ratio, r.fetched, r.cpu, r.raw_cpu, r.machine_cpu, r.target
        );
    }
}
