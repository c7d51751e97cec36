//! The SCRAM-SHA-256 exchange with a client. Two kinds of input: raw client messages (first and final), and
//! an honest client (postgres-protocol's) whose messages are changed at one byte. An honest, unchanged
//! exchange succeeds; whatever comes, the router answers with a message or an error.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use router::frontend::scram::{server_first, Verifier};

#[derive(Arbitrary, Debug)]
enum Input {
    Raw { first: Vec<u8>, last: Vec<u8>, bind: bool },
    Honest { bind: bool, first_at: Option<(u16, u8)>, last_at: Option<(u16, u8)> },
    Verifier(String),
}

const ENDPOINT: [u8; 32] = [7; 32];

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::from_password("secret", b"fuzz-salt", 2))
}

fn change(msg: &mut [u8], at: Option<(u16, u8)>) -> bool {
    match at {
        Some((i, b)) if (i as usize) < msg.len() && msg[i as usize] != b => {
            msg[i as usize] = b;
            true
        }
        _ => false,
    }
}

fuzz_target!(|input: Input| {
    let v = verifier();
    match input {
        Input::Raw { first, last, bind } => {
            if let Ok((_, ex)) = server_first(v, &first, bind.then_some(&ENDPOINT)) {
                let _ = ex.server_final(v, &last);
            }
        }
        Input::Honest { bind, first_at, last_at } => {
            let binding = if bind {
                ChannelBinding::tls_server_end_point(ENDPOINT.to_vec())
            } else {
                ChannelBinding::unsupported()
            };
            let mut client = ScramSha256::new(b"secret", binding);
            let mut first = client.message().to_vec();
            let changed = change(&mut first, first_at);
            let Ok((server_first_msg, ex)) = server_first(v, &first, bind.then_some(&ENDPOINT)) else {
                assert!(changed, "an honest client's first message refused");
                return;
            };
            if client.update(&server_first_msg).is_err() {
                assert!(changed, "the honest client refused the router's first message");
                return;
            }
            let mut last = client.message().to_vec();
            let changed = change(&mut last, last_at) || changed;
            match ex.server_final(v, &last) {
                Ok(server_final) => {
                    if !changed {
                        client.finish(&server_final).expect("the honest client takes the router's signature");
                    }
                }
                Err(e) => assert!(changed, "an honest exchange refused: {e:?}"),
            }
        }
        Input::Verifier(text) => {
            let _ = Verifier::parse(&text);
        }
    }
});
