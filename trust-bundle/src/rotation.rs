//! Rotation: SVID renewal and CA root rotation.
//!
//! Both schedules are I/O-free state machines that take `now` as an argument
//! ([`RenewalState`], [`Authority`]); [`spawn_renewer`] is the thin tokio
//! driver that turns the renewal schedule into a `watch` channel of SVIDs.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bundle::Bundle;
use crate::ca::{CaError, ClusterCa, SvidPolicy};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::Svid;

/// Retry behaviour after a failed renewal.
#[derive(Debug, Clone)]
pub struct RenewalPolicy {
    /// First retry delay; it doubles with each consecutive failure.
    pub initial_backoff: Duration,
    /// Retries never wait longer than this.
    pub max_backoff: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// When to try to renew next. Renewal starts half-way through the current
/// SVID's validity; a failure keeps the current SVID and retries with
/// exponential backoff, capped.
#[derive(Debug, Clone)]
pub struct RenewalState {
    policy: RenewalPolicy,
    failures: u32,
    /// Set after a failure: retry then, whatever the SVID's half-life says.
    retry_at: Option<SystemTime>,
    /// Set after a success: never renew again before this, so that an SVID
    /// whose half-life is already past cannot cause a tight loop.
    quiet_until: Option<SystemTime>,
}

impl RenewalState {
    pub fn new(policy: RenewalPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            retry_at: None,
            quiet_until: None,
        }
    }

    /// When the next attempt is due, given the current SVID's half-life.
    pub fn due_at(&self, renew_at: SystemTime) -> SystemTime {
        match (self.retry_at, self.quiet_until) {
            (Some(retry), _) => retry,
            (None, Some(quiet)) => renew_at.max(quiet),
            (None, None) => renew_at,
        }
    }

    pub fn succeeded(&mut self, now: SystemTime) {
        self.failures = 0;
        self.retry_at = None;
        self.quiet_until = Some(now + self.policy.initial_backoff);
    }

    /// Records a failure at `now` and returns the delay before the retry:
    /// the exponential step, scaled by `jitter` in [0, 1) to between half
    /// and all of it, so that every workload of a cluster does not retry
    /// a recovering controller in the same instant.
    pub fn failed(&mut self, now: SystemTime, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(30);
        let step = self
            .policy
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.policy.max_backoff);
        let backoff = step.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0);
        self.retry_at = Some(now + backoff);
        backoff
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }
}

/// Wall-clock time for the drivers. Tests substitute a clock that follows
/// tokio's paused time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Obtains a fresh SVID: from a local [`ClusterCa`], or over the controller's
/// `Certify` RPC.
pub trait SvidSource: Send + Sync + 'static {
    fn fetch(&self) -> impl Future<Output = Result<Svid, RenewError>> + Send;
}

/// A failed renewal. The current SVID stays in use.
#[derive(Debug, thiserror::Error)]
#[error("SVID renewal failed: {0}")]
pub struct RenewError(pub Box<dyn std::error::Error + Send + Sync>);

/// Runs renewal for `initial` and returns the channel consumers follow. The
/// task ends when every receiver has been dropped.
pub fn spawn_renewer<S: SvidSource, C: Clock>(
    source: S,
    initial: Svid,
    policy: RenewalPolicy,
    clock: C,
) -> (watch::Receiver<Arc<Svid>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(initial));
    let task = tokio::spawn(run_renewer(source, tx, RenewalState::new(policy), clock));
    (rx, task)
}

