//! The policy file: roles, what each grants, and its limits.
//!
//! ```toml
//! [roles.payments]
//! actions = ["sign", "message", "issue_cert"]
//! intents = ["refund order *", "pay *"]   # for messages; absent = any
//! max_ttl_seconds = 600                   # certificates; absent = keyward's
//! rate_per_second = 5                     # token bucket; absent = no limit
//! burst = 10
//!
//! [anomaly]                               # what detection does:
//! credential_sharing = "suspend"          # "off", "alert" (the default)
//!                                         # or "suspend"
//! rate_spike = "alert"                    # "off" by default
//! cross_agent_probing = "suspend"         # "alert" by default
//! sharing_window_seconds = 60             # two addresses within this,
//! probing_denials = 5                     # or this many denials
//! shared_networks = ["10.0.0.0/8"]        # addresses behind one NAT or proxy
//! rate_spike_factor = 10                  # a rate this many times the
//! rate_spike_floor = 10                   # agent's baseline, and above this
//!                                         # many requests a second
//! rate_baseline_seconds = 3600            # how long the baseline remembers
//! ```
//!
//! An agent has the roles named by its scopes. A request is allowed when
//! some role of the agent grants its action (and, for a message, its
//! intent); the limits are those of the most generous such role.
//!
//! Renewal (a client certificate by enrollment, TPM attestation or
//! `POST /v1/renew`) is granted by every policy, since an agent that cannot
//! renew loses its identity; it is never held for approval, but the
//! agent's roles cap its lifetime (`max_ttl_seconds`) and its rate.
//!
//! Every number is checked against a range a deployment could mean, so a
//! policy that parses can never make a request fail in arithmetic.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// What a role can grant.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    Sign,
    Message,
    IssueCert,
    /// Not written in a policy: every policy grants it (see the module).
    #[serde(skip)]
    Renew,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub actions: Vec<Grant>,
    /// Glob patterns (`*` matches any run of characters) a message's intent
    /// must match; absent means any intent.
    pub intents: Option<Vec<String>>,
    pub max_ttl_seconds: Option<u64>,
    pub rate_per_second: Option<f64>,
    pub burst: Option<u32>,
    /// Requests under this role wait for an admin's approval.
    #[serde(default)]
    pub requires_approval: bool,
    /// How many different admins must approve (the two-person rule: 2).
    pub approvals_required: Option<u8>,
    /// Rotate the custodial key of agents with this role when it is older
    /// than this (keyward does it; reason `superseded`).
    pub rotate_after_seconds: Option<u64>,
    /// An agent's client certificate past half its lifetime authenticates
    /// for nothing but its renewal.
    #[serde(default)]
    pub renew_at_half_life: bool,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    #[serde(default)]
    pub roles: BTreeMap<String, Role>,
    #[serde(default)]
    pub anomaly: AnomalyPolicy,
}

/// What keyward does when a detector fires.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyResponse {
    Off,
    /// An audit entry, a metric, a hook event and a row in
    /// `/v1/anomalies`.
    #[default]
    Alert,
    /// All of that, and the agent is suspended at once until an admin
    /// resumes it (quarantine with a human in the loop).
    Suspend,
}

impl AnomalyResponse {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Alert => "alert",
            Self::Suspend => "suspend",
        }
    }
}

/// The `[anomaly]` section: detection is on (alerting) unless a policy
/// turns it off.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyPolicy {
    /// One credential used from two or more source addresses within
    /// `sharing_window_seconds`: the mark of a copied credential.
    pub credential_sharing: AnomalyResponse,
    /// An agent's request rate far above its own moving baseline and
    /// above `rate_spike_floor`.
    pub rate_spike: AnomalyResponse,
    pub cross_agent_probing: AnomalyResponse,
    /// The window of sharing and probing, and the span within which one
    /// credential's detections of one kind are one anomaly.
    pub sharing_window_seconds: u64,
    /// Denials (`other_agent`, `not_in_scope`, `intent_not_allowed`) of
    /// one credential within the window that make cross-agent probing.
    pub probing_denials: u32,
    /// Networks (CIDR) each of which counts as one address: a NAT or a
    /// pool of proxies that one agent's requests may leave from.
    pub shared_networks: Vec<ipnet::IpNet>,
    /// How many times its baseline an agent's rate must be to be a spike.
    pub rate_spike_factor: f64,
    /// Requests a second (on one replica) below which no rate is a spike,
    /// however quiet the agent was: an idle agent that wakes is not an
    /// attack.
    pub rate_spike_floor: f64,
    /// The time constant of the moving baseline: how long a rate is
    /// remembered. An agent is judged once a replica has watched it for a
    /// sixth of this (ten minutes at the default hour).
    pub rate_baseline_seconds: u64,
}

