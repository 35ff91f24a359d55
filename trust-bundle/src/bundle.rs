//! SPIFFE bundles: the roots of one trust domain, and the document format that
//! carries them between clusters (a JWK Set, per the SPIFFE Trust Domain and
//! Bundle specification).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::spiffe::TrustDomain;

pub const X509_SVID_USE: &str = "x509-svid";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The document is not JSON of the right shape. `line` and `column` are 1-based.
    #[error("{origin}: invalid bundle JSON at line {line}, column {column}: {reason}")]
    Json {
        origin: String,
        line: usize,
        column: usize,
        reason: String,
    },
    /// One field of an otherwise readable document is wrong.
    #[error("{origin}: {field}: {reason}")]
    Field {
        origin: String,
        field: String,
        reason: String,
    },
    /// The document is readable but holds no `x509-svid` root, so it would
    /// trust nothing.
    #[error("{origin}: bundle for {trust_domain} has no x509-svid roots ({keys} keys read)")]
    Empty {
        origin: String,
        trust_domain: TrustDomain,
        keys: usize,
    },
}

/// The roots of one trust domain. A bundle may hold several roots at once,
/// which is how a CA rotation overlaps old and new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    /// Bumped whenever the roots change, so that consumers can ignore stale copies.
    pub sequence: u64,
    /// How often consumers should poll for a newer bundle.
    pub refresh_hint: Option<Duration>,
}

