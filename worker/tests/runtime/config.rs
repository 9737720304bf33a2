//! A configuration that cannot work is refused with a typed error before
//! anything starts. (Store-independent: checked on the in-memory store.)

use std::time::Duration;

use chatstate::Options;
use chatstate_worker::{ConfigError, Runtime, Timing};

use crate::backend::{Backend, Mem};
use crate::handlers::Turn;

#[tokio::test]
async fn bad_configurations_are_refused() {
    let b = Mem::new().await;
    let (done, _turns) = tokio::sync::mpsc::unbounded_channel();
    let builder = || Runtime::builder(b.store(), b.notify(), Turn { done: done.clone() });
    let stale = Options::default().heartbeat_stale;
    let cases: [(&str, Result<Runtime, ConfigError>); 4] = [
        ("capacity 0", builder().capacity(0).spawn()),
        (
            "heartbeat at staleness",
            builder().heartbeat_interval(stale).spawn(),
        ),
        (
            "heartbeat zero",
            builder().heartbeat_interval(Duration::ZERO).spawn(),
        ),
        (
            "sweep zero",
            builder().sweep_interval(Duration::ZERO).spawn(),
        ),
    ];
    for (name, result) in cases {
        let err = result.expect_err(name);
        let ok = matches!(
            (name, &err),
            ("capacity 0", ConfigError::ZeroCapacity)
                | (
                    "heartbeat at staleness" | "heartbeat zero",
                    ConfigError::HeartbeatInterval { .. }
                )
                | ("sweep zero", ConfigError::ZeroSweepInterval)
        );
        assert!(ok, "{name}: {err}");
    }
}

#[tokio::test]
async fn defaults_follow_heartbeat_stale() {
    let b = Mem::new().await;
    let (done, _turns) = tokio::sync::mpsc::unbounded_channel();
    let options = Options {
        heartbeat_stale: Duration::from_secs(30),
        ..Options::default()
    };
    let runtime = Runtime::builder(b.store(), b.notify(), Turn { done })
        .options(options)
        .spawn()
        .unwrap();
    let timing: Timing = runtime.timing();
    assert_eq!(timing, Timing::derived(&options));
    assert_eq!(
        (
            timing.heartbeat_interval,
            timing.sweep_interval,
            timing.grace
        ),
        (
            Duration::from_secs(10),
            Duration::from_secs(15),
            Duration::from_secs(10)
        )
    );
    runtime.shutdown().await;
}
