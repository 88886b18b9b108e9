//! The crate-level error: every module's error converts into it, for callers
//! (the CLI, embedding programs) that handle keyward as a whole.

use crate::agents::AgentError;
use crate::attestation::AttestationError;
use crate::config::ConfigError;
use crate::keys::KeyError;
use crate::pki::CaError;
use crate::policy::PolicyError;
use crate::pool::PoolError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Attestation(#[from] AttestationError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Agent(#[from] AgentError),
}
