//! The client behind a load balancer: with `[server] trusted_proxies`, a
//! request whose connection comes from a trusted proxy is taken to come
//! from the address that proxy says it forwarded for (`X-Forwarded-For`),
//! for the audit log's source, the traces' `client.address` and the
//! detectors.
//!
//! The header is read from the right: each proxy appends the address it
//! received the request from, so the rightmost entries are the ones our
//! own proxies wrote, and the first address from the right that is not a
//! trusted proxy is the client. Anything to its left was written by the
//! client itself and is never read: a client cannot choose its address by
//! sending the header. A connection from anywhere else keeps its TCP
//! peer, whatever it sends. Hand-written rather than axum-client-ip: its
//! `RightmostXForwardedFor` believes the rightmost entry on every
//! connection, which is right only when every connection comes through
//! exactly one proxy; here the peer must be trusted, and a chain of
//! trusted proxies is walked.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AppState, ClientAddress};

/// The most entries read, so that a long header costs bounded work; past
/// it the farthest trusted hop read is the client.
const MAX_HOPS: usize = 32;

pub(super) async fn resolve_client(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(ClientAddress(peer)) = request.extensions().get::<ClientAddress>().copied() else {
        return next.run(request).await;
    };
    match forwarded_client(&state.trusted_proxies, peer.ip(), request.headers()) {
        Ok(Some(client)) => {
            // Port 0: no TCP peer has it, so it says "not known".
            request
                .extensions_mut()
                .insert(ClientAddress(SocketAddr::new(client, 0)));
        }
        Ok(None) => {}
        Err(reason) => {
            return ApiError::bad_request("invalid_forwarded_for", reason).into_response();
        }
    }
    next.run(request).await
}

/// The client a trusted `peer` forwarded for; `None` when `peer` is not a
/// trusted proxy or sent no `X-Forwarded-For` (a health check from the
/// proxy itself).
fn forwarded_client(
    trusted: &[ipnet::IpNet],
    peer: IpAddr,
    headers: &HeaderMap,
) -> Result<Option<IpAddr>, &'static str> {
    let is_trusted = |address: IpAddr| trusted.iter().any(|net| net.contains(&address));
    if !is_trusted(peer.to_canonical()) {
        return Ok(None);
    }
    let mut nearest = None;
    // Several header lines are one list, in order (RFC 9110, 5.3).
    let lines: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    let mut hops = 0;
    for line in lines.into_iter().rev() {
        let text = line
            .to_str()
            .map_err(|_| "X-Forwarded-For is not printable ASCII")?;
        for entry in text.rsplit(',') {
            hops += 1;
            if hops > MAX_HOPS {
                return Ok(nearest);
            }
            let address = parse_entry(entry.trim())
                .ok_or("an X-Forwarded-For entry a trusted proxy wrote is not an IP address")?;
            if !is_trusted(address) {
                return Ok(Some(address));
            }
            nearest = Some(address);
        }
    }
    // Every hop a trusted proxy: the farthest of them is the client.
    Ok(nearest)
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:443`,
/// `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let address = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<IpAddr>().ok())
        })?;
    // An IPv4-mapped IPv6 address as IPv4, as a dual-stack listener sees it.
    Some(address.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(
        trusted: &[&str],
        peer: &str,
        lines: &[&str],
    ) -> Result<Option<String>, &'static str> {
        let trusted: Vec<ipnet::IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("x-forwarded-for", line.parse().unwrap());
        }
        forwarded_client(&trusted, peer.parse().unwrap(), &headers)
            .map(|a| a.map(|a| a.to_string()))
    }

    const PROXIES: &[&str] = &["10.0.0.0/8"];

    #[test]
    fn the_client_is_the_first_untrusted_address_from_the_right() {
        assert_eq!(
            client(PROXIES, "10.0.0.1", &["203.0.113.7"]),
            Ok(Some("203.0.113.7".into()))
        );
        // Two proxies in a row: the outer one wrote the client.
        assert_eq!(
            client(PROXIES, "10.0.0.1", &["203.0.113.7, 10.9.9.9"]),
            Ok(Some("203.0.113.7".into()))
        );
        // Over two header lines, the same list.
        assert_eq!(
            client(PROXIES, "10.0.0.1", &["203.0.113.7", "10.9.9.9"]),
            Ok(Some("203.0.113.7".into()))
        );
    }

    #[test]
    fn what_the_client_wrote_itself_is_never_read() {
        // The client sent "X-Forwarded-For: 198.51.100.1, junk"; the proxy
        // appended the address it really came from.
        assert_eq!(
            client(PROXIES, "10.0.0.1", &["198.51.100.1, junk, 203.0.113.7"]),
            Ok(Some("203.0.113.7".into()))
        );
    }

    #[test]
    fn a_connection_not_from_a_trusted_proxy_keeps_its_own_address() {
        assert_eq!(client(PROXIES, "192.0.2.50", &["203.0.113.7"]), Ok(None));
        assert_eq!(client(&[], "10.0.0.1", &["203.0.113.7"]), Ok(None));
    }

    #[test]
    fn a_trusted_proxy_without_the_header_is_itself() {
        assert_eq!(client(PROXIES, "10.0.0.1", &[]), Ok(None));
    }

    #[test]
    fn when_every_hop_is_trusted_the_farthest_is_the_client() {
        assert_eq!(
            client(PROXIES, "10.0.0.1", &["10.1.1.1, 10.2.2.2"]),
            Ok(Some("10.1.1.1".into()))
        );
    }

    #[test]
    fn a_long_chain_of_trusted_hops_is_read_only_so_far() {
        let chain = vec!["10.0.0.9"; 100].join(", ");
        let line = format!("203.0.113.7, {chain}");
        assert_eq!(
            client(PROXIES, "10.0.0.1", &[&line]),
            Ok(Some("10.0.0.9".into()))
        );
    }

    #[test]
    fn ports_brackets_and_mapped_addresses_are_read() {
        let c = |entry| client(PROXIES, "::ffff:10.0.0.1", &[entry]);
        assert_eq!(c("203.0.113.7:5555"), Ok(Some("203.0.113.7".into())));
        assert_eq!(c("[2001:db8::1]:443"), Ok(Some("2001:db8::1".into())));
        assert_eq!(c("[2001:db8::1]"), Ok(Some("2001:db8::1".into())));
        assert_eq!(c("2001:db8::1"), Ok(Some("2001:db8::1".into())));
        assert_eq!(
            c("::ffff:10.3.3.3, 2001:db8::2"),
            Ok(Some("2001:db8::2".into()))
        );
    }

    #[test]
    fn an_entry_a_trusted_proxy_wrote_that_is_not_an_address_is_refused() {
        for bad in [
            "unknown",
            "",
            "203.0.113",
            "example.com",
            "1.2.3.4:99999",
            "10.0.0.2, ",
        ] {
            assert!(client(PROXIES, "10.0.0.1", &[bad]).is_err(), "{bad:?}");
        }
    }
}
