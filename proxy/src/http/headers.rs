//! Header rewriting between the app and an HTTP/1.1 upstream: hop-by-hop
//! headers (RFC 9110 §7.6.1) go, upgrades keep theirs, and requests get an
//! origin-form target and a Host header.

use hyper::Version;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

pub(crate) fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Rewrites a request for an HTTP/1.1 upstream: origin-form target, a
/// Host header, and no hop-by-hop headers (but the upgrade ones, when
/// upgrading).
pub(crate) fn prepare_request(
    parts: &mut hyper::http::request::Parts,
    authority: &str,
    upgrade: bool,
) {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Ok(uri) = path.parse() {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // Host is what the request was routed by: with an absolute URI, its
    // authority wins over any Host header (RFC 9112 §3.2.2), so a backend
    // never sees a request for one service named as another.
    if let Ok(h) = HeaderValue::from_str(authority) {
        parts.headers.insert(header::HOST, h);
    }
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, and any header the
/// Connection header names. An upgrade keeps `Connection: upgrade` and
/// `Upgrade`.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Request;

    #[test]
    fn hop_by_hop_headers_go_and_connection_named_ones_too() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-keep", "yes"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        let mut left: Vec<&str> = plain.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["traceparent", "x-keep"]);

        let mut up = h;
        up.insert("connection", HeaderValue::from_static("Upgrade"));
        assert!(wants_upgrade(&up));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up["connection"], "upgrade");
        assert_eq!(up["upgrade"], "websocket");
    }

    #[test]
    fn requests_are_rewritten_for_an_http1_upstream() {
        let req = Request::builder()
            .uri("http://cart.shop:8080/a/b?c=d")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare_request(&mut parts, "cart.shop:8080", false);
        assert_eq!(parts.uri, "/a/b?c=d");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers[header::HOST], "cart.shop:8080");
    }

    #[test]
    fn host_becomes_the_authority_the_request_was_routed_by() {
        let req = Request::get("http://checkout.shop/pay?x=1")
            .header("host", "payments.shop")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare_request(&mut parts, "checkout.shop", false);
        assert_eq!(parts.headers[header::HOST], "checkout.shop");
        assert_eq!(parts.headers.get_all(header::HOST).iter().count(), 1);
        assert_eq!(parts.uri.to_string(), "/pay?x=1");
    }
}
