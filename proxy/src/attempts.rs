//! The attempts of one request (or one TCP connection): which target comes
//! next, whether a failure may be retried, and when to give up. I/O-free:
//! the driver ([`crate::http`], [`crate::tcp`]) reports what happened and
//! passes `now`; the balancer's choice and the retry budget come in as
//! closures, so this is tested on a virtual clock.
//!
//! The rules:
//! - a failure before the first byte (connect refused or unreachable, the
//!   tunnel refused) always fails over to another target: the target never
//!   saw the request;
//! - a pooled connection that died under the request is retried once on
//!   the same target, on a fresh connection, without spending a retry: the
//!   target never saw it either;
//! - after the request was sent, only a replayable (bodiless), idempotent
//!   request is retried, and only while retries and the budget last; a
//!   502, 503 or 504 answer counts as such a failure;
//! - a remote cluster whose tunnel died mid-request may be chosen once more
//!   (a fresh path through another gateway) instead of being skipped;
//! - every attempt ends by the request's deadline; each by its per-try
//!   timeout, if one is set.

use std::time::{Duration, Instant};

/// A target, as far as retries care.
pub trait Hop: Clone + PartialEq {
    /// Whether another attempt on this target may take another path (a
    /// remote cluster, reached through any of several gateways).
    fn has_other_paths(&self) -> bool;
}

/// The per-request knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptPolicy {
    /// Retries after the request was sent.
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
}

/// What the request itself allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// Nothing to resend: the request has no body.
    pub bodiless: bool,
    /// The method may be repeated (RFC 9110 §9.2.2).
    pub idempotent: bool,
}

impl Replay {
    /// A request with `method`, bodiless or not.
    pub fn of(method: &str, bodiless: bool) -> Self {
        Self {
            bodiless,
            idempotent: matches!(
                method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
        }
    }

    /// A TCP connection: it may fail over before its first byte, never after.
    pub const STREAM: Replay = Replay {
        bodiless: false,
        idempotent: false,
    };
}

/// How a sent attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Reset, closed or refused after sending. `reused`: the connection came
    /// from the pool.
    Reset { reused: bool },
    /// No response within the per-try timeout.
    TryTimeout,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<K> {
    Try(Try<K>),
    GiveUp(Ending),
}

/// One attempt to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Try<K> {
    pub target: K,
    /// The same target as the last attempt, which must not use a pooled
    /// connection (the balancer was not asked; count it as started).
    pub fresh_connection: bool,
    /// When this attempt times out: the per-try timeout or the request's
    /// deadline, whichever is first.
    pub until: Instant,
}

/// Why the attempts ended without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The request's deadline passed.
    Deadline,
    /// No target was usable, or none was left untried.
    NoHealthyUpstream,
    /// The last attempt got no response within its per-try timeout.
    LastTimedOut,
    /// The last attempt failed, and no other may follow.
    LastFailed,
}

#[derive(Debug)]
pub struct Attempts<K, E> {
    deadline: Instant,
    policy: AttemptPolicy,
    replay: Replay,
    retries_left: u32,
    /// Targets not to choose again.
    tried: Vec<K>,
    current: Option<K>,
    /// The next attempt is `current` again, on a fresh connection.
    again: bool,
    fresh_path_used: bool,
    /// A failure that no attempt may follow.
    finished: bool,
    last: Option<(K, E, bool)>,
    made: usize,
}

impl<K: Hop, E> Attempts<K, E> {
    pub fn new(deadline: Instant, policy: AttemptPolicy, replay: Replay) -> Self {
        Self {
            deadline,
            policy,
            replay,
            retries_left: policy.retries,
            tried: Vec::new(),
            current: None,
            again: false,
            fresh_path_used: false,
            finished: false,
            last: None,
            made: 0,
        }
    }

    /// The next attempt. `choose` is the balancer: the next target,
    /// skipping those given (already tried), counted as started.
    pub fn next(&mut self, now: Instant, choose: impl FnOnce(&[K]) -> Option<K>) -> Next<K> {
        if self.finished || now >= self.deadline {
            return Next::GiveUp(self.ending(now));
        }
        let (target, fresh_connection) = match (self.again, &self.current) {
            (true, Some(t)) => (t.clone(), true),
            _ => match choose(&self.tried) {
                Some(t) => (t, false),
                None => return Next::GiveUp(self.ending(now)),
            },
        };
        self.again = false;
        self.current = Some(target.clone());
        self.made += 1;
        let until = self
            .policy
            .per_try_timeout
            .map_or(self.deadline, |t| self.deadline.min(now + t));
        Next::Try(Try {
            target,
            fresh_connection,
            until,
        })
    }