async fn run_renewer<S: SvidSource, C: Clock>(
    source: S,
    tx: watch::Sender<Arc<Svid>>,
    mut state: RenewalState,
    clock: C,
) {
    loop {
        let current = tx.borrow().clone();
        let due = state.due_at(current.renew_at());
        let wait = due.duration_since(clock.now()).unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = tx.closed() => return,
        }
        let fetched = source.fetch().await.and_then(|svid| {
            // A source that hands back another identity is broken; keep ours.
            if svid.spiffe_id() == current.spiffe_id() {
                Ok(svid)
            } else {
                Err(RenewError(
                    format!(
                        "source returned an SVID for {}, expected {}",
                        svid.spiffe_id(),
                        current.spiffe_id()
                    )
                    .into(),
                ))
            }
        });
        match fetched {
            Ok(svid) => {
                state.succeeded(clock.now());
                tracing::info!(
                    id = %svid.spiffe_id(),
                    not_after = ?svid.not_after(),
                    "renewed SVID"
                );
                tx.send_replace(Arc::new(svid));
            }
            Err(error) => {
                let backoff = state.failed(clock.now(), fastrand::f64());
                tracing::warn!(
                    %error,
                    retry_in = ?backoff,
                    failures = state.consecutive_failures(),
                    still_valid = current.is_valid_at(clock.now()),
                    not_after = ?current.not_after(),
                    "SVID renewal failed; keeping the current SVID"
                );
            }
        }
    }
}

/// Timing of a CA rotation.
#[derive(Debug, Clone)]
pub struct RotationPolicy {
    /// How long a new root sits in the bundle before it signs anything, so
    /// that every peer has it before it meets a leaf that needs it. The
    /// SPIFFE federation guidance is 3 to 5 refresh hints.
    pub propagation_delay: Duration,
    /// Published in the bundle as `spiffe_refresh_hint`.
    pub refresh_hint: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            propagation_delay: Duration::from_secs(15 * 60),
            refresh_hint: Duration::from_secs(5 * 60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    #[error("a rotation is already in progress: the new root activates at {0:?}")]
    InProgress(SystemTime),
    #[error("the new root is for trust domain {new}, not {current}")]
    WrongTrustDomain {
        current: TrustDomain,
        new: TrustDomain,
    },
}

/// Where a rotation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationPhase {
    /// One root, signing.
    Steady,
    /// The new root is published next to the old one; the old still signs.
    Publishing { activate_at: SystemTime },
    /// The new root signs; the old one stays in the bundle until its last
    /// leaf has expired.
    Retiring { drop_at: SystemTime },
}

#[derive(Debug)]
struct Root {
    ca: ClusterCa,
    /// The latest expiry of any leaf this root signed.
    last_leaf_expiry: Option<SystemTime>,
}

/// A trust domain's signing authority across rotations: which root signs,
/// which roots the bundle publishes, and when each changes. I/O-free; call
/// [`Authority::poll`] at [`Authority::next_deadline`] and publish the bundle
/// whenever it reports a change.
#[derive(Debug)]
pub struct Authority {
    svid_policy: SvidPolicy,
    rotation: RotationPolicy,
    active: Root,
    incoming: Option<(Root, SystemTime)>,
    retiring: Vec<(Root, SystemTime)>,
    sequence: u64,
}

