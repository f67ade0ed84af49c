//! Test support: unit tests that check kiln's formats against a host tool (sfdisk, bmaptool,
//! cpio, the SPDX validator) skip where the host lacks it (the fast tier, `cargo test
//! --workspace` as any user) and say so; under `scripts/test` (`KILN_TEST_REQUIRE_ALL`) a skip
//! is a failure.

use std::io::Write as _;

/// Whether `tool` is on this host's PATH (as the test will run it); otherwise see [`allows`].
pub fn host_has(test: &str, tool: &str) -> bool {
    allows(test, crate::host::tools::which(tool).is_some(), &format!("`{tool}` on PATH (`kiln doctor --install`)"))
}

/// `ok`, or prints why `test` is skipped (past libtest's capture of the print macros), or
/// panics where nothing may be skipped.
pub fn allows(test: &str, ok: bool, need: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("KILN_TEST_REQUIRE_ALL").is_some() {
        panic!("{test} would be skipped: it needs {need}; KILN_TEST_REQUIRE_ALL is set");
    }
    let _ = writeln!(std::io::stderr(), "kiln: skipped {test}: needs {need}");
    false
}
