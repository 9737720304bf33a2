//! Reliable span and event capture in tests that share a process.
//!
//! tracing decides once per callsite, process-wide, whether it is enabled,
//! and while at most one dispatcher exists it asks the subscriber of the
//! thread that reaches the callsite first. A test that reaches a callsite
//! on a thread without a subscriber can so disable it for every later
//! test of the binary, including one that installed a capturing
//! subscriber on its own thread: that test then sees no spans, depending
//! on which test ran first.
//!
//! [`heal_callsites`] makes the outcome independent of the order: it
//! installs, once, a global subscriber that enables everything (a bare
//! registry, which keeps nothing), so every thread sees a real subscriber,
//! and rebuilds the cache of the callsites reached before. Call it after
//! the test's own subscriber exists (after `set_default`, or after
//! building the `Dispatch` it instruments futures with).

use std::sync::Once;

/// Installs the global enabling subscriber (once per process) and
/// re-evaluates every callsite registered so far.
pub fn heal_callsites() {
    static GLOBAL: Once = Once::new();
    GLOBAL.call_once(|| {
        // Fails only if a global subscriber exists, which serves as well.
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
    tracing::callsite::rebuild_interest_cache();
}
