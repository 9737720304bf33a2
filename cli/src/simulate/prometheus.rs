//! `simulate --metrics`: a Prometheus recorder for the run, and its text
//! rendering printed after the summary (the names are listed in
//! `docs/observability.md`).
//!
//! `metrics` has one recorder per process, so only the command installs
//! it, never [`super::simulate`], which `demo` and the tests call too. The
//! exporter is built without its HTTP listener: the run prints what it
//! measured once, at the end.

use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Upper bounds of the duration histograms' buckets, in seconds: 10 µs to
/// 10 s, about three per decade (an in-memory Update takes tens of
/// microseconds, a Postgres one milliseconds).
const BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often the recorder folds the samples it buffered into its
/// histograms while the run goes on, so a long run holds buckets rather
/// than every sample.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The installed recorder.
pub(super) struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the recorder for the rest of the process.
    pub(super) fn install() -> anyhow::Result<Self> {
        let handle = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .context("the histogram buckets")?
            .install_recorder()
            .context("installing the metrics recorder")?;
        Ok(Metrics { handle })
    }

    /// Folds buffered samples into the histograms every [`UPKEEP_EVERY`],
    /// until the task running it is aborted.
    pub(super) fn upkeep(&self) -> impl Future<Output = ()> + Send + 'static {
        let handle = self.handle.clone();
        async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        }
    }

    /// Everything recorded, in the Prometheus text format, after a comment
    /// line that a scraper of the output skips.
    pub(super) fn render(&self) -> String {
        format!(
            "# metrics at the end of the run (Prometheus text format)\n{}",
            self.handle.render()
        )
    }
}
