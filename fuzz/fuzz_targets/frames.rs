//! The client's byte stream: framing under a size limit, then every reader of a message body. Parse and Bind
//! bodies that read must write back to bodies that read the same (the router re-writes both).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use router::net::proto;
use router::net::wire::{split_frame_within, Limit};

fuzz_target!(|data: &[u8]| {
    let Some((limit, stream)) = data.split_first_chunk::<2>() else { return };
    let limit = 5 + u16::from_be_bytes(*limit) as usize;
    let mut buf = BytesMut::from(stream);
    while let Ok(Some(m)) = split_frame_within(&mut buf, Limit { bytes: limit, client: true }) {
        assert!(m.frame.len() <= limit, "a frame over the limit");
        let body = m.body();
        if let Some(p) = proto::read_parse_bytes(body) {
            let mut out = BytesMut::new();
            proto::write_parse_bytes(&mut out, p.name, p.query, &p.types);
            let again = proto::read_parse_bytes(&out[5..]).expect("a Parse written reads");
            assert_eq!((again.name, again.query, &again.types), (p.name, p.query, &p.types));
        }
        if let Some(b) = proto::read_bind(body) {
            for i in 0..4 {
                let _ = (b.value(i), b.binary(i));
            }
            if let Some(results) = b.result_formats() {
                let mut out = BytesMut::new();
                proto::write_bind(&mut out, b.portal, b.statement, &b.formats(), b.values(), &results);
                let again = proto::read_bind(&out[5..]).expect("a Bind written reads");
                assert_eq!(again.formats(), b.formats());
                assert_eq!(again.values(), b.values());
                assert_eq!(again.result_formats(), Some(results));
                let mut renamed = BytesMut::new();
                let head = proto::read_bind_head(body).expect("a Bind that reads has a head");
                assert_eq!((head.portal, head.statement, head.tail), (b.portal, b.statement, b.tail));
                proto::write_bind_renamed(&mut renamed, &head, "s1");
                let r = proto::read_bind(&renamed[5..]).expect("a renamed Bind reads");
                assert_eq!((r.statement, r.values()), ("s1", b.values()));
            }
        }
        let _ = proto::data_row(body);
        let _ = proto::data_row_values(body);
        let _ = proto::row_fields(body);
        let _ = proto::error_fields(body);
        let _ = proto::is_commit_cut(body);
        if let Ok(text) = std::str::from_utf8(body) {
            let _ = proto::command_rows(text);
        }
    }
});
