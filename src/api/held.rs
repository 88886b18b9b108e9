//! Runs an approved request as its agent's own request would have run
//! (`crate::approvals::RunHeld`): the domain's `run_held`, which goes
//! through the same revocation check and records, and the same answers.

use serde_json::Value;

use super::agents::IssuedCertificateView;
use super::error::ApiError;
use super::messages::MessageOutput;
use super::signing::SignResponse;
use super::AppState;
use crate::agents::requests::HeldResult;
use crate::approvals::{HeldRequest, Refusal, RunHeld};
use crate::identity::AgentName;

pub(crate) struct HeldRunner<'a> {
    state: &'a AppState,
    /// The approving vote's request, which the run's records name.
    request_id: &'a str,
}

impl<'a> HeldRunner<'a> {
    pub(crate) fn new(state: &'a AppState, request_id: &'a str) -> Self {
        Self { state, request_id }
    }
}

fn answer<T: serde::Serialize>(answer: T) -> Value {
    serde_json::to_value(answer).unwrap_or(Value::Null)
}

#[async_trait::async_trait]
impl RunHeld for HeldRunner<'_> {
    async fn run(
        &self,
        agent: &AgentName,
        request: &HeldRequest,
        policy_version: i64,
    ) -> Result<Value, Refusal> {
        let ran = self
            .state
            .requests
            .run_held(agent, request, policy_version, self.request_id)
            .await;
        match ran {
            Ok(HeldResult::Signature(signed)) => Ok(answer(SignResponse::from(signed))),
            Ok(HeldResult::Message(signed)) => Ok(answer(MessageOutput::from(signed))),
            Ok(HeldResult::Certificate(certified)) => {
                self.state.metrics.certificates_issued.inc();
                Ok(answer(IssuedCertificateView::new(self.state, certified)))
            }
            Err(e) => {
                let e = ApiError::from(e);
                Err(Refusal {
                    code: e.code.to_string(),
                    message: e.message,
                })
            }
        }
    }
}
