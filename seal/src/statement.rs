//! Signed statements: what a DSSE payload says, who may sign it, and the
//! checks every reader makes before it believes one.
//!
//! A statement names the key it belongs at (`subject`, relative to the
//! zone's prefix), so a genuine value copied to another key is refused; it
//! carries a sequence that only rises, so a genuine older value written back
//! (a replay, an old backup) is refused; and a `value` of `null` is a signed
//! deletion, the only deletion a reader obeys.
//!
//! Three kinds of signer, each checked against what the reader already
//! trusts, never against anything read from the same store:
//! - the federation anchor (cluster records, policies), pinned at join;
//! - a cluster CA's root (its bundle), trusted through the anchor-signed
//!   cluster record, then through the bundle a reader holds;
//! - a cluster controller's SVID (its export manifest), which must verify
//!   against that cluster's bundle as `…/fedmesh/controller/<cluster>`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fedmesh_trust::{Bundle, BundleSet, ClusterCa, SpiffeId, Svid, Usage};
use rustls::SignatureScheme;
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::anchor::{AnchorKey, AnchorPublic, hex};
use crate::envelope::{Envelope, EnvelopeError, PAYLOAD_TYPE, pae};

/// How far ahead of a reader's clock a statement may be dated.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The payload of every envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Statement<T> {
    /// The key the value belongs at, without the zone's prefix
    /// (`clusters/aws-use1`).
    pub subject: String,
    /// Rises with every statement about the subject: milliseconds since the
    /// Unix epoch when it was signed, or one more than the last, whichever
    /// is higher.
    pub seq: u64,
    /// `None`: the subject is deleted.
    pub value: Option<T>,
    /// The signer's certificate chain, base64 DER, leaf first: set when the
    /// signer is an SVID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub x5c: Vec<String>,
    /// For a bundle: each root since the first, endorsed by the root before
    /// it (`fedmesh rotate-ca`), so that a reader who trusts only the first
    /// (pinned in the cluster's record) follows every rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endorsements: Vec<Endorsement>,
}

/// A CA root vouching for the next root of its trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endorsement {
    /// The endorsed root, base64 DER.
    pub root: String,
    /// The endorsing root, base64 DER.
    pub by: String,
    /// `by`'s signature over the subject and `root`.
    pub sig: String,
}

fn endorsement_message(subject: &str, root: &[u8]) -> Vec<u8> {
    let mut msg = format!("fedmesh root endorsement v1\n{subject}\n").into_bytes();
    msg.extend_from_slice(root);
    msg
}

/// `by` (the root that signs now) endorses `root` (the next) for the
/// bundle at `subject` (`bundles/<td>`).
pub fn endorse(
    by: &ClusterCa,
    subject: &str,
    root: &CertificateDer<'_>,
) -> Result<Endorsement, SealError> {
    Ok(Endorsement {
        root: STANDARD.encode(root),
        by: STANDARD.encode(by.cert_der()),
        sig: STANDARD.encode(by.sign(&endorsement_message(subject, root))?),
    })
}

/// Extends `trusted` (keyids) and `certificates` with every root that a
/// trusted root endorses for `subject`, in as many steps as the chain has.
fn follow_endorsements(
    subject: &str,
    endorsements: &[Endorsement],
    trusted: &mut Vec<String>,
    certificates: &mut Vec<CertificateDer<'static>>,
) {
    let decoded: Vec<(CertificateDer<'static>, CertificateDer<'static>, Vec<u8>)> = endorsements
        .iter()
        .filter_map(|e| {
            let d = |s: &str| STANDARD.decode(s).ok();
            Some((
                CertificateDer::from(d(&e.root)?),
                CertificateDer::from(d(&e.by)?),
                d(&e.sig)?,
            ))
        })
        .collect();
    loop {
        let mut grew = false;
        for (root, by, sig) in &decoded {
            let (Some(root_id), Some(by_id)) = (root_keyid(root), root_keyid(by)) else {
                continue;
            };
            if trusted.contains(&root_id) || !trusted.contains(&by_id) {
                continue;
            }
            if verify_with_cert(by, &endorsement_message(subject, root), sig) {
                trusted.push(root_id);
                certificates.push(root.clone());
                grew = true;
            }
        }
        if !grew {
            return;
        }
    }
}

/// Why a stored value is not believed. The label is what `fedmesh get`
/// shows in its TRUST column and the `reason` of the refused-records metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not an envelope at all (a plain value, as written before signing).
    #[error("unsigned: {0}")]
    Unsigned(String),
    /// An envelope whose signature does not verify, or whose signer may not
    /// sign this key.
    #[error("forged: {0}")]
    Forged(String),
    /// A genuine statement older than one already believed.
    #[error("rollback: sequence {got} is older than {held}, already believed")]
    Rollback { held: u64, got: u64 },
    /// Signed, but the payload is not a valid value for this key.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Over a per-cluster budget (exports, value size).
    #[error("over budget: {0}")]
    Budget(String),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Unsigned(_) => "UNSIGNED",
            Refusal::Forged(_) => "FORGED",
            Refusal::Rollback { .. } => "ROLLBACK",
            Refusal::Invalid(_) => "INVALID",
            Refusal::Budget(_) => "BUDGET",
        }
    }
}

