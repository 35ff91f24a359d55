//! Where each record lives in etcd (ARCHITECTURE.md §3.1), and the reverse: what a key
//! seen on a watch refers to.

/// The default prefix of the global zone.
pub const DEFAULT_PREFIX: &str = "/fedmesh/v1/";

/// The global zone's key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    prefix: String,
}

impl Default for KeySpace {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

/// What a global-zone key refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalKey {
    Cluster(String),
    Alive(String),
    Seen(String),
    Bundle(String),
    Export {
        cluster: String,
        namespace: String,
        service: String,
    },
    Policy(String),
    /// `anchor/chain`: the federation anchor's history.
    AnchorChain,
}

impl KeySpace {
    /// `prefix` gets a trailing '/' if it lacks one, so that `/a` and `/ab`
    /// can never share keys.
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn cluster(&self, cluster: &str) -> String {
        format!("{}clusters/{cluster}", self.prefix)
    }

    pub fn alive(&self, cluster: &str) -> String {
        format!("{}alive/{cluster}", self.prefix)
    }

    pub fn seen(&self, cluster: &str) -> String {
        format!("{}seen/{cluster}", self.prefix)
    }

    pub fn bundle(&self, trust_domain: &str) -> String {
        format!("{}bundles/{trust_domain}", self.prefix)
    }

    pub fn export(&self, cluster: &str, namespace: &str, service: &str) -> String {
        format!("{}exports/{cluster}/{namespace}/{service}", self.prefix)
    }

    /// The prefix of every export of `cluster` (ends in '/').
    pub fn exports_of(&self, cluster: &str) -> String {
        format!("{}exports/{cluster}/", self.prefix)
    }

    pub fn policy(&self, name: &str) -> String {
        format!("{}policies/{name}", self.prefix)
    }

    /// The federation anchor's history (`fedmesh_seal::chain`).
    pub fn anchor_chain(&self) -> String {
        format!("{}anchor/chain", self.prefix)
    }

    /// Reads a key back. `None` for keys outside the prefix or of unknown
    /// shape, which a watcher should ignore (a newer version may add kinds).
    pub fn parse(&self, key: &str) -> Option<GlobalKey> {
        let rest = key.strip_prefix(&self.prefix)?;
        let (kind, rest) = rest.split_once('/')?;
        let single = |s: &str| (!s.is_empty() && !s.contains('/')).then(|| s.to_owned());
        match kind {
            "clusters" => single(rest).map(GlobalKey::Cluster),
            "alive" => single(rest).map(GlobalKey::Alive),
            "seen" => single(rest).map(GlobalKey::Seen),
            "bundles" => single(rest).map(GlobalKey::Bundle),
            "policies" => single(rest).map(GlobalKey::Policy),
            "anchor" => (rest == "chain").then_some(GlobalKey::AnchorChain),
            "exports" => {
                let (c, n, s) = export_parts(rest)?;
                Some(GlobalKey::Export {
                    cluster: c.into(),
                    namespace: n.into(),
                    service: s.into(),
                })
            }
            _ => None,
        }
    }

    /// `(cluster, namespace, service)` of an export key, borrowed: a listing
    /// reads a million of them.
    pub fn parse_export<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str, &'k str)> {
        export_parts(key.strip_prefix(&self.prefix)?.strip_prefix("exports/")?)
    }
}

fn export_parts(rest: &str) -> Option<(&str, &str, &str)> {
    let mut parts = rest.split('/');
    let (c, n, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [c, n, s].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some((c, n, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_design() {
        let ks = KeySpace::default();
        assert_eq!(ks.cluster("aws-use1"), "/fedmesh/v1/clusters/aws-use1");
        assert_eq!(ks.alive("aws-use1"), "/fedmesh/v1/alive/aws-use1");
        assert_eq!(ks.seen("aws-use1"), "/fedmesh/v1/seen/aws-use1");
        assert_eq!(ks.bundle("aws.example"), "/fedmesh/v1/bundles/aws.example");
        assert_eq!(
            ks.export("aws-use1", "shop", "checkout"),
            "/fedmesh/v1/exports/aws-use1/shop/checkout"
        );
        assert_eq!(ks.exports_of("aws-use1"), "/fedmesh/v1/exports/aws-use1/");
        assert_eq!(ks.policy("checkout"), "/fedmesh/v1/policies/checkout");
    }

    #[test]
    fn every_key_parses_back() {
        let ks = KeySpace::new("/custom");
        assert_eq!(ks.prefix(), "/custom/");
        let cases = [
            (ks.cluster("a"), GlobalKey::Cluster("a".into())),
            (ks.alive("a"), GlobalKey::Alive("a".into())),
            (ks.seen("a"), GlobalKey::Seen("a".into())),
            (
                ks.bundle("a.example"),
                GlobalKey::Bundle("a.example".into()),
            ),
            (ks.policy("p"), GlobalKey::Policy("p".into())),
            (
                ks.export("a", "shop", "cart"),
                GlobalKey::Export {
                    cluster: "a".into(),
                    namespace: "shop".into(),
                    service: "cart".into(),
                },
            ),
        ];
        for (key, want) in cases {
            assert_eq!(ks.parse(&key), Some(want), "{key}");
        }
        assert_eq!(
            ks.parse_export(&ks.export("a", "shop", "cart")),
            Some(("a", "shop", "cart"))
        );
        assert_eq!(ks.parse_export(&ks.cluster("a")), None);
    }

    #[test]
    fn foreign_and_malformed_keys_are_ignored() {
        let ks = KeySpace::default();
        for key in [
            "/other/clusters/a",
            "/fedmesh/v1x/clusters/a",
            "/fedmesh/v1/clusters/",
            "/fedmesh/v1/clusters/a/b",
            "/fedmesh/v1/exports/a/shop",
            "/fedmesh/v1/exports/a/shop/cart/extra",
            "/fedmesh/v1/exports/a//cart",
            "/fedmesh/v1/unknown/a",
            "/fedmesh/v1/clusters",
        ] {
            assert_eq!(ks.parse(key), None, "{key}");
            assert_eq!(ks.parse_export(key), None, "{key}");
        }
    }
}
