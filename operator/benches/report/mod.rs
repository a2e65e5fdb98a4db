//! Bench output: a table on stdout and the same rows as JSON in `bench/out/<name>.json`
//! (`SIGIL_BENCH_OUT` overrides the directory), for `make bench` and for notes.
#![allow(dead_code, unreachable_pub, missing_debug_implementations)]

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

    /// A "metric | Sigil | SPIRE | ratio" row where less is better (latency, memory); the
    /// ratio is SPIRE/Sigil, above 1 when Sigil is better.
    pub fn lower_better(&mut self, what: &str, sigil: f64, spire: f64, unit: &str) {
        let ratio = if sigil > 0.0 {
            format!("{:>7.2}", spire / sigil)
        } else {
            "    n/a (Sigil below resolution)".to_owned()
        };
        self.row(
            what,
            format!(
                "Sigil {sigil:>10.2} {unit} | SPIRE {spire:>10.2} {unit} | SPIRE/Sigil {ratio}"
            ),
        );
    }

    /// A "metric | Sigil | SPIRE | ratio" row where more is better (throughput); the ratio
    /// is Sigil/SPIRE, above 1 when Sigil is better.
    pub fn higher_better(&mut self, what: &str, sigil: f64, spire: f64, unit: &str) {
        let ratio = if spire > 0.0 {
            format!("{:>7.2}", sigil / spire)
        } else {
            "    n/a".to_owned()
        };
        self.row(
            what,
            format!(
                "Sigil {sigil:>10.0} {unit} | SPIRE {spire:>10.0} {unit} | Sigil/SPIRE {ratio}"
            ),
        );
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

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}
