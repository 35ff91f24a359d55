//! The tunnel header: length-prefixed `TunnelOpen` / `TunnelAccept` frames,
//! and the checks a `TunnelOpen` must pass. Free of I/O, so that every
//! malformed input is a unit test; the drivers only move bytes.

use std::time::Duration;

use fedmesh_api::ServiceKey;
use fedmesh_proto::tunnel::v1::{TunnelAccept, TunnelOpen, tunnel_accept::Status};
use fedmesh_trust::SpiffeId;
use prost::Message;

/// The largest frame body a peer may send (§3.3): 16 KiB.
pub const MAX_FRAME: usize = 16 * 1024;
/// The length prefix: a big-endian u32.
pub const PREFIX: usize = 4;
/// `deadline_ms` = 0 means this.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);
/// Longer deadlines are clamped to this.
pub const MAX_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("tunnel header of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLong(u64),
    #[error("tunnel header does not decode as {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

/// A frame: the prefix, then `msg`.
pub fn encode(msg: &impl Message) -> Result<Vec<u8>, FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len as u64));
    }
    let mut out = Vec::with_capacity(PREFIX + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode_raw(&mut out);
    Ok(out)
}

/// The body length announced by a prefix, refused when over the limit
/// before a single body byte is read.
pub fn body_len(prefix: [u8; PREFIX]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len as usize > MAX_FRAME {
        return Err(FrameError::TooLong(u64::from(len)));
    }
    Ok(len as usize)
}

/// Decodes a frame body.
pub fn decode_body<M: Message + Default>(what: &'static str, body: &[u8]) -> Result<M, FrameError> {
    M::decode(body).map_err(|e| FrameError::Malformed {
        what,
        reason: e.to_string(),
    })
}

/// Decodes one frame from the front of `buf`: `Ok(None)` while more bytes
/// are needed, else the message and how many bytes it took.
pub fn decode<M: Message + Default>(
    what: &'static str,
    buf: &[u8],
) -> Result<Option<(M, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<PREFIX>() else {
        return Ok(None);
    };
    let len = body_len(*prefix)?;
    match buf.get(PREFIX..PREFIX + len) {
        Some(body) => Ok(Some((decode_body(what, body)?, PREFIX + len))),
        None => Ok(None),
    }
}

/// A `TunnelOpen` that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    pub service: ServiceKey,
    pub port: u16,
    pub target_cluster: String,
    /// `None` from a proxy: the egress fills it in from the proxy's SVID,
    /// or the ingress takes the certificate's identity (direct egress).
    pub source: Option<SpiffeId>,
    /// A well-formed W3C traceparent, or `None`.
    pub traceparent: Option<String>,
    pub deadline: Duration,
}

impl OpenRequest {
    /// The span a tunnel runs in, carrying the caller's trace context.
    pub fn span(&self, direction: &'static str, peer_cluster: &str) -> tracing::Span {
        tracing::info_span!(
            "tunnel",
            direction,
            peer_cluster,
            service = %self.service,
            port = self.port,
            source = self.source.as_ref().map(|s| s.as_str()).unwrap_or(""),
            traceparent = self.traceparent.as_deref().unwrap_or(""),
        )
    }

    pub fn to_wire(&self) -> TunnelOpen {
        TunnelOpen {
            service: self.service.to_string(),
            port: u32::from(self.port),
            target_cluster: self.target_cluster.clone(),
            source_identity: self
                .source
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            traceparent: self.traceparent.clone().unwrap_or_default(),
            deadline_ms: u32::try_from(self.deadline.as_millis()).unwrap_or(u32::MAX),
        }
    }
}