impl Default for AnomalyPolicy {
    fn default() -> Self {
        Self {
            credential_sharing: AnomalyResponse::Alert,
            // Off unless a policy turns it on: what rate is normal is the
            // deployment's to say (the floor), and a floor that does not
            // fit alerts on every busy agent.
            rate_spike: AnomalyResponse::Off,
            cross_agent_probing: AnomalyResponse::Alert,
            probing_denials: DEFAULT_PROBING_DENIALS,
            sharing_window_seconds: DEFAULT_SHARING_WINDOW_SECONDS,
            shared_networks: Vec::new(),
            rate_spike_factor: DEFAULT_RATE_SPIKE_FACTOR,
            rate_spike_floor: DEFAULT_RATE_SPIKE_FLOOR,
            rate_baseline_seconds: DEFAULT_RATE_BASELINE_SECONDS,
        }
    }
}

pub const DEFAULT_SHARING_WINDOW_SECONDS: u64 = 60;
pub const DEFAULT_PROBING_DENIALS: u32 = 5;
pub const MAX_PROBING_DENIALS: u32 = 1000;
/// Longest sharing window: a day. Beyond it an agent that moved hosts
/// looks like a thief.
pub const MAX_SHARING_WINDOW_SECONDS: u64 = 86_400;
pub const MAX_SHARED_NETWORKS: usize = 256;
pub const DEFAULT_RATE_SPIKE_FACTOR: f64 = 10.0;
pub const DEFAULT_RATE_SPIKE_FLOOR: f64 = 10.0;
pub const DEFAULT_RATE_BASELINE_SECONDS: u64 = 3600;
/// Shortest baseline: a minute (its warm-up is then ten seconds, one
/// measuring slot). Longest: a week.
pub const RATE_BASELINE_SECONDS: std::ops::RangeInclusive<u64> = 60..=7 * 86_400;

