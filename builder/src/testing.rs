//! Test support: unit tests that check kiln's formats against a host tool (sfdisk, bmaptool,
//! cpio) skip where the tool is missing (the fast tier, `cargo test --workspace` on any
//! machine) and say so; under `scripts/test` (`KILN_TEST_REQUIRE_ALL`) a missing tool fails.

use std::io::Write as _;

/// Whether `tool` is on this host; otherwise prints why `test` is skipped (past libtest's
/// capture of the print macros), or panics where nothing may be skipped.
pub fn host_has(test: &str, tool: &str) -> bool {
    if crate::doctor::which(tool).is_some()
        || ["/usr/sbin", "/sbin"].iter().any(|d| std::path::Path::new(d).join(tool).is_file())
    {
        return true;
    }
    if std::env::var_os("KILN_TEST_REQUIRE_ALL").is_some() {
        panic!("{test} would be skipped: `{tool}` is not installed (`kiln doctor --install`); KILN_TEST_REQUIRE_ALL is set");
    }
    let _ = writeln!(std::io::stderr(), "kiln: skipped {test}: needs `{tool}` (`kiln doctor --install`)");
    false
}
