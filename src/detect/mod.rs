//! Anomaly detectors over the request stream, and the response the policy
//! in force asks for (`[anomaly]`: off, alert, or suspend).
//!
//! **Credential sharing**: one credential (an agent's or an admin's
//! client certificate, or an admin token) used from two or more source
//! addresses within the sharing window. A stolen certificate and key work
//! from anywhere; where they are used from is what a thief cannot copy.
//! Addresses, not ports: an agent that reconnects uses a new port. A
//! renewed certificate is a new credential, so renewal is never sharing.
//! Addresses inside one of the policy's `shared_networks` count as one
//! (a NAT, a pool of proxies).
//!
//! Replicas see one another's sightings through the store
//! (`credential_sightings`): a credential used on one replica from one
//! address and on another from a second is caught on the second. The
//! store is written only when this replica sees a (credential, address)
//! pair it has not written within a quarter of the window, so steady
//! traffic costs a map lookup per request, not a database write.
//!
//! Each detection is stored once per credential and window, however many
//! replicas notice it, with an audit entry (`anomaly`) and a hook event of
//! type `anomaly` in the same transaction; then counted, and, under
//! `suspend`, the agent is suspended at once (certificateHold) until an
//! admin resumes it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agents::{AgentError, Registry, StatusChange};
use crate::audit::AuditEvent;
use crate::identity::AgentName;
use crate::policy::document::{AnomalyPolicy, AnomalyResponse};
use crate::policy::engine::PolicyEngine;
/// What a search of the anomalies asks for, and what it finds.
pub use crate::store::{AnomalyQuery, AnomalyRecord};
use crate::store::{NewAnomaly, Store, StoreError};
use crate::telemetry::DetectMetrics;

mod rate;

pub const CREDENTIAL_SHARING: &str = "credential_sharing";
pub const CROSS_AGENT_PROBING: &str = "cross_agent_probing";
pub const RATE_SPIKE: &str = "rate_spike";
/// The denials that probing is made of: asking for another agent, or for
/// what the agent's roles do not grant.
pub const PROBING_DENIALS: [&str; 3] = ["other_agent", "not_in_scope", "intent_not_allowed"];
/// The actor of a suspension the detector makes.
const DETECTOR: &str = "keyward:detect";
/// Pairs this replica remembers writing; past it the map starts afresh
/// (the store still holds every sighting, so nothing is missed: the next
/// use of each pair writes again).
const MAX_REMEMBERED_PAIRS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("suspending the agent failed: {0}")]
    Suspend(#[from] AgentError),
}

/// The mission's KPIs over a window; a mean over nothing is `null`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Kpis {
    pub window_seconds: u64,
    pub mean_time_to_detect_seconds: Option<f64>,
    pub mean_time_to_revoke_seconds: Option<f64>,
    pub policy_compliant_ratio: Option<f64>,
    pub anomalies_detected: usize,
    /// Detections followed by a suspension or revocation of their agent.
    pub anomalies_revoked: usize,
    pub requests_allowed: i64,
    pub requests_denied: i64,
}

/// Who used which credential from where.
#[derive(Clone, Debug)]
pub struct CredentialUse<'a> {
    /// `cert:<serial>` or `token:<id>`.
    pub credential: &'a str,
    /// The agent the credential is, for an agent's certificate.
    pub agent: Option<&'a AgentName>,
    pub address: IpAddr,
}

pub struct Detector {
    store: Arc<dyn Store>,
    policy: Arc<PolicyEngine>,
    registry: Arc<Registry>,
    metrics: DetectMetrics,
    /// Credential -> each address (as counted) it was seen from here, and
    /// when this replica last wrote that sighting to the store. Keyed by
    /// the credential alone so that a request looks it up without
    /// allocating.
    written: Mutex<HashMap<String, Vec<(CountedAddress, Instant)>>>,
    /// Credential -> its recent denials (when, which code), on this
    /// replica.
    denials: Mutex<HashMap<String, Vec<(i64, &'static str)>>>,
    /// Each agent's request rate and its moving baseline, on this replica.
    rates: Mutex<rate::RateTracker>,
}

impl Detector {
    pub fn new(
        store: Arc<dyn Store>,
        policy: Arc<PolicyEngine>,
        registry: Arc<Registry>,
        metrics: DetectMetrics,
    ) -> Self {
        Self {
            store,
            policy,
            registry,
            metrics,
            written: Mutex::new(HashMap::new()),
            denials: Mutex::new(HashMap::new()),
            rates: Mutex::new(rate::RateTracker::default()),
        }
    }

