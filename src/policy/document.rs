//! The policy file: roles, what each grants, and its limits.
//!
//! ```toml
//! [roles.payments]
//! actions = ["sign", "message", "issue_cert"]
//! intents = ["refund order *", "pay *"]   # for messages; absent = any
//! max_ttl_seconds = 600                   # certificates; absent = keyward's
//! rate_per_second = 5                     # token bucket; absent = no limit
//! burst = 10
//! ```
//!
//! An agent has the roles named by its scopes. A request is allowed when
//! some role of the agent grants its action (and, for a message, its
//! intent); the limits are those of the most generous such role.

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
}

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
}

/// Longest policy accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 32 * 1024;

impl PolicyDocument {
    pub fn parse(text: &str) -> Result<Self, DocumentError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(DocumentError::Parse("longer than 32 KiB".into()));
        }
        let document: Self =
            toml::from_str(text).map_err(|e| DocumentError::Parse(e.message().to_owned()))?;
        for (name, role) in &document.roles {
            let err = |what| Err(DocumentError::Role(name.clone(), what));
            if crate::identity::Scope::parse(name).is_err() {
                return err("a role name must be a valid scope name");
            }
            if role.actions.is_empty() {
                return err("actions is empty");
            }
            if role.max_ttl_seconds == Some(0) {
                return err("max_ttl_seconds must be positive");
            }
            match (role.rate_per_second, role.burst) {
                (Some(rate), _) if !(rate.is_finite() && rate > 0.0) => {
                    return err("rate_per_second must be a positive number")
                }
                (Some(_), Some(0)) => return err("burst must be positive"),
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
            if role.rotate_after_seconds == Some(0) {
                return err("rotate_after_seconds must be positive");
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
        let granting: Vec<&Role> = roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .filter(|role| role.actions.contains(&grant))
            .filter(|role| match (&role.intents, intent) {
                (Some(patterns), Some(intent)) => patterns.iter().any(|p| glob_match(p, intent)),
                _ => true,
            })
            .collect();
        if granting.is_empty() {
            return None;
        }
        let max_ttl = if granting.iter().any(|r| r.max_ttl_seconds.is_none()) {
            None
        } else {
            granting
                .iter()
                .filter_map(|r| r.max_ttl_seconds)
                .max()
                .map(Duration::from_secs)
        };
        let rate = if granting.iter().any(|r| r.rate_per_second.is_none()) {
            None
        } else {
            granting
                .iter()
                .filter_map(|r| {
                    r.rate_per_second
                        .map(|rate| (rate, r.burst.unwrap_or_else(|| rate.ceil().max(1.0) as u32)))
                })
                .max_by(|a, b| a.0.total_cmp(&b.0))
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
