//! `chatstate bench --store pg --pgbouncer`: CommitStep by the route the
//! store takes to the server, in one run on the throwaway cluster: direct
//! (`Pooling::Session`), through PgBouncer in session mode (the same
//! store), and through PgBouncer in transaction mode
//! (`Pooling::Transaction`). The routes alternate within each repetition,
//! so a drift of the machine's speed lands on every route alike.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chatstate_store_pg::{PgStore, Pooling, pool_options_for};
use chatstate_testing::pgbouncer::{PgBouncer, PoolMode};
use chatstate_testing::throwaway::Cluster;
use serde::Serialize;

use super::{Case, Counter, Kind, Row, Shape, run_case};

/// One route to the server.
struct Route {
    name: &'static str,
    store: PgStore,
}

/// One measured case of one route in one repetition.
#[derive(Clone, Debug, Serialize)]
pub(super) struct RouteRow {
    route: &'static str,
    repetition: usize,
    #[serde(flatten)]
    row: Row,
}

/// The routes to the database of `direct` (a throwaway cluster's), and
/// the PgBouncers they run through (dropping them stops them).
async fn routes(direct: PgStore) -> anyhow::Result<(Vec<Route>, Vec<PgBouncer>)> {
    let database = direct
        .pool()
        .connect_options()
        .get_database()
        .context("the benchmark database has a name")?
        .to_owned();
    // One server connection per client connection a store may hold, so
    // no client waits for the pooler in either mode.
    let by_session = tokio::task::spawn_blocking(move || {
        PgBouncer::start(Cluster::shared()?, PoolMode::Session, 20)
    })
    .await?
    .context("starting PgBouncer in session mode")?;
    let by_transaction = tokio::task::spawn_blocking(move || {
        PgBouncer::start(Cluster::shared()?, PoolMode::Transaction, 8)
    })
    .await?
    .context("starting PgBouncer in transaction mode")?;
    let session = PgStore::new(
        pool_options_for(Pooling::Session)
            .connect_with(by_session.connect_options(&database))
            .await
            .context("connecting through PgBouncer (session mode)")?,
    );
    let transaction = PgStore::new(
        pool_options_for(Pooling::Transaction)
            .connect_with(by_transaction.connect_options(&database))
            .await
            .context("connecting through PgBouncer (transaction mode)")?,
    )
    .with_pooling(Pooling::Transaction);
    for store in [&direct, &session, &transaction] {
        store.check_pooling().await.context("checking a route")?;
    }
    let routes = vec![
        Route {
            name: "direct",
            store: direct,
        },
        Route {
            name: "pgbouncer session mode",
            store: session,
        },
        Route {
            name: "pgbouncer transaction mode",
            store: transaction,
        },
    ];
    Ok((routes, vec![by_session, by_transaction]))
}

/// Measures CommitStep on every route, `repeat` times, alternating.
pub(super) async fn measure(
    direct: PgStore,
    seconds: Duration,
    repeat: usize,
) -> anyhow::Result<Vec<RouteRow>> {
    let (routes, _bouncers) = routes(direct).await?;
    let mut rows = Vec::new();
    for repetition in 0..repeat.max(1) {
        // Rotate the order too: no route always runs first.
        for i in 0..routes.len() {
            let route = &routes[(i + repetition) % routes.len()];
            let counter = {
                let s = route.store.clone();
                Arc::new(move || s.round_trips()) as Counter
            };
            for (clients, hot) in [(1, false), (8, false)] {
                let case = Case {
                    kind: Kind::CommitStep,
                    shape: Shape::Ours,
                    clients,
                    hot,
                };
                let row = run_case(&route.store, None, &counter, case, seconds).await?;
                rows.push(RouteRow {
                    route: route.name,
                    repetition,
                    row,
                });
            }
        }
    }
    Ok(rows)
}

/// The median and the range of each route and case over the repetitions.
pub(super) fn render(rows: &[RouteRow]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let reps = rows.iter().map(|r| r.repetition).max().map_or(0, |m| m + 1);
    let _ = writeln!(
        s,
        "\nCommitStep by route ({reps} repetition(s), routes alternating; median [min-max])"
    );
    let _ = writeln!(
        s,
        "{:<28} {:>7} {:>24} {:>8} {:>7}",
        "route", "clients", "Updates/s", "p50 ms", "per Upd"
    );
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for r in rows {
        let key = (r.route, r.row.clients);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let same: Vec<&RouteRow> = rows
            .iter()
            .filter(|o| o.route == r.route && o.row.clients == r.row.clients)
            .collect();
        let mut rates: Vec<f64> = same.iter().map(|o| o.row.updates_per_sec).collect();
        rates.sort_by(f64::total_cmp);
        let mut p50: Vec<f64> = same.iter().map(|o| o.row.p50_ms).collect();
        p50.sort_by(f64::total_cmp);
        let trips = same
            .iter()
            .filter(|o| o.row.clients == 1)
            .find_map(|o| o.row.per_update);
        let _ = writeln!(
            s,
            "{:<28} {:>7} {:>24} {:>8.3} {:>7}",
            r.route,
            r.row.clients,
            format!(
                "{:.0} [{:.0}-{:.0}]",
                rates[rates.len() / 2],
                rates[0],
                rates[rates.len() - 1]
            ),
            p50[p50.len() / 2],
            trips.map_or("-".to_owned(), |t| format!("{t:.1}")),
        );
    }
    s
}
