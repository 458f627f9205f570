//! Lease-based leader election (coordination.k8s.io/v1), client-go's algorithm: one replica
//! holds the Lease and renews it; the others wait until it has not been renewed for a whole
//! lease duration, as measured on their own clock (so clock skew between replicas does not
//! matter), then take it with an optimistic-concurrency update.
//!
//! A leader stops writing claims `renew_deadline` after its last successful renewal, before any
//! other replica may consider the Lease expired (`lease_duration` > `renew_deadline`): two
//! replicas never write at the same time.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Timing of the election.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// How long others wait after the last renewal they saw before taking over.
    pub lease_duration: Duration,
    /// How long a leader keeps acting after its last successful renewal.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    /// client-go's defaults.
    fn default() -> Self {
        LeaseTiming {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Why a [`LeaseTiming`] is unsafe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    #[error(
        "lease duration {lease:?} must be longer than the renew deadline {renew:?} (else a \
         standby may take over while the leader still writes)"
    )]
    LeaseNotAfterDeadline { lease: Duration, renew: Duration },
    #[error("renew deadline {renew:?} must be longer than the retry period {retry:?}")]
    DeadlineNotAfterRetry { renew: Duration, retry: Duration },
    #[error("retry period must be positive")]
    ZeroRetry,
}

impl LeaseTiming {
    /// client-go's rules: lease duration > renew deadline > retry period > 0.
    pub fn validate(&self) -> Result<(), TimingError> {
        if self.retry_period.is_zero() {
            return Err(TimingError::ZeroRetry);
        }
        if self.renew_deadline <= self.retry_period {
            return Err(TimingError::DeadlineNotAfterRetry {
                renew: self.renew_deadline,
                retry: self.retry_period,
            });
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(TimingError::LeaseNotAfterDeadline {
                lease: self.lease_duration,
                renew: self.renew_deadline,
            });
        }
        Ok(())
    }
}

/// Whether this replica may act, shared with the allocation loop.
#[derive(Clone, Debug, Default)]
pub struct Leadership {
    until: Arc<Mutex<Option<Instant>>>,
}

impl Leadership {
    /// A replica that always leads (leader election disabled).
    pub fn always() -> Leadership {
        let l = Leadership::default();
        l.extend(Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
        l
    }

    pub fn is_leading(&self) -> bool {
        self.until
            .lock()
            .map(|u| u.is_some_and(|t| Instant::now() < t))
            .unwrap_or(false)
    }

    fn extend(&self, until: Instant) {
        if let Ok(mut u) = self.until.lock() {
            *u = Some(until);
        }
    }

    fn lose(&self) {
        if let Ok(mut u) = self.until.lock() {
            *u = None;
        }
    }
}

/// One participant in the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    leadership: Leadership,
    /// The last Lease record seen (holder, renew time) and when it was first seen, to measure
    /// expiry on the local clock.
    observed: Option<(String, Option<Timestamp>, Instant)>,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Elector {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            leadership: Leadership::default(),
            observed: None,
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Acquire or renew once; true when this replica holds the Lease now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let started = Instant::now();
        let now = Timestamp::now();
        let lease_seconds =
            i32::try_from(self.timing.lease_duration.as_secs().max(1)).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(lease_seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.won(started);
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renew = spec.renew_time.as_ref().map(|t| t.0);
        let record = (holder.clone(), renew);
        let first_seen = match &self.observed {
            Some((h, r, at)) if (h, r) == (&record.0, &record.1) => *at,
            _ => {
                self.observed = Some((record.0.clone(), record.1, started));
                started
            }
        };
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.timing.lease_duration);
        let held_by_other = !holder.is_empty() && holder != self.identity;
        if held_by_other && started < first_seen + duration {
            self.leadership.lose();
            return Ok(false);
        }
        let mut new_spec = spec.clone();
        if holder != self.identity {
            new_spec.acquire_time = Some(MicroTime(now));
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        new_spec.holder_identity = Some(self.identity.clone());
        new_spec.lease_duration_seconds = Some(lease_seconds);
        new_spec.renew_time = Some(MicroTime(now));
        lease.spec = Some(new_spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.won(started);
                Ok(true)
            }
            // Someone else renewed or took it in the meantime.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.leadership.lose();
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn won(&mut self, started: Instant) {
        // Measured from before the request: the Lease was at most this old when written.
        self.leadership.extend(started + self.timing.renew_deadline);
        self.observed = None;
    }

    /// Keep acquiring and renewing until the task is dropped.
    pub async fn run(mut self, on_change: impl Fn(bool) + Send + 'static) {
        let mut was_leading = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "leader election request failed")
                }
            }
            let leading = self.leadership.is_leading();
            if leading != was_leading {
                if leading {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                } else {
                    tracing::info!(lease = %self.name, identity = %self.identity, "not the leader");
                }
                on_change(leading);
                was_leading = leading;
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(lease: u64, renew: u64, retry: u64) -> LeaseTiming {
        LeaseTiming {
            lease_duration: Duration::from_millis(lease),
            renew_deadline: Duration::from_millis(renew),
            retry_period: Duration::from_millis(retry),
        }
    }

    #[test]
    fn timing_must_leave_a_gap_between_leaders() {
        assert_eq!(LeaseTiming::default().validate(), Ok(()));
        assert_eq!(timing(1500, 1000, 200).validate(), Ok(()));
        assert!(matches!(
            timing(1000, 1000, 200).validate(),
            Err(TimingError::LeaseNotAfterDeadline { .. })
        ));
        assert!(matches!(
            timing(1500, 200, 200).validate(),
            Err(TimingError::DeadlineNotAfterRetry { .. })
        ));
        assert_eq!(
            timing(1500, 1000, 0).validate(),
            Err(TimingError::ZeroRetry)
        );
    }
}
