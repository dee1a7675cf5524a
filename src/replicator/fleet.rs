//! The routes of a fan-out as the reader keeps them: which are fed, which are down or too
//! slow and hold the slot where their target stands, which were evicted; and how a route
//! that went away is watched until it can come back.
//!
//! One slot feeds every route, so a route can only be fed what the stream brings now. A
//! route that falls out (its target down, or too slow to keep up) is left behind: the others
//! go on at full speed while it holds the slot at its durable position, so nothing it has not
//! applied is confirmed. Once its target answers again (a probe, with backoff), the session
//! ends and the next one starts the stream at the lowest position of all: the route catches
//! up from its own checkpoint while the others skip what they hold. A route down longer than
//! `--evict-after` stops holding the slot (WAL retention is the source's to bear) and needs
//! a resync; a new session finds its checkpoint behind the slot and leaves it evicted.
//!
//! Without `--routes` there is one route, and none of this applies: any failure of it ends
//! the session, as it always has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::route::RouteHandle;
use super::{APPLICATION_NAME, BACKOFF_MAX, BACKOFF_MIN};
use crate::apply;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::routing::Routes;

/// The least time between two sessions started to let routes back in: each one pauses
/// the routes that were fine for a reconnect (and makes them read again, skipping, what the
/// returning route still needs), so a route that keeps falling behind rejoins in steps, not
/// in a storm. A route left behind again and again waits twice as long each time, up to
/// [`REJOIN_MAX`].
pub(super) const REJOIN_INTERVAL: Duration = Duration::from_secs(10);
const REJOIN_MAX: Duration = Duration::from_secs(300);
/// A route attached this long in one session counts as working again: its backoffs start
/// afresh.
pub(super) const SETTLED: Duration = Duration::from_secs(60);

/// A route as the reader sees it.
pub(super) enum Member {
    /// Fed what the stream brings for it.
    Attached(RouteHandle),
    /// Too slow: told to apply what it holds and end; it still holds the slot where its
    /// target stands, and rejoins once done.
    Draining(RouteHandle),
    /// Down: holds the slot at `held`, its durable position, while a probe waits for it.
    Detached { held: Lsn },
    /// New (no checkpoint yet): holds the slot at `held` while its target is prepared, then
    /// joins the stream and is copied online (see [`super::backfill`]).
    Joining { held: Lsn },
    /// Down past `--evict-after`, or found behind the slot: holds nothing; needs a resync.
    Evicted,
}

impl Member {
    /// The position the slot may be confirmed to for this route's sake; `None`: none
    /// (evicted, it holds nothing).
    pub fn holds(&self) -> Option<Lsn> {
        match self {
            Member::Attached(handle) | Member::Draining(handle) => Some(handle.confirmed()),
            Member::Detached { held } | Member::Joining { held } => Some(*held),
            Member::Evicted => None,
        }
    }

    /// The handle of a route that is fed.
    pub fn fed(&self) -> Option<&RouteHandle> {
        match self {
            Member::Attached(handle) => Some(handle),
            _ => None,
        }
    }

    pub fn state(&self) -> &'static str {
        match self {
            Member::Attached(_) => "active",
            Member::Draining(_) => "draining",
            Member::Detached { .. } => "detached",
            Member::Joining { .. } => "joining",
            Member::Evicted => "evicted",
        }
    }
}

/// What `run` keeps of its routes across sessions.
pub(super) struct Fleet {
    /// Each route's health, in the routes' order.
    pub health: Vec<RouteHealth>,
    /// Routes files read again on SIGHUP.
    pub reload: Option<watch::Receiver<Option<Arc<Routes>>>>,
    /// The config with the routes a session added, for the sessions after it.
    pub next_config: Option<Config>,
    /// A route alone writes with one target connection from now on: a second could not be
    /// opened, or the two deadlocked (see `route::Companion`).
    pub one_connection: bool,
}

impl Fleet {
    pub fn new(routes: usize, reload: Option<watch::Receiver<Option<Arc<Routes>>>>) -> Fleet {
        Fleet {
            health: vec![RouteHealth::default(); routes],
            reload,
            next_config: None,
            one_connection: false,
        }
    }
}

