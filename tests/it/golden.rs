//! Golden tests of profile errors: each case directory holds profiles, an `args` file and the
//! expected stderr. `KILN_BLESS=1 cargo test` rewrites the expected files.

use crate::{kiln, repo_root, text};

#[test]
fn profile_errors_match_golden_files() {
    let dir = repo_root().join("tests/golden/profile-errors");
    let bless = std::env::var_os("KILN_BLESS").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 8, "golden cases are missing from {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let args_text = std::fs::read_to_string(case.join("args")).unwrap();
        let mut args: Vec<&str> = args_text.split_whitespace().collect();
        args.extend(["--mirror", "http://mirror.invalid/debian"]);
        let out = kiln(case, &args);
        let got = text(&out.stderr);
        let expected_path = case.join("expected.stderr");
        assert_eq!(out.status.code(), Some(1), "{}: kiln should fail with exit 1, stderr: {got}", case.display());
        if bless {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failures.push(format!("{}:\n  expected: {expected:?}\n  got:      {got:?}", case.display()));
        }
    }
    println!("golden: {} profile error cases checked", cases.len());
    assert!(failures.is_empty(), "golden mismatches (KILN_BLESS=1 to accept):\n{}", failures.join("\n"));
}
