//! The envelope every signed value of the global zone is stored in: DSSE
//! (Dead Simple Signing Envelope, as used by in-toto and Sigstore), JSON
//! serialisation. `etcdctl get` shows it as JSON; its `payload` is the
//! record itself, base64 (`jq -r .payload | base64 -d` prints it).
//!
//! What is signed is DSSE's pre-authentication encoding of the payload and
//! its type, never the JSON around them, so re-encoding the envelope cannot
//! change what a signature covers.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// The payload type of every fedmesh statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.fedmesh.statement.v1+json";

/// Largest envelope a reader parses. A cluster record, a policy or a
/// manifest of 64 bucket digests is a few KiB; a bundle a few certificates.
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;

/// A DSSE envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    /// base64 (standard alphabet, padded) of the payload.
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Which key signed: `anchor:<hex>`, `root:<hex>` (a cluster CA's root,
    /// by the SHA-256 of its public key) or `svid:<SPIFFE ID>`.
    pub keyid: String,
    /// base64 of the signature.
    pub sig: String,
}

/// Why bytes are not a well-formed envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not a signed envelope: {0}")]
    NotEnvelope(String),
    #[error("the envelope is {0} bytes; at most {MAX_ENVELOPE_BYTES} are read")]
    TooLarge(usize),
    #[error("payloadType {0:?} is not {PAYLOAD_TYPE:?}")]
    PayloadType(String),
    #[error("{0} is not valid base64")]
    Base64(&'static str),
}

impl Envelope {
    /// An envelope around `payload`, signed by `sign` under `keyid`.
    pub fn seal<E>(
        payload: &[u8],
        keyid: String,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Self, E> {
        let sig = sign(&pae(PAYLOAD_TYPE, payload))?;
        Ok(Self {
            payload: STANDARD.encode(payload),
            payload_type: PAYLOAD_TYPE.into(),
            signatures: vec![Signature {
                keyid,
                sig: STANDARD.encode(sig),
            }],
        })
    }

    /// Parses stored bytes. A value that is not JSON of this shape is "not
    /// an envelope", which readers report as unsigned.
    pub fn parse(raw: &[u8]) -> Result<Self, EnvelopeError> {
        if raw.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge(raw.len()));
        }
        let env: Envelope =
            serde_json::from_slice(raw).map_err(|e| EnvelopeError::NotEnvelope(e.to_string()))?;
        if env.payload_type != PAYLOAD_TYPE {
            return Err(EnvelopeError::PayloadType(env.payload_type));
        }
        Ok(env)
    }

    pub fn to_json(&self) -> String {
        // Plain strings always serialise.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The decoded payload.
    pub fn payload(&self) -> Result<Vec<u8>, EnvelopeError> {
        STANDARD
            .decode(&self.payload)
            .map_err(|_| EnvelopeError::Base64("payload"))
    }

    /// Each signature as (keyid, signature bytes, the message it signs).
    pub fn signed(&self) -> Result<Vec<(&str, Vec<u8>)>, EnvelopeError> {
        self.signatures
            .iter()
            .map(|s| {
                let sig = STANDARD
                    .decode(&s.sig)
                    .map_err(|_| EnvelopeError::Base64("a signature"))?;
                Ok((s.keyid.as_str(), sig))
            })
            .collect()
    }
}

/// DSSE's pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII
/// decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_specification() {
        // The specification's own example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn an_envelope_round_trips_and_refuses_other_shapes() {
        let env = Envelope::seal(b"{\"a\":1}", "k".into(), |m| {
            Ok::<_, ()>(m.len().to_be_bytes().to_vec())
        })
        .unwrap();
        let back = Envelope::parse(env.to_json().as_bytes()).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.payload().unwrap(), b"{\"a\":1}");
        assert!(matches!(
            Envelope::parse(b"{\"name\":\"plain json\"}"),
            Err(EnvelopeError::NotEnvelope(_))
        ));
        let other = env.to_json().replace(PAYLOAD_TYPE, "text/plain");
        assert!(matches!(
            Envelope::parse(other.as_bytes()),
            Err(EnvelopeError::PayloadType(_))
        ));
        let huge = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            Envelope::parse(&huge),
            Err(EnvelopeError::TooLarge(_))
        ));
    }
}
