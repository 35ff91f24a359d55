//! Property-based tests of the tunnel header on the wire: any bytes decode
//! to a frame, "more bytes needed", or an error that says what is wrong,
//! never a panic; any `TunnelOpen` passes or fails its checks with a
//! reason; and what is encoded decodes back the same.
//! `PROPTEST_CASES` sets how many cases each property runs (256 by default).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use fedmesh_proto::tunnel::v1::TunnelOpen;
use fedmesh_tunnel::frame::{self, MAX_FRAME, PREFIX};
use proptest::prelude::*;

fn open() -> impl Strategy<Value = TunnelOpen> {
    (
        prop_oneof![Just("shop/checkout".to_string()), any::<String>()],
        prop_oneof![Just(8080u32), any::<u32>()],
        prop_oneof![Just("gcp-usc1".to_string()), any::<String>()],
        prop_oneof![
            Just(String::new()),
            Just("spiffe://aws.example/ns/shop/sa/web".to_string()),
            any::<String>()
        ],
        prop_oneof![
            Just(String::new()),
            Just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string()),
            any::<String>()
        ],
        any::<u32>(),
    )
        .prop_map(
            |(service, port, target_cluster, source_identity, traceparent, deadline_ms)| {
                TunnelOpen {
                    service,
                    port,
                    target_cluster,
                    source_identity,
                    traceparent,
                    deadline_ms,
                }
            },
        )
}

proptest! {
    #[test]
    fn any_bytes_decode_or_say_why(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        match frame::decode::<TunnelOpen>("TunnelOpen", &bytes) {
            Ok(Some((m, used))) => {
                prop_assert!(used <= bytes.len() && used >= PREFIX);
                if let Err(why) = frame::check_open(&m) {
                    prop_assert!(!why.is_empty());
                }
            }
            Ok(None) => {
                let announced = bytes
                    .first_chunk::<PREFIX>()
                    .map(|p| u32::from_be_bytes(*p) as usize + PREFIX);
                prop_assert!(announced.is_none_or(|n| n > bytes.len()));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn an_announced_length_over_the_limit_is_refused_before_the_body(
        len in (MAX_FRAME as u32 + 1)..
    ) {
        prop_assert!(frame::body_len(len.to_be_bytes()).is_err());
    }

    #[test]
    fn every_open_passes_or_fails_its_checks_with_a_reason(o in open()) {
        match frame::check_open(&o) {
            Ok(r) => {
                prop_assert!(r.port != 0);
                prop_assert_eq!(r.service.to_string(), o.service.clone());
                prop_assert!(r.deadline <= std::time::Duration::from_secs(60));
            }
            Err(why) => prop_assert!(!why.is_empty()),
        }
        // What is encoded (within the limit) decodes back the same.
        if let Ok(wire) = frame::encode(&o) {
            let (back, used) = frame::decode::<TunnelOpen>("TunnelOpen", &wire).unwrap().unwrap();
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!(back, o);
        }
    }
}
