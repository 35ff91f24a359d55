//! The `ServiceExport` conditions fedmesh owns, `Valid` and `Conflict`
//! (KEP-1645), worked out from a [`Verdict`] and the clusters that export
//! the service on other ports: I/O-free.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::summary::Verdict;

pub const VALID: &str = "Valid";
pub const CONFLICT: &str = "Conflict";

/// The conditions a `ServiceExport` should carry, or `None` when those it
/// has already say so. A condition whose status is unchanged keeps its
/// `lastTransitionTime`, as the API conventions ask; conditions of other
/// types (another controller's) are kept as they are.
pub fn desired(
    existing: &[Condition],
    verdict: &Verdict,
    conflicting: &[String],
    ports: &[u16],
    generation: Option<i64>,
    now: &Time,
) -> Option<Vec<Condition>> {
    let valid = match verdict {
        Verdict::Exported { note } if note.is_empty() => {
            ("True", "Exported", "exported to the clusterset".to_string())
        }
        Verdict::Exported { note } => ("True", "Exported", format!("exported; {note}")),
        Verdict::Invalid { reason, message } => ("False", *reason, message.clone()),
    };
    let conflict = if conflicting.is_empty() {
        (
            "False",
            "NoConflict",
            "no other cluster exports other ports".to_string(),
        )
    } else {
        (
            "True",
            "PortConflict",
            format!(
                "{} export this service on other ports than {ports:?}; they are left out of it",
                conflicting.join(", ")
            ),
        )
    };
    let mut out: Vec<Condition> = existing
        .iter()
        .filter(|c| c.type_ != VALID && c.type_ != CONFLICT)
        .cloned()
        .collect();
    for (type_, (status, reason, message)) in [(VALID, valid), (CONFLICT, conflict)] {
        let old = existing.iter().find(|c| c.type_ == type_);
        let since = match old {
            Some(o) if o.status == status => o.last_transition_time.clone(),
            _ => now.clone(),
        };
        out.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: since,
            observed_generation: generation,
        });
    }
    let same = |a: &Condition, b: &Condition| {
        a.type_ == b.type_
            && a.status == b.status
            && a.reason == b.reason
            && a.message == b.message
            && a.observed_generation == b.observed_generation
    };
    let unchanged =
        out.len() == existing.len() && out.iter().all(|c| existing.iter().any(|e| same(c, e)));
    (!unchanged).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn conditions_change_only_when_what_they_say_changes() {
        let ok = Verdict::Exported {
            note: String::new(),
        };
        let first = desired(&[], &ok, &[], &[8080], Some(1), &at(100)).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(
            (first[0].type_.as_str(), first[0].status.as_str()),
            (VALID, "True")
        );
        assert_eq!(
            (first[1].type_.as_str(), first[1].status.as_str()),
            (CONFLICT, "False")
        );
        assert_eq!(desired(&first, &ok, &[], &[8080], Some(1), &at(200)), None);

        // A conflict appears: Conflict flips (new time), Valid keeps its time.
        let gcp = ["gcp-usc1".to_string()];
        let second = desired(&first, &ok, &gcp, &[8080], Some(1), &at(300)).unwrap();
        assert_eq!(second[0].last_transition_time, at(100));
        assert_eq!(second[1].status, "True");
        assert_eq!(second[1].last_transition_time, at(300));
        assert!(
            second[1].message.contains("gcp-usc1"),
            "{}",
            second[1].message
        );

        // Invalid: says why; another controller's condition is left alone.
        let mut theirs = second.clone();
        theirs.push(Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Theirs".into(),
            message: String::new(),
            last_transition_time: at(1),
            observed_generation: None,
        });
        let bad = Verdict::Invalid {
            reason: "ServiceNotFound",
            message: "there is no Service shop/cart to export".into(),
        };
        let third = desired(&theirs, &bad, &[], &[], Some(2), &at(400)).unwrap();
        assert_eq!(third[0].type_, "Ready");
        let valid = third.iter().find(|c| c.type_ == VALID).unwrap();
        assert_eq!(
            (valid.status.as_str(), valid.reason.as_str()),
            ("False", "ServiceNotFound")
        );
        assert_eq!(valid.observed_generation, Some(2));
    }
}
