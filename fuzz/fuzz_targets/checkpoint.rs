//! The checkpoint reader: a file truncated by a crash, edited by hand, or written by another
//! version is an error naming the file, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kubelet_plugin::checkpoint::decode(std::path::Path::new("checkpoint.json"), data);
});