/// Checks a `TunnelOpen`. The error is the `message` of a `BAD_REQUEST`.
///
/// An invalid `traceparent` is dropped rather than refused, as W3C Trace
/// Context asks: the trace restarts, the request goes on.
pub fn check_open(open: &TunnelOpen) -> Result<OpenRequest, String> {
    let service: ServiceKey = open.service.parse()?;
    fedmesh_api::validate_label("namespace", &service.namespace).map_err(|e| e.to_string())?;
    fedmesh_api::validate_label("service name", &service.name).map_err(|e| e.to_string())?;
    let port = u16::try_from(open.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {} is not in 1-65535", open.port))?;
    fedmesh_api::validate_label("target_cluster", &open.target_cluster)
        .map_err(|e| e.to_string())?;
    let source = match open.source_identity.as_str() {
        "" => None,
        s => Some(SpiffeId::parse(s).map_err(|e| format!("source_identity: {e}"))?),
    };
    let traceparent = Some(open.traceparent.as_str())
        .filter(|t| valid_traceparent(t))
        .map(str::to_owned);
    if traceparent.is_none() && !open.traceparent.is_empty() {
        tracing::debug!(traceparent = %open.traceparent.escape_debug(), "dropping malformed traceparent");
    }
    let deadline = match open.deadline_ms {
        0 => DEFAULT_DEADLINE,
        ms => Duration::from_millis(u64::from(ms)).min(MAX_DEADLINE),
    };
    Ok(OpenRequest {
        service,
        port,
        target_cluster: open.target_cluster.clone(),
        source,
        traceparent,
        deadline,
    })
}

/// W3C Trace Context `traceparent`, version 00 (and the version-00 prefix
/// of later versions): `vv-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
pub fn valid_traceparent(t: &str) -> bool {
    let b = t.as_bytes();
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let not_zero = |s: &[u8]| s.iter().any(|c| *c != b'0');
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return false;
    }
    let (version, trace, parent, flags) = (&b[..2], &b[3..35], &b[36..52], &b[53..55]);
    let later_ok = match version {
        b"00" => b.len() == 55,
        b"ff" => false,
        _ => b.len() == 55 || b[55] == b'-',
    };
    later_ok
        && [version, trace, parent, flags].into_iter().all(lower_hex)
        && not_zero(trace)
        && not_zero(parent)
}

/// A refusal: a status other than OK, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub message: String,
}

impl Refusal {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        debug_assert!(status != Status::Ok);
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn to_wire(&self) -> TunnelAccept {
        TunnelAccept {
            status: self.status as i32,
            endpoint: String::new(),
            message: self.message.clone(),
        }
    }

    /// The status as metrics label it.
    pub fn label(&self) -> &'static str {
        status_label(self.status)
    }

    /// Whether another gateway of the same cluster might accept: true but
    /// for a request that is malformed wherever it goes.
    pub fn worth_another_gateway(&self) -> bool {
        self.status != Status::BadRequest
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", status_label(self.status), self.message)
    }
}

pub fn status_label(s: Status) -> &'static str {
    match s {
        Status::Unspecified => "unspecified",
        Status::Ok => "ok",
        Status::UnknownService => "unknown_service",
        Status::NoHealthyEndpoints => "no_healthy_endpoints",
        Status::Forbidden => "forbidden",
        Status::Overloaded => "overloaded",
        Status::BadRequest => "bad_request",
        Status::Unreachable => "unreachable",
    }
}

/// Reads a peer's `TunnelAccept`: `Ok(endpoint)` for OK, else the refusal.
/// A missing or unknown status is the peer's protocol error.
pub fn read_accept(a: &TunnelAccept) -> Result<String, Refusal> {
    match Status::try_from(a.status) {
        Ok(Status::Ok) => Ok(a.endpoint.clone()),
        Ok(Status::Unspecified) | Err(_) => Err(Refusal::new(
            Status::BadRequest,
            format!("peer sent TunnelAccept with invalid status {}", a.status),
        )),
        Ok(status) => Err(Refusal {
            status,
            message: a.message.clone(),
        }),
    }
}

