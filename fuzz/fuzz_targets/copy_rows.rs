//! COPY FROM STDIN row splitting (text, CSV, binary): any data is rows or an error; and the rows do not
//! depend on how the data was cut into CopyData messages — the whole stream at once and the same bytes in the
//! pieces the input chooses give the same rows, keys and outcome.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use router::frontend::copy::{Key, Row, Splitter};
use shardmap::sql::{CopyFormat, CopyIn};

#[derive(Arbitrary, Debug)]
struct Input {
    format: u8,
    tab: bool,
    header: bool,
    key_column: u8,
    cuts: Vec<u8>,
    data: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum Out {
    Data(Vec<u8>, Option<Option<Vec<u8>>>),
    Header(Vec<u8>),
}

const MAX_ROW: usize = 4096;

fn run(s: &mut Splitter, pieces: &[&[u8]]) -> (Vec<Out>, Result<(), String>) {
    let mut out = Vec::new();
    let mut on = |r: Row<'_>| {
        out.push(match r {
            Row::Header(h) => Out::Header(h.to_vec()),
            Row::Data { line, key } => Out::Data(
                line.to_vec(),
                Some(key.map(|k| match k {
                    Key::Text(t) => t.into_bytes(),
                    Key::Binary(b) => b.to_vec(),
                })),
            ),
        });
        Ok(())
    };
    let mut result = Ok(());
    for p in pieces {
        result = s.feed(p, &mut on);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = s.finish(&mut on);
    }
    (out, result)
}

fuzz_target!(|input: Input| {
    let format = match input.format % 3 {
        0 => CopyFormat::Text,
        1 => CopyFormat::Csv,
        _ => CopyFormat::Binary,
    };
    let copy = CopyIn {
        table: "t".into(),
        key_column: Some(input.key_column as usize % 4),
        columns_given: true,
        format,
        delimiter: if input.tab { b'\t' } else { b',' },
        header: input.header,
    };
    let key = input.key_column as usize % 4;
    let whole = run(&mut Splitter::new(&copy, key, MAX_ROW), &[&input.data]);
    let mut pieces = Vec::new();
    let mut rest = &input.data[..];
    for &c in &input.cuts {
        let (a, b) = rest.split_at((c as usize).min(rest.len()));
        pieces.push(a);
        rest = b;
    }
    pieces.push(rest);
    let cut = run(&mut Splitter::new(&copy, key, MAX_ROW), &pieces);
    // Cut into pieces, a row may be refused as too long before it is complete: compare up to there.
    let too_long = |r: &Result<(), String>| r.as_ref().is_err_and(|e| e.contains("longer than"));
    if too_long(&whole.1) || too_long(&cut.1) {
        let n = whole.0.len().min(cut.0.len());
        assert_eq!(whole.0[..n], cut.0[..n]);
    } else {
        assert_eq!(whole, cut, "rows differ with the data cut into pieces");
    }
});
