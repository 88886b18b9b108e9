//! Test harness: a real keyward process with its keys on a real SoftHSM2
//! token (its own data directory and SOFTHSM2_CONF) or in a real swtpm of
//! its own, on SQLite or on the real PostgreSQL server, driven over HTTPS.

#![allow(dead_code)]

pub mod readers;
pub mod swtpm;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// The PostgreSQL server the suite uses; `.ci/run` requires it.
pub fn postgres_admin_url() -> String {
    std::env::var("KEYWARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Where keyward keeps its keys (the CA's, its service keys, the agents'
/// custodial keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keys {
    /// The embedded SoftHSM2 token, keyward's default: custodial keys kept
    /// wrapped in the database unless the config says `custodial_storage =
    /// "token"`.
    SoftHsm,
    /// A TPM 2.0 (`[keys] backend = "tpm"`): a swtpm process the `Server`
    /// starts and owns; every key is a blob pair in `<data-dir>/tpm-keys`.
    Swtpm,
}

/// One cell of the test matrix: a key backend and a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backends {
    pub keys: Keys,
    pub db: Db,
}

/// The tests that do not name a key backend run on keyward's default.
impl From<Db> for Backends {
    fn from(db: Db) -> Self {
        Self {
            keys: Keys::SoftHsm,
            db,
        }
    }
}

/// A database for one test: a SQLite file in the data directory, or a fresh
/// PostgreSQL database dropped afterwards.
pub struct TestDatabase {
    pub url: String,
    postgres_name: Option<String>,
}

impl TestDatabase {
    pub async fn create(db: Db, data_dir: &Path) -> Self {
        match db {
            Db::Sqlite => Self {
                url: format!("sqlite://{}", data_dir.join("keyward.db").display()),
                postgres_name: None,
            },
            Db::Postgres => {
                use sqlx::Connection;
                let admin = postgres_admin_url();
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("PostgreSQL at {admin} is required for the PostgreSQL tests: {e}")
                    });
                let name = format!("keyward_test_{}", hex::encode(rand::random::<[u8; 6]>()));
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                Self {
                    url: format!("{base}/{name}"),
                    postgres_name: Some(name),
                }
            }
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(name) = self.postgres_name.take() {
            // Drop runs outside async context: use a throwaway runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A directory only its owner can read, as keyward requires of its data
/// directory (a plain temporary directory is 0755 under the usual umask).
pub fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// An HTTPS client that trusts `ca` (PEM) and nothing else, with a
/// connection pool of its own.
pub fn https_client(ca: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A running `keyward serve` on its embedded SoftHSM2 token or its own
/// swtpm.
pub struct Server {
    pub data_dir: tempfile::TempDir,
    pub url: String,
    pub database: TestDatabase,
    pub client: reqwest::Client,
    pub admin_token: String,
    pub keys: Keys,
    child: Option<Child>,
    /// Dropped after `child` is killed (`Drop for Server`), so keyward never
    /// sees its TPM vanish under it.
    swtpm: Option<swtpm::Swtpm>,
}

pub fn keyward_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyward")
}

/// `--config <data-dir>/config.toml` when the test wrote one: every keyward
/// command on a server's data directory must see the same `[keys]`.
pub fn config_args(data_dir: &Path) -> Vec<std::ffi::OsString> {
    let config = data_dir.join("config.toml");
    if config.exists() {
        vec!["--config".into(), config.into()]
    } else {
        Vec::new()
    }
}

fn spawn(data_dir: &Path, database_url: &str) -> (Child, String) {
    let mut command = Command::new(keyward_bin());
    command.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2"]);
    command.args(config_args(data_dir));
    let mut child = command
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--database-url")
        .arg(database_url)
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting keyward");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading keyward's first line");
    let addr = line
        .trim()
        .strip_prefix("keyward listening on ")
        .unwrap_or_else(|| panic!("keyward did not start: {line:?}"))
        .to_owned();
    (child, addr)
}

/// A config that keeps custodial keys as token objects, one per agent, on
/// the embedded token (the default keeps them wrapped).
pub const TOKEN_STORAGE: &str =
    "[keys]\nbackend = \"embedded-softhsm\"\ncustodial_storage = \"token\"\n";

/// Runs `$body` with `$c` a fresh connection to the database at `$url`,
/// SQLite or PostgreSQL (the two connection types share no trait the
/// queries below could be written against once).
macro_rules! with_connection {
    ($url:expr, |$c:ident| $body:expr) => {{
        use sqlx::Connection;
        if $url.starts_with("sqlite") {
            let mut $c = sqlx::SqliteConnection::connect($url).await.unwrap();
            $body
        } else {
            let mut $c = sqlx::PgConnection::connect($url).await.unwrap();
            $body
        }
    }};
}

/// keyward's own keys on a serving keyward's token: the CA's, the
/// attestation key, the OCSP responder's, the audit log's and the HTTPS
/// listener's.
pub const SERVICE_KEYS: usize = 5;

impl Server {
    /// A server on `backends` (or on SoftHSM2, given only a `Db`) with
    /// keyward's default config.
    pub async fn start(backends: impl Into<Backends>) -> Self {
        Self::start_with_config(backends, "").await
    }