pub fn accept_ok(endpoint: String) -> TunnelAccept {
    TunnelAccept {
        status: Status::Ok as i32,
        endpoint,
        message: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> TunnelOpen {
        TunnelOpen {
            service: "shop/checkout".into(),
            port: 8080,
            target_cluster: "gcp-usc1".into(),
            source_identity: "spiffe://aws.example/ns/shop/sa/web".into(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            deadline_ms: 0,
        }
    }

    #[test]
    fn frames_round_trip_and_report_what_they_consumed() {
        let mut buf = encode(&open()).unwrap();
        buf.extend_from_slice(b"app bytes");
        let (back, used) = decode::<TunnelOpen>("TunnelOpen", &buf).unwrap().unwrap();
        assert_eq!(back, open());
        assert_eq!(&buf[used..], b"app bytes");
        for cut in 0..used {
            assert_eq!(
                decode::<TunnelOpen>("x", &buf[..cut]).unwrap(),
                None,
                "{cut}"
            );
        }
    }

    #[test]
    fn the_readme_example_is_exact() {
        let open = TunnelOpen {
            service: "shop/echo".into(),
            port: 8080,
            target_cluster: "gcp-usc1".into(),
            ..Default::default()
        };
        let mut want = vec![0, 0, 0, 0x18, 0x0a, 0x09];
        want.extend(b"shop/echo");
        want.extend([0x10, 0x90, 0x3f, 0x1a, 0x08]);
        want.extend(b"gcp-usc1");
        assert_eq!(encode(&open).unwrap(), want);
    }

    #[test]
    fn oversized_frames_are_refused_from_the_prefix_alone() {
        let prefix = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(
            decode::<TunnelOpen>("x", &prefix),
            Err(FrameError::TooLong(MAX_FRAME as u64 + 1))
        );
        assert_eq!(
            body_len(u32::MAX.to_be_bytes()),
            Err(FrameError::TooLong(u32::MAX.into()))
        );
        assert_eq!(body_len((MAX_FRAME as u32).to_be_bytes()), Ok(MAX_FRAME));
        let huge = TunnelOpen {
            service: "a".repeat(MAX_FRAME),
            ..open()
        };
        assert!(matches!(encode(&huge), Err(FrameError::TooLong(_))));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode::<TunnelOpen>("TunnelOpen", &buf),
            Err(FrameError::Malformed {
                what: "TunnelOpen",
                ..
            })
        ));
        // Wrong wire type for field 2 (port).
        let mut buf = 2u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0x12, 0x00]);
        assert!(decode::<TunnelOpen>("TunnelOpen", &buf).is_err());
    }

    #[test]
    fn a_good_open_passes_with_defaults() {
        let r = check_open(&open()).unwrap();
        assert_eq!(r.service, ServiceKey::new("shop", "checkout"));
        assert_eq!(r.port, 8080);
        assert_eq!(r.deadline, DEFAULT_DEADLINE);
        assert!(r.traceparent.is_some());
        assert_eq!(check_open(&r.to_wire()).unwrap().source, r.source);
        let long = TunnelOpen {
            deadline_ms: u32::MAX,
            ..open()
        };
        assert_eq!(check_open(&long).unwrap().deadline, MAX_DEADLINE);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = fn(&mut TunnelOpen);
        let cases: [(Mutation, &str); 7] = [
            (|o| o.service = "checkout".into(), "namespace/name"),
            (|o| o.service = "shop/Check_out".into(), "service name"),
            (|o| o.port = 0, "port 0"),
            (|o| o.port = 70000, "port 70000"),
            (|o| o.target_cluster.clear(), "target_cluster"),
            (|o| o.target_cluster = "GCP".into(), "target_cluster"),
            (
                |o| o.source_identity = "http://x/y".into(),
                "source_identity",
            ),
        ];
        for (mutate, want) in cases {
            let mut o = open();
            mutate(&mut o);
            let err = check_open(&o).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn traceparents_follow_w3c() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
        let o = TunnelOpen {
            traceparent: "nonsense".into(),
            ..open()
        };
        assert_eq!(check_open(&o).unwrap().traceparent, None);
    }

    #[test]
    fn accepts_without_a_status_are_protocol_errors() {
        assert_eq!(
            read_accept(&accept_ok("10.0.0.1:80".into())).unwrap(),
            "10.0.0.1:80"
        );
        let r = read_accept(&TunnelAccept::default()).unwrap_err();
        assert_eq!(r.status, Status::BadRequest);
        let r = read_accept(&TunnelAccept {
            status: 99,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(r.status, Status::BadRequest);
        let refused = Refusal::new(Status::Forbidden, "no").to_wire();
        assert_eq!(read_accept(&refused).unwrap_err().status, Status::Forbidden);
        assert!(!Refusal::new(Status::BadRequest, "x").worth_another_gateway());
        assert!(Refusal::new(Status::Overloaded, "x").worth_another_gateway());
    }
}
