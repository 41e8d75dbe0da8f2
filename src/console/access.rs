//! Who may use the console (README, "Console"):
//!
//! - on a loopback `METRICS_ADDR` without `CONSOLE_TOKEN`: anyone on the
//!   host, provided the request names a loopback host (a page of another
//!   site whose name was rebound to 127.0.0.1 names its own);
//! - with `CONSOLE_TOKEN` (required off loopback): `Authorization: Bearer
//!   TOKEN`, or the cookie that `/?token=TOKEN` sets once;
//! - off loopback without `CONSOLE_TOKEN`: nobody (the page says why).
//!
//! Changes (`POST`) must also carry `X-Console: 1` and a JSON body, which a
//! form of another site cannot send without a CORS preflight (never
//! granted), and an `Origin`, when there is one, of this very host.

use crate::config::Secret;
use axum::http::{header, HeaderMap, Method};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;

/// The cookie `/?token=` sets: the token's SHA-256, never the token itself.
pub const COOKIE: &str = "console_token";

/// The header every change must carry.
pub const CHANGE_HEADER: &str = "x-console";

/// Who may use the console.
#[derive(Debug, Clone)]
pub enum Access {
    /// Loopback without a token.
    Loopback,
    /// The hex SHA-256 of `CONSOLE_TOKEN`.
    Token(String),
    /// Not loopback, and no token configured.
    Refused,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Off loopback without `CONSOLE_TOKEN`: the console is not served.
    NotServed,
    /// The token is missing or wrong.
    Unauthorized,
    /// A cross-site request, or a change without the guard's header.
    Forbidden(&'static str),
}

impl Access {
    pub fn new(addr: SocketAddr, token: Option<&Secret>) -> Access {
        match token.map(|t| t.expose().trim()).filter(|t| !t.is_empty()) {
            Some(token) => Access::Token(digest(token)),
            None if addr.ip().is_loopback() => Access::Loopback,
            None => Access::Refused,
        }
    }

    /// Whether `query` holds the right `token=`: the cookie to set if so.
    pub fn token_cookie(&self, query: Option<&str>) -> Option<String> {
        let Access::Token(expected) = self else {
            return None;
        };
        let given = query?
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .map(percent_decode)?;
        (digest(given.trim()) == *expected)
            .then(|| format!("{COOKIE}={expected}; Path=/; HttpOnly; SameSite=Strict"))
    }

    /// Checks a request to the console.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), Denied> {
        match self {
            Access::Refused => return Err(Denied::NotServed),
            Access::Loopback => {
                if !loopback_host(headers) {
                    return Err(Denied::Forbidden(
                        "the console answers only requests for a loopback host",
                    ));
                }
            }
            Access::Token(expected) => {
                if !bearer_or_cookie(headers, expected) {
                    return Err(Denied::Unauthorized);
                }
            }
        }
        if method != Method::GET && method != Method::HEAD {
            guard_change(headers)?;
        }
        Ok(())
    }
}

fn guard_change(headers: &HeaderMap) -> Result<(), Denied> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if text(CHANGE_HEADER) != Some("1") {
        return Err(Denied::Forbidden("a change needs the header X-Console: 1"));
    }
    if let Some(site) = text("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return Err(Denied::Forbidden("a cross-site request"));
        }
    }
    if let Some(origin) = text(header::ORIGIN.as_str()) {
        let host = text(header::HOST.as_str()).unwrap_or_default();
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or(origin);
        if host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
            return Err(Denied::Forbidden("a cross-site request"));
        }
    }
    Ok(())
}

fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn bearer_or_cookie(headers: &HeaderMap, expected: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| digest(token.trim()) == expected);
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(|value| value == expected);
    bearer || cookie
}

/// Hex SHA-256: tokens are compared by their digests, so that the time a
/// comparison takes says nothing of the token.
fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(value) = HeaderValue::from_str(value) {
                map.append(*name, value);
            }
        }
        map
    }

    fn addr(raw: &str) -> SocketAddr {
        raw.parse().unwrap_or(crate::observe::DEFAULT_METRICS_ADDR)
    }

    #[test]
    fn loopback_is_open_to_loopback_hosts_only() {
        let access = Access::new(addr("127.0.0.1:9464"), None);
        let get = Method::GET;
        for host in ["127.0.0.1:9464", "localhost:1", "[::1]:9464", "localhost"] {
            assert_eq!(access.check(&get, &headers(&[("host", host)])), Ok(()));
        }
        assert!(matches!(
            access.check(&get, &headers(&[("host", "evil.example:9464")])),
            Err(Denied::Forbidden(_))
        ));
    }

    #[test]
    fn off_loopback_needs_a_token() {
        let everywhere = addr("0.0.0.0:9464");
        assert!(matches!(Access::new(everywhere, None), Access::Refused));
        let access = Access::new(everywhere, Some(&Secret::new("s3cret token")));
        let get = Method::GET;
        let host = ("host", "10.0.0.5:9464");
        assert_eq!(
            access.check(&get, &headers(&[host])),
            Err(Denied::Unauthorized)
        );
        assert_eq!(
            access.check(&get, &headers(&[host, ("authorization", "Bearer wrong")])),
            Err(Denied::Unauthorized)
        );
        assert_eq!(
            access.check(
                &get,
                &headers(&[host, ("authorization", "Bearer s3cret token")])
            ),
            Ok(())
        );
        assert_eq!(access.token_cookie(Some("token=wrong")), None);
        let cookie = access
            .token_cookie(Some("a=1&token=s3cret%20token"))
            .unwrap_or_default();
        assert!(!cookie.contains("s3cret"), "{cookie}");
        let value = cookie.split(';').next().unwrap_or_default();
        assert_eq!(
            access.check(&get, &headers(&[host, ("cookie", value)])),
            Ok(())
        );
    }

    #[test]
    fn changes_need_the_header_and_the_same_origin() {
        let access = Access::new(addr("127.0.0.1:9464"), None);
        let post = Method::POST;
        let host = ("host", "127.0.0.1:9464");
        assert!(matches!(
            access.check(&post, &headers(&[host])),
            Err(Denied::Forbidden(_))
        ));
        assert_eq!(
            access.check(&post, &headers(&[host, ("x-console", "1")])),
            Ok(())
        );
        assert_eq!(
            access.check(
                &post,
                &headers(&[
                    host,
                    ("x-console", "1"),
                    ("origin", "http://127.0.0.1:9464")
                ])
            ),
            Ok(())
        );
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ] {
            assert!(matches!(
                access.check(&post, &headers(&[host, ("x-console", "1"), (name, value)])),
                Err(Denied::Forbidden(_))
            ));
        }
    }
}
