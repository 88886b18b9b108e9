//! The X.509 stacks keyward's users run, reading its certificates: Go's
//! crypto/x509 (`tests/x509-go`), OpenSSL and Python's `cryptography`, and
//! pkilint's RFC 5280 lint. A certificate kind is done when these accept
//! it, not only keyward's own parser.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use super::run;

/// What the certificate's key is for, as each reader is asked to check it.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// TLS client authentication (id-kp-clientAuth).
    Client,
    /// Signing through keyward (id-kp-documentSigning).
    Signing,
}

impl Purpose {
    fn go_name(self) -> &'static str {
        match self {
            Purpose::Client => "client",
            Purpose::Signing => "signing",
        }
    }
}

/// Writes an issuance answer's certificate and chain (leaf first) to
/// `dir/name.pem`.
pub fn chain_file(dir: &Path, name: &str, issued: &Value) -> PathBuf {
    let path = dir.join(format!("{name}.pem"));
    let leaf = issued["certificate_pem"].as_str().expect("certificate_pem");
    let chain = issued["chain_pem"].as_str().unwrap_or("");
    std::fs::write(&path, format!("{}\n{}", leaf.trim(), chain.trim())).unwrap();
    path
}

/// Go's crypto/x509, OpenSSL and pyca each parse every chain file and
/// verify it under `roots` for its purpose; panics with the reader's own
/// words otherwise. Returns Go's reading of each leaf, in order: `subject`,
/// `uris` and `cmw` (the id-pe-cmw extension's media type and payload,
/// decoded without keyward's code, or null).
pub fn accept(roots: &Path, chains: &[(Purpose, &Path)]) -> Vec<Value> {
    for (purpose, chain) in chains {
        let mut openssl = Command::new("openssl");
        openssl
            .args(["verify", "-x509_strict", "-CAfile"])
            .arg(roots);
        openssl.arg("-untrusted").arg(chain);
        if matches!(purpose, Purpose::Client) {
            openssl.args(["-purpose", "sslclient"]);
        }
        let (ok, out) = run(openssl.arg(leaf_only(chain)));
        assert!(ok, "openssl refuses {}: {out}", chain.display());
        let (ok, out) = run(Command::new("python3")
            .args(["-c", PYCA_READER])
            .arg(roots)
            .arg(chain));
        assert!(ok, "pyca refuses {}: {out}", chain.display());
    }
    for (_, chain) in chains {
        lint_clean(&leaf_only(chain));
    }
    let mut go = Command::new(go_reader());
    go.arg(roots);
    for (purpose, chain) in chains {
        go.arg(format!("{}={}", purpose.go_name(), chain.display()));
    }
    let out = go.output().expect("the Go reader runs");
    assert!(
        out.status.success(),
        "Go's crypto/x509 refuses: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// pkilint's findings on one certificate (PEM) at ERROR severity or above,
/// but for its URI check, which knows only web schemes and flags every
/// `spiffe://` URI; panics if pkilint cannot load the certificate or finds
/// anything else. pkilint is installed by `scripts/test.sh`
/// (`KEYWARD_PKILINT`); without it this fails rather than skips.
pub fn lint_clean(certificate: &Path) {
    let pkilint = std::env::var("KEYWARD_PKILINT").expect(
        "KEYWARD_PKILINT names pkilint's lint_pkix_cert; scripts/test.sh installs it and sets it",
    );
    let output = Command::new(&pkilint)
        .args(["lint", "-s", "ERROR"])
        .arg(certificate)
        .output()
        .expect("pkilint runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !text.to_lowercase().contains("failed to load") && !text.contains("Traceback"),
        "pkilint cannot load {}: {text}",
        certificate.display()
    );
    let findings: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("(ERROR)") || line.contains("(FATAL)"))
        .filter(|line| !(line.contains("pkix.invalid_uri_syntax") && line.contains("\"spiffe://")))
        .collect();
    assert!(
        findings.is_empty(),
        "pkilint on {}: {findings:?}\n{text}",
        certificate.display()
    );
}

/// The leaf of a chain file, alone in a file beside it (openssl verify
/// reads only the first certificate of its argument).
fn leaf_only(chain: &Path) -> PathBuf {
    let text = std::fs::read_to_string(chain).unwrap();
    let end = text
        .find("-----END CERTIFICATE-----")
        .expect("a certificate")
        + 25;
    let leaf = chain.with_extension("leaf.pem");
    std::fs::write(&leaf, &text[..end]).unwrap();
    leaf
}

/// pyca `cryptography`: loads every certificate of the chain, decodes every
/// extension it knows, checks each signature with the issuer's key and the
/// last one's issuer against the roots.
const PYCA_READER: &str = r#"
import sys
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
END = b"-----END CERTIFICATE-----"
def load(path):  # load_pem_x509_certificates is newer than Debian 12's 38.0
    text = open(path, "rb").read()
    return [x509.load_pem_x509_certificate(part + END) for part in text.split(END) if b"BEGIN" in part]
roots = load(sys.argv[1])
chain = load(sys.argv[2])
for cert in chain:
    for ext in cert.extensions:
        ext.value
path = chain + [r for r in roots if r.subject == chain[-1].issuer and r not in chain]
for cert, issuer in zip(path, path[1:] + [path[-1]]):
    if cert.issuer != issuer.subject:
        sys.exit(f"{cert.subject.rfc4514_string()}: no issuer in the chain or the roots")
    issuer.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                               ec.ECDSA(cert.signature_hash_algorithm))
"#;

/// The Go reader, built once per test process from `tests/x509-go`.
fn go_reader() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/x509-go");
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // One binary per process: nextest runs tests as parallel processes.
        let binary = tmp.join(format!("x509check-{}", std::process::id()));
        let (ok, out) = run(Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&binary)
            .arg(".")
            .current_dir(&source)
            .env("GOCACHE", tmp.join("go-cache"))
            .env("GOPATH", tmp.join("go-path"))
            .env("GOFLAGS", "-mod=mod")
            .env("GOTOOLCHAIN", "local"));
        assert!(ok, "go build tests/x509-go (Debian's golang-go): {out}");
        binary
    })
}
