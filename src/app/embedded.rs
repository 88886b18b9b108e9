//! The embedded default key store: a SoftHSM2 token that keyward creates and
//! owns under `<data-dir>/softhsm/`, so a developer needs no setup at all.
//!
//! Must run before any thread starts: SoftHSM2 reads its configuration path
//! from the `SOFTHSM2_CONF` environment variable, which this sets.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

use crate::config::{read_secret_file, EMBEDDED_TOKEN_LABEL};
use crate::keys::pkcs11::{create_wrapping_key, init_token, load_module, Pkcs11Config};
use crate::runtime::files::{private_dir, write_private_file};

/// Where Debian, Ubuntu, Fedora and source builds put the module.
const SOFTHSM_MODULE_PATHS: [&str; 4] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

pub fn find_softhsm_module() -> anyhow::Result<PathBuf> {
    SOFTHSM_MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "SoftHSM2 is not installed; run: sudo apt-get install -y softhsm2 \
                 (or point [keys] at another PKCS#11 module)"
            )
        })
}

fn random_pin() -> SecretString {
    let bytes: [u8; 16] = rand::random();
    SecretString::from(hex::encode(bytes))
}

/// Prepares (on first start: creates) the embedded SoftHSM2 token and
/// returns how to open it.
pub fn prepare(data_dir: &Path) -> anyhow::Result<Pkcs11Config> {
    use secrecy::ExposeSecret;

    let module = find_softhsm_module()?;
    let dir = std::path::absolute(data_dir.join("softhsm"))?;
    let tokens = dir.join("tokens");
    private_dir(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    if !conf.exists() {
        let text = format!(
            "# Written by keyward for its embedded token.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        );
        write_private_file(&conf, text.as_bytes())?;
    }
    // Sound here: called from main before the runtime or any thread exists.
    std::env::set_var("SOFTHSM2_CONF", &conf);

    let pin_file = dir.join("user.pin");
    if !pin_file.exists() {
        let so_pin = random_pin();
        let user_pin = random_pin();
        let ctx = load_module(&module)?;
        init_token(&ctx, EMBEDDED_TOKEN_LABEL, &so_pin, &user_pin)?;
        write_private_file(&dir.join("so.pin"), so_pin.expose_secret().as_bytes())?;
        write_private_file(&pin_file, user_pin.expose_secret().as_bytes())?;
        tracing::info!(token = EMBEDDED_TOKEN_LABEL, dir = %dir.display(), "initialized the embedded SoftHSM2 token");
    }
    let user_pin = read_secret_file(&pin_file)?;
    // Custodial keys are kept wrapped by default (KeyStorage::Wrapped); a
    // token made before wrapped keys existed gets its wrapping key now.
    let ctx = load_module(&module)?;
    let so_pin = read_secret_file(&dir.join("so.pin"))?;
    if create_wrapping_key(&ctx, EMBEDDED_TOKEN_LABEL, &so_pin, &user_pin)? {
        tracing::info!(
            token = EMBEDDED_TOKEN_LABEL,
            "created the embedded token's wrapping key"
        );
    }
    Ok(Pkcs11Config {
        module,
        token_label: EMBEDDED_TOKEN_LABEL.into(),
        user_pin,
    })
}
