//! Latency samples and how the benchmarks print them: shared by `wasnap bench` and the
//! workspace's dev benchmark `wasnap-bench`, so both print the same figures.

use std::time::{Duration, Instant};

use wasnap::error::Result;

/// A set of latency samples: percentiles and throughput.
#[derive(Debug)]
pub struct Stats {
    pub(crate) n: usize,
    total: Duration,
    samples: Vec<Duration>,
}

impl Stats {
    /// The statistics of `samples` (in any order).
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let total = samples.iter().sum();
        Stats { n: samples.len(), total, samples }
    }
    /// The `p` quantile (0.5 for the median, 1.0 for the maximum); zero without samples.
    pub fn pct(&self, p: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.samples.len() - 1) as f64 * p).round() as usize;
        self.samples[i]
    }
    /// Operations per second, had they run one after another.
    pub fn per_sec(&self) -> f64 {
        self.n as f64 / self.total.as_secs_f64().max(1e-9)
    }
}

/// A duration as the benchmark tables show it: `263.6 µs`, `3.43 ms`.
pub fn fmt_d(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 { format!("{us:.1} µs") } else { format!("{:.2} ms", us / 1000.0) }
}

/// How long `f` took (its error, if it failed).
pub(crate) fn timed(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}
