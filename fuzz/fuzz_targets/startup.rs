//! The first bytes of a connection: startup packets, SSLRequest, GSSENCRequest and CancelRequest, read by
//! the router's startup reader from an in-memory stream that ends after them. It must answer (a hello, an
//! error, or the end of the stream) and never wait for bytes that cannot come.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else { return };
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(bytes).await.expect("in-memory write");
        drop(client);
        let mut io = router::net::wire::Framed::new(server);
        io.limit = router::net::wire::Limit { bytes: 64 + flags as usize * 16, client: true };
        let answer =
            tokio::time::timeout(Duration::from_secs(5), router::frontend::startup::hello(&mut io, flags & 1 == 1))
                .await;
        assert!(answer.is_ok(), "the startup reader waited for bytes that cannot come");
    });
});