/// The routes of `new` (a routes file read again) that can join a fan-out streaming with
/// `old`: `old`'s routes followed by them, and their indexes. Anything else that changed (a
/// route removed or changed, values moved, a new default, another column) takes effect only
/// when `run` restarts, and is said so; a new route is refused when it would take values
/// another route has (with a default route, every value no route names is the default's).
pub(super) fn merge_added(old: &Routes, new: &Routes) -> (Routes, Vec<usize>) {
    let restart = "takes effect when usersync run restarts";
    if new.by != old.by {
        tracing::warn!("the routes file routes by another column now: {restart}");
    }
    for gone in old
        .routes
        .iter()
        .filter(|r| !new.routes.iter().any(|n| n.name == r.name))
    {
        tracing::warn!(route = %gone.name, "a route removed from the routes file: {restart}");
    }
    let mut merged = old.clone();
    let mut added = Vec::new();
    for (index, spec) in new.routes.iter().enumerate() {
        let name = spec.name.as_str();
        if let Some(existing) = merged.routes.iter().find(|r| r.name == spec.name) {
            if existing != spec {
                tracing::warn!(
                    route = name,
                    "a route changed in the routes file: {restart}"
                );
            }
            continue;
        }
        if new.default == Some(index) {
            tracing::warn!(route = name, "a new default route: {restart}");
            continue;
        }
        if let Some(default) = old.default {
            tracing::warn!(
                route = name,
                default = %old.routes[default].name,
                "a new route would take values from the default route, whose target keeps \
                 those users as they were (docs/fan-out.md, moving a value): {restart}"
            );
            continue;
        }
        let owner = merged
            .routes
            .iter()
            .find(|r| spec.values.iter().any(|v| r.values.contains(v)));
        if let Some(owner) = owner {
            tracing::warn!(
                route = name,
                owner = %owner.name,
                "a value of the new route belongs to another route: moving values is not \
                 supported while running (docs/fan-out.md); the route is not added"
            );
            continue;
        }
        let shared = merged.routes.iter().find(|r| {
            (&r.target.host, r.target.port, &r.target.dbname)
                == (&spec.target.host, spec.target.port, &spec.target.dbname)
        });
        if let Some(shared) = shared {
            tracing::warn!(
                route = name,
                other = %shared.name,
                "the new route writes to another route's database; the route is not added"
            );
            continue;
        }
        if merged.routes.len() >= crate::routing::MAX_ROUTES {
            tracing::warn!(route = name, "too many routes; the route is not added");
            continue;
        }
        merged.routes.push(spec.clone());
        added.push(merged.routes.len() - 1);
    }
    (merged, added)
}

/// What `run` remembers of each route across sessions: since when it is down, and how
/// long its next probe waits.
#[derive(Debug, Default, Clone)]
pub struct RouteHealth {
    down_since: Option<Instant>,
    failures: u32,
    left_behind: u32,
    evicted: bool,
}

impl RouteHealth {
    /// The route failed (or could not start): the next probe waits longer.
    pub fn failed(&mut self) {
        self.down_since.get_or_insert_with(Instant::now);
        self.failures = self.failures.saturating_add(1);
    }

    /// The route made its target durable past where it started: it is not down.
    pub fn progressed(&mut self) {
        self.down_since = None;
    }

    /// The route has been attached for [`SETTLED`]: its backoffs start afresh.
    pub fn settled(&mut self) {
        self.failures = 0;
        self.left_behind = 0;
    }

    /// The route was left behind (too slow) and is done with what it held: how long before
    /// a new session lets it rejoin.
    pub fn left_behind(&mut self) -> Duration {
        self.left_behind = self.left_behind.saturating_add(1);
        let doublings = (self.left_behind - 1).min(8);
        REJOIN_INTERVAL
            .saturating_mul(1 << doublings)
            .min(REJOIN_MAX)
    }

    /// The route stops holding the slot for good (until a resync and a restart of `run`).
    pub fn evict(&mut self) {
        self.evicted = true;
    }

    /// The route is resynced online: it may come back, from where the slot stands.
    pub fn resynced(&mut self) {
        self.evicted = false;
        self.down_since = None;
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted
    }

    /// Whether the route has been down longer than `limit`.
    pub fn down_longer_than(&self, limit: Duration) -> bool {
        self.down_since
            .is_some_and(|since| since.elapsed() >= limit)
    }

    /// How long the next probe waits first.
    pub fn backoff(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        BACKOFF_MIN.saturating_mul(1 << doublings).min(BACKOFF_MAX)
    }
}

