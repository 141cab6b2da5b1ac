//! The bearer-token file (`--auth-token-file`): read at start, then reread
//! every [`RELOAD_INTERVAL`](super::RELOAD_INTERVAL) so a rotated token is
//! in force without a restart. The check of each call's token is the
//! service's ([`Auth`]); this module only keeps its tokens current.
//!
//! One token per line, blank lines ignored: several lines are all accepted
//! while a new token is rolled out. An unusable file keeps the tokens in
//! force, is logged and counted once per distinct failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info};

use crate::metrics::Metrics;
use crate::service::Auth;

use super::config::{read_file, StartError};

/// The tokens of `--auth-token-file`: one per line (several while a new
/// token is rolled out), blank lines ignored.
pub(super) fn read_token(path: &Path) -> Result<Vec<String>, StartError> {
    let bytes = read_file("--auth-token-file", path)?;
    let text = String::from_utf8_lossy(&bytes);
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        return Err(StartError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    if !tokens
        .iter()
        .all(|token| token.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
    {
        return Err(StartError::BadToken {
            path: path.to_path_buf(),
        });
    }
    Ok(tokens)
}

/// Rereads the token file every [`RELOAD_INTERVAL`](super::RELOAD_INTERVAL)
/// and hands a changed, usable token set to `auth`; `tokens` are those in
/// force.
pub(super) async fn reload(auth: Auth, path: PathBuf, tokens: Vec<String>, metrics: Arc<Metrics>) {
    let mut last_token = Some(tokens);
    let mut last_failure: Option<String> = None;
    let mut ticker = tokio::time::interval(super::RELOAD_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match read_token(&path) {
            Ok(token) if Some(&token) != last_token.as_ref() => {
                auth.replace(&token);
                last_token = Some(token);
                last_failure = None;
                metrics.reloads.get(&["token", "success"]).inc();
                metrics.reload_last_success.get(&["token"]).set(1.0);
                info!("reloaded the bearer token");
            }
            Ok(_) => {}
            Err(error) => {
                metrics.reload_last_success.get(&["token"]).set(0.0);
                let text = error.to_string();
                if last_failure.as_ref() != Some(&text) {
                    metrics.reloads.get(&["token", "failure"]).inc();
                    error!(%error, "the token file is unusable; keeping the previous token");
                    last_failure = Some(text);
                    // Reload the same token again once the file is fixed.
                    last_token = None;
                }
            }
        }
    }
}
