//! Opening an ESAPI context from a TCTI string, including swtpm instances
//! whose control channel is not where libtss2 looks for it.
//!
//! libtss2's swtpm TCTI takes one port and insists on swtpm's control
//! channel at port + 1, only to set the locality (always 0 here); if that
//! connection is refused, the whole TCTI fails. A swtpm started with its
//! control channel anywhere else is then reached through a relay: a pair of
//! consecutive loopback ports whose first forwards the TPM command stream
//! byte for byte to the real server port and whose second answers control
//! commands with success. Nothing the TPM computes passes through anything
//! but a byte copy; the relay binds 127.0.0.1 only, and adds no reach that
//! swtpm's own TCP port does not already give a local process.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tss_esapi::tcti_ldr::{NetworkTPMConfig, TctiNameConf};
use tss_esapi::{Context, Error as TssError, WrapperErrorKind};

/// Opens a context for `tcti`, through a relay when it names a swtpm whose
/// control channel is not at port + 1.
pub fn open_context(tcti: &str) -> Result<Context, TssError> {
    let conf = TctiNameConf::from_str(tcti)?;
    match Context::new(conf.clone()) {
        Ok(ctx) => Ok(ctx),
        Err(first) => {
            let Some((host, port)) = swtpm_address(tcti) else {
                return Err(first);
            };
            let reachable = |port: u16| {
                (host.as_str(), port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
            };
            // Only the case the relay fixes: the TPM answers, the
            // control channel at port + 1 does not.
            if port == u16::MAX || reachable(port + 1) || !reachable(port) {
                return Err(first);
            }
            let local = relay_for(&host, port).map_err(|e| {
                tracing::warn!(error = %e, "could not start the swtpm relay");
                first
            })?;
            tracing::info!(
                tpm = %format!("{host}:{port}"),
                relay = local,
                "swtpm's control channel is not at port + 1; relaying"
            );
            Context::new(TctiNameConf::Swtpm(
                NetworkTPMConfig::from_str(&format!("host=127.0.0.1,port={local}"))
                    .map_err(|_| TssError::WrapperError(WrapperErrorKind::InvalidParam))?,
            ))
        }
    }
}

/// `swtpm[:host=H][,port=P]` with libtss2's defaults.
fn swtpm_address(tcti: &str) -> Option<(String, u16)> {
    let conf = match tcti.strip_prefix("swtpm") {
        Some("") => "",
        Some(rest) => rest.strip_prefix(':')?,
        None => return None,
    };
    let (mut host, mut port) = ("localhost".to_owned(), 2321u16);
    for part in conf.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=')? {
            ("host", h) => host = h.to_owned(),
            ("port", p) => port = p.parse().ok()?,
            _ => return None,
        }
    }
    Some((host, port))
}

/// One relay per swtpm address, for the life of the process.
fn relay_for(host: &str, port: u16) -> std::io::Result<u16> {
    static RELAYS: OnceLock<Mutex<HashMap<(String, u16), u16>>> = OnceLock::new();
    let relays = RELAYS.get_or_init(Default::default);
    let mut relays = relays.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(local) = relays.get(&(host.to_owned(), port)) {
        return Ok(*local);
    }
    let (server, control) = consecutive_listeners()?;
    let local = server.local_addr()?.port();
    let target = format!("{host}:{port}");
    std::thread::Builder::new()
        .name("swtpm-relay".into())
        .spawn(move || {
            for client in server.incoming().flatten() {
                if let Ok(tpm) = TcpStream::connect(&target) {
                    splice(client, tpm);
                }
            }
        })?;
    std::thread::Builder::new()
        .name("swtpm-relay-ctrl".into())
        .spawn(move || {
            for mut client in control.incoming().flatten() {
                answer_control(&mut client);
            }
        })?;
    relays.insert((host.to_owned(), port), local);
    Ok(local)
}

/// Two listeners on 127.0.0.1, on ports n and n + 1.
fn consecutive_listeners() -> std::io::Result<(TcpListener, TcpListener)> {
    for _ in 0..64 {
        let first = TcpListener::bind("127.0.0.1:0")?;
        let port = first.local_addr()?.port();
        if port == u16::MAX {
            continue;
        }
        if let Ok(second) = TcpListener::bind(("127.0.0.1", port + 1)) {
            return Ok((first, second));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no two consecutive free loopback ports",
    ))
}

/// Copies bytes both ways until either side closes.
fn splice(client: TcpStream, tpm: TcpStream) {
    let pairs = client
        .try_clone()
        .and_then(|c| tpm.try_clone().map(|t| (c, t)));
    let Ok((client_reader, tpm_writer)) = pairs else {
        return;
    };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    let _ = std::thread::Builder::new()
        .name("swtpm-relay-up".into())
        .spawn(copy(client_reader, tpm_writer));
    let _ = std::thread::Builder::new()
        .name("swtpm-relay-down".into())
        .spawn(copy(tpm, client));
}

/// swtpm's control protocol: a 4-byte command code and its parameters; the
/// answer starts with a 4-byte result, 0 for success. libtss2 sends only
/// CMD_SET_LOCALITY (always locality 0 here), whose whole answer is that.
fn answer_control(client: &mut TcpStream) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
    let mut command = [0u8; 64];
    if matches!(client.read(&mut command), Ok(n) if n >= 4) {
        let _ = client.write_all(&[0, 0, 0, 0]);
    }
    let _ = client.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swtpm_addresses_parse_with_libtss2_defaults() {
        assert_eq!(
            swtpm_address("swtpm:host=127.0.0.1,port=4000"),
            Some(("127.0.0.1".into(), 4000))
        );
        assert_eq!(swtpm_address("swtpm"), Some(("localhost".into(), 2321)));
        assert_eq!(swtpm_address("swtpm:port=7"), Some(("localhost".into(), 7)));
        assert_eq!(swtpm_address("device:/dev/tpmrm0"), None);
        assert_eq!(swtpm_address("swtpmx:port=1"), None);
        assert_eq!(swtpm_address("swtpm:port=notanumber"), None);
    }
}
