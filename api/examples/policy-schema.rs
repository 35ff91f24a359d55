//! Prints the global traffic policy's JSON Schema, generated from its types:
//! `cargo run -p fedmesh-api --example policy-schema > policies/global-traffic-policy.schema.json`.

fn main() {
    print!("{}", fedmesh_api::policy::schema_json());
}