impl From<EnvelopeError> for Refusal {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::NotEnvelope(_) => Refusal::Unsigned(e.to_string()),
            EnvelopeError::TooLarge(_) => Refusal::Budget(e.to_string()),
            _ => Refusal::Forged(e.to_string()),
        }
    }
}

/// A statement whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened<T> {
    pub seq: u64,
    pub value: Option<T>,
    /// The keyid that signed it.
    pub signer: String,
}

/// Who signs a statement.
#[derive(Debug, Clone, Copy)]
pub enum Signer<'a> {
    Anchor(&'a AnchorKey),
    Root(&'a ClusterCa),
    Svid(&'a Svid),
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("signing with the cluster CA: {0}")]
    Ca(#[from] fedmesh_trust::CaError),
    #[error("signing with the SVID: {0}")]
    Svid(String),
}

/// The next sequence for a subject last signed at `after`.
pub fn next_seq(now: SystemTime, after: Option<u64>) -> u64 {
    let ms = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    after.map_or(ms, |a| ms.max(a + 1))
}

/// The time a sequence was signed at.
pub fn seq_time(seq: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(seq)
}

/// Signs `statement` as `signer`.
pub fn seal<T: Serialize>(
    mut statement: Statement<T>,
    signer: Signer<'_>,
) -> Result<Envelope, SealError> {
    if let Signer::Svid(svid) = signer {
        statement.x5c = svid.chain().iter().map(|c| STANDARD.encode(c)).collect();
    }
    // Plain data always serialises.
    let payload = serde_json::to_vec(&statement).unwrap_or_default();
    match signer {
        Signer::Anchor(key) => {
            Envelope::seal(&payload, key.keyid(), |m| Ok::<_, SealError>(key.sign(m)))
        }
        Signer::Root(ca) => {
            let keyid = root_keyid(ca.cert_der()).unwrap_or_default();
            Envelope::seal(&payload, keyid, |m| Ok(ca.sign(m)?))
        }
        Signer::Svid(svid) => {
            let keyid = format!("svid:{}", svid.spiffe_id());
            Envelope::seal(&payload, keyid, |m| {
                let key = &svid.certified_key().key;
                let signer = key
                    .choose_scheme(&[
                        SignatureScheme::ECDSA_NISTP256_SHA256,
                        SignatureScheme::ECDSA_NISTP384_SHA384,
                        SignatureScheme::ED25519,
                    ])
                    .ok_or_else(|| SealError::Svid("no usable signature scheme".into()))?;
                signer.sign(m).map_err(|e| SealError::Svid(e.to_string()))
            })
        }
    }
}

/// `root:` and the first 32 hex digits of the SHA-256 of a certificate's
/// SubjectPublicKeyInfo: names a CA root independently of its certificate
/// (a renewed certificate of the same key keeps its keyid).
pub fn root_keyid(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let spki = parsed.tbs_certificate.subject_pki.raw;
    Some(format!(
        "root:{}",
        hex(&digest::digest(&digest::SHA256, spki).as_ref()[..16])
    ))
}

/// The statement inside `raw`, if it is a well-formed envelope about
/// `subject`, with its signatures, before any key is checked.
struct Unwrapped<T> {
    statement: Statement<T>,
    msg: Vec<u8>,
    signatures: Vec<(String, Vec<u8>)>,
}

/// The statement inside `raw`, **without checking any signature**: for
/// finding what a signature must be checked against (the certificate of a
/// bundle's signing root is in the bundle), or what a writer builds on.
/// Never a reason to believe the value.
pub fn peek<T: DeserializeOwned>(raw: &[u8]) -> Result<Statement<T>, Refusal> {
    let payload = Envelope::parse(raw)?.payload()?;
    serde_json::from_slice(&payload)
        .map_err(|e| Refusal::Invalid(format!("the signed payload: {e}")))
}

fn unwrap<T: DeserializeOwned>(raw: &[u8], subject: &str) -> Result<Unwrapped<T>, Refusal> {
    let env = Envelope::parse(raw)?;
    let payload = env.payload()?;
    let signatures = env
        .signed()?
        .into_iter()
        .map(|(k, s)| (k.to_owned(), s))
        .collect::<Vec<_>>();
    if signatures.is_empty() {
        return Err(Refusal::Unsigned(
            "the envelope carries no signature".into(),
        ));
    }
    let msg = pae(PAYLOAD_TYPE, &payload);
    // Signatures are checked before the payload is believed, but the
    // subject is read first so a copied value is named as such.
    let statement: Statement<T> = serde_json::from_slice(&payload)
        .map_err(|e| Refusal::Invalid(format!("the signed payload: {e}")))?;
    if statement.subject != subject {
        return Err(Refusal::Forged(format!(
            "signed for {:?}, found at {subject:?}",
            statement.subject
        )));
    }
    Ok(Unwrapped {
        statement,
        msg,
        signatures,
    })
}

fn opened<T>(u: Unwrapped<T>, signer: String) -> Opened<T> {
    Opened {
        seq: u.statement.seq,
        value: u.statement.value,
        signer,
    }
}

/// Opens a statement the federation anchor must have signed.
pub fn open_anchored<T: DeserializeOwned>(
    raw: &[u8],
    subject: &str,
    anchors: &[AnchorPublic],
) -> Result<Opened<T>, Refusal> {
    let u = unwrap::<T>(raw, subject)?;
    for (keyid, sig) in &u.signatures {
        if let Some(anchor) = anchors.iter().find(|a| a.keyid() == *keyid)
            && anchor.verify(&u.msg, sig)
        {
            let signer = keyid.clone();
            return Ok(opened(u, signer));
        }
    }
    Err(Refusal::Forged(format!(
        "not signed by the federation anchor ({})",
        signers(&u.signatures)
    )))
}

/// Opens a statement one of `trusted` roots must have signed (by keyid).
/// `certificates` are where the signing root's certificate may be found:
/// the roots the reader holds and those in the new bundle itself.
pub fn open_by_root<T: DeserializeOwned>(
    raw: &[u8],
    subject: &str,
    trusted: &[String],
    certificates: &[CertificateDer<'_>],
) -> Result<Opened<T>, Refusal> {
    let u = unwrap::<T>(raw, subject)?;
    let mut trusted = trusted.to_vec();
    let mut certificates: Vec<CertificateDer<'static>> = certificates
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    follow_endorsements(
        subject,
        &u.statement.endorsements,
        &mut trusted,
        &mut certificates,
    );
    for (keyid, sig) in &u.signatures {
        if !trusted.contains(keyid) {
            continue;
        }
        let Some(cert) = certificates
            .iter()
            .find(|c| root_keyid(c).as_deref() == Some(keyid))
        else {
            continue;
        };
        if verify_with_cert(cert, &u.msg, sig) {
            let signer = keyid.clone();
            return Ok(opened(u, signer));
        }
    }
    Err(Refusal::Forged(format!(
        "not signed by a root trusted for this trust domain ({})",
        signers(&u.signatures)
    )))
}

/// Opens a statement that `expected` must have signed with an SVID valid,
/// when it signed, against `bundle`. A statement dated more than
/// [`MAX_CLOCK_SKEW`] after `now` is refused: it would outrank every
/// genuine one to come.
pub fn open_by_svid<T: DeserializeOwned>(
    raw: &[u8],
    subject: &str,
    expected: &SpiffeId,
    bundle: &Bundle,
    now: SystemTime,
) -> Result<Opened<T>, Refusal> {
    let u = unwrap::<T>(raw, subject)?;
    let signed_at = seq_time(u.statement.seq);
    if signed_at > now + MAX_CLOCK_SKEW {
        return Err(Refusal::Forged(format!(
            "dated {} s in the future",
            signed_at.duration_since(now).unwrap_or_default().as_secs()
        )));
    }
    let chain = u
        .statement
        .x5c
        .iter()
        .map(|c| STANDARD.decode(c).map(CertificateDer::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Refusal::Forged("x5c is not base64".into()))?;
    let Some(leaf) = chain.first() else {
        return Err(Refusal::Forged("no signing certificate (x5c)".into()));
    };
    let mut set = BundleSet::new();
    set.insert(bundle.clone());
    let id = set
        .reverify(&chain, signed_at, Usage::Client)
        .map_err(|e| Refusal::Forged(format!("the signing certificate: {e}")))?;
    if id != *expected {
        return Err(Refusal::Forged(format!(
            "signed by {id}; only {expected} may sign it"
        )));
    }
    let keyid = format!("svid:{expected}");
    let sig = u
        .signatures
        .iter()
        .find(|(k, _)| *k == keyid)
        .map(|(_, s)| s);
    match sig {
        Some(sig) if verify_with_cert(leaf, &u.msg, sig) => Ok(opened(u, keyid)),
        _ => Err(Refusal::Forged(format!(
            "the signature of {expected} does not verify"
        ))),
    }
}

/// Refuses a sequence lower than the one held.
pub fn check_seq(held: Option<u64>, got: u64) -> Result<(), Refusal> {
    match held {
        Some(held) if got < held => Err(Refusal::Rollback { held, got }),
        _ => Ok(()),
    }
}

fn verify_with_cert(cert: &CertificateDer<'_>, msg: &[u8], sig: &[u8]) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    // webpki checks the key's algorithm before any arithmetic, so only the
    // matching algorithm costs a verification.
    fedmesh_trust::crypto_provider()
        .signature_verification_algorithms
        .all
        .iter()
        .any(|alg| ee.verify_signature(*alg, msg, sig).is_ok())
}

fn signers(sigs: &[(String, Vec<u8>)]) -> String {
    let ids: Vec<&str> = sigs.iter().map(|(k, _)| k.as_str()).collect();
    format!("signed by {}", ids.join(", "))
}
