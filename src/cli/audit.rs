//! `keyward audit`: the audit log, a transparency log anyone can verify
//! (docs/audit.md).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::{Args, Subcommand};
use p256::pkcs8::DecodePublicKey as _;

use keyward::audit::verify::{self, DirSource, HttpSource, LogSource, Report, VerifyOptions};
use keyward::client::{pinned_to, read_token};

use super::output::{self, Column};
use super::serve::cli_runtime;
use super::ClientArgs;

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the log against the audit key: the checkpoint's signature,
    /// that it extends an earlier checkpoint, and (with the admin token or
    /// a mirror holding them) every entry. Exits 0 when it verifies, 1 with
    /// the first thing wrong as the last line.
    Verify(VerifyArgs),
    /// Search the log's events, oldest first: a table, or JSON lines with
    /// --json (admins; an agent on its own certificate reads its own).
    Events(EventsArgs),
    /// Every event from --since on as JSON lines, for a SIEM: to standard
    /// output, or --out FILE.
    Export(ExportArgs),
}

/// What `GET /v1/audit/events` filters on.
#[derive(Args)]
pub(crate) struct EventFilter {
    #[arg(long)]
    agent: Option<String>,
    /// e.g. certificate.issue, policy.deny, agent.revoke.
    #[arg(long)]
    action: Option<String>,
    /// e.g. admin:ops, agent:alpha, keyward.
    #[arg(long)]
    actor: Option<String>,
    /// RFC 3339 time or Unix seconds (inclusive).
    #[arg(long)]
    since: Option<String>,
    /// RFC 3339 time or Unix seconds (exclusive).
    #[arg(long)]
    until: Option<String>,
}

#[derive(Args)]
pub(crate) struct EventsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    filter: EventFilter,
    /// Events after this entry index (the `next` of an earlier page).
    #[arg(long)]
    after: Option<u64>,
    /// At most this many events (1-1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// One JSON object per line, each the entry as the log holds it.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    filter: EventFilter,
    /// Where to write the JSON lines (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
}

const EVENT_COLUMNS: &[Column] = &[
    Column::number("INDEX", "index"),
    Column::new("TIME", "time"),
    Column::new("ACTOR", "actor"),
    Column::new("ACTION", "action"),
    Column::new("SUBJECT", "subject"),
    Column::new("AGENT", "agent"),
    Column::new("DECISION", "decision"),
];

#[derive(Args)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    log: LogLocation,
    /// The keyward CA's certificate: the only one trusted for --url.
    #[arg(long, requires = "url")]
    ca: Option<PathBuf>,
    /// The audit key (SPKI PEM, as served at /v1/audit/public-key.pem).
    /// Take it from somewhere other than the log being checked.
    #[arg(long)]
    key: PathBuf,
    /// The admin token: with it every entry is read and checked, not only
    /// the hash tiles.
    #[arg(long, requires = "url")]
    token_file: Option<PathBuf>,
    /// A checkpoint saved by an earlier run (--save): the log must extend it.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Where to save the checkpoint that verified, for the next run's
    /// --checkpoint.
    #[arg(long)]
    save: Option<PathBuf>,
}

/// Where the log is read from: a server, or a mirror on disk.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct LogLocation {
    /// The keyward server (its log is under /v1/audit/).
    #[arg(long, requires = "ca")]
    url: Option<String>,
    /// A mirror laid out as the URL space under /v1/audit/ (checkpoint,
    /// tile/0/000, tile/entries/000...).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub(crate) fn audit_command(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify(args) => verify_command(&args),
        AuditCommand::Events(args) => cli_runtime()?.block_on(events_command(&args)),
        AuditCommand::Export(args) => cli_runtime()?.block_on(export_command(&args)),
    }
}

