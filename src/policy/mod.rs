//! Authorization, in two steps decided here.
//!
//! [`authorize`]: partitioning, fixed rules — an admin may do everything;
//! an agent acts only for itself (its record, keys, certificates,
//! signatures) and never on others or on keyward itself.
//!
//! [`engine::PolicyEngine`]: the versioned policy — what an agent may do
//! for itself (roles named by its scopes: actions, intents, lifetimes,
//! rates, approval). Until a policy is applied, the built-in version 0
//! allows everything partitioning allows. Every decision carries the
//! version it was made under, and the records of what it allowed keep it.

pub mod document;
pub mod engine;

use crate::identity::AgentName;

/// The version of the built-in policy.
pub const BUILTIN_POLICY_VERSION: i64 = 0;

/// Who is calling, as proven by the API layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An operator, by an admin token or an admin client certificate.
    Admin(Admin),
    /// An agent, authenticated by its own client certificate.
    Agent(AgentName),
}

/// An admin: a person, named, holding one or more credentials. Everything
/// that counts admins (the two-person rule) counts names, so one person
/// with a token and a certificate is one admin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    pub name: AgentName,
    /// Which credential was used: `token:<first 8 hex digits of its
    /// SHA-256>` or `cert:<serial>`. Never the secret itself.
    pub credential: String,
}

impl Caller {
    /// How the caller is named in audit events.
    pub fn audit_name(&self) -> String {
        match self {
            Caller::Admin(admin) => format!("admin:{}", admin.name),
            Caller::Agent(name) => format!("agent:{name}"),
        }
    }
}

/// What the caller wants to do.
#[derive(Clone, Copy, Debug)]
pub enum Action<'a> {
    CreateAgent,
    /// Change an agent's scopes (its roles).
    UpdateAgent,
    ListAgents,
    ReadAgent(&'a AgentName),
    IssueCertificate(&'a AgentName),
    /// Sign with the agent's custodial key (raw digest or message).
    Sign(&'a AgentName),
    /// Sign an agent-to-agent message envelope as the agent.
    SignMessage(&'a AgentName),
    ReadAttestation,
    /// Check a signature or an envelope: anyone authenticated may.
    Verify,
    /// Revoke a certificate, or revoke, suspend or resume an agent.
    Revoke,
    /// Register, list or remove revocation hooks.
    ManageHooks,
    /// Issue an enrollment token for an agent's client credential.
    CreateEnrollmentToken,
    /// Apply, read or roll back the policy.
    ManagePolicy,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// `reason` is a machine-readable code.
    #[error("forbidden: {reason}")]
    Forbidden { reason: &'static str },
    /// The policy in force does not grant it.
    #[error("denied by policy version {policy_version}: {reason}")]
    Denied {
        reason: &'static str,
        policy_version: i64,
    },
    #[error("rate limit reached; retry in {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },
    /// A certificate lifetime asked for above what the agent's roles allow.
    #[error("the policy (version {policy_version}) allows certificates of at most {max:?}")]
    TtlAboveLimit {
        max: std::time::Duration,
        policy_version: i64,
    },
}

/// A line diff of two policy versions: `-` removed, `+` added, ` ` kept
/// (longest common subsequence; policies are small).
pub fn diff_lines(old: &str, new: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        }
    }
    out
}

/// Partitioning: whether `caller` may act on `action`'s target at all.
/// What an agent may do for itself is the versioned policy's to decide
/// (`engine::PolicyEngine::permit`), which also names the version.
pub fn authorize(caller: &Caller, action: Action<'_>) -> Result<(), PolicyError> {
    match (caller, action) {
        (Caller::Admin(_), _) => Ok(()),
        (
            Caller::Agent(me),
            Action::ReadAgent(target)
            | Action::IssueCertificate(target)
            | Action::Sign(target)
            | Action::SignMessage(target),
        ) => {
            if me == target {
                Ok(())
            } else {
                Err(PolicyError::Forbidden {
                    reason: "other_agent",
                })
            }
        }
        (Caller::Agent(_), Action::ReadAttestation | Action::Verify) => Ok(()),
        (
            Caller::Agent(_),
            Action::CreateAgent
            | Action::UpdateAgent
            | Action::ListAgents
            | Action::Revoke
            | Action::ManageHooks
            | Action::CreateEnrollmentToken
            | Action::ManagePolicy,
        ) => Err(PolicyError::Forbidden {
            reason: "admin_only",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(n: &str) -> AgentName {
        AgentName::parse(n).unwrap()
    }

    #[test]
    fn an_agent_acts_only_for_itself() {
        let alice = Caller::Agent(agent("alice"));
        assert!(authorize(&alice, Action::IssueCertificate(&agent("alice"))).is_ok());
        assert_eq!(
            authorize(&alice, Action::IssueCertificate(&agent("bob"))),
            Err(PolicyError::Forbidden {
                reason: "other_agent"
            })
        );
        assert_eq!(
            authorize(&alice, Action::CreateAgent),
            Err(PolicyError::Forbidden {
                reason: "admin_only"
            })
        );
    }

    #[test]
    fn a_diff_shows_what_was_removed_and_added() {
        let d = diff_lines("a\nb\nc\n", "a\nc\nd\n");
        assert_eq!(d, "  a\n- b\n  c\n+ d\n");
        assert_eq!(diff_lines("", "x"), "+ x\n");
    }

    #[test]
    fn an_admin_may_act_on_every_agent() {
        let admin = Caller::Admin(Admin {
            name: agent("ops"),
            credential: "token:00000000".into(),
        });
        assert!(authorize(&admin, Action::IssueCertificate(&agent("bob"))).is_ok());
        assert!(authorize(&admin, Action::ManagePolicy).is_ok());
    }
}
