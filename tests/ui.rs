//! Compile-time behaviour of `#[idempotent]`: programs that must compile (and
//! run), and programs that must fail with a pointed error (`tests/ui/fail/*.stderr`).

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
