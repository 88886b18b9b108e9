//! A real software TPM (swtpm, libtpms) per test: its state in a temporary
//! directory, on two free TCP ports, killed on drop.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward::keys::tpm::TpmConfig;
use tempfile::TempDir;

/// Two consecutive free ports: libtss2's swtpm TCTI takes only the server
/// port and always expects the control channel on the next one.
fn free_port_pair() -> (u16, u16) {
    // The ports are released before swtpm binds them; a collision with
    // another test in that window would show as swtpm failing to start.
    loop {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return (port, port + 1);
        }
    }
}

/// swtpm's local CA: the root and intermediate that sign the EK
/// certificates `swtpm_setup --create-ek-cert` makes. root's is system-wide;
/// other users get one under their XDG config directory.
pub const LOCALCA_DIR: &str = "/var/lib/swtpm-localca";

fn localca_dir() -> PathBuf {
    let system = PathBuf::from(LOCALCA_DIR);
    if system.join("issuercert.pem").exists() {
        return system;
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or(system.clone());
    config.join("var/lib/swtpm-localca")
}

pub struct Swtpm {
    child: Child,
    pub port: u16,
    ctrl: u16,
    pub dir: TempDir,
}

impl Swtpm {
    /// A TPM fresh from the factory, without EK certificates.
    pub fn start() -> Self {
        Self::start_manufactured(false, false)
    }

    /// A TPM as a manufacturer ships it: `swtpm_setup` creates the RSA and
    /// ECC EKs and writes their certificates (from swtpm's local CA) and a
    /// platform certificate to NV.
    pub fn start_with_ek_certificates() -> Self {
        Self::start_manufactured(true, false)
    }

    /// As `start_with_ek_certificates`, with the control channel on a port
    /// of its own rather than at port + 1, where libtss2 expects it.
    pub fn start_with_control_channel_elsewhere() -> Self {
        Self::start_manufactured(true, true)
    }

    fn start_manufactured(ek_certificates: bool, ctrl_elsewhere: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        if ek_certificates {
            let output = Command::new("swtpm_setup")
                .args(["--tpm2", "--create-ek-cert", "--create-platform-cert"])
                .arg("--tpmstate")
                .arg(&state)
                .arg("--overwrite")
                .output()
                .expect("swtpm_setup is installed (swtpm-tools)");
            assert!(
                output.status.success(),
                "swtpm_setup failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let (child, port, ctrl) = spawn_on_free_ports(&state, ctrl_elsewhere);
        Self {
            child,
            port,
            ctrl,
            dir,
        }
    }

    /// Stops the TPM and starts it again on the same state: what a host
    /// reboot does to a real one. It comes back on new ports: the old ones
    /// can sit in TIME_WAIT, and swtpm cannot bind them then.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, port, ctrl) = spawn_on_free_ports(&self.dir.path().join("state"), false);
        self.port = port;
        self.ctrl = ctrl;
        self.child = child;
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn config(&self) -> TpmConfig {
        TpmConfig {
            tcti: self.tcti(),
            key_dir: self.dir.path().join("keys"),
        }
    }

    /// A directory holding swtpm's local CA certificates: the EK roots of
    /// every TPM made by `start_with_ek_certificates`.
    pub fn localca_roots(into: &Path) -> PathBuf {
        let roots = into.join("ek-roots");
        std::fs::create_dir_all(&roots).unwrap();
        if !localca_dir().join("issuercert.pem").exists() {
            // swtpm's local CA is created by the first manufacturing run.
            drop(Self::start_with_ek_certificates());
        }
        let localca = localca_dir();
        for name in ["swtpm-localca-rootca-cert.pem", "issuercert.pem"] {
            std::fs::copy(localca.join(name), roots.join(name))
                .unwrap_or_else(|e| panic!("{}/{name}: {e}", localca.display()));
        }
        roots
    }
}

/// Starts swtpm on ports free a moment ago. Another test can take one in
/// between (swtpm then exits at once): it is started again on others.
fn spawn_on_free_ports(state: &Path, ctrl_elsewhere: bool) -> (Child, u16, u16) {
    for _ in 0..5 {
        let (port, mut ctrl) = free_port_pair();
        if ctrl_elsewhere {
            // Far from port + 1, and free when probed.
            ctrl = loop {
                let probe = TcpListener::bind("127.0.0.1:0").unwrap();
                let candidate = probe.local_addr().unwrap().port();
                if candidate.abs_diff(port) > 1 {
                    break candidate;
                }
            };
        }
        if let Some(child) = spawn(state, port, ctrl) {
            return (child, port, ctrl);
        }
    }
    panic!("swtpm exited at start five times: are its ports being taken?");
}

/// swtpm listening on `port`, or `None` if it exited first.
fn spawn(state: &Path, port: u16, ctrl: u16) -> Option<Child> {
    let mut child = Command::new("swtpm")
        .arg("socket")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port}"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={ctrl}"))
        .arg("--flags")
        .arg("not-need-init,startup-clear")
        .stdin(Stdio::null())
        .spawn()
        .expect("swtpm is installed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        assert!(Instant::now() < deadline, "swtpm did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child)
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
