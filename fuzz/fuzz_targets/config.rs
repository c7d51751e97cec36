//! config.csv: any bytes are a configuration or an error naming the problem; a configuration that parses
//! builds a shard map or is refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = shardmap::Config::parse("fuzz.csv", data) {
        let _ = shardmap::ShardMap::new(&config);
    }
});
