//! prefill_worker names: which are valid, and how logs and messages show
//! one. Pure, and apart from the allocator so that the stores, which refuse
//! a record naming an invalid worker, import nothing from it.
//!
//! Invariant: a name is valid in every store and on every call alike (1 to
//! [`MAX_WORKER_LEN`] bytes of UTF-8 without control characters), so a
//! record the allocator wrote always loads, and a damaged one never does.

use thiserror::Error;

pub use room_allocator_client::limits::MAX_WORKER_LEN;

/// Why a prefill_worker name is refused. Each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("prefill_worker is empty; pass the prefill worker's name as routers know it (e.g. its bootstrap host:port)")]
    Empty,
    #[error(
        "prefill_worker is {len} bytes, over the limit of {MAX_WORKER_LEN}; use a shorter name"
    )]
    TooLong { len: usize },
    #[error("prefill_worker {worker} contains the control character U+{code:04X}; names are UTF-8 without control characters")]
    ControlCharacter { worker: String, code: u32 },
}

/// A name as logs and messages show it: quoted, control characters escaped,
/// so a hostile name cannot split a log line.
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.0.escape_debug())
    }
}

/// A prefill_worker: 1 to 253 bytes of UTF-8 without control characters
/// (U+0000-U+001F, U+007F-U+009F).
pub fn validate_worker(prefill_worker: &str) -> Result<(), NameError> {
    match prefill_worker.len() {
        0 => return Err(NameError::Empty),
        len if len > MAX_WORKER_LEN => return Err(NameError::TooLong { len }),
        _ => {}
    }
    if let Some(c) = prefill_worker.chars().find(|c| c.is_control()) {
        return Err(NameError::ControlCharacter {
            worker: Escaped(prefill_worker).to_string(),
            code: u32::from(c),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_name_is_one_to_max_bytes_of_utf8_without_control_characters() {
        let longest = "w".repeat(MAX_WORKER_LEN);
        let too_long = "w".repeat(MAX_WORKER_LEN + 1);
        for (name, verdict) in [
            ("10.0.0.1:8998", Ok(())),
            ("prefill-ü-0", Ok(())),
            (longest.as_str(), Ok(())),
            ("", Err(NameError::Empty)),
            (
                too_long.as_str(),
                Err(NameError::TooLong {
                    len: MAX_WORKER_LEN + 1,
                }),
            ),
            (
                "a\nb",
                Err(NameError::ControlCharacter {
                    worker: "\"a\\nb\"".into(),
                    code: 0x0A,
                }),
            ),
            (
                "a\u{85}",
                Err(NameError::ControlCharacter {
                    worker: "\"a\\u{85}\"".into(),
                    code: 0x85,
                }),
            ),
        ] {
            assert_eq!(validate_worker(name), verdict, "{name:?}");
        }
    }
}
