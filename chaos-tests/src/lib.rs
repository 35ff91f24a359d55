//! fedmesh's chaos suite: failover drills against a running federation.
//!
//! - [`drill`]: a drill as its YAML file says it;
//! - [`load`]: the open-loop load driver, recording every request;
//! - [`run`]: the runner, which keeps time around a [`run::Federation`]
//!   that injects the faults;
//! - [`report`]: the figures and the verdict, I/O-free; [`text`] and
//!   [`svg`] show them.
//!
//! The drills that ship with fedmesh are in [`SHIPPED`].

pub mod drill;
pub mod load;
pub mod report;
pub mod run;
pub mod svg;
pub mod text;

pub use drill::{Action, Drill, DrillError};
pub use report::Report;
pub use run::{Federation, run};

/// The shipped drills, by file name, as `fedmesh drill <name>` finds them.
pub const SHIPPED: &[(&str, &str)] = &[];

/// The shipped drill called `name`.
pub fn shipped(name: &str) -> Option<Result<Drill, DrillError>> {
    SHIPPED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, yaml)| Drill::parse(yaml, &format!("drills/{n}.yaml")))
}
