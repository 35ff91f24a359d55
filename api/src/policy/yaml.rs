//! Policy documents as an operator writes them: one or more YAML documents
//! per file, each checked, every error naming the file, the line and
//! column, and the field (`checkout.yaml: line 12 column 7:
//! spec.failoverThreshold: 1.5 is outside (0, 1]`).

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::{GlobalTrafficPolicy, PolicyError};

/// A YAML document's shape with the position of every node: where the
/// semantic checks' errors point.
#[derive(Debug)]
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

/// A mapping key of any scalar type, as text.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.into()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(Key(k)) = m.next_key()? {
            entries.push((k, m.next_value()?));
        }
        Ok(Node::Map(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = s.next_element()? {
            items.push(n);
        }
        Ok(Node::Seq(items))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        d.deserialize_any(self)
    }
}

/// The position of the deepest node on `path` (`spec.routes[1].to`): the
/// field itself when it is there, else the nearest enclosing one.
fn locate(doc: &Spanned<Node>, path: &str) -> (u64, u64) {
    let mut at = doc;
    // Keys may hold dots (`weights.gcp-usc1` has none, header names may):
    // match the longest key first.
    let mut rest = path;
    'walk: while !rest.is_empty() {
        match &at.value {
            Node::Map(entries) => {
                let mut best: Option<(&Spanned<Node>, usize)> = None;
                for (k, v) in entries {
                    if rest.starts_with(k.as_str())
                        && matches!(rest.as_bytes().get(k.len()), None | Some(b'.' | b'['))
                        && best.is_none_or(|(_, l)| k.len() > l)
                    {
                        best = Some((v, k.len()));
                    }
                }
                let Some((v, len)) = best else { break };
                at = v;
                rest = rest[len..].trim_start_matches('.');
            }
            Node::Seq(items) => {
                let Some(idx) = rest.strip_prefix('[').and_then(|r| r.split_once(']')) else {
                    break;
                };
                let Some(item) = idx.0.parse::<usize>().ok().and_then(|i| items.get(i)) else {
                    break 'walk;
                };
                at = item;
                rest = idx.1.trim_start_matches('.');
            }
            Node::Leaf => break,
        }
    }
    (at.referenced.line(), at.referenced.column())
}

/// Every policy in `yaml` (one or more documents), each checked; `origin`
/// names the file in errors. Names must be unique within the file.
pub fn parse_documents(yaml: &str, origin: &str) -> Result<Vec<GlobalTrafficPolicy>, String> {
    let policies: Vec<GlobalTrafficPolicy> =
        serde_saphyr::from_multiple(yaml).map_err(|e| format!("{origin}: {e}"))?;
    let trees: Vec<Spanned<Node>> =
        serde_saphyr::from_multiple(yaml).map_err(|e| format!("{origin}: {e}"))?;
    if policies.is_empty() {
        return Err(format!("{origin}: no document in the file"));
    }
    for (i, (p, tree)) in policies.iter().zip(&trees).enumerate() {
        let fail = |e: PolicyError| {
            let (line, column) = locate(tree, &e.path);
            format!("{origin}: line {line} column {column}: {e}")
        };
        p.validate().map_err(fail)?;
        if let Some(j) = policies[..i]
            .iter()
            .position(|q| q.metadata.name == p.metadata.name)
        {
            return Err(fail(PolicyError {
                path: "metadata.name".into(),
                message: format!(
                    "{:?} is already the name of document {} in this file",
                    p.metadata.name,
                    j + 1
                ),
            }));
        }
    }
    Ok(policies)
}

/// The resource's JSON Schema, generated from the Rust types.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(GlobalTrafficPolicy);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
