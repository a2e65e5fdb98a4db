//! Bench output: a table on stdout and the same rows as JSON in `bench/out/<name>.json`
//! (`SIGIL_BENCH_OUT` overrides the directory), for `make bench` and for notes.

use std::time::Duration;

/// Rows of one bench run.
pub struct Report {
    name: &'static str,
    rows: Vec<serde_json::Value>,
}

impl Report {
    pub fn new(name: &'static str, title: &str) -> Self {
        println!("{title}");
        println!("{}", "-".repeat(110));
        Self {
            name,
            rows: Vec::new(),
        }
    }

    /// A row with a free-form value.
    pub fn row(&mut self, what: &str, value: String) {
        println!("{what:<62} {value}");
        self.rows
            .push(serde_json::json!({"what": what, "value": value}));
    }

    /// A "metric | Sigil | SPIRE | who is ahead" row where less is better (latency,
    /// memory).
    pub fn lower_better(&mut self, what: &str, sigil: f64, spire: f64, unit: &str) {
        let advantage = (sigil > 0.0).then(|| spire / sigil);
        self.versus(
            what,
            [sigil, spire],
            [
                format!("{sigil:>10.2} {unit}"),
                format!("{spire:>10.2} {unit}"),
            ],
            unit,
            advantage.ok_or("Sigil below resolution"),
        );
    }

    /// A "metric | Sigil | SPIRE | who is ahead" row where more is better (throughput).
    pub fn higher_better(&mut self, what: &str, sigil: f64, spire: f64, unit: &str) {
        let advantage = (spire > 0.0).then(|| sigil / spire);
        self.versus(
            what,
            [sigil, spire],
            [
                format!("{sigil:>10.0} {unit}"),
                format!("{spire:>10.0} {unit}"),
            ],
            unit,
            advantage.ok_or("SPIRE did none"),
        );
    }

    /// A "metric | Sigil | SPIRE | who is ahead" row. The last column reads the same way
    /// on every row, whichever way the metric points: the system ahead, and by how many
    /// times (`advantage` is Sigil's, above 1 when Sigil is ahead; `Err` says why there
    /// is none). The JSON row keeps both figures, the unit and `sigil_advantage`, so runs
    /// can be compared over time.
    pub fn versus(
        &mut self,
        what: &str,
        [sigil, spire]: [f64; 2],
        [sigil_text, spire_text]: [String; 2],
        unit: &str,
        advantage: Result<f64, &str>,
    ) {
        let ahead = match advantage {
            Ok(a) if a > 1.0 => format!("Sigil ahead ×{a:.2}"),
            Ok(a) if a < 1.0 && a > 0.0 => format!("SPIRE ahead ×{:.2}", 1.0 / a),
            // Neither above nor below 1.
            Ok(a) if a > 0.0 => "even".to_owned(),
            Ok(_) => "n/a (Sigil did none)".to_owned(),
            Err(why) => format!("n/a ({why})"),
        };
        let value = format!("Sigil {sigil_text} | SPIRE {spire_text} | {ahead}");
        println!("{what:<62} {value}");
        self.rows.push(serde_json::json!({
            "what": what, "value": value, "sigil": sigil, "spire": spire, "unit": unit,
            "sigil_advantage": advantage.ok(),
        }));
    }

    /// A row summarising latencies: p50, p99 and max (JSON in microseconds).
    pub fn latencies(&mut self, what: &str, mut v: Vec<Duration>) {
        v.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let (p50, p99, max) = (
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or_default(),
        );
        println!(
            "{what:<62} p50 {p50:>9.1?}  p99 {p99:>9.1?}  max {max:>9.1?}  (n={})",
            v.len()
        );
        self.rows.push(serde_json::json!({"what": what, "n": v.len(), "p50_us": us(p50), "p99_us": us(p99), "max_us": us(max)}));
    }

    /// Writes the JSON file and says where.
    pub fn finish(self) {
        let dir = std::env::var("SIGIL_BENCH_OUT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out")
            });
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{}.json", self.name));
        let doc = serde_json::json!({"bench": self.name, "rows": self.rows});
        match std::fs::write(
            &path,
            serde_json::to_string_pretty(&doc).unwrap_or_default(),
        ) {
            Ok(()) => println!("(written to {})", path.display()),
            Err(e) => println!("(could not write {}: {e})", path.display()),
        }
    }
}

/// A size from the environment variable `name`, or `default`.
/// The runtime every bench runs in: two worker threads, the size of the machine the
/// figures are read on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Calls `f` for `window` and returns calls per second.
pub fn rate(window: Duration, mut f: impl FnMut()) -> f64 {
    let started = std::time::Instant::now();
    let mut n = 0u64;
    while started.elapsed() < window {
        f();
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The value at fraction `p` of `sorted` (nearest rank); the default (zero) when empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}
