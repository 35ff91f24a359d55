//! SPIFFE IDs and trust domains, parsed strictly by the SPIFFE ID specification.
//!
//! Parsing is strict on purpose: an ID that two implementations could read
//! differently (upper case, percent-encoding, `..`) is refused, so that an
//! authorization decision never depends on how a string was normalised.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// RFC 3986 caps a URI host at 255 characters.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The SPIFFE ID specification caps a whole ID at 2048 bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("is empty")]
    Empty,
    #[error("must start with \"spiffe://\" (lowercase scheme)")]
    WrongScheme,
    #[error("has no trust domain")]
    MissingTrustDomain,
    #[error("trust domain has a port; trust domains may not carry one")]
    TrustDomainPort,
    #[error("trust domain has userinfo ('@'); trust domains may not carry one")]
    TrustDomainUserinfo,
    #[error("trust domain has {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed")]
    TrustDomainChar(char),
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("path has an empty segment (\"//\" or a trailing '/')")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("has a query ('?'); SPIFFE IDs may not carry one")]
    Query,
    #[error("has a fragment ('#'); SPIFFE IDs may not carry one")]
    Fragment,
    #[error("is percent-encoded ('%'); SPIFFE IDs must be written plainly")]
    PercentEncoded,
    #[error("path has {0:?}; only letters, digits, '.', '-' and '_' are allowed in a segment")]
    PathChar(char),
    #[error("is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
}