    /// What is left of the request's deadline.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.deadline.saturating_duration_since(now)
    }

    /// Attempts made so far.
    pub fn made(&self) -> usize {
        self.made
    }

    /// The current attempt failed before any byte reached the target.
    pub fn not_sent(&mut self, error: E) {
        let Some(t) = self.current.clone() else {
            return;
        };
        self.tried.push(t.clone());
        self.last = Some((t, error, false));
    }

    /// The current attempt failed after sending. `budget` is asked only
    /// when everything else allows a retry, so it is spent only on retries
    /// that happen.
    pub fn sent_failed(&mut self, how: Sent, error: E, budget: impl FnOnce() -> bool) {
        let Some(t) = self.current.clone() else {
            return;
        };
        let timed_out = how == Sent::TryTimeout;
        let stale = how == (Sent::Reset { reused: true }) && self.replay.bodiless;
        if stale {
            self.again = true;
        } else if self.may_retry(budget) {
            // Once per request, a cluster whose tunnel died may be tried
            // again through another path.
            let fresh_path = !self.fresh_path_used && !timed_out && t.has_other_paths();
            if fresh_path {
                self.fresh_path_used = true;
            } else {
                self.tried.push(t.clone());
            }
        } else {
            self.finished = true;
        }
        self.last = Some((t, error, timed_out));
    }

    /// The current attempt was answered with `status`. Returns whether to
    /// retry instead of passing the answer on (a 502, 503 or 504, when a
    /// retry is allowed); `error` then names the failure.
    pub fn answered(
        &mut self,
        status: u16,
        error: impl FnOnce() -> E,
        budget: impl FnOnce() -> bool,
    ) -> bool {
        let Some(t) = self.current.clone() else {
            return false;
        };
        if !matches!(status, 502..=504) || !self.may_retry(budget) {
            return false;
        }
        self.tried.push(t.clone());
        self.last = Some((t, error(), false));
        true
    }

    /// The last failure, with its target.
    pub fn last(&self) -> Option<(&K, &E)> {
        self.last.as_ref().map(|(k, e, _)| (k, e))
    }

    fn may_retry(&mut self, budget: impl FnOnce() -> bool) -> bool {
        let ok =
            self.replay.bodiless && self.retries_left > 0 && self.replay.idempotent && budget();
        if ok {
            self.retries_left -= 1;
        }
        ok
    }

    /// Why the attempts end now.
    pub fn ending(&self, now: Instant) -> Ending {
        match &self.last {
            _ if now >= self.deadline => Ending::Deadline,
            None => Ending::NoHealthyUpstream,
            Some((_, _, true)) => Ending::LastTimedOut,
            Some(_) => Ending::LastFailed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum T {
        Local(u8),
        Remote(u8),
    }

    impl Hop for T {
        fn has_other_paths(&self) -> bool {
            matches!(self, T::Remote(_))
        }
    }

    const MS: Duration = Duration::from_millis(1);
    const POLICY: AttemptPolicy = AttemptPolicy {
        retries: 2,
        per_try_timeout: None,
    };

    /// A balancer over `order`: the first target not yet tried.
    fn first_of(order: &[T]) -> impl Fn(&[T]) -> Option<T> + '_ {
        move |tried: &[T]| order.iter().find(|t| !tried.contains(t)).copied()
    }

    fn try_of(n: Next<T>) -> Try<T> {
        match n {
            Next::Try(t) => t,
            Next::GiveUp(e) => panic!("gave up: {e:?}"),
        }
    }

    fn get(t0: Instant) -> Attempts<T, &'static str> {
        Attempts::new(t0 + 1000 * MS, POLICY, Replay::of("GET", true))
    }

    #[test]
    fn failures_before_the_first_byte_fail_over_whatever_the_method() {
        let t0 = Instant::now();
        let order = [T::Local(1), T::Local(2), T::Remote(3)];
        let mut a: Attempts<T, &str> =
            Attempts::new(t0 + 1000 * MS, POLICY, Replay::of("POST", false));
        for want in order {
            assert_eq!(try_of(a.next(t0, first_of(&order))).target, want);
            a.not_sent("refused");
        }
        assert_eq!(
            a.next(t0, first_of(&order)),
            Next::GiveUp(Ending::LastFailed)
        );
        assert_eq!(a.made(), 3, "no retry was spent on them");
        assert_eq!(a.last(), Some((&T::Remote(3), &"refused")));
    }

    #[test]
    fn nothing_usable_is_no_healthy_upstream() {
        let t0 = Instant::now();
        let mut a = get(t0);
        assert_eq!(
            a.next(t0, |_| None),
            Next::GiveUp(Ending::NoHealthyUpstream)
        );
        assert_eq!(a.made(), 0);
    }

    #[test]
    fn after_sending_only_bodiless_idempotent_requests_are_retried() {
        let t0 = Instant::now();
        let order = [T::Local(1), T::Local(2)];
        for (method, bodiless, retried) in [
            ("GET", true, true),
            ("PUT", true, true),
            ("POST", true, false),
            ("GET", false, false),
            ("PUT", false, false),
        ] {
            let mut a: Attempts<T, &str> =
                Attempts::new(t0 + 1000 * MS, POLICY, Replay::of(method, bodiless));
            try_of(a.next(t0, first_of(&order)));
            let mut asked = false;
            a.sent_failed(Sent::Reset { reused: false }, "reset", || {
                asked = true;
                true
            });
            assert_eq!(
                asked, retried,
                "{method} asks the budget only if it may retry"
            );
            match a.next(t0, first_of(&order)) {
                Next::Try(t) => {
                    assert!(retried, "{method} body={}", !bodiless);
                    assert_eq!(t.target, T::Local(2));
                }
                Next::GiveUp(e) => {
                    assert!(!retried, "{method}");
                    assert_eq!(e, Ending::LastFailed);
                }
            }
        }
    }

    #[test]
    fn retries_stop_at_the_count_and_at_the_budget() {
        let t0 = Instant::now();
        let order = [T::Local(1), T::Local(2), T::Local(3), T::Local(4)];
        let mut a = get(t0);
        for _ in 0..3 {
            try_of(a.next(t0, first_of(&order)));
            a.sent_failed(Sent::Reset { reused: false }, "reset", || true);
        }
        assert_eq!(
            a.next(t0, first_of(&order)),
            Next::GiveUp(Ending::LastFailed)
        );
        assert_eq!(a.made(), 3, "one attempt and two retries");

        let mut a = get(t0);
        try_of(a.next(t0, first_of(&order)));
        a.sent_failed(Sent::Reset { reused: false }, "reset", || false);
        assert_eq!(
            a.next(t0, first_of(&order)),
            Next::GiveUp(Ending::LastFailed)
        );
    }

    #[test]
    fn a_stale_pooled_connection_is_retried_fresh_on_the_same_target_for_free() {
        let t0 = Instant::now();
        let order = [T::Local(1), T::Local(2)];
        let mut a: Attempts<T, &str> = Attempts::new(
            t0 + 1000 * MS,
            AttemptPolicy {
                retries: 0,
                per_try_timeout: None,
            },
            Replay::of("POST", true),
        );
        try_of(a.next(t0, first_of(&order)));
        a.sent_failed(Sent::Reset { reused: true }, "closed", || {
            panic!("a stale connection spends no budget")
        });
        let again = try_of(a.next(t0, |_| panic!("the balancer is not asked")));
        assert_eq!(again.target, T::Local(1));
        assert!(again.fresh_connection);
        // A fresh connection that fails is a real failure: POST stops.
        a.sent_failed(Sent::Reset { reused: false }, "reset", || true);
        assert_eq!(
            a.next(t0, first_of(&order)),
            Next::GiveUp(Ending::LastFailed)
        );

        // A request with a body was (partly) sent on it: never replayed.
        let mut a: Attempts<T, &str> =
            Attempts::new(t0 + 1000 * MS, POLICY, Replay::of("PUT", false));
        try_of(a.next(t0, first_of(&order)));
        a.sent_failed(Sent::Reset { reused: true }, "closed", || true);
        assert_eq!(
            a.next(t0, first_of(&order)),
            Next::GiveUp(Ending::LastFailed)
        );
    }

    #[test]
    fn a_remote_cluster_whose_tunnel_died_gets_one_fresh_path() {
        let t0 = Instant::now();
        let order = [T::Remote(1), T::Remote(2)];
        let mut a = get(t0);
        try_of(a.next(t0, first_of(&order)));
        a.sent_failed(Sent::Reset { reused: false }, "tunnel reset", || true);
        // The cluster is still a candidate once...
        assert_eq!(try_of(a.next(t0, first_of(&order))).target, T::Remote(1));
        a.sent_failed(Sent::Reset { reused: false }, "tunnel reset", || true);
        // ...but not twice.
        assert_eq!(try_of(a.next(t0, first_of(&order))).target, T::Remote(2));

        // A timeout is the cluster's slowness, not a path's: skipped.
        let mut a = get(t0);
        try_of(a.next(t0, first_of(&order)));
        a.sent_failed(Sent::TryTimeout, "slow", || true);
        assert_eq!(try_of(a.next(t0, first_of(&order))).target, T::Remote(2));

        // A local endpoint has one path only.
        let order = [T::Local(1), T::Local(2)];
        let mut a = get(t0);
        try_of(a.next(t0, first_of(&order)));
        a.sent_failed(Sent::Reset { reused: false }, "reset", || true);
        assert_eq!(try_of(a.next(t0, first_of(&order))).target, T::Local(2));
    }

    #[test]
    fn gateway_errors_are_retried_like_failures_and_others_passed_on() {
        let t0 = Instant::now();
        let order = [T::Local(1), T::Local(2), T::Local(3)];
        let mut a = get(t0);
        try_of(a.next(t0, first_of(&order)));
        assert!(
            !a.answered(500, || "500", || true),
            "a 500 is the app's answer"
        );
        assert!(!a.answered(404, || "404", || true));

        let mut a = get(t0);
        try_of(a.next(t0, first_of(&order)));
        assert!(a.answered(503, || "answered 503", || true));
        assert_eq!(try_of(a.next(t0, first_of(&order))).target, T::Local(2));
        assert!(a.answered(502, || "answered 502", || true));
        try_of(a.next(t0, first_of(&order)));
        assert!(
            !a.answered(504, || "answered 504", || true),
            "retries spent"
        );

        let mut a: Attempts<T, &str> =
            Attempts::new(t0 + 1000 * MS, POLICY, Replay::of("POST", true));
        try_of(a.next(t0, first_of(&order)));
        assert!(!a.answered(503, || "503", || true), "POST is not retried");
    }

    #[test]
    fn every_attempt_shares_the_deadline_and_each_has_its_try_timeout() {
        let t0 = Instant::now();
        let order = [T::Local(1), T::Local(2), T::Local(3)];
        let mut a: Attempts<T, &str> = Attempts::new(
            t0 + 250 * MS,
            AttemptPolicy {
                retries: 5,
                per_try_timeout: Some(100 * MS),
            },
            Replay::of("GET", true),
        );
        assert_eq!(try_of(a.next(t0, first_of(&order))).until, t0 + 100 * MS);
        a.sent_failed(Sent::TryTimeout, "slow", || true);
        assert_eq!(a.remaining(t0 + 100 * MS), 150 * MS);
        assert_eq!(
            try_of(a.next(t0 + 100 * MS, first_of(&order))).until,
            t0 + 200 * MS
        );
        a.sent_failed(Sent::TryTimeout, "slow", || true);
        // The third gets what is left of the deadline, not a full try.
        assert_eq!(
            try_of(a.next(t0 + 200 * MS, first_of(&order))).until,
            t0 + 250 * MS
        );
        a.sent_failed(Sent::TryTimeout, "slow", || true);
        assert_eq!(
            a.next(t0 + 200 * MS, first_of(&order)),
            Next::GiveUp(Ending::LastTimedOut),
            "every target tried, the last timed out"
        );
        assert_eq!(
            a.next(t0 + 250 * MS, first_of(&order)),
            Next::GiveUp(Ending::Deadline)
        );
    }

    #[test]
    fn the_deadline_ends_attempts_even_with_targets_and_retries_left() {
        let t0 = Instant::now();
        let order = [T::Local(1), T::Local(2)];
        let mut a = get(t0);
        try_of(a.next(t0, first_of(&order)));
        a.not_sent("refused");
        assert_eq!(
            a.next(t0 + 1000 * MS, first_of(&order)),
            Next::GiveUp(Ending::Deadline)
        );
    }
}
