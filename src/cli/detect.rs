//! `keyward anomalies` and `keyward kpis`: what detection found, and the
//! mission's KPIs (docs/observability.md).

use clap::{Args, Subcommand};

use super::output::{Column, Format};
use super::ClientArgs;

#[derive(Subcommand)]
pub(crate) enum AnomaliesCommand {
    /// Detections, newest first (admins).
    List(AnomaliesListArgs),
}

#[derive(Args)]
pub(crate) struct AnomaliesListArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    agent: Option<String>,
    /// e.g. credential_sharing.
    #[arg(long)]
    kind: Option<String>,
    /// RFC 3339 time or Unix seconds.
    #[arg(long)]
    since: Option<String>,
    /// Anomalies before this id (the `next` of an earlier page).
    #[arg(long)]
    before: Option<i64>,
    /// At most this many (1-1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[command(flatten)]
    format: Format,
}

#[derive(Args)]
pub(crate) struct KpisArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Over the last this many seconds (default: a day).
    #[arg(long)]
    window_seconds: Option<u64>,
    #[command(flatten)]
    format: Format,
}

const ANOMALY_COLUMNS: &[Column] = &[
    Column::number("ID", "id"),
    Column::new("KIND", "kind"),
    Column::new("AGENT", "agent"),
    Column::new("CREDENTIAL", "credential"),
    Column::new("RESPONSE", "response"),
    Column::number("DETECTED_AT_MS", "detected_at_ms"),
];

pub(crate) async fn anomalies_command(command: AnomaliesCommand) -> anyhow::Result<()> {
    let AnomaliesCommand::List(args) = command;
    let mut pairs: Vec<(&str, String)> = [
        ("agent", args.agent.clone()),
        ("kind", args.kind.clone()),
        ("since", args.since.clone()),
        ("before", args.before.map(|b| b.to_string())),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    pairs.push(("limit", args.limit.to_string()));
    let query = serde_urlencoded::to_string(pairs)?;
    let page = super::client(&args.client)?
        .get(&format!("/v1/anomalies?{query}"))
        .await?;
    args.format.list(&page, "anomalies", ANOMALY_COLUMNS)
}

pub(crate) async fn kpis_command(args: KpisArgs) -> anyhow::Result<()> {
    let query = args
        .window_seconds
        .map(|w| format!("?window_seconds={w}"))
        .unwrap_or_default();
    let kpis = super::client(&args.client)?
        .get(&format!("/v1/kpis{query}"))
        .await?;
    args.format.object(
        &kpis,
        &[
            "window_seconds",
            "mean_time_to_detect_seconds",
            "mean_time_to_revoke_seconds",
            "policy_compliant_ratio",
        ],
    )
}