impl Authority {
    /// `ca` may already have signed leaves that we know nothing of (it was
    /// loaded from disk), so they are assumed to live a full SVID lifetime
    /// from `now`.
    pub fn new(
        ca: ClusterCa,
        svid_policy: SvidPolicy,
        rotation: RotationPolicy,
        now: SystemTime,
    ) -> Self {
        let last_leaf_expiry = Some(now + svid_policy.lifetime);
        Self {
            svid_policy,
            rotation,
            active: Root {
                ca,
                last_leaf_expiry,
            },
            incoming: None,
            retiring: Vec::new(),
            sequence: 1,
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.active.ca.trust_domain()
    }

    /// The root that signs new leaves now.
    pub fn active(&self) -> &ClusterCa {
        &self.active.ca
    }

    pub fn phase(&self) -> RotationPhase {
        if let Some((_, activate_at)) = &self.incoming {
            RotationPhase::Publishing {
                activate_at: *activate_at,
            }
        } else if let Some(drop_at) = self.retiring.iter().map(|(_, t)| *t).max() {
            RotationPhase::Retiring { drop_at }
        } else {
            RotationPhase::Steady
        }
    }

    /// Starts a rotation to `next`: it is published at once and signs from
    /// `now + propagation_delay`.
    pub fn begin_rotation(
        &mut self,
        next: ClusterCa,
        now: SystemTime,
    ) -> Result<(), RotationError> {
        let delay = self.rotation.propagation_delay;
        self.begin_rotation_in(next, now, delay)
    }

    /// As [`Authority::begin_rotation`], with this rotation's own
    /// propagation delay (an operator's choice for this one rotation).
    pub fn begin_rotation_in(
        &mut self,
        next: ClusterCa,
        now: SystemTime,
        propagation_delay: Duration,
    ) -> Result<(), RotationError> {
        if let Some((_, at)) = &self.incoming {
            return Err(RotationError::InProgress(*at));
        }
        if next.trust_domain() != self.trust_domain() {
            return Err(RotationError::WrongTrustDomain {
                current: self.trust_domain().clone(),
                new: next.trust_domain().clone(),
            });
        }
        let root = Root {
            ca: next,
            last_leaf_expiry: None,
        };
        self.incoming = Some((root, now + propagation_delay));
        self.sequence += 1;
        Ok(())
    }

    /// Keeps `previous` in the bundle until `drop_at`: the root a rotation
    /// replaced before this authority was made (a restarted controller),
    /// whose leaves may still be live.
    pub fn retiring(mut self, previous: ClusterCa, drop_at: SystemTime) -> Self {
        if previous.trust_domain() == self.trust_domain()
            && previous.cert_der() != self.active.ca.cert_der()
        {
            let root = Root {
                ca: previous,
                last_leaf_expiry: None,
            };
            self.retiring.push((root, drop_at));
            self.sequence += 1;
        }
        self
    }

    /// Whether `cert` is one of this authority's roots: signing, incoming
    /// or retiring.
    pub fn has_root(&self, cert: &rustls_pki_types::CertificateDer<'_>) -> bool {
        std::iter::once(&self.active)
            .chain(self.incoming.iter().map(|(r, _)| r))
            .chain(self.retiring.iter().map(|(r, _)| r))
            .any(|r| r.ca.cert_der().as_ref() == cert.as_ref())
    }

    /// Advances the rotation to `now`. Returns true when the bundle changed
    /// and must be republished.
    pub fn poll(&mut self, now: SystemTime) -> bool {
        let mut changed = false;
        if let Some((next, _)) = self.incoming.take_if(|(_, at)| *at <= now) {
            // The bundle's roots are unchanged; only the signer moves. The old
            // root stays until the last leaf it signed has expired.
            let old = std::mem::replace(&mut self.active, next);
            let drop_at = old.last_leaf_expiry.unwrap_or(now).max(now);
            tracing::info!(trust_domain = %self.trust_domain(), ?drop_at, "new root is signing; old root retiring");
            self.retiring.push((old, drop_at));
        }
        let before = self.retiring.len();
        self.retiring.retain(|(_, drop_at)| *drop_at > now);
        if self.retiring.len() != before {
            tracing::info!(trust_domain = %self.trust_domain(), "old root dropped from the bundle");
            self.sequence += 1;
            changed = true;
        }
        changed
    }

    /// The next moment at which [`Authority::poll`] has work to do.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        let activate = self.incoming.as_ref().map(|(_, at)| *at);
        let drop = self.retiring.iter().map(|(_, at)| *at).min();
        match (activate, drop) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        }
    }

    /// The bundle to publish: every root that may vouch for a live leaf,
    /// plus the incoming one.
    pub fn bundle(&self) -> Bundle {
        let roots = self
            .retiring
            .iter()
            .map(|(r, _)| r)
            .chain(std::iter::once(&self.active))
            .chain(self.incoming.iter().map(|(r, _)| r))
            .map(|r| r.ca.cert_der().clone());
        let mut bundle = Bundle::with_roots(self.trust_domain().clone(), roots);
        bundle.sequence = self.sequence;
        bundle.refresh_hint = Some(self.rotation.refresh_hint);
        bundle
    }

    /// Issues a leaf from the active root and records its expiry.
    pub fn issue(&mut self, id: &SpiffeId, now: SystemTime) -> Result<Svid, CaError> {
        let svid = self.active.ca.issue(id, &self.svid_policy, now)?;
        self.record(svid.not_after());
        Ok(svid)
    }

    /// Signs a CSR for `allowed` from the active root and records its expiry.
    pub fn sign_csr(
        &mut self,
        csr_der: &[u8],
        allowed: &SpiffeId,
        now: SystemTime,
    ) -> Result<rustls_pki_types::CertificateDer<'static>, CaError> {
        let cert = self
            .active
            .ca
            .sign_csr(csr_der, allowed, &self.svid_policy, now)?;
        let info = crate::svid::parse_any(&cert)?;
        self.record(info.not_after);
        Ok(cert)
    }

    fn record(&mut self, not_after: SystemTime) {
        let last = &mut self.active.last_leaf_expiry;
        *last = Some(last.map_or(not_after, |t| t.max(not_after)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaOptions;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn renewal_backs_off_exponentially_up_to_the_cap_and_resets() {
        let mut st = RenewalState::new(RenewalPolicy {
            initial_backoff: S,
            max_backoff: 10 * S,
        });
        let half_life = t0() + 100 * S;
        assert_eq!(st.due_at(half_life), half_life);
        let mut now = half_life;
        let mut waits = Vec::new();
        for _ in 0..6 {
            // The top of the jitter range: the whole step.
            let w = st.failed(now, 1.0);
            assert_eq!(st.due_at(half_life), now + w);
            waits.push(w.as_secs());
            now += w;
        }
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        // The bottom: half of it.
        assert_eq!(st.failed(now, 0.0), 5 * S);
        assert_eq!(st.consecutive_failures(), 7);
        st.succeeded(now);
        assert_eq!(st.consecutive_failures(), 0);
        let next_half_life = now + 500 * S;
        assert_eq!(st.due_at(next_half_life), next_half_life);
    }

    #[test]
    fn a_renewed_svid_already_past_half_life_does_not_spin() {
        let mut st = RenewalState::new(RenewalPolicy::default());
        st.succeeded(t0());
        // The new SVID's half-life is in the past (clock skew, tiny lifetime).
        assert_eq!(st.due_at(t0() - 10 * S), t0() + S);
    }

    fn authority(now: SystemTime) -> Authority {
        let td = TrustDomain::new("aws.example").unwrap();
        let ca = ClusterCa::generate(&td, &CaOptions::default(), now).unwrap();
        Authority::new(
            ca,
            SvidPolicy {
                lifetime: 60 * S,
                clock_skew: Duration::ZERO,
            },
            RotationPolicy {
                propagation_delay: 10 * S,
                refresh_hint: 5 * S,
            },
            now,
        )
    }

    fn issuer_of(svid: &Svid) -> Vec<u8> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, c) = X509Certificate::from_der(svid.leaf()).unwrap();
        c.issuer().as_raw().to_vec()
    }

    fn subject_of(ca: &ClusterCa) -> Vec<u8> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, c) = X509Certificate::from_der(ca.cert_der()).unwrap();
        c.subject().as_raw().to_vec()
    }

    #[test]
    fn ca_rotation_publishes_first_signs_later_and_drops_after_the_last_old_leaf() {
        let mut now = t0();
        let mut auth = authority(now);
        let id = SpiffeId::workload(auth.trust_domain(), "shop", "cart").unwrap();
        let old_subject = subject_of(auth.active());
        assert_eq!(auth.phase(), RotationPhase::Steady);
        assert_eq!(auth.bundle().roots().len(), 1);
        assert_eq!(auth.next_deadline(), None);

        // A leaf from the old root, issued just before the rotation.
        let old_leaf = auth.issue(&id, now).unwrap();
        assert_eq!(issuer_of(&old_leaf), old_subject);

        // 1. The new root is published next to the old one...
        now += 5 * S;
        let seq_before = auth.bundle().sequence;
        let next = ClusterCa::generate(auth.trust_domain(), &CaOptions::default(), now).unwrap();
        let new_subject = subject_of(&next);
        let next_cert = next.cert_der().clone();
        assert!(!auth.has_root(&next_cert));
        auth.begin_rotation(next, now).unwrap();
        assert!(auth.has_root(&next_cert), "incoming roots count");
        assert_eq!(auth.bundle().roots().len(), 2);
        assert!(auth.bundle().sequence > seq_before);
        assert_eq!(
            auth.phase(),
            RotationPhase::Publishing {
                activate_at: now + 10 * S
            }
        );
        // ...but does not sign until peers have had time to fetch it.
        let during = auth.issue(&id, now).unwrap();
        assert_eq!(issuer_of(&during), old_subject);
        let second = ClusterCa::generate(auth.trust_domain(), &CaOptions::default(), now).unwrap();
        assert!(matches!(
            auth.begin_rotation(second, now),
            Err(RotationError::InProgress(_))
        ));

        // 2. After the propagation delay, new leaves come from the new root.
        now = auth.next_deadline().unwrap();
        assert!(
            !auth.poll(now),
            "activation does not change the bundle's roots"
        );
        let fresh = auth.issue(&id, now).unwrap();
        assert_eq!(issuer_of(&fresh), new_subject);
        let drop_at = during.not_after();
        assert_eq!(auth.phase(), RotationPhase::Retiring { drop_at });
        assert_eq!(auth.bundle().roots().len(), 2);

        // 3. The old root stays until the last leaf it signed has expired...
        assert!(!auth.poll(drop_at - S));
        assert_eq!(auth.bundle().roots().len(), 2);
        assert_eq!(auth.next_deadline(), Some(drop_at));
        // ...and is dropped then.
        assert!(auth.poll(drop_at));
        assert_eq!(auth.phase(), RotationPhase::Steady);
        let bundle = auth.bundle();
        assert_eq!(bundle.roots(), &[auth.active().cert_der().clone()]);
    }

    #[test]
    fn a_loaded_root_is_kept_for_a_full_lifetime_of_unknown_leaves() {
        let now = t0();
        let mut auth = authority(now);
        let next = ClusterCa::generate(auth.trust_domain(), &CaOptions::default(), now).unwrap();
        auth.begin_rotation(next, now).unwrap();
        let activate = now + 10 * S;
        auth.poll(activate);
        // Nothing was issued through this Authority, yet leaves signed before
        // it was built may live until now + lifetime.
        assert_eq!(
            auth.phase(),
            RotationPhase::Retiring {
                drop_at: now + 60 * S
            }
        );
    }

    /// A restarted controller whose last rotation finished recently keeps
    /// the replaced root in its bundle until that root's leaves are gone.
    #[test]
    fn a_root_replaced_before_a_restart_retires_on_schedule() {
        let now = t0();
        let fresh = authority(now);
        let previous =
            ClusterCa::generate(fresh.trust_domain(), &CaOptions::default(), now).unwrap();
        let old = previous.cert_der().clone();
        let mut auth = fresh.retiring(previous, now + 30 * S);
        assert!(auth.has_root(&old));
        assert_eq!(auth.bundle().roots().len(), 2);
        assert_eq!(
            auth.phase(),
            RotationPhase::Retiring {
                drop_at: now + 30 * S
            }
        );
        assert!(!auth.poll(now + 29 * S));
        assert!(auth.poll(now + 30 * S), "dropped: the bundle changes");
        assert_eq!(auth.bundle().roots().len(), 1);
        assert!(!auth.has_root(&old));
        // Its own signing root is never retired.
        let same = authority(now);
        let active = ClusterCa::from_pem(
            same.trust_domain(),
            same.active().cert_pem().as_bytes(),
            same.active().key_pem().as_bytes(),
            "cert",
            "key",
        )
        .unwrap();
        let auth = same.retiring(active, now + 30 * S);
        assert_eq!(auth.bundle().roots().len(), 1);
    }

    #[test]
    fn rotation_refuses_a_root_of_another_trust_domain() {
        let mut auth = authority(t0());
        let other = ClusterCa::generate(
            &TrustDomain::new("gcp.example").unwrap(),
            &CaOptions::default(),
            t0(),
        )
        .unwrap();
        assert!(matches!(
            auth.begin_rotation(other, t0()),
            Err(RotationError::WrongTrustDomain { .. })
        ));
    }
}