    /// Notes a use of a credential; when it makes credential sharing,
    /// records the anomaly and responds as the policy says. Returns the
    /// anomaly when this call detected it.
    pub async fn credential_used(
        &self,
        usage: CredentialUse<'_>,
    ) -> Result<Option<AnomalyRecord>, DetectError> {
        let policy = self.policy.anomaly_policy();
        if policy.credential_sharing == AnomalyResponse::Off {
            return Ok(None);
        }
        let window = Duration::from_secs(policy.sharing_window_seconds);
        let address = counted_address(&policy, usage.address);
        if !self.due_for_writing(usage.credential, address, window / 4) {
            return Ok(None);
        }
        let address = address.to_string();
        let now = now_ms();
        let since = now - window.as_millis() as i64;
        let seen = self
            .store
            .sight_credential(
                usage.credential,
                &address,
                usage.agent.map(AgentName::as_str),
                now,
                since,
            )
            .await?;
        if seen.len() < 2 {
            return Ok(None);
        }
        // The offense is the first use from a second address.
        let first_offense_ms = seen
            .iter()
            .map(|s| s.first_seen_ms.max(since))
            .nth(1)
            .unwrap_or(now);
        let addresses: Vec<&str> = seen.iter().map(|s| s.address.as_str()).collect();
        let response = match (policy.credential_sharing, usage.agent) {
            // Only an agent can be quarantined; an admin credential alerts.
            (AnomalyResponse::Suspend, Some(_)) => AnomalyResponse::Suspend,
            _ => AnomalyResponse::Alert,
        };
        let anomaly = NewAnomaly {
            kind: CREDENTIAL_SHARING,
            agent: usage.agent.map(|a| a.as_str().to_owned()),
            credential: usage.credential.to_owned(),
            response: response.as_str(),
            first_offense_ms,
            detected_at_ms: now,
            details: serde_json::json!({
                "addresses": addresses,
                "window_seconds": policy.sharing_window_seconds,
            }),
        };
        self.respond(anomaly, response, since, usage.agent).await
    }

    /// Notes a denial of a request made with `credential` (an agent's
    /// certificate); `probing_denials` of them within the window make
    /// cross-agent probing. Counted per replica (see docs/observability.md).
    pub async fn denied(
        &self,
        credential: &str,
        agent: &AgentName,
        code: &'static str,
    ) -> Result<Option<AnomalyRecord>, DetectError> {
        let policy = self.policy.anomaly_policy();
        if policy.cross_agent_probing == AnomalyResponse::Off || !PROBING_DENIALS.contains(&code) {
            return Ok(None);
        }
        let now = now_ms();
        let since = now - policy.sharing_window_seconds as i64 * 1000;
        let recent = {
            let mut denials = self.denials.lock().unwrap_or_else(|e| e.into_inner());
            if denials.len() >= MAX_REMEMBERED_PAIRS {
                denials.retain(|_, seen| seen.last().is_some_and(|(at, _)| *at >= since));
            }
            let seen = denials.entry(credential.to_owned()).or_default();
            seen.retain(|(at, _)| *at >= since);
            seen.push((now, code));
            if seen.len() < policy.probing_denials as usize {
                return Ok(None);
            }
            std::mem::take(seen)
        };
        let mut codes: std::collections::BTreeMap<&str, usize> = Default::default();
        for (_, code) in &recent {
            *codes.entry(code).or_default() += 1;
        }
        let anomaly = NewAnomaly {
            kind: CROSS_AGENT_PROBING,
            agent: Some(agent.as_str().to_owned()),
            credential: credential.to_owned(),
            response: policy.cross_agent_probing.as_str(),
            first_offense_ms: recent.first().map_or(now, |(at, _)| *at),
            detected_at_ms: now,
            details: serde_json::json!({
                "denials": codes,
                "window_seconds": policy.sharing_window_seconds,
            }),
        };
        self.respond(anomaly, policy.cross_agent_probing, since, Some(agent))
            .await
    }