/// Waits `delay`, then until route `route`'s target answers with its checkpoint; returns
/// `route`. Backs off while it does not answer.
pub(super) async fn probe(route: usize, config: Config, delay: Duration) -> usize {
    let mut wait = delay;
    let key = config.checkpoint_key();
    loop {
        tokio::time::sleep(wait).await;
        // Ready: it answers, has its checkpoint, and nobody holds its lock (a session that
        // does would fail the route again at once, restarting every route for nothing).
        let ready = tokio::time::timeout(BACKOFF_MAX, async {
            let client = crate::conn::sql::connect(&config.target, APPLICATION_NAME)
                .await
                .ok()?;
            apply::read_checkpoint(&client, &key).await.ok().flatten()?;
            let holders = apply::slot_lock::holders(&client, &key).await.ok()?;
            holders.is_empty().then_some(())
        })
        .await;
        if let Ok(Some(())) = ready {
            return route;
        }
        wait = (wait * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_back_off_and_a_recovery_starts_afresh() {
        let mut health = RouteHealth::default();
        assert!(!health.down_longer_than(Duration::ZERO));
        health.failed();
        assert_eq!(health.backoff(), BACKOFF_MIN);
        health.failed();
        assert_eq!(health.backoff(), BACKOFF_MIN * 2);
        for _ in 0..40 {
            health.failed();
        }
        assert_eq!(health.backoff(), BACKOFF_MAX);
        assert!(health.down_longer_than(Duration::ZERO));
        health.progressed();
        assert!(!health.down_longer_than(Duration::ZERO));
        assert_eq!(health.backoff(), BACKOFF_MAX, "until it has settled");
        health.settled();
        assert_eq!(health.backoff(), BACKOFF_MIN);
    }

    fn routes(text: &str) -> Routes {
        Routes::parse(
            &format!("route_by = \"tenant\"\n{text}"),
            "routes.toml",
            None,
            |_| unreachable!(),
        )
        .unwrap()
    }

    fn route(name: &str, values: &str, db: &str) -> String {
        format!(
            "[[route]]\nname = \"{name}\"\nvalues = [{values}]\ntarget = \"postgresql://u@h/{db}\"\n"
        )
    }

    #[test]
    fn only_new_routes_that_take_nothing_from_others_join_while_running() {
        let old = routes(&(route("a", "\"1\"", "a") + &route("b", "\"2\"", "b")));
        // c is new and its own; a changed (ignored until a restart); b removed (kept).
        let new = routes(
            &(route("a", "\"1\", \"9\"", "a")
                + &route("c", "\"3\"", "c")
                + &route("d", "\"2\"", "d")
                + &route("e", "\"5\"", "b")),
        );
        let (merged, added) = merge_added(&old, &new);
        assert_eq!(
            added,
            vec![2],
            "only c: d takes b's value, e writes to b's database"
        );
        let names: Vec<&str> = merged.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(
            merged.routes[0].values,
            ["1"],
            "a changes only on a restart"
        );
        assert_eq!(merged.router().route(Some("3")), Some(2));
        assert_eq!(merged.router().route(Some("9")), None);
        // With a default route, any new route would take the default's values.
        let with_default = routes(
            &(route("a", "\"1\"", "a")
                + "[[route]]\nname = \"rest\"\ndefault = true\ntarget = \"postgresql://u@h/rest\"\n"),
        );
        let grown = routes(
            &(route("a", "\"1\"", "a")
                + "[[route]]\nname = \"rest\"\ndefault = true\ntarget = \"postgresql://u@h/rest\"\n"
                + &route("c", "\"3\"", "c")),
        );
        let (merged, added) = merge_added(&with_default, &grown);
        assert!(added.is_empty());
        assert_eq!(merged, with_default);
    }

    #[test]
    fn a_route_left_behind_again_and_again_rejoins_less_often() {
        let mut health = RouteHealth::default();
        assert_eq!(health.left_behind(), REJOIN_INTERVAL);
        assert_eq!(health.left_behind(), REJOIN_INTERVAL * 2);
        for _ in 0..20 {
            health.left_behind();
        }
        assert_eq!(health.left_behind(), REJOIN_MAX);
        health.settled();
        assert_eq!(health.left_behind(), REJOIN_INTERVAL);
    }
}
