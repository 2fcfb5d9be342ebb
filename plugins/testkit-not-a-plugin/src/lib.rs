//! A perfectly good shared library that exports nothing probe looks for.

#[no_mangle]
pub extern "C" fn add(a: i32, b: i32) -> i32 {
    a + b
}
