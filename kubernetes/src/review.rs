//! Checks a projected ServiceAccount token with the API server's
//! `TokenReview`, for `Certify`: the token's audience must be ours, and
//! the identity it proves, `system:serviceaccount:<ns>:<sa>`, is the
//! workload identity issued.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::Client;
use kube::api::{Api, PostParams};

/// The audience proxies' projected tokens are minted for.
pub const AUDIENCE: &str = "fedmesh";
/// How long a review may take before `Certify` answers `UNAVAILABLE`.
const REVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A workload's Kubernetes identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server said no: an expired or forged token, another
    /// audience, not a ServiceAccount. Do not retry with the same token.
    #[error("ServiceAccount token refused: {0}")]
    Refused(String),
    /// The API server could not be asked; retry.
    #[error("TokenReview failed (retry): {0}")]
    Unavailable(String),
}

/// Asks the API server about tokens.
#[derive(Clone)]
pub struct TokenReviewer {
    client: Client,
    audience: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            audience: AUDIENCE.into(),
        }
    }

    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        // Certify waits on this: a stuck API server must not hold it.
        let reply =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| {
                    ReviewError::Unavailable(format!("no answer within {REVIEW_TIMEOUT:?}"))
                })?
                .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let status = reply.status.ok_or_else(|| {
            ReviewError::Unavailable("the TokenReview came back without a status".into())
        })?;
        service_account(&status, &self.audience).map_err(ReviewError::Refused)
    }
}

/// Reads a `TokenReview`'s verdict: I/O-free.
pub fn service_account(
    status: &TokenReviewStatus,
    audience: &str,
) -> Result<ServiceAccount, String> {
    if status.authenticated != Some(true) {
        return Err(status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "the API server did not authenticate it".into()));
    }
    // An API server that does not check audiences returns none: refuse
    // rather than accept a token minted for someone else.
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(format!("the token is not for audience {audience:?}"));
    }
    let user = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let parts: Vec<&str> = user.split(':').collect();
    match parts.as_slice() {
        ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => {
            Ok(ServiceAccount {
                namespace: (*ns).into(),
                name: (*sa).into(),
            })
        }
        _ => Err(format!("{user:?} is not a ServiceAccount")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(ok: bool, audiences: &[&str], user: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(ok),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn only_an_authenticated_service_account_of_our_audience_passes() {
        let sa = service_account(
            &status(true, &["fedmesh"], "system:serviceaccount:shop:web"),
            AUDIENCE,
        )
        .unwrap();
        assert_eq!((sa.namespace.as_str(), sa.name.as_str()), ("shop", "web"));
        for (s, want) in [
            (
                status(false, &["fedmesh"], "system:serviceaccount:shop:web"),
                "did not authenticate",
            ),
            (
                status(true, &["vault"], "system:serviceaccount:shop:web"),
                "audience",
            ),
            (
                status(true, &[], "system:serviceaccount:shop:web"),
                "audience",
            ),
            (status(true, &["fedmesh"], "alice"), "not a ServiceAccount"),
            (
                status(true, &["fedmesh"], "system:serviceaccount:shop"),
                "not a ServiceAccount",
            ),
            (
                status(true, &["fedmesh"], "system:serviceaccount:shop:web:x"),
                "not a ServiceAccount",
            ),
        ] {
            let e = service_account(&s, AUDIENCE).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
