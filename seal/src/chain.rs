//! The federation anchor's history, so that the anchor can be rotated
//! without touching every join directory first: each key after the first is
//! endorsed by the one before it (the new key signed by the old). A reader
//! pinned to any key of the chain follows it to the newest, which is then
//! the only key it believes records and policies from: a rotation away from
//! a key (say, one feared stolen) also stops that key's signatures
//! counting, once the reader has seen the chain.
//!
//! The chain is stored as a statement at `anchor/chain`, signed by its
//! newest key; each link's endorsement is checked on its own, from the
//! reader's pinned key onward.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::anchor::{AnchorKey, AnchorPublic};
use crate::statement::Refusal;

/// The subject (key without the prefix) the chain is stored at.
pub const CHAIN_SUBJECT: &str = "anchor/chain";

/// What a link's endorsement signs: a domain tag and the new key.
fn endorsement_message(key_pem: &str) -> Vec<u8> {
    let mut msg = b"fedmesh anchor rotation v1\n".to_vec();
    msg.extend_from_slice(key_pem.as_bytes());
    msg
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorChain {
    /// The first key, then each later one with its endorsement.
    pub links: Vec<AnchorLink>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorLink {
    /// PEM `PUBLIC KEY`.
    pub key: String,
    /// base64 of the previous key's signature over this key (empty for the
    /// first link).
    #[serde(default)]
    pub endorsement: String,
}

impl AnchorChain {
    /// A chain that starts at `first`.
    pub fn starting_at(first: &AnchorPublic) -> Self {
        Self {
            links: vec![AnchorLink {
                key: first.to_pem(),
                endorsement: String::new(),
            }],
        }
    }

    /// This chain with `next` endorsed by `current`, which must be its
    /// newest key.
    pub fn rotated(mut self, current: &AnchorKey, next: &AnchorPublic) -> Result<Self, Refusal> {
        let newest = self.keys()?.pop();
        if newest.as_ref() != Some(&current.public()) {
            return Err(Refusal::Invalid(format!(
                "{} is not the chain's newest key; rotate from the anchor in use",
                current.keyid()
            )));
        }
        let key = next.to_pem();
        let endorsement = STANDARD.encode(current.sign(&endorsement_message(&key)));
        self.links.push(AnchorLink { key, endorsement });
        Ok(self)
    }

    /// Every key of the chain, in order, unchecked.
    pub fn keys(&self) -> Result<Vec<AnchorPublic>, Refusal> {
        self.links
            .iter()
            .enumerate()
            .map(|(i, l)| {
                AnchorPublic::from_pem(l.key.as_bytes(), &format!("anchor chain link {i}"))
                    .map_err(|e| Refusal::Invalid(e.to_string()))
            })
            .collect()
    }

    /// The newest key a reader pinned to `pinned` reaches: from the last
    /// pinned key found in the chain, each later link must be endorsed by
    /// the one before. A chain that names none of `pinned` is not for this
    /// reader.
    pub fn follow(&self, pinned: &[AnchorPublic]) -> Result<AnchorPublic, Refusal> {
        let keys = self.keys()?;
        let start = keys
            .iter()
            .rposition(|k| pinned.contains(k))
            .ok_or_else(|| Refusal::Forged("the anchor chain names no pinned anchor".into()))?;
        for i in start + 1..keys.len() {
            let sig = STANDARD
                .decode(&self.links[i].endorsement)
                .map_err(|e| Refusal::Invalid(format!("anchor chain link {i}: {e}")))?;
            if !keys[i - 1].verify(&endorsement_message(&self.links[i].key), &sig) {
                return Err(Refusal::Forged(format!(
                    "anchor chain link {i} is not endorsed by the key before it"
                )));
            }
        }
        Ok(keys[keys.len() - 1].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_pinned_to_any_key_follows_to_the_newest_and_no_further_than_endorsed() {
        let (a, b, c) = (
            AnchorKey::generate().unwrap(),
            AnchorKey::generate().unwrap(),
            AnchorKey::generate().unwrap(),
        );
        let chain = AnchorChain::starting_at(&a.public())
            .rotated(&a, &b.public())
            .unwrap()
            .rotated(&b, &c.public())
            .unwrap();
        for pinned in [&a, &b, &c] {
            assert_eq!(chain.follow(&[pinned.public()]).unwrap(), c.public());
        }
        // Only the newest key rotates it further.
        let err = chain.clone().rotated(&a, &a.public()).unwrap_err();
        assert!(err.to_string().contains("newest"), "{err}");
        // A reader pinned elsewhere is not led anywhere.
        let stranger = AnchorKey::generate().unwrap();
        assert_eq!(
            chain.follow(&[stranger.public()]).unwrap_err().label(),
            "FORGED"
        );
        // A link endorsed by anyone but the key before it breaks the chain
        // for readers pinned before it.
        let mut forged = chain.clone();
        forged.links[2].endorsement =
            STANDARD.encode(stranger.sign(&endorsement_message(&forged.links[2].key)));
        assert_eq!(forged.follow(&[a.public()]).unwrap_err().label(), "FORGED");
        // A reader pinned to c does not need c's own endorsement.
        assert_eq!(forged.follow(&[c.public()]).unwrap(), c.public());
        // An appended stranger's key, endorsed by itself, is not followed.
        let mut appended = chain.clone();
        appended.links.push(AnchorLink {
            key: stranger.public().to_pem(),
            endorsement: STANDARD
                .encode(stranger.sign(&endorsement_message(&stranger.public().to_pem()))),
        });
        assert_eq!(
            appended.follow(&[a.public()]).unwrap_err().label(),
            "FORGED"
        );
    }
}