    /// Counts a request made with `credential`, an agent's certificate;
    /// a rate far above the agent's own baseline and above the floor is a
    /// rate spike (see `rate`). Judged per agent, not per credential, so
    /// that a renewed certificate keeps its agent's baseline.
    pub async fn agent_request(
        &self,
        credential: &str,
        agent: &AgentName,
    ) -> Result<Option<AnomalyRecord>, DetectError> {
        let policy = self.policy.anomaly_policy();
        if policy.rate_spike == AnomalyResponse::Off {
            return Ok(None);
        }
        let now = now_ms();
        let spike = self
            .rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .request(agent.as_str(), now, &policy);
        let Some(spike) = spike else {
            return Ok(None);
        };
        let anomaly = NewAnomaly {
            kind: RATE_SPIKE,
            agent: Some(agent.as_str().to_owned()),
            credential: credential.to_owned(),
            response: policy.rate_spike.as_str(),
            first_offense_ms: spike.since_ms,
            detected_at_ms: now,
            details: serde_json::json!({
                "rate_per_second": round2(spike.rate_per_second),
                "baseline_per_second": round2(spike.baseline_per_second),
                "rate_spike_factor": policy.rate_spike_factor,
                "rate_spike_floor": policy.rate_spike_floor,
                "measured_over_seconds": rate::SLOT_MS / 1000,
            }),
        };
        let since = now - policy.sharing_window_seconds as i64 * 1000;
        self.respond(anomaly, policy.rate_spike, since, Some(agent))
            .await
    }

    async fn respond(
        &self,
        anomaly: NewAnomaly,
        response: AnomalyResponse,
        since_ms: i64,
        agent: Option<&AgentName>,
    ) -> Result<Option<AnomalyRecord>, DetectError> {
        let mut audit = AuditEvent::new(DETECTOR, "anomaly", anomaly.credential.as_str())
            .with("kind", anomaly.kind)
            .with("response", anomaly.response)
            .with("first_offense_ms", anomaly.first_offense_ms)
            .with("seen", anomaly.details.clone());
        if let Some(agent) = &anomaly.agent {
            audit = audit.agent(agent.as_str());
        }
        let Some(record) = self
            .store
            .record_anomaly(&anomaly, since_ms, &audit)
            .await?
        else {
            return Ok(None);
        };
        self.metrics.detected(
            anomaly.kind,
            anomaly.response,
            (anomaly.detected_at_ms - anomaly.first_offense_ms).max(0) as f64 / 1000.0,
        );
        // The request that made it, when there is one: the ids an operator
        // finds its trace and audit entries by.
        let context = crate::audit::RequestContext::current();
        tracing::warn!(
            request_id = context.request_id.as_deref(),
            trace_id = context.trace_id.as_deref(),
            kind = anomaly.kind,
            agent = anomaly.agent.as_deref().unwrap_or("-"),
            credential = %anomaly.credential,
            response = anomaly.response,
            seen = %anomaly.details,
            "anomaly detected"
        );
        if let (AnomalyResponse::Suspend, Some(agent)) = (response, agent) {
            self.registry
                .change_status(DETECTOR, agent, StatusChange::Suspend)
                .await?;
        }
        Ok(Some(record))
    }

