//! Names that appear in etcd keys: clusters, namespaces, services, zones.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {name:?} is {len} characters; the limit is 63 (an RFC 1123 label)")]
    TooLong {
        what: &'static str,
        name: String,
        len: usize,
    },
    #[error(
        "{what} {name:?} has {ch:?}; use lowercase letters, digits and '-' (an RFC 1123 label)"
    )]
    BadChar {
        what: &'static str,
        name: String,
        ch: char,
    },
    #[error("{what} {name:?} must start and end with a letter or digit (an RFC 1123 label)")]
    BadEdge { what: &'static str, name: String },
}

/// Checks that `name` is an RFC 1123 label: 1 to 63 characters of `[a-z0-9-]`,
/// starting and ending alphanumeric. `what` names the field in the error
/// ("cluster name", "zone").
pub fn validate_label(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return Err(NameError::BadChar {
            what,
            name: name.into(),
            ch,
        });
    }
    if name.len() > 63 {
        return Err(NameError::TooLong {
            what,
            name: name.into(),
            len: name.len(),
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::BadEdge {
            what,
            name: name.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_rfc1123_labels() {
        for ok in ["a", "aws-use1", "0", "x".repeat(63).as_str(), "a-b-c"] {
            assert_eq!(validate_label("cluster name", ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else_with_the_reason() {
        let long = "x".repeat(64);
        let cases = [
            ("", "is empty"),
            (long.as_str(), "is 64 characters"),
            ("AWS", "has 'A'"),
            ("aws_use1", "has '_'"),
            ("aws.use1", "has '.'"),
            ("aws/use1", "has '/'"),
            ("-aws", "must start and end"),
            ("aws-", "must start and end"),
        ];
        for (bad, want) in cases {
            let err = validate_label("cluster name", bad).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.starts_with("cluster name"),
                "{bad:?}: {err}"
            );
        }
    }
}
