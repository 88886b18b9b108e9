//! Names that identify agents, checked once at the edge and carried as types
//! that can only hold valid values.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An agent's name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("agent names match [a-z0-9][a-z0-9-]{{0,62}}")]
    InvalidAgentName,
    #[error("trust domains are DNS-style names of [a-z0-9.-], 1 to 253 characters")]
    InvalidTrustDomain,
    #[error("scopes are 1 to 128 characters of [A-Za-z0-9:._/*-]")]
    InvalidScope,
}

impl AgentName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let bytes = s.as_bytes();
        let valid = matches!(bytes.first(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::InvalidAgentName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AgentName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<AgentName> for String {
    fn from(n: AgentName) -> String {
        n.0
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SPIFFE trust domain keyward names agents in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let valid = !s.is_empty()
            && s.len() <= 253
            && !s.starts_with(['.', '-'])
            && !s.ends_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::InvalidTrustDomain)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<trust-domain>/agent/<name>`
    pub fn agent_spiffe_id(&self, agent: &AgentName) -> String {
        format!("spiffe://{}/agent/{}", self.0, agent)
    }

    /// `spiffe://<trust-domain>/admin/<name>`: an operator, not an agent.
    pub fn admin_spiffe_id(&self, admin: &AgentName) -> String {
        format!("spiffe://{}/admin/{}", self.0, admin)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> String {
        t.0
    }
}

/// A scope an agent holds, such as `orders:read`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(String);

impl Scope {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let valid = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":._/*-".contains(&b));
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::InvalidScope)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Scope {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.0
    }
}

/// A fresh enrollment token: 256 random bits, shown once. keyward keeps
/// only [`enrollment_token_hash`] of it.
pub fn new_enrollment_token() -> String {
    format!("kwe_{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// What keyward stores of an enrollment token. Surrounding whitespace (a
/// token read from a file) is not part of the token.
pub fn enrollment_token_hash(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.trim().as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names_follow_the_documented_pattern() {
        for ok in ["a", "alpha", "0x", "a-b-c", &"a".repeat(63)] {
            assert!(AgentName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "Alpha",
            "a_b",
            "a b",
            "Bad Name!",
            &"a".repeat(64),
            "é",
        ] {
            assert_eq!(
                AgentName::parse(bad),
                Err(NameError::InvalidAgentName),
                "{bad}"
            );
        }
    }

    #[test]
    fn spiffe_ids_name_the_agent_under_the_trust_domain() {
        let td = TrustDomain::parse("example.org").unwrap();
        let name = AgentName::parse("alpha").unwrap();
        assert_eq!(
            td.agent_spiffe_id(&name),
            "spiffe://example.org/agent/alpha"
        );
    }

    #[test]
    fn scopes_refuse_spaces_and_empties() {
        assert!(Scope::parse("orders:read").is_ok());
        assert!(Scope::parse("").is_err());
        assert!(Scope::parse("a b").is_err());
        assert!(Scope::parse(&"a".repeat(129)).is_err());
    }
}