    /// A server whose `config.toml` (in its data directory) is `config`,
    /// plus, on a TPM, the `[keys]` table for the server's own swtpm. A
    /// config with a `[keys]` table of its own is SoftHSM2's to run.
    pub async fn start_with_config(backends: impl Into<Backends>, config: &str) -> Self {
        let backends = backends.into();
        let data_dir = private_tempdir();
        let swtpm = match backends.keys {
            Keys::SoftHsm => None,
            Keys::Swtpm => Some(swtpm::Swtpm::start()),
        };
        let config = match &swtpm {
            None => config.to_owned(),
            Some(tpm) => {
                assert!(
                    !config.lines().any(|l| l.trim() == "[keys]"),
                    "this config chooses its own key backend: {config:?}"
                );
                let separator = if config.is_empty() || config.ends_with('\n') {
                    ""
                } else {
                    "\n"
                };
                format!(
                    "{config}{separator}[keys]\nbackend = \"tpm\"\ntcti = \"{}\"\n",
                    tpm.tcti()
                )
            }
        };
        if !config.is_empty() {
            std::fs::write(data_dir.path().join("config.toml"), config).unwrap();
        }
        let database = TestDatabase::create(backends.db, data_dir.path()).await;
        let (child, url) = spawn(data_dir.path(), &database.url);
        let mut server = Self {
            data_dir,
            url,
            database,
            client: reqwest::Client::new(),
            admin_token: String::new(),
            keys: backends.keys,
            child: Some(child),
            swtpm,
        };
        server.connect();
        server
    }

    /// The client and admin token for the process just started: its CA and
    /// token are in the data directory by the time it listens.
    fn connect(&mut self) {
        let ca = std::fs::read(self.path("ca.pem")).unwrap();
        self.client = https_client(&ca);
        self.admin_token = std::fs::read_to_string(self.path("admin.token")).unwrap();
    }

    /// Stops the process as an operator would (SIGTERM, see `terminate`)
    /// and starts it again on the same data, database and key store. After
    /// `stop`, it restarts a killed process.
    pub async fn restart(mut self) -> Self {
        self.terminate();
        self.respawn();
        self
    }

    /// Starts the stopped process again, on the same everything.
    fn respawn(&mut self) {
        let (child, url) = spawn(self.data_dir.path(), &self.database.url);
        self.child = Some(child);
        self.url = url;
        self.connect();
    }

    /// SIGTERM, and up to 10 s for keyward to shut down (it destroys its
    /// listener's key on the way out); SIGKILL after that. How it exited,
    /// when it did by itself.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.stop();
        None
    }