impl Bundle {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            roots: Vec::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    pub fn with_roots(
        trust_domain: TrustDomain,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Self {
        let mut b = Self::new(trust_domain);
        for r in roots {
            b.add_root(r);
        }
        b
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Adds a root unless it is already present. Returns whether it was added.
    pub fn add_root(&mut self, root: CertificateDer<'static>) -> bool {
        if self.roots.contains(&root) {
            return false;
        }
        self.roots.push(root);
        true
    }

    /// Removes a root. Returns whether it was present.
    pub fn remove_root(&mut self, root: &CertificateDer<'_>) -> bool {
        let before = self.roots.len();
        self.roots.retain(|r| r.as_ref() != root.as_ref());
        before != self.roots.len()
    }

    /// Encodes the bundle as a SPIFFE bundle document (pretty JSON).
    pub fn to_document(&self) -> String {
        let keys = self.roots.iter().map(|r| jwk_for(r)).collect();
        let doc = Document {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs()),
        };
        // Serialising plain owned data cannot fail.
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    /// Decodes a SPIFFE bundle document. `origin` names where it came from (a
    /// file, an etcd key) so that errors point at it.
    ///
    /// Keys whose `use` is not `x509-svid` (JWT-SVID keys, future uses) are
    /// ignored, as the specification asks.
    pub fn from_document(
        trust_domain: TrustDomain,
        json: &[u8],
        origin: &str,
    ) -> Result<Self, BundleError> {
        let doc: RawDocument = serde_json::from_slice(json).map_err(|e| BundleError::Json {
            origin: origin.into(),
            line: e.line(),
            column: e.column(),
            reason: e.to_string(),
        })?;
        let field_err = |field: String, reason: String| BundleError::Field {
            origin: origin.into(),
            field,
            reason,
        };
        let keys = doc
            .keys
            .ok_or_else(|| field_err("keys".into(), "missing".into()))?;
        let mut bundle = Bundle::new(trust_domain);
        bundle.sequence = doc.spiffe_sequence.unwrap_or(0);
        bundle.refresh_hint = doc.spiffe_refresh_hint.map(Duration::from_secs);
        for (i, key) in keys.iter().enumerate() {
            let at = |f: &str| format!("keys[{i}].{f}");
            let key_use = key
                .get("use")
                .ok_or_else(|| field_err(at("use"), "missing".into()))?
                .as_str()
                .ok_or_else(|| field_err(at("use"), "must be a string".into()))?;
            if key_use != X509_SVID_USE {
                continue;
            }
            match key.get("kty").and_then(|v| v.as_str()) {
                Some(kty) if !kty.is_empty() => {}
                _ => return Err(field_err(at("kty"), "missing or not a string".into())),
            }
            let x5c = key
                .get("x5c")
                .and_then(|v| v.as_array())
                .ok_or_else(|| field_err(at("x5c"), "missing or not an array".into()))?;
            let [entry] = x5c.as_slice() else {
                return Err(field_err(
                    at("x5c"),
                    format!(
                        "must hold exactly one certificate (the root), found {}",
                        x5c.len()
                    ),
                ));
            };
            let field = at("x5c[0]");
            let b64 = entry
                .as_str()
                .ok_or_else(|| field_err(field.clone(), "must be a string".into()))?;
            let der = STANDARD
                .decode(b64)
                .map_err(|e| field_err(field.clone(), format!("invalid base64: {e}")))?;
            match X509Certificate::from_der(&der) {
                Ok(([], cert)) => {
                    if !cert.is_ca() {
                        return Err(field_err(
                            field,
                            "is not a CA certificate (basicConstraints cA is not set)".into(),
                        ));
                    }
                }
                Ok(_) => return Err(field_err(field, "trailing bytes after certificate".into())),
                Err(e) => {
                    return Err(field_err(
                        field,
                        format!("not a valid X.509 certificate: {e}"),
                    ));
                }
            }
            bundle.add_root(CertificateDer::from(der));
        }
        if bundle.roots.is_empty() {
            return Err(BundleError::Empty {
                origin: origin.into(),
                trust_domain: bundle.trust_domain,
                keys: keys.len(),
            });
        }
        Ok(bundle)
    }
}

#[derive(Serialize)]
struct Document {
    keys: Vec<BTreeMap<&'static str, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

/// Decoding is lenient about unknown members (as JWK requires) and strict
/// about the members it uses.
#[derive(Deserialize)]
struct RawDocument {
    keys: Option<Vec<serde_json::Map<String, serde_json::Value>>>,
    spiffe_sequence: Option<u64>,
    spiffe_refresh_hint: Option<u64>,
}

/// The JWK of a root: its public key parameters plus the certificate in `x5c`.
fn jwk_for(root: &CertificateDer<'_>) -> BTreeMap<&'static str, serde_json::Value> {
    use serde_json::Value::String as S;
    let mut jwk = BTreeMap::new();
    jwk.insert("use", S(X509_SVID_USE.into()));
    jwk.insert("x5c", serde_json::json!([STANDARD.encode(root.as_ref())]));
    // Roots in a bundle were parsed when they were added or generated; an
    // unparsable one still travels, with only its x5c.
    let Ok((_, cert)) = X509Certificate::from_der(root.as_ref()) else {
        jwk.insert("kty", S("EC".into()));
        return jwk;
    };
    match cert.public_key().parsed() {
        Ok(PublicKey::EC(point)) => {
            let data = point.data();
            let coord = (data.len().saturating_sub(1)) / 2;
            let crv = match coord {
                32 => "P-256",
                48 => "P-384",
                66 => "P-521",
                _ => "unknown",
            };
            jwk.insert("kty", S("EC".into()));
            jwk.insert("crv", S(crv.into()));
            if data.first() == Some(&0x04) && data.len() == 1 + 2 * coord {
                jwk.insert("x", S(URL_SAFE_NO_PAD.encode(&data[1..1 + coord])));
                jwk.insert("y", S(URL_SAFE_NO_PAD.encode(&data[1 + coord..])));
            }
        }
        Ok(PublicKey::RSA(rsa)) => {
            jwk.insert("kty", S("RSA".into()));
            jwk.insert("n", S(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus))));
            jwk.insert("e", S(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent))));
        }
        _ => {
            jwk.insert("kty", S("OKP".into()));
        }
    }
    jwk
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaOptions, ClusterCa};
    use std::time::SystemTime;

    fn td() -> TrustDomain {
        TrustDomain::new("aws.example").unwrap()
    }

    fn root() -> CertificateDer<'static> {
        ClusterCa::generate(&td(), &CaOptions::default(), SystemTime::now())
            .unwrap()
            .cert_der()
            .clone()
    }

    #[test]
    fn round_trips_with_several_roots() {
        let mut b = Bundle::with_roots(td(), [root(), root()]);
        b.sequence = 7;
        b.refresh_hint = Some(Duration::from_secs(300));
        let doc = b.to_document();
        let back = Bundle::from_document(td(), doc.as_bytes(), "bundles/aws.example").unwrap();
        assert_eq!(back, b);
        assert_eq!(back.roots().len(), 2);
    }

    #[test]
    fn document_follows_the_spiffe_bundle_format() {
        let r = root();
        let mut b = Bundle::with_roots(td(), [r.clone()]);
        b.sequence = 3;
        b.refresh_hint = Some(Duration::from_secs(60));
        let v: serde_json::Value = serde_json::from_str(&b.to_document()).unwrap();
        assert_eq!(v["spiffe_sequence"], 3);
        assert_eq!(v["spiffe_refresh_hint"], 60);
        let key = &v["keys"][0];
        assert_eq!(key["use"], "x509-svid");
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(key["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(key["y"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        let x5c = key["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        assert_eq!(
            STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(),
            r.as_ref()
        );
    }

    #[test]
    fn ignores_jwt_keys_and_unknown_members() {
        let r = root();
        let doc = serde_json::json!({
            "keys": [
                {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"},
                {"use": "x509-svid", "kty": "EC", "x5c": [STANDARD.encode(r.as_ref())], "future": 1}
            ],
            "spiffe_sequence": 2,
            "extra": true
        });
        let b = Bundle::from_document(td(), doc.to_string().as_bytes(), "f").unwrap();
        assert_eq!(b.roots(), &[r]);
        assert_eq!(b.refresh_hint, None);
    }

    #[test]
    fn truncated_json_names_origin_line_and_column() {
        let doc = Bundle::with_roots(td(), [root()]).to_document();
        let cut = &doc.as_bytes()[..doc.len() / 2];
        let err = Bundle::from_document(td(), cut, "bundles/aws.example").unwrap_err();
        match &err {
            BundleError::Json { origin, line, .. } => {
                assert_eq!(origin, "bundles/aws.example");
                assert!(*line > 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn bad_fields_are_named() {
        let good = STANDARD.encode(root().as_ref());
        let leafish = {
            let ca = ClusterCa::generate(&td(), &CaOptions::default(), SystemTime::now()).unwrap();
            let id = crate::SpiffeId::workload(&td(), "a", "b").unwrap();
            let svid = ca
                .issue(&id, &Default::default(), SystemTime::now())
                .unwrap();
            STANDARD.encode(svid.leaf().as_ref())
        };
        let cases = [
            (serde_json::json!({"spiffe_sequence": 1}), "keys: missing"),
            (
                serde_json::json!({"keys": [{"kty": "EC", "x5c": [good]}]}),
                "keys[0].use: missing",
            ),
            (
                serde_json::json!({"keys": [{"use": 5}]}),
                "keys[0].use: must be a string",
            ),
            (
                serde_json::json!({"keys": [{"use": "x509-svid", "x5c": [good]}]}),
                "keys[0].kty",
            ),
            (
                serde_json::json!({"keys": [{"use": "x509-svid", "kty": "EC"}]}),
                "keys[0].x5c: missing",
            ),
            (
                serde_json::json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [good, good]}]}),
                "exactly one",
            ),
            (
                serde_json::json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["!!"]}]}),
                "keys[0].x5c[0]: invalid base64",
            ),
            (
                serde_json::json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["AAAA"]}]}),
                "keys[0].x5c[0]: not a valid X.509",
            ),
            (
                serde_json::json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [leafish]}]}),
                "keys[0].x5c[0]: is not a CA",
            ),
            (serde_json::json!({"keys": []}), "bundle.json: bundle for"),
            (
                serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC"}]}),
                "has no x509-svid roots (1 keys read)",
            ),
            (
                serde_json::json!({"keys": [], "spiffe_sequence": -1}),
                "line 1",
            ),
        ];
        for (doc, want) in cases {
            let err = Bundle::from_document(td(), doc.to_string().as_bytes(), "bundle.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{doc}: {err}");
        }
    }

    #[test]
    fn add_and_remove_roots() {
        let (a, b) = (root(), root());
        let mut bundle = Bundle::with_roots(td(), [a.clone()]);
        assert!(!bundle.add_root(a.clone()));
        assert!(bundle.add_root(b.clone()));
        assert!(bundle.remove_root(&a));
        assert!(!bundle.remove_root(&a));
        assert_eq!(bundle.roots(), &[b]);
    }
}