/// The query string of a search: the filters given, then `extra`.
fn events_query(filter: &EventFilter, extra: &[(&str, String)]) -> anyhow::Result<String> {
    let mut pairs: Vec<(&str, String)> = [
        ("agent", &filter.agent),
        ("action", &filter.action),
        ("actor", &filter.actor),
        ("since", &filter.since),
        ("until", &filter.until),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
    .collect();
    pairs.extend(extra.iter().cloned());
    Ok(serde_urlencoded::to_string(pairs)?)
}

async fn events_command(args: &EventsArgs) -> anyhow::Result<()> {
    let mut extra = vec![("limit", args.limit.to_string())];
    if let Some(after) = args.after {
        extra.push(("after", after.to_string()));
    }
    let query = events_query(&args.filter, &extra)?;
    let page = super::client(&args.client)?
        .get(&format!("/v1/audit/events?{query}"))
        .await?;
    let events = page["events"].as_array().map_or(&[][..], Vec::as_slice);
    if args.json {
        return output::emit(&json_lines(events)?);
    }
    let mut shown = output::table(EVENT_COLUMNS, events);
    if let Some(next) = page["next"].as_u64() {
        shown.push_str(&format!("(more: --after {next})\n"));
    }
    output::emit(&shown)
}

/// Follows `next` from the first page to the last, writing each page as it
/// comes: an export of millions of events holds one page at a time.
async fn export_command(args: &ExportArgs) -> anyhow::Result<()> {
    let client = super::client(&args.client)?;
    let mut out: Box<dyn std::io::Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut after: Option<u64> = None;
    let mut exported = 0u64;
    loop {
        let mut extra = vec![("limit", "1000".to_owned())];
        if let Some(after) = after {
            extra.push(("after", after.to_string()));
        }
        let query = events_query(&args.filter, &extra)?;
        let page = client.get(&format!("/v1/audit/events?{query}")).await?;
        let events = page["events"].as_array().map_or(&[][..], Vec::as_slice);
        out.write_all(json_lines(events)?.as_bytes())?;
        exported += events.len() as u64;
        match page["next"].as_u64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    out.flush()?;
    if args.out.is_some() {
        eprintln!("exported {exported} events");
    }
    Ok(())
}

fn json_lines(events: &[serde_json::Value]) -> anyhow::Result<String> {
    let mut lines = String::new();
    for event in events {
        lines.push_str(&serde_json::to_string(event)?);
        lines.push('\n');
    }
    Ok(lines)
}

/// `keyward audit verify`: a log that fails exits 1, its refusal last.
fn verify_command(args: &VerifyArgs) -> anyhow::Result<()> {
    let key_pem = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading the audit key {}", args.key.display()))?;
    let key = p256::PublicKey::from_public_key_pem(&key_pem).with_context(|| {
        format!(
            "{} is not a P-256 public key (SPKI PEM)",
            args.key.display()
        )
    })?;
    let old_checkpoint = args
        .checkpoint
        .as_ref()
        .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
        .transpose()?;
    let (source, entries): (Box<dyn LogSource>, bool) = match (&args.log.url, &args.log.dir) {
        (Some(url), _) => {
            let ca = args.ca.as_ref().context("--url needs --ca")?;
            let token = args.token_file.as_deref().map(read_token).transpose()?;
            let entries = token.is_some();
            let http = pinned_to(ca)?.build()?;
            (Box::new(HttpSource::new(http, url, token)), entries)
        }
        (None, Some(dir)) => {
            // Else every file in it is "not found", the checkpoint first.
            anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
            let source = DirSource::new(dir);
            let entries = source.has_entries();
            (Box::new(source), entries)
        }
        (None, None) => anyhow::bail!("--url or --dir is required"),
    };
    let options = VerifyOptions {
        old_checkpoint,
        entries,
    };
    let outcome = cli_runtime()?.block_on(verify::verify(source.as_ref(), &key, &options));
    match outcome {
        Ok(report) => {
            if let Some(path) = &args.save {
                save(path, &report.checkpoint)?;
            }
            println!("{}", summary(&report));
            Ok(())
        }
        Err(e) => {
            eprintln!("failed: {e}");
            std::process::exit(1);
        }
    }
}

/// `ok: log keyward.local/audit, size 1234, root <base64>, entries checked
/// 1234, extends the checkpoint of size 1000`.
fn summary(report: &Report) -> String {
    let mut line = format!(
        "ok: log {}, size {}, root {}",
        report.origin,
        report.size,
        STANDARD.encode(report.root)
    );
    if report.entries_checked > 0 || report.size == 0 {
        line.push_str(&format!(", entries checked {}", report.entries_checked));
    } else {
        line.push_str(", entries not checked (hash tiles only)");
    }
    if let Some(old) = report.old_size {
        line.push_str(&format!(", extends the checkpoint of size {old}"));
    }
    line
}

/// Replaces `path` whole or not at all: a run cut short must not leave the
/// next run a truncated checkpoint to start from.
fn save(path: &Path, note: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    file.write_all(note)?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("saving the checkpoint to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(entries_checked: u64, old_size: Option<u64>) -> Report {
        Report {
            origin: "keyward.local/audit".into(),
            size: 1234,
            root: [0u8; 32],
            old_size,
            entries_checked,
            checkpoint: Vec::new(),
        }
    }

    #[test]
    fn the_summary_says_what_was_checked() {
        assert_eq!(
            summary(&report(1234, Some(1000))),
            "ok: log keyward.local/audit, size 1234, root \
             AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=, entries checked 1234, \
             extends the checkpoint of size 1000"
        );
        assert_eq!(
            summary(&report(0, None)),
            "ok: log keyward.local/audit, size 1234, root \
             AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=, entries not checked (hash tiles only)"
        );
    }

    #[test]
    fn a_saved_checkpoint_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        std::fs::write(&path, b"old").unwrap();
        save(&path, b"new note\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new note\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