    /// SIGKILL: the process ends at once, as in a crash.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.data_dir.path().join(name)
    }

    /// Sends a request with the admin token; returns status and JSON body.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.request(method, path, body, Some(&self.admin_token.clone()))
            .await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        self.request_at(&self.url, method, path, body, token).await
    }

    /// A second keyward process on the same token, data directory and
    /// database: another replica, as production runs them.
    pub fn spawn_replica(&self) -> Replica {
        assert_eq!(
            self.keys,
            Keys::SoftHsm,
            "a TPM's keys load only in that TPM, whose object slots one keyward fills"
        );
        let (child, url) = spawn(self.data_dir.path(), &self.database.url);
        Replica { child, url }
    }

    /// Sends a request to `base` (this server or a replica of it).
    pub async fn request_at(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, format!("{base}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request reached keyward");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Runs a `keyward` command on this server's data directory, config
    /// and database, as an operator on its host would.
    ///
    /// A command that opens the key store cannot run beside a serving
    /// process on swtpm; see `operator_beside`.
    pub fn operator<I, A>(&self, args: I) -> (bool, String)
    where
        I: IntoIterator<Item = A>,
        A: AsRef<std::ffi::OsStr>,
    {
        run(Command::new(keyward_bin())
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .arg("--database-url")
            .arg(&self.database.url)
            .args(config_args(self.data_dir.path()))
            .env_remove("SOFTHSM2_CONF"))
    }

    /// `operator` while this server serves: beside the running process on
    /// SoftHSM2 (a PKCS#11 token serves several processes at once), and
    /// between a SIGTERM and a restart on swtpm. swtpm has no resource
    /// manager: its three object slots are shared by every process, and a
    /// serving keyward keeps its primary and keys loaded in them, so a
    /// second keyward process finds none free (`keyward admin cert-issue`
    /// failed with "Load: out of memory for object contexts"). A host TPM
    /// behind the kernel's resource manager (`/dev/tpmrm0`) serves both.
    pub async fn operator_beside<I, A>(&mut self, args: I) -> (bool, String)
    where
        I: IntoIterator<Item = A>,
        A: AsRef<std::ffi::OsStr>,
    {
        self.beside(|server| server.operator(args)).await
    }

    /// Runs `work` as another user of this server's key store while it
    /// serves, as `operator_beside` runs a command.
    pub async fn beside<T>(&mut self, work: impl FnOnce(&Self) -> T) -> T {
        match self.keys {
            Keys::SoftHsm => work(self),
            Keys::Swtpm => {
                self.terminate();
                let outcome = work(self);
                self.respawn();
                outcome
            }
        }
    }

    /// A tpm2-tools command (`tpm2_<tool>`) against this server's swtpm,
    /// run in its data directory; its output, having succeeded. tpm2-tools
    /// leave what they load in the TPM (no resource manager flushes it):
    /// follow with `tpm2("flushcontext", &["-t"])`.
    pub fn tpm2(&self, tool: &str, args: &[&str]) -> String {
        let (ok, out) = run(Command::new(format!("tpm2_{tool}"))
            .args(args)
            .current_dir(self.data_dir.path())
            .env("TPM2TOOLS_TCTI", self.tcti().expect("a server on swtpm")));
        assert!(ok, "tpm2_{tool} {args:?}: {out}");
        out
    }

    /// Opens the server's database directly, to check what was written.
    pub async fn store(&self) -> std::sync::Arc<dyn keyward::store::Store> {
        keyward::store::connect(&self.database.url).await.unwrap()
    }

    /// Rows in each table a request could write: (agents, certificates, audit events).
    pub async fn row_counts(&self) -> (i64, i64, i64) {
        let sql = "SELECT (SELECT COUNT(*) FROM agents), (SELECT COUNT(*) FROM certificates), \
                   (SELECT COUNT(*) FROM audit_entries)";
        with_connection!(&self.database.url, |c| sqlx::query_as(sql)
            .fetch_one(&mut c)
            .await
            .unwrap())
    }

    /// Runs one statement on the server's database, as another replica or
    /// an operator with database access would; returns the first column of
    /// the first row as an integer when the statement is a query.
    pub async fn sql(&self, sql: &str) -> Option<i64> {
        use sqlx::Row;
        with_connection!(&self.database.url, |c| sqlx::query(sql)
            .fetch_optional(&mut c)
            .await
            .unwrap()
            .map(|r| r.get::<i64, _>(0)))
    }

    /// Whether keyward still holds the custodial key `key_id`: in its key
    /// store (an object on its token, a blob in the TPM key directory), or
    /// as a wrapped blob in its database (an agent's current key or a
    /// retired one not yet destroyed).
    pub async fn custodial_key_held(&self, key_id: &str) -> bool {
        assert!(key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        let wrapped = self
            .sql(&format!(
                "SELECT (SELECT COUNT(*) FROM agents WHERE key_id = '{key_id}' AND key_wrapped IS NOT NULL)
                      + (SELECT COUNT(*) FROM retired_keys WHERE key_id = '{key_id}' AND key_wrapped IS NOT NULL)"
            ))
            .await
            .unwrap_or(0);
        wrapped > 0 || self.key_store_ids().contains(key_id)
    }

    /// The ids of the private keys in keyward's key store: the token's
    /// private key objects as `pkcs11-tool` lists them, or the keys whose
    /// blobs (either half: a half-removed key is still there) are in the
    /// TPM key directory.
    pub fn key_store_ids(&self) -> std::collections::BTreeSet<String> {
        match self.keys {
            Keys::SoftHsm => self
                .token_private_keys()
                .lines()
                .filter_map(|l| l.trim().strip_prefix("label:"))
                .map(|label| label.trim().to_owned())
                .collect(),
            Keys::Swtpm => std::fs::read_dir(self.tpm_key_dir())
                .unwrap()
                .filter_map(|e| {
                    let name = e.unwrap().file_name().into_string().unwrap();
                    match name.rsplit_once('.') {
                        Some((id, "pub" | "priv")) => Some(id.to_owned()),
                        _ => None,
                    }
                })
                .collect(),
        }
    }

    /// Private keys in keyward's key store: its own service keys
    /// (`SERVICE_KEYS`) and the custodial keys it keeps there.
    pub fn key_store_key_count(&self) -> usize {
        match self.keys {
            Keys::SoftHsm => self.token_private_key_count(),
            Keys::Swtpm => self.key_store_ids().len(),
        }
    }

    /// The TCTI of this server's swtpm, on a TPM.
    pub fn tcti(&self) -> Option<String> {
        self.swtpm.as_ref().map(swtpm::Swtpm::tcti)
    }

    /// Where keyward keeps the blobs of a TPM's keys (`[keys] key_dir`'s
    /// default).
    pub fn tpm_key_dir(&self) -> PathBuf {
        self.path("tpm-keys")
    }

    /// Whether custodial keys live in the key store (a TPM's blobs, or token
    /// objects under `custodial_storage = "token"`) rather than wrapped in
    /// the database (SoftHSM2's default).
    pub fn custodial_keys_in_key_store(&self) -> bool {
        let config = std::fs::read_to_string(self.path("config.toml")).unwrap_or_default();
        self.keys == Keys::Swtpm
            || config
                .lines()
                .any(|l| l.replace(' ', "") == "custodial_storage=\"token\"")
    }

    /// What `key_store_key_count` and `wrapped_key_count` should say when
    /// keyward holds `custodial` custodial keys and nothing more.
    pub fn expected_key_counts(&self, custodial: usize) -> (usize, i64) {
        if self.custodial_keys_in_key_store() {
            (SERVICE_KEYS + custodial, 0)
        } else {
            (SERVICE_KEYS, custodial as i64)
        }
    }

    /// `key_store_key_count` and `wrapped_key_count`, for comparing with
    /// `expected_key_counts`.
    pub async fn key_counts(&self) -> (usize, i64) {
        (self.key_store_key_count(), self.wrapped_key_count().await)
    }

    /// The first column of every row a query returns, as text.
    pub async fn sql_strings(&self, sql: &str) -> Vec<String> {
        use sqlx::Row;
        with_connection!(&self.database.url, |c| sqlx::query(sql)
            .fetch_all(&mut c)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect())
    }

    /// Wrapped custodial keys in the database (current and retired).
    pub async fn wrapped_key_count(&self) -> i64 {
        self.sql(
            "SELECT (SELECT COUNT(*) FROM agents WHERE key_wrapped IS NOT NULL)
                  + (SELECT COUNT(*) FROM retired_keys WHERE key_wrapped IS NOT NULL)",
        )
        .await
        .unwrap_or(0)
    }

    /// Private keys on the token: keyward's own service keys (CA and
    /// attestation) and, with `custodial_storage = "token"`, one per agent
    /// key.
    pub fn token_private_key_count(&self) -> usize {
        self.token_private_keys()
            .matches("Private Key Object")
            .count()
    }

    /// The private keys on the server's token, as the OpenSC `pkcs11-tool`
    /// (an independent PKCS#11 client) lists them.
    pub fn token_private_keys(&self) -> String {
        self.token_objects("privkey")
    }

    /// The token's objects of one type (`privkey`, `secrkey`, ...), as
    /// `pkcs11-tool` lists them to a session logged in with the user PIN.
    pub fn token_objects(&self, kind: &str) -> String {
        self.pkcs11_tool_as_user(&["--list-objects", "--type", kind])
    }

    /// The same, to a session that has not logged in.
    pub fn token_objects_without_login(&self, kind: &str) -> String {
        self.pkcs11_tool(&["--list-objects", "--type", kind])
    }

    /// Generates a P-256 key pair on the server's token with `pkcs11-tool`,
    /// labelled `label` and with `label` as its CKA_ID (as keyward names its
    /// keys): a key keyward did not make and no agent owns.
    pub fn generate_token_key_outside_keyward(&self, label: &str) {
        self.pkcs11_tool_as_user(&[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            label,
            "--id",
            &hex::encode(label),
        ]);
    }

    /// Deletes one object (`privkey`, `pubkey`) labelled `label` from the
    /// server's token with `pkcs11-tool`.
    pub fn delete_token_object_outside_keyward(&self, kind: &str, label: &str) {
        self.pkcs11_tool_as_user(&["--delete-object", "--type", kind, "--label", label]);
    }

    /// Polls for up to `limit` until `done` holds; whether it did.
    pub async fn eventually(&self, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        done()
    }

    /// `pkcs11-tool` in a session logged in with the user PIN.
    fn pkcs11_tool_as_user(&self, args: &[&str]) -> String {
        assert_eq!(self.keys, Keys::SoftHsm, "no token to list on a TPM");
        let pin = std::fs::read_to_string(self.path("softhsm/user.pin")).unwrap();
        let login = ["--login", "--pin", pin.trim()];
        self.pkcs11_tool(&[&login[..], args].concat())
    }

    fn pkcs11_tool(&self, args: &[&str]) -> String {
        let conf = self.path("softhsm/softhsm2.conf");
        let module = keyward::app::embedded::find_softhsm_module().unwrap();
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(module)
            .args(args)
            .env("SOFTHSM2_CONF", conf)
            .output()
            .expect("pkcs11-tool (package opensc) is installed by the test command");
        assert!(
            out.status.success(),
            "pkcs11-tool failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Another keyward process sharing a `Server`'s token and database.
pub struct Replica {
    child: Child,
    pub url: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Registers an agent (custodial key on the token, no scopes) as an admin;
/// its JSON.
pub async fn register_agent(server: &Server, name: &str) -> Value {
    register_agent_with(server, name, &[]).await
}

/// Registers an agent with these scopes (its roles under the policy).
pub async fn register_agent_with(server: &Server, name: &str, scopes: &[&str]) -> Value {
    let (status, agent) = server
        .admin(
            "POST",
            "/v1/agents",
            Some(serde_json::json!({"name": name, "scopes": scopes})),
        )
        .await;
    assert_eq!(status, 201, "{agent}");
    agent
}

/// Issues a 600 s certificate for the agent's custodial key; its JSON.
pub async fn issue_certificate(server: &Server, name: &str) -> Value {
    issue_certificate_with(server, name, serde_json::json!({"ttl_seconds": 600})).await
}

/// `POST /v1/agents/{name}/certificates` with `body`, as an admin; the
/// answer, which must be a 201.
pub async fn issue_certificate_with(server: &Server, name: &str, body: Value) -> Value {
    let (status, issued) = server
        .admin(
            "POST",
            &format!("/v1/agents/{name}/certificates"),
            Some(body),
        )
        .await;
    assert_eq!(status, 201, "{issued}");
    issued
}

/// An agent with a certificate: the certificate's JSON.
pub async fn certified_agent(server: &Server, name: &str) -> Value {
    register_agent(server, name).await;
    issue_certificate(server, name).await
}

/// A self-signed certificate made by OpenSSL, as an outsider would forge
/// one: for the P-256 key at `key`, created there first if it does not
/// exist, with `subject` and any `-addext` values. Returns the PEM, also
/// written to `out`.
pub fn openssl_self_signed(key: &Path, subject: &str, extensions: &[&str], out: &Path) -> String {
    let mut command = Command::new("openssl");
    command.args(["req", "-x509"]);
    if key.exists() {
        command.arg("-new").arg("-key").arg(key);
    } else {
        command
            .args([
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(key);
    }
    command.args(["-subj", subject, "-days", "1"]);
    for extension in extensions {
        command.args(["-addext", extension]);
    }
    let (ok, log) = run(command.arg("-out").arg(out));
    assert!(ok, "{log}");
    std::fs::read_to_string(out).unwrap()
}

/// A P-256 key and a CSR for it, made by OpenSSL in `dir`.
pub fn key_and_csr(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let (ok, out) = run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    assert!(ok, "{out}");
    (key, std::fs::read_to_string(csr).unwrap())
}

pub async fn enrollment_token(server: &Server, agent: &str) -> String {
    let (status, token) = server
        .admin(
            "POST",
            &format!("/v1/agents/{agent}/enrollment-tokens"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    token["token"].as_str().unwrap().to_owned()
}

/// `POST /v1/enroll` with no credential but the token.
pub async fn enroll(server: &Server, token: &str, csr: &str) -> (u16, Value) {
    server
        .request(
            "POST",
            "/v1/enroll",
            Some(json!({"token": token, "csr_pem": csr})),
            None,
        )
        .await
}

/// An HTTPS client presenting `certificate_pem` with `key`.
pub fn mtls_client(server: &Server, certificate_pem: &str, key: &Path) -> reqwest::Client {
    mtls_client_from(server, certificate_pem, key, "127.0.0.1")
}

/// `mtls_client` connecting from the local address `source` (another
/// loopback address: another host, as keyward sees it).
pub fn mtls_client_from(
    server: &Server,
    certificate_pem: &str,
    key: &Path,
    source: &str,
) -> reqwest::Client {
    let mut identity = certificate_pem.as_bytes().to_vec();
    identity.extend(std::fs::read(key).unwrap());
    let ca = std::fs::read(server.path("ca.pem")).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `GET /metrics` of the server at `base` (this server or a replica), as
/// an admin.
pub async fn metrics_text(server: &Server, base: &str) -> String {
    server
        .client
        .get(format!("{base}/metrics"))
        .bearer_auth(server.admin_token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub async fn post(
    client: &reqwest::Client,
    server: &Server,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let response = client
        .post(format!("{}{path}", server.url))
        .json(&body)
        .send()
        .await
        .expect("reached keyward");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Enrolls `name`: its key file and certificate JSON.
pub async fn enrolled(server: &Server, name: &str) -> (PathBuf, Value) {
    enrolled_with(server, name, &[]).await
}

/// Registers `name` with `scopes` and enrolls it: its key file and
/// certificate JSON.
pub async fn enrolled_with(server: &Server, name: &str, scopes: &[&str]) -> (PathBuf, Value) {
    register_agent_with(server, name, scopes).await;
    let token = enrollment_token(server, name).await;
    let (key, csr) = key_and_csr(server.data_dir.path(), name);
    let (status, issued) = enroll(server, &token, &csr).await;
    assert_eq!(status, 201, "{issued}");
    (key, issued)
}

/// Registers `name` with `scopes`, enrolls it, and connects as it: its mTLS
/// client, key file and certificate JSON.
pub async fn agent_client(
    server: &Server,
    name: &str,
    scopes: &[&str],
) -> (reqwest::Client, PathBuf, Value) {
    let (key, certificate) = enrolled_with(server, name, scopes).await;
    let client = mtls_client(
        server,
        certificate["certificate_pem"].as_str().unwrap(),
        &key,
    );
    (client, key, certificate)
}

/// Gives the admin `name` a token of their own (`keyward admin
/// token-create`) and restarts the server, which accepts new tokens at
/// start: the restarted server and the token.
pub async fn with_admin_token(mut server: Server, name: &str) -> (Server, String) {
    server.stop();
    let file = server.path(&format!("{name}.admin-token"));
    let (ok, out) = server.operator([
        "admin",
        "token-create",
        "--name",
        name,
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let server = server.restart().await;
    let token = std::fs::read_to_string(file).unwrap().trim().to_owned();
    (server, token)
}

/// Runs a command, returning (success, stdout+stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("running a command");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        text.push_str(&format!("\n[{}]", out.status));
    }
    (out.status.success(), text)
}

/// `der` as one PEM block labelled `label`.
/// An OCSP request for `cert` (PEM file) issued by `issuer`, as `openssl
/// ocsp` writes it (DER, no nonce unless asked), kept at `out`.
pub fn openssl_ocsp_request(issuer: &Path, cert: &Path, out: &Path) -> Vec<u8> {
    let (ok, log) = run(Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(issuer)
        .arg("-cert")
        .arg(cert)
        .arg("-reqout")
        .arg(out));
    assert!(ok, "{log}");
    std::fs::read(out).unwrap()
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Declares each listed test, an `async fn(Backends)`, for every cell of
/// the matrix: {SoftHSM2, swtpm} x {SQLite, PostgreSQL}, named
/// `softhsm::sqlite::<test>` ... `swtpm::postgres::<test>` (nextest:
/// `-E 'test(/^swtpm::/)'` runs the TPM half). Tests after `swtpm only:`
/// run on swtpm with both databases: the TPM's counterparts of tests that
/// inspect the SoftHSM2 token (`on_both_databases!`).
#[macro_export]
macro_rules! on_every_backend {
    (swtpm only: $($tpm:ident),* $(,)?) => {
        $crate::on_every_backend!(@cells [] [$($tpm),*]);
    };
    ($($every:ident),+ $(,)?) => {
        $crate::on_every_backend!(@cells [$($every),+] []);
    };
    ($($every:ident),+ ; swtpm only: $($tpm:ident),* $(,)?) => {
        $crate::on_every_backend!(@cells [$($every),+] [$($tpm),*]);
    };
    (@cells [$($every:ident),*] [$($tpm:ident),*]) => {
        mod softhsm {
            $crate::on_every_backend!(@db SoftHsm, Sqlite, sqlite; $($every),*);
            $crate::on_every_backend!(@db SoftHsm, Postgres, postgres; $($every),*);
        }
        mod swtpm {
            $crate::on_every_backend!(@db Swtpm, Sqlite, sqlite; $($every,)* $($tpm),*);
            $crate::on_every_backend!(@db Swtpm, Postgres, postgres; $($every,)* $($tpm),*);
        }
    };
    (@db $keys:ident, $db:ident, $module:ident; $($name:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::super::$name($crate::common::Backends {
                        keys: $crate::common::Keys::$keys,
                        db: $crate::common::Db::$db,
                    })
                    .await
                }
            )*
        }
    };
}

/// Declares each listed test, an `async fn(Db)`, once for SQLite and once
/// for PostgreSQL, on SoftHSM2: for tests the key backend does not touch
/// (hooks, paging, policy arithmetic) and tests of the token itself (its
/// objects, the wrapped tier, a second process on it).
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Db::Postgres).await
                }
            )*
        }
    };
}