/// A validated trust domain name, such as `aws-use1.fedmesh.example`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name. A `spiffe://` prefix is accepted too, so
    /// that operators may paste either form.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if let Some(rest) = name.strip_prefix(SCHEME) {
            let id = SpiffeId::parse(name)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::PathChar('/'));
            }
            return Ok(Self(rest.to_owned()));
        }
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>`, carried by its CA.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("{SCHEME}{}", self.0),
            td_end: SCHEME.len() + self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust-domain>[/<segment>...]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    /// Byte offset where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or(SpiffeIdError::WrongScheme)?;
        // Query and fragment are checked before the split so that
        // "spiffe://td?x" names the real problem rather than a bad character.
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            full: input.to_owned(),
            td_end: SCHEME.len() + td.len(),
        })
    }

    /// Builds `spiffe://<td>/<seg>/<seg>...`. Each segment is validated on its
    /// own, so a '/' inside one cannot smuggle in extra segments.
    pub fn from_segments(td: &TrustDomain, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut full = format!("{SCHEME}{td}");
        for seg in segments {
            validate_segment(seg)?;
            full.push('/');
            full.push_str(seg);
        }
        Self::parse(&full)
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`
    pub fn workload(td: &TrustDomain, ns: &str, sa: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["ns", ns, "sa", sa])
    }

    /// `spiffe://<td>/fedmesh/gateway/<cluster>`
    pub fn gateway(td: &TrustDomain, cluster: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["fedmesh", "gateway", cluster])
    }

    /// `spiffe://<td>/fedmesh/controller/<cluster>`
    pub fn controller(td: &TrustDomain, cluster: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["fedmesh", "controller", cluster])
    }

    pub fn trust_domain_name(&self) -> &str {
        &self.full[SCHEME.len()..self.td_end]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, with its leading '/', or "" for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.full[self.td_end..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            ':' => return Err(SpiffeIdError::TrustDomainPort),
            '@' => return Err(SpiffeIdError::TrustDomainUserinfo),
            '%' => return Err(SpiffeIdError::PercentEncoded),
            other => return Err(SpiffeIdError::TrustDomainChar(other)),
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split element is always "".
    path.split('/').skip(1).try_for_each(validate_segment)
}

fn validate_segment(seg: &str) -> Result<(), SpiffeIdError> {
    match seg {
        "" => return Err(SpiffeIdError::EmptySegment),
        "." | ".." => return Err(SpiffeIdError::DotSegment),
        _ => {}
    }
    for c in seg.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            '%' => return Err(SpiffeIdError::PercentEncoded),
            '?' => return Err(SpiffeIdError::Query),
            '#' => return Err(SpiffeIdError::Fragment),
            other => return Err(SpiffeIdError::PathChar(other)),
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("SPIFFE ID {s:?} {e}")))
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(|e| serde::de::Error::custom(format!("trust domain {s:?} {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Valid examples from the SPIFFE ID specification and go-spiffe's conformance cases.
    #[test]
    fn spec_valid_ids() {
        for id in [
            "spiffe://trust-domain-name/path",
            "spiffe://staging.example.com/payments/mysql",
            "spiffe://staging.example.com/payments/web-fe",
            "spiffe://k8s-west.example.com/ns/staging/sa/default",
            "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
            "spiffe://example.org",
            "spiffe://trust_domain.example.com/Mixed.Case_path-1",
            "spiffe://1.2.3.4/ip-like-trust-domain",
            "spiffe://example.org/.../a..b/.hidden",
        ] {
            let parsed = SpiffeId::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(parsed.as_str(), id);
        }
    }

    #[test]
    fn spec_invalid_ids() {
        use SpiffeIdError::*;
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let long_id = format!("spiffe://example.org/{}", "a".repeat(2048));
        let cases: Vec<(&str, SpiffeIdError)> = vec![
            ("", Empty),
            ("http://example.org/path", WrongScheme),
            ("SPIFFE://example.org/path", WrongScheme),
            ("spiffe:/example.org/path", WrongScheme),
            ("example.org/path", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://Example.org/path", TrustDomainChar('E')),
            ("spiffe://example.org:8080/path", TrustDomainPort),
            ("spiffe://user@example.org/path", TrustDomainUserinfo),
            ("spiffe://exa%41mple.org/path", PercentEncoded),
            ("spiffe://[::1]/path", TrustDomainChar('[')),
            ("spiffe://exa mple.org", TrustDomainChar(' ')),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org//path", EmptySegment),
            ("spiffe://example.org/path/", EmptySegment),
            ("spiffe://example.org/./path", DotSegment),
            ("spiffe://example.org/path/..", DotSegment),
            ("spiffe://example.org/pa%20th", PercentEncoded),
            ("spiffe://example.org/path?query=1", Query),
            ("spiffe://example.org/path#frag", Fragment),
            ("spiffe://example.org?x", Query),
            ("spiffe://example.org/pa$th", PathChar('$')),
            ("spiffe://example.org/päth", PathChar('ä')),
            (long_td.as_str(), TrustDomainTooLong),
            (long_id.as_str(), TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want.clone()), "{input:?}");
        }
    }

    #[test]
    fn max_lengths_are_inclusive() {
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(TrustDomain::new(&td).is_ok());
        let prefix = "spiffe://example.org/";
        let id = format!("{prefix}{}", "p".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert_eq!(id.len(), MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::parse(&id).is_ok());
    }

    #[test]
    fn components() {
        let id = SpiffeId::parse("spiffe://aws.example/ns/shop/sa/checkout").unwrap();
        assert_eq!(id.trust_domain_name(), "aws.example");
        assert_eq!(id.path(), "/ns/shop/sa/checkout");
        assert!(id.is_member_of(&TrustDomain::new("aws.example").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::new("aws.example.evil").unwrap()));
        let td = TrustDomain::new("aws.example").unwrap();
        assert_eq!(td.id().as_str(), "spiffe://aws.example");
        assert_eq!(td.id().path(), "");
    }

    #[test]
    fn constructors_follow_design_naming() {
        let td = TrustDomain::new("gcp.example").unwrap();
        assert_eq!(
            SpiffeId::workload(&td, "shop", "checkout")
                .unwrap()
                .as_str(),
            "spiffe://gcp.example/ns/shop/sa/checkout"
        );
        assert_eq!(
            SpiffeId::gateway(&td, "gcp-euw1").unwrap().as_str(),
            "spiffe://gcp.example/fedmesh/gateway/gcp-euw1"
        );
        assert_eq!(
            SpiffeId::controller(&td, "gcp-euw1").unwrap().as_str(),
            "spiffe://gcp.example/fedmesh/controller/gcp-euw1"
        );
        // A namespace cannot smuggle in extra segments.
        assert_eq!(
            SpiffeId::workload(&td, "shop/sa/admin", "x"),
            Err(SpiffeIdError::PathChar('/'))
        );
        assert_eq!(
            SpiffeId::workload(&td, "..", "x"),
            Err(SpiffeIdError::DotSegment)
        );
        assert_eq!(SpiffeId::gateway(&td, ""), Err(SpiffeIdError::EmptySegment));
    }

    #[test]
    fn trust_domain_accepts_id_form_without_path() {
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
        assert!(TrustDomain::new("spiffe://example.org/path").is_err());
        assert!(TrustDomain::new("").is_err());
    }

    #[test]
    fn serde_validates() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://a.example/x\"").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"spiffe://a.example/x\""
        );
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://A.example/x\"").unwrap_err();
        assert!(err.to_string().contains("trust domain has 'A'"), "{err}");
    }
}
