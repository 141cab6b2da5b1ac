//! Failpoints: named steps of every durable write where a test makes the step
//! fail or the process die, compiled in only with the `failpoints` feature
//! (the test command builds with it; release builds have none).
//!
//! Configure them with the `FAILPOINTS` environment variable, as the `fail`
//! crate reads it: `FAILPOINTS='embedded::log_fsync=3*off->return'` fails the
//! fourth log fsync, `...=return(crash)` kills the process there with SIGKILL,
//! as `kill -9` would, and `...=sleep(200)` stalls the step. RELIABILITY.md
//! lists every failpoint and the tests that use it.

/// Fails the enclosing step at failpoint `$name`: returns `Err($error)` from
/// the enclosing function (or, without an error, skips the rest of a
/// function returning `()`), or kills the process when configured with
/// `return(crash)`.
#[macro_export]
macro_rules! failpoint {
    // In a function returning (): the step is skipped.
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |action: Option<String>| {
            $crate::failpoint::act($name, action.as_deref());
        });
    };
    ($name:expr, $error:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |action: Option<String>| {
            $crate::failpoint::act($name, action.as_deref());
            Err($error)
        });
        // Without the feature: type-checked, never run, so both builds see
        // the same names in use.
        #[cfg(not(feature = "failpoints"))]
        let _ = || $error;
    };
}

/// Kills the process for `return(crash)`; otherwise lets the step fail.
#[cfg(feature = "failpoints")]
pub fn act(name: &str, action: Option<&str>) {
    if action == Some("crash") {
        eprintln!("failpoint {name}: crashing (SIGKILL)");
        // SAFETY: signalling our own process; SIGKILL cannot be caught, so
        // nothing runs after this line, exactly as with `kill -9`.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Reads `FAILPOINTS` once at start; a no-op without the feature.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}

/// An I/O error a failpoint injects, as a failing disk would report it.
pub fn io_error(step: &'static str) -> std::io::Error {
    std::io::Error::other(format!("failpoint {step} injected an I/O error"))
}

#[cfg(test)]
mod tests {
    //! RELIABILITY.md's failpoint table is checked against the code, so it
    //! cannot drift: every failpoint in `src/` has a row, every row names a
    //! failpoint that exists, and every test a row names exists.
    use std::collections::BTreeSet;
    use std::path::Path;

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The first string literal after each `marker` in `text`.
    fn names_after(text: &str, marker: &str) -> Vec<String> {
        text.match_indices(marker)
            .filter_map(|(at, _)| {
                let rest = &text[at + marker.len()..];
                let open = rest.find('"')?;
                let close = rest[open + 1..].find('"')?;
                Some(rest[open + 1..open + 1 + close].to_owned())
            })
            .collect()
    }

    fn failpoints_in_code(root: &Path) -> BTreeSet<String> {
        let mut files = Vec::new();
        rust_files(&root.join("src"), &mut files);
        let mut names = BTreeSet::new();
        for file in files.iter().filter(|f| !f.ends_with("failpoint.rs")) {
            let text = std::fs::read_to_string(file).expect("read source");
            names.extend(names_after(&text, "failpoint!("));
            names.extend(names_after(&text, "fail::eval("));
        }
        names
    }

    /// Rows of the table under `## Failpoints`: (failpoint, tests named).
    fn table_rows(reliability: &str) -> Vec<(String, Vec<String>)> {
        let section = reliability
            .split("\n## Failpoints")
            .nth(1)
            .expect("RELIABILITY.md has a '## Failpoints' section");
        let section = section.split("\n## ").next().unwrap_or(section);
        section
            .lines()
            .filter(|line| line.starts_with("| `"))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let name = cells[1].trim_matches('`').to_owned();
                let tests = cells[3..]
                    .iter()
                    .flat_map(|cell| cell.split('`').skip(1).step_by(2))
                    .map(str::to_owned)
                    .collect();
                (name, tests)
            })
            .collect()
    }

    /// `fn test(`, or `test,`/`test:` in the argument list of a macro that
    /// defines tests (tests/it/failpoints.rs's `*_cases!`).
    fn defines_test(sources: &str, test: &str) -> bool {
        sources.contains(&format!("fn {test}("))
            || sources.match_indices(test).any(|(at, _)| {
                let before = sources[..at].chars().next_back();
                let after = sources[at + test.len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && matches!(after, Some(',' | ':'))
            })
    }

    #[test]
    fn reliability_md_lists_every_failpoint_and_only_tests_that_exist() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let in_code = failpoints_in_code(root);
        let reliability =
            std::fs::read_to_string(root.join("RELIABILITY.md")).expect("read RELIABILITY.md");
        let rows = table_rows(&reliability);
        let in_table: BTreeSet<String> = rows.iter().map(|(name, _)| name.clone()).collect();
        let missing: Vec<_> = in_code.difference(&in_table).collect();
        let stale: Vec<_> = in_table.difference(&in_code).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "RELIABILITY.md's failpoint table drifted: no row for {missing:?}; rows for failpoints no code has: {stale:?}"
        );

        let mut test_sources = String::new();
        let mut files = Vec::new();
        rust_files(&root.join("tests"), &mut files);
        rust_files(&root.join("src"), &mut files);
        for file in files {
            test_sources.push_str(&std::fs::read_to_string(file).expect("read test source"));
        }
        for (name, tests) in rows {
            assert!(
                !tests.is_empty(),
                "the row for {name} names no test: every failpoint needs a fail test and a crash test"
            );
            for test in tests {
                assert!(
                    defines_test(&test_sources, &test),
                    "the row for {name} names the test {test}, which does not exist"
                );
            }
        }
    }
}
