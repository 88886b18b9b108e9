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

use super::serve::cli_runtime;

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the log against the audit key: the checkpoint's signature,
    /// that it extends an earlier checkpoint, and (with the admin token or
    /// a mirror holding them) every entry. Exits 0 when it verifies, 1 with
    /// the first thing wrong as the last line.
    Verify(VerifyArgs),
}

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
    }
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
