//! What a metrics scrape refreshes before it renders: the allocator's
//! gauges (workers, space used, store reachability, readiness) and each
//! certificate file's expiry. Read at scrape time, so a renewed file or a
//! store that came back shows at once; scrapes are rare and the reads small.

use std::path::PathBuf;

use crate::allocator::Allocator;
use crate::metrics::Metrics;

pub(super) fn refresh_gauges(allocator: &Allocator, metrics: &Metrics) {
    let gauges = allocator.gauges();
    metrics
        .workers_registered
        .set(gauges.workers_registered as f64);
    metrics.workers_limit.set(gauges.workers_limit as f64);
    metrics.space_used.set(gauges.space_used as f64);
    metrics.space_size.set(gauges.space_size as f64);
    metrics.ranges_held.set(gauges.ranges_held as f64);
    metrics
        .store_reachable
        .set(if gauges.store_reachable { 1.0 } else { 0.0 });
    metrics.registrations_confirmed_age.set(
        gauges
            .registrations_confirmed_age
            .map_or(0.0, |age| age.as_secs_f64()),
    );
    metrics.ready.set(if gauges.ready { 1.0 } else { 0.0 });
}

/// Exports when each certificate file expires, read at scrape time so a
/// renewed file shows at once (the files are small; scrapes are rare).
pub(super) fn refresh_certificates(certificates: &[(&'static str, PathBuf)], metrics: &Metrics) {
    for (file, path) in certificates {
        // Mid-swap, or not a certificate: the reload reports that.
        if let Ok(Some(not_after)) = std::fs::read(path).map(|pem| soonest_not_after(&pem)) {
            metrics
                .certificate_not_after
                .get(&[file])
                .set(not_after as f64);
        }
    }
    if let Some(succeeded) = crate::store::etcd::client::tls_reload_succeeded() {
        metrics
            .reload_last_success
            .get(&["etcd_tls"])
            .set(if succeeded { 1.0 } else { 0.0 });
    }
    if let Some(succeeded) = crate::store::etcd::client::password_reload_succeeded() {
        metrics
            .reload_last_success
            .get(&["etcd_password"])
            .set(if succeeded { 1.0 } else { 0.0 });
    }
}

/// The soonest notAfter (unix seconds) of the PEM certificates in `pem`.
fn soonest_not_after(pem: &[u8]) -> Option<i64> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|block| block.label == "CERTIFICATE")
        .filter_map(|block| {
            block
                .parse_x509()
                .ok()
                .map(|cert| cert.validity().not_after.timestamp())
        })
        .min()
}