    /// Whether this replica should write the sighting of `credential` from
    /// `address` now: it has not within `refresh` (so that every
    /// replica's view of the pair is at most that stale).
    fn due_for_writing(
        &self,
        credential: &str,
        address: CountedAddress,
        refresh: Duration,
    ) -> bool {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(seen) = written.get_mut(credential) {
            match seen.iter_mut().find(|(a, _)| *a == address) {
                Some((_, at)) if now.duration_since(*at) < refresh => return false,
                Some((_, at)) => *at = now,
                None => seen.push((address, now)),
            }
            return true;
        }
        if written.len() >= MAX_REMEMBERED_PAIRS {
            written.clear();
        }
        written.insert(credential.to_owned(), vec![(address, now)]);
        true
    }

    /// Anomalies, newest first.
    pub async fn anomalies(&self, query: &AnomalyQuery) -> Result<Vec<AnomalyRecord>, DetectError> {
        Ok(self.store.anomalies(query).await?)
    }

    /// The mission's KPIs over the last `window` (definitions in
    /// docs/observability.md).
    pub async fn kpis(&self, window: Duration) -> Result<Kpis, DetectError> {
        let samples = self
            .store
            .kpi_samples(now_ms() - window.as_millis() as i64)
            .await?;
        let mean_seconds = |delays: &[i64]| {
            (!delays.is_empty())
                .then(|| delays.iter().sum::<i64>() as f64 / delays.len() as f64 / 1000.0)
        };
        let decided = samples.allowed + samples.denied;
        Ok(Kpis {
            window_seconds: window.as_secs(),
            mean_time_to_detect_seconds: mean_seconds(&samples.detection_delays_ms),
            mean_time_to_revoke_seconds: mean_seconds(&samples.revocation_delays_ms),
            policy_compliant_ratio: (decided > 0).then(|| samples.allowed as f64 / decided as f64),
            anomalies_detected: samples.detection_delays_ms.len(),
            anomalies_revoked: samples.revocation_delays_ms.len(),
            requests_allowed: samples.allowed,
            requests_denied: samples.denied,
        })
    }

    /// Forgets sightings older than a day, the longest window a policy
    /// may set, and the rates of agents idle for five baseline time
    /// constants (their baseline is then under 1% of what it was).
    pub async fn prune(&self) -> Result<(), StoreError> {
        let day = crate::policy::document::MAX_SHARING_WINDOW_SECONDS as i64 * 1000;
        let now = now_ms();
        let idle_ms = 5 * self.policy.anomaly_policy().rate_baseline_seconds as i64 * 1000;
        self.rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prune(now, idle_ms);
        self.store.prune_sightings(now - day).await?;
        Ok(())
    }
}

/// An address as detection counts it: a shared network it is in, else
/// itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CountedAddress {
    Address(IpAddr),
    Network(ipnet::IpNet),
}

impl std::fmt::Display for CountedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address(a) => a.fmt(f),
            Self::Network(n) => n.fmt(f),
        }
    }
}

/// The address as detection counts it: the shared network it is in, else
/// itself (an IPv4-mapped IPv6 address as IPv4).
fn counted_address(policy: &AnomalyPolicy, address: IpAddr) -> CountedAddress {
    let address = address.to_canonical();
    policy
        .shared_networks
        .iter()
        .find(|network| network.contains(&address))
        .map_or(CountedAddress::Address(address), |n| {
            CountedAddress::Network(*n)
        })
}

/// Two decimals: what a reader of an anomaly needs of a rate.
fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_one_shared_network_count_as_one() {
        let policy = AnomalyPolicy {
            shared_networks: vec!["10.1.0.0/16".parse().unwrap()],
            ..AnomalyPolicy::default()
        };
        let counted = |a: &str| counted_address(&policy, a.parse().unwrap()).to_string();
        assert_eq!(counted("10.1.2.3"), counted("10.1.200.7"));
        assert_eq!(counted("10.1.2.3"), "10.1.0.0/16");
        assert_ne!(counted("10.2.0.1"), counted("10.2.0.2"));
        assert_eq!(counted("::ffff:127.0.0.2"), "127.0.0.2");
    }
}
