//! Integrity for the global zone, which fedmesh treats as untrusted storage
//! (ARCHITECTURE.md §3.1, "signed records"): etcd gives availability and
//! ordering, and every reader checks a signature before it believes a value.
//!
//! - [`chain`]: the anchor's history (each new key signed by the old), so
//!   that the anchor can be rotated;
//! - [`envelope`]: DSSE envelopes, the stored form of every signed value;
//! - [`anchor`]: the operator's federation anchor (Ed25519), which signs
//!   cluster records and policies;
//! - [`statement`]: what an envelope says (subject, sequence, value or
//!   deletion), how each kind of signer seals one, and the checks that open
//!   one: anchor, a cluster CA root, or a controller's SVID;
//! - [`manifest`]: one signed manifest per cluster vouching for all of its
//!   export values, checked per bucket.
//!
//! I/O-free apart from reading and writing the anchor's key files: what a
//! reader does with a refusal (keep the last good value, report it) is its
//! own business.

pub mod anchor;
pub mod chain;
pub mod envelope;
pub mod manifest;
pub mod statement;

pub use anchor::{ANCHOR_KEY_FILE, ANCHOR_PUB_FILE, AnchorError, AnchorKey, AnchorPublic};
pub use chain::{AnchorChain, CHAIN_SUBJECT};
pub use envelope::{Envelope, EnvelopeError};
pub use manifest::{BUCKETS, Digest, ExportManifest, ExportSet, bucket_of, value_digest};
pub use statement::{
    Endorsement, Opened, Refusal, SealError, Signer, Statement, check_seq, endorse, next_seq,
    open_anchored, open_by_root, open_by_svid, peek, root_keyid, seal, seq_time,
};
