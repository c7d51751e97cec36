//! Untrusted bytes never panic the router's decoders: every reader of a client's (or server's) message, the
//! framing, the startup packet and the SCRAM exchange take arbitrary input and answer with a value or an
//! error. Property tests (proptest) over random and mutated inputs, a few thousand cases each. The
//! coverage-guided fuzzing of the same readers (and of the planner, config.csv and COPY row splitting) is in
//! `fuzz/`, run by scripts/fuzz.sh.

use bytes::BytesMut;
use proptest::prelude::*;
use router::net::proto;
use router::net::wire::{split_frame_within, Limit};

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn message_readers_take_any_body(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = proto::read_parse_bytes(&body);
        if let Some(b) = proto::read_bind(&body) {
            for i in 0..8 {
                let _ = b.value(i);
                let _ = b.binary(i);
            }
            let _ = b.result_formats();
            let _ = b.formats();
        }
        let _ = proto::data_row(&body);
        let _ = proto::data_row_values(&body);
        let _ = proto::row_fields(&body);
        let _ = proto::error_fields(&body);
        let _ = proto::read_cstr(&body);
        let _ = proto::read_i32(&body);
    }

    #[test]
    fn framing_takes_any_stream(bytes in proptest::collection::vec(any::<u8>(), 0..512), limit in 16usize..4096) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Frames come off, or an error, or a wait for more: never a panic, never a frame over the limit.
        for _ in 0..64 {
            match split_frame_within(&mut buf, Limit { bytes: limit, client: true }) {
                Ok(Some(m)) => prop_assert!(m.frame.len() <= limit),
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn scram_takes_any_client_messages(first in proptest::collection::vec(any::<u8>(), 0..128),
                                       last in proptest::collection::vec(any::<u8>(), 0..128),
                                       bind in any::<bool>()) {
        let v = router::frontend::scram::Verifier::from_password("pw", b"salt", 4);
        let endpoint = [3u8; 32];
        if let Ok((_, ex)) = router::frontend::scram::server_first(&v, &first, bind.then_some(&endpoint)) {
            let _ = ex.server_final(&v, &last);
        }
        let _ = router::frontend::scram::Verifier::parse(&String::from_utf8_lossy(&first));
    }

    #[test]
    fn well_formed_client_firsts_with_mutations(user in "[a-z]{0,8}", nonce in "[A-Za-z0-9+/]{1,24}",
                                                flip in 0usize..64, to in any::<u8>()) {
        let mut msg = format!("n,,n={user},r={nonce}").into_bytes();
        if flip < msg.len() {
            msg[flip] = to;
        }
        let v = router::frontend::scram::Verifier::from_password("pw", b"salt", 4);
        let _ = router::frontend::scram::server_first(&v, &msg, None);
    }
}

/// The startup packet reader, through a real (in-memory) stream: lengths out of range, truncated packets,
/// unknown protocol codes and malformed parameter lists are errors, not panics or waits for ever.
#[tokio::test]
async fn startup_packets_of_any_shape() {
    use tokio::io::AsyncWriteExt;
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0, 0],
        vec![0, 0, 0, 4],
        vec![255, 255, 255, 255],
        vec![0, 0, 0, 8, 0, 3, 0, 0],
        vec![0, 0, 0, 9, 0, 3, 0, 0, b'u'],
        vec![0, 0, 0, 12, 0, 3, 0, 0, b'u', 0, b'x', 0],
        vec![0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 1, 0, 0, 0, 2],
        vec![0, 0, 0, 8, 0, 9, 0, 0],
        vec![0, 0, 39, 17, 0, 3, 0, 0],
    ];
    for case in cases {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&case).await.unwrap();
        drop(client);
        let mut io = router::net::wire::Framed::new(server);
        let r =
            tokio::time::timeout(std::time::Duration::from_secs(5), router::frontend::startup::hello(&mut io, false))
                .await;
        assert!(r.is_ok(), "{case:?}: no answer");
    }
}