/// What the roles of an agent allow for one kind of request.
#[derive(Clone, Debug, PartialEq)]
pub struct Allowance {
    pub max_ttl: Option<Duration>,
    /// (rate per second, burst); `None` when some granting role has no limit.
    pub rate: Option<(f64, u32)>,
    /// Admins who must approve first; 0 when some granting role needs none.
    pub approvals: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DocumentError {
    #[error("the policy is not valid TOML for keyward: {0}")]
    Parse(String),
    #[error("role {0:?}: {1}")]
    Role(String, &'static str),
    #[error("[anomaly]: {0}")]
    Anomaly(&'static str),
}

/// Longest policy accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 32 * 1024;

/// Slowest rate a role may set: one request a day. Slower than this is a
/// role that grants nothing, which is better written without the action.
pub const MIN_RATE_PER_SECOND: f64 = 1.0 / 86_400.0;
/// Fastest rate a role may set; above it a limit limits nothing a token
/// could do.
pub const MAX_RATE_PER_SECOND: f64 = 1_000_000.0;
pub const MAX_BURST: u32 = 1_000_000;
/// Longest certificate lifetime a role may allow (keyward's own maximum
/// still applies on top).
pub const MAX_TTL_SECONDS: u64 = 366 * 86_400;
/// Longest key age a role may allow before keyward rotates the key.
pub const MAX_ROTATE_AFTER_SECONDS: u64 = 10 * 366 * 86_400;

impl PolicyDocument {
    pub fn parse(text: &str) -> Result<Self, DocumentError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(DocumentError::Parse("longer than 32 KiB".into()));
        }
        let document: Self =
            toml::from_str(text).map_err(|e| DocumentError::Parse(e.message().to_owned()))?;
        let anomaly = &document.anomaly;
        if !(1..=MAX_SHARING_WINDOW_SECONDS).contains(&anomaly.sharing_window_seconds) {
            return Err(DocumentError::Anomaly(
                "sharing_window_seconds must be 1 to 86400 (a day)",
            ));
        }
        // NaN fails the range checks too.
        if !(2.0..=1000.0).contains(&anomaly.rate_spike_factor) {
            return Err(DocumentError::Anomaly(
                "rate_spike_factor must be 2 to 1000",
            ));
        }
        if !(0.1..=MAX_RATE_PER_SECOND).contains(&anomaly.rate_spike_floor) {
            return Err(DocumentError::Anomaly(
                "rate_spike_floor must be 0.1 to 1000000 requests a second",
            ));
        }
        if !RATE_BASELINE_SECONDS.contains(&anomaly.rate_baseline_seconds) {
            return Err(DocumentError::Anomaly(
                "rate_baseline_seconds must be 60 to 604800 (a week)",
            ));
        }
        if !(2..=MAX_PROBING_DENIALS).contains(&anomaly.probing_denials) {
            return Err(DocumentError::Anomaly("probing_denials must be 2 to 1000"));
        }
        if anomaly.shared_networks.len() > MAX_SHARED_NETWORKS {
            return Err(DocumentError::Anomaly("at most 256 shared_networks"));
        }
        for (name, role) in &document.roles {
            let err = |what| Err(DocumentError::Role(name.clone(), what));
            if crate::identity::Scope::parse(name).is_err() {
                return err("a role name must be a valid scope name");
            }
            if role.actions.is_empty() {
                return err("actions is empty");
            }
            if role
                .max_ttl_seconds
                .is_some_and(|t| !(1..=MAX_TTL_SECONDS).contains(&t))
            {
                return err("max_ttl_seconds must be 1 to 31622400 (366 days)");
            }
            match (role.rate_per_second, role.burst) {
                // NaN fails the range check too.
                (Some(rate), _) if !(MIN_RATE_PER_SECOND..=MAX_RATE_PER_SECOND).contains(&rate) => {
                    return err("rate_per_second must be between 1/86400 (one a day) and 1000000")
                }
                (Some(_), Some(burst)) if !(1..=MAX_BURST).contains(&burst) => {
                    return err("burst must be 1 to 1000000")
                }
                (None, Some(_)) => return err("burst needs rate_per_second"),
                _ => {}
            }
            match (role.requires_approval, role.approvals_required) {
                (false, Some(_)) => return err("approvals_required needs requires_approval"),
                (true, Some(n)) if !(1..=2).contains(&n) => {
                    return err("approvals_required is 1 or 2")
                }
                _ => {}
            }
            if role
                .rotate_after_seconds
                .is_some_and(|t| !(1..=MAX_ROTATE_AFTER_SECONDS).contains(&t))
            {
                return err("rotate_after_seconds must be 1 to 316224000 (ten years)");
            }
            for pattern in role.intents.iter().flatten() {
                let printable = pattern.bytes().all(|b| (0x20..=0x7e).contains(&b));
                if pattern.is_empty() || pattern.len() > 256 || !printable {
                    return err("an intent pattern is 1 to 256 printable ASCII characters");
                }
            }
        }
        Ok(document)
    }

    /// What `roles` allow for `grant` (and `intent`, for messages); `None`
    /// when no role of theirs grants it.
    pub fn allowance(
        &self,
        roles: &[String],
        grant: Grant,
        intent: Option<&str>,
    ) -> Option<Allowance> {
        let roles: Vec<&Role> = roles.iter().filter_map(|r| self.roles.get(r)).collect();
        if grant == Grant::Renew {
            return Some(Self::renewal(&roles));
        }
        let granting: Vec<&Role> = roles
            .into_iter()
            .filter(|role| role.actions.contains(&grant))
            .filter(|role| match (&role.intents, intent) {
                (Some(patterns), Some(intent)) => patterns.iter().any(|p| glob_match(p, intent)),
                _ => true,
            })
            .collect();
        if granting.is_empty() {
            return None;
        }
        // A granting role without a limit grants without one.
        let max_ttl = if granting.iter().any(|r| r.max_ttl_seconds.is_none()) {
            None
        } else {
            most_generous_ttl(&granting)
        };
        let rate = if granting.iter().any(|r| r.rate_per_second.is_none()) {
            None
        } else {
            most_generous_rate(&granting)
        };
        let approvals = granting
            .iter()
            .map(|r| {
                if r.requires_approval {
                    r.approvals_required.unwrap_or(1)
                } else {
                    0
                }
            })
            .min()
            .unwrap_or(0);
        Some(Allowance {
            max_ttl,
            rate,
            approvals,
        })
    }

    /// Renewal is every role's, so a role that says nothing about
    /// certificates or rates must not lift another role's limit: the most
    /// generous limit among the roles that set one applies, and none only
    /// when no role sets one. Never held for approval.
    fn renewal(roles: &[&Role]) -> Allowance {
        Allowance {
            max_ttl: most_generous_ttl(roles),
            rate: most_generous_rate(roles),
            approvals: 0,
        }
    }
}

fn most_generous_ttl(roles: &[&Role]) -> Option<Duration> {
    roles
        .iter()
        .filter_map(|r| r.max_ttl_seconds)
        .max()
        .map(Duration::from_secs)
}

/// (rate per second, burst) of the role with the highest rate that sets one.
fn most_generous_rate(roles: &[&Role]) -> Option<(f64, u32)> {
    roles
        .iter()
        .filter_map(|r| {
            r.rate_per_second
                .map(|rate| (rate, r.burst.unwrap_or_else(|| rate.ceil().max(1.0) as u32)))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

impl PolicyDocument {
    /// The shortest `rotate_after_seconds` among `roles`.
    pub fn rotate_after(&self, roles: &[String]) -> Option<Duration> {
        roles
            .iter()
            .filter_map(|r| self.roles.get(r)?.rotate_after_seconds)
            .min()
            .map(Duration::from_secs)
    }

    /// Whether some role of `roles` requires renewal at half-life.
    pub fn renew_at_half_life(&self, roles: &[String]) -> bool {
        roles.iter().any(|r| {
            self.roles
                .get(r)
                .is_some_and(|role| role.renew_at_half_life)
        })
    }
}

/// `*` matches any run of characters (also none); everything else matches
/// itself. Iterative, so no input makes it slow.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [roles.payments]
        actions = ["sign", "message"]
        intents = ["refund order *", "pay *"]
        rate_per_second = 2
        burst = 3

        [roles.certs]
        actions = ["issue_cert"]
        max_ttl_seconds = 600
    "#;

    fn roles(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_role_grants_only_its_actions_and_intents() {
        let policy = PolicyDocument::parse(POLICY).unwrap();
        let payments = roles(&["payments"]);
        assert!(policy.allowance(&payments, Grant::Sign, None).is_some());
        assert!(policy
            .allowance(&payments, Grant::IssueCert, None)
            .is_none());
        assert!(policy
            .allowance(&payments, Grant::Message, Some("refund order 42"))
            .is_some());
        assert!(policy
            .allowance(&payments, Grant::Message, Some("delete everything"))
            .is_none());
        assert!(policy
            .allowance(&roles(&["unknown"]), Grant::Sign, None)
            .is_none());
        let certs = policy
            .allowance(&roles(&["certs"]), Grant::IssueCert, None)
            .unwrap();
        assert_eq!(certs.max_ttl, Some(Duration::from_secs(600)));
        let rate = policy.allowance(&payments, Grant::Sign, None).unwrap().rate;
        assert_eq!(rate, Some((2.0, 3)));
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        for (text, expected) in [
            ("[roles.x]\nactions = []", "actions is empty"),
            ("[roles.x]\nactions = [\"fly\"]", ""),
            (
                "[roles.x]\nactions = [\"sign\"]\nburst = 2",
                "burst needs rate_per_second",
            ),
            (
                "[roles.x]\nactions = [\"sign\"]\nrate_per_second = -1",
                "rate_per_second",
            ),
            (
                "[roles.x]\nactions = [\"sign\"]\nrequires_approval = true\napprovals_required = 3",
                "1 or 2",
            ),
            (
                "[roles.x]\nactions = [\"sign\"]\napprovals_required = 2",
                "needs requires_approval",
            ),
            ("[roles.x]\nactions = [\"sign\"]\nwhatever = 1", ""),
            ("[roles.\"Bad Name\"]\nactions = [\"sign\"]", "scope name"),
            ("not toml at all [", ""),
        ] {
            let e = PolicyDocument::parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn numbers_outside_what_a_deployment_could_mean_are_refused() {
        let role = |line: &str| format!("[roles.x]\nactions = [\"sign\"]\n{line}\n");
        for (line, expected) in [
            ("rate_per_second = 1e-300", "rate_per_second"),
            ("rate_per_second = 0.00001", "rate_per_second"),
            ("rate_per_second = 1e300", "rate_per_second"),
            ("rate_per_second = nan", "rate_per_second"),
            ("rate_per_second = inf", "rate_per_second"),
            ("rate_per_second = 0", "rate_per_second"),
            ("rate_per_second = 1\nburst = 0", "burst"),
            ("rate_per_second = 1\nburst = 1000001", "burst"),
            ("max_ttl_seconds = 0", "max_ttl_seconds"),
            ("max_ttl_seconds = 31622401", "max_ttl_seconds"),
            ("rotate_after_seconds = 0", "rotate_after_seconds"),
            ("rotate_after_seconds = 316224001", "rotate_after_seconds"),
            ("max_ttl_seconds = -1", ""),
            ("burst = 4294967296\nrate_per_second = 1", ""),
        ] {
            let text = role(line);
            let e = PolicyDocument::parse(&text).unwrap_err().to_string();
            assert!(e.contains(expected), "{line}: {e}");
        }
        for line in [
            "rate_per_second = 0.0000116",
            "rate_per_second = 1000000\nburst = 1000000",
            "max_ttl_seconds = 31622400",
            "rotate_after_seconds = 316224000",
        ] {
            PolicyDocument::parse(&role(line)).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn renewal_is_granted_to_every_agent_within_its_roles_limits() {
        let policy = PolicyDocument::parse(
            r#"
            [roles.limited]
            actions = ["sign"]
            max_ttl_seconds = 300
            rate_per_second = 1
            burst = 2

            [roles.talker]
            actions = ["message"]
        "#,
        )
        .unwrap();
        let renew = |roles: &[&str]| policy.allowance(&self::roles(roles), Grant::Renew, None);
        let limited = renew(&["limited"]).unwrap();
        assert_eq!(limited.max_ttl, Some(Duration::from_secs(300)));
        assert_eq!(limited.rate, Some((1.0, 2)));
        assert_eq!(limited.approvals, 0);
        // A role that says nothing of lifetimes or rates lifts neither.
        assert_eq!(renew(&["limited", "talker"]), Some(limited));
        assert_eq!(
            renew(&[]),
            Some(Allowance {
                max_ttl: None,
                rate: None,
                approvals: 0
            })
        );
        // Not something a policy writes.
        assert!(PolicyDocument::parse("[roles.x]\nactions = [\"renew\"]").is_err());
    }

    /// The parser fuzzed in the suite: documents assembled from a policy's
    /// own vocabulary with hostile values, and byte-level mutations of a
    /// valid one. Nothing panics, and whatever parses has limits the rate
    /// arithmetic can use (a rate of 1e-300 once passed and then panicked
    /// a request in `Duration::from_secs_f64`).
    #[test]
    fn no_policy_that_parses_breaks_the_arithmetic_that_uses_it() {
        use rand::rngs::StdRng;
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x6b65_7977_6172_6400);
        let plausible = ["1", "2", "0.5", "60", "300", "true"];
        let hostile = [
            "0",
            "-0",
            "1",
            "-1",
            "2",
            "0.5",
            "1e-300",
            "5e-324",
            "1e300",
            "nan",
            "inf",
            "-inf",
            "1.0e-5",
            "0.0000116",
            "86400",
            "1e6",
            "1000000",
            "1000001",
            "4294967295",
            "4294967296",
            "18446744073709551615",
            "-9223372036854775808",
            "31622400",
            "3.4e38",
            "true",
            "\"1\"",
            "[]",
        ];
        let keys = [
            "max_ttl_seconds",
            "rate_per_second",
            "burst",
            "requires_approval",
            "approvals_required",
            "rotate_after_seconds",
            "renew_at_half_life",
        ];
        let actions = [
            "\"sign\"",
            "\"message\"",
            "\"issue_cert\"",
            "\"renew\"",
            "\"x\"",
        ];
        let grants = [Grant::Sign, Grant::Message, Grant::IssueCert, Grant::Renew];
        let mut accepted = 0;
        for _ in 0..10_000 {
            let mut text = String::new();
            let role_count = rng.gen_range(1..=3);
            for r in 0..role_count {
                text.push_str(&format!("[roles.r{r}]\n"));
                // Mostly grants that exist, so that many documents parse.
                let pool = if rng.gen_bool(0.8) {
                    &actions[..3]
                } else {
                    &actions[..]
                };
                let count = rng.gen_range(1..=3);
                let chosen: Vec<&str> = pool.choose_multiple(&mut rng, count).copied().collect();
                text.push_str(&format!("actions = [{}]\n", chosen.join(", ")));
                let count = rng.gen_range(0..=3);
                for key in keys.choose_multiple(&mut rng, count) {
                    let value = if rng.gen_bool(0.5) {
                        plausible.choose(&mut rng).unwrap()
                    } else {
                        hostile.choose(&mut rng).unwrap()
                    };
                    text.push_str(&format!("{key} = {value}\n"));
                }
            }
            let Ok(policy) = PolicyDocument::parse(&text) else {
                continue;
            };
            accepted += 1;
            let all: Vec<String> = (0..role_count).map(|r| format!("r{r}")).collect();
            for grant in grants {
                let Some(allowance) = policy.allowance(&all, grant, Some("any intent")) else {
                    continue;
                };
                if let Some((rate, burst)) = allowance.rate {
                    assert!(
                        (MIN_RATE_PER_SECOND..=MAX_RATE_PER_SECOND).contains(&rate),
                        "{text}"
                    );
                    assert!((1..=MAX_BURST).contains(&burst), "{text}");
                    // What the token bucket computes for a Retry-After.
                    let wait = Duration::from_secs_f64(1.0 / rate);
                    assert!(wait <= Duration::from_secs(86_400), "{text}");
                }
                if let Some(ttl) = allowance.max_ttl {
                    assert!(ttl >= Duration::from_secs(1), "{text}");
                }
            }
        }
        assert!(
            accepted > 1000,
            "the generator should also make valid policies: {accepted}"
        );

        let valid = POLICY.as_bytes();
        for _ in 0..10_000 {
            let mut bytes = valid.to_vec();
            for _ in 0..rng.gen_range(1..=8) {
                let at = rng.gen_range(0..bytes.len());
                match rng.gen_range(0..3) {
                    0 => bytes[at] = rng.gen(),
                    1 => bytes.insert(at, *b"=[]\"*.,1e9-\n".choose(&mut rng).unwrap()),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let _ = PolicyDocument::parse(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob_match("pay *", "pay bob 10"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("pay *", "repay bob"));
        assert!(!glob_match("a*b", "a-x-c"));
        let long = "a".repeat(10_000);
        assert!(!glob_match("*a*a*a*a*a*b", &long));
    }
}
