//! Every metric the server exports, with its help text, and the `/metrics`
//! endpoint: Prometheus text format 0.0.4 by default, OpenMetrics 1.0 when the
//! scraper asks for it in `Accept`.
//!
//! Besides the project's own `room_allocator_*` metrics, the gRPC server
//! exports go-grpc-middleware's names (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_handling_seconds`, with codes as
//! grpc-go prints them), so off-the-shelf gRPC dashboards and alerts apply,
//! and the usual `process_*` metrics.
//!
//! Labels are bounded: methods and services are the ones this server has,
//! codes the gRPC codes, stores the store kinds. Worker names are never
//! labels: a fleet may have thousands of them. Families an alert uses exist
//! from the start (at zero), not only after their first event.
//!
//! What every call updates is reached through a [`Series`] resolved on first
//! use: a call takes no lock and looks up no labels (its five lookups by
//! labels cost more than the allocation itself: `benches/hot_path.rs`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::server::limits;

/// Latency buckets in seconds, 100 µs to 20 s: allocation is in memory and
/// sits in the lowest buckets; the tail reaches past the store timeout (3 s)
/// and the request timeout (10 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 20.0,
];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// At zero; `const`, so a count with no handle on [`Metrics`] can be a
    /// static.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// ResolveRank look-ups the etcd store sent to etcd (rooms in neither this
/// replica's memory nor its cache of misses). Statics: the store has no
/// handle on [`Metrics`], and a process serves one store.
pub static ETCD_LOOKUPS: Counter = Counter::new();
/// Keys etcd went through to answer them: the sum of each read's `count`
/// (etcd 3.4 and 3.5 visit every key of a read's window whatever its limit),
/// so the cost of a look-up shows without timing it.
pub static ETCD_LOOKUP_KEYS: Counter = Counter::new();

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A distribution over [`LATENCY_BUCKETS`].
#[derive(Debug)]
pub struct Histogram {
    counts: Vec<AtomicU64>,
    /// Sum of observations, in nanoseconds (exact, lock-free).
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: LATENCY_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS.iter().position(|upper| seconds <= *upper) {
            self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// One metric per label set. Label values are static strings (methods, codes,
/// store kinds), so a lookup allocates nothing.
pub struct Family<M> {
    metrics: RwLock<BTreeMap<Vec<&'static str>, Arc<M>>>,
    label_names: &'static [&'static str],
}

impl<M: Default> Family<M> {
    fn new(label_names: &'static [&'static str]) -> Self {
        Self {
            metrics: RwLock::default(),
            label_names,
        }
    }

    /// The metric for these label values (in the family's label order).
    pub fn get(&self, values: &[&'static str]) -> Arc<M> {
        debug_assert_eq!(values.len(), self.label_names.len());
        if let Some(metric) = self
            .metrics
            .read()
            .expect("metric family lock is never poisoned")
            .get(values)
        {
            return metric.clone();
        }
        self.metrics
            .write()
            .expect("metric family lock is never poisoned")
            .entry(values.to_vec())
            .or_default()
            .clone()
    }

    fn each(&self, mut f: impl FnMut(&[(&'static str, &str)], &M)) {
        let metrics = self
            .metrics
            .read()
            .expect("metric family lock is never poisoned");
        for (values, metric) in metrics.iter() {
            let labels: Vec<(&'static str, &str)> = self
                .label_names
                .iter()
                .copied()
                .zip(values.iter().copied())
                .collect();
            f(&labels, metric);
        }
    }
}

/// One series of a family, resolved on its first use, then reached with one
/// atomic load: a call takes no lock, looks nothing up and allocates nothing
/// for it. Resolved on first use rather than up front, so that the
/// exposition is what `Family::get` alone would make it: a label set appears
/// once used, or when `Metrics::new` creates it at zero.
pub struct Series<M>(OnceLock<Arc<M>>);

impl<M> Default for Series<M> {
    fn default() -> Self {
        Self(OnceLock::new())
    }
}

impl<M: Default> Series<M> {
    /// The series of `family` with these label values; every call on one
    /// `Series` must pass the same values.
    pub fn get(&self, family: &Family<M>, values: &[&'static str]) -> &M {
        self.0.get_or_init(|| family.get(values))
    }
}

/// gRPC status codes: 0 (OK) to 16 (UNAUTHENTICATED).
const GRPC_CODES: usize = 17;

/// One [`Series`] per gRPC code, each resolved on first use.
pub struct ByCode<M>([Series<M>; GRPC_CODES]);

impl<M> Default for ByCode<M> {
    fn default() -> Self {
        Self(std::array::from_fn(|_| Series::default()))
    }
}

impl<M> ByCode<M> {
    pub fn of(&self, code: tonic::Code) -> &Series<M> {
        // A code's number is its index: tonic's codes are 0 to 16.
        &self.0[code as usize]
    }
}

/// The rpcs of `room_allocator.v1.RoomAllocatorService`, for label values
/// that exist from the start.
pub const METHODS: &[&str] = &[
    "RegisterWorker",
    "AllocateRoom",
    "LeaseRooms",
    "ResolveRank",
    "ListWorkers",
    "DeregisterWorker",
    "GetRoomSpace",
];

/// An rpc of `room_allocator.v1.RoomAllocatorService`, in the order of
/// [`METHODS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    RegisterWorker,
    AllocateRoom,
    LeaseRooms,
    ResolveRank,
    ListWorkers,
    DeregisterWorker,
    GetRoomSpace,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::RegisterWorker,
        Method::AllocateRoom,
        Method::LeaseRooms,
        Method::ResolveRank,
        Method::ListWorkers,
        Method::DeregisterWorker,
        Method::GetRoomSpace,
    ];

    /// Its name, the `method` label.
    pub fn name(self) -> &'static str {
        METHODS[self as usize]
    }
}

/// `room_allocator_requests_total` and `room_allocator_request_duration_seconds`
/// of one method, by code.
#[derive(Default)]
struct RequestSeries {
    count: ByCode<Counter>,
    duration: ByCode<Histogram>,
}

/// The allocator service's full name.
pub const SERVICE: &str = "room_allocator.v1.RoomAllocatorService";

/// Every metric the server exports.
pub struct Metrics {
    // The project's own.
    pub rooms_issued: Family<Counter>,
    pub ranges_reserved: Family<Counter>,
    pub store_errors: Family<Counter>,
    pub requests: Family<Counter>,
    pub request_duration: Family<Histogram>,
    pub reloads: Family<Counter>,
    /// 1 while the last reload of a file succeeded, 0 while it fails: an
    /// alert on it stays firing for as long as the problem lasts.
    pub reload_last_success: Family<Gauge>,
    /// The soonest notAfter (unix seconds) of each certificate file in use.
    pub certificate_not_after: Family<Gauge>,
    pub workers_registered: Gauge,
    pub workers_limit: Gauge,
    pub space_used: Gauge,
    pub space_size: Gauge,
    pub store_reachable: Gauge,
    pub registrations_confirmed_age: Gauge,
    pub ranges_held: Gauge,
    pub ready: Gauge,
    pub build_info: Family<Gauge>,
    /// The id written into the store when it was created; not a `Family`,
    /// whose label values are fixed strings. One value per process.
    store_id: std::sync::OnceLock<String>,
    // go-grpc-middleware's.
    pub grpc_started: Family<Counter>,
    pub grpc_handled: Family<Counter>,
    pub grpc_handling: Family<Histogram>,
    store: &'static str,
    /// The series each call of each method updates, by [`Method`].
    request_series: [RequestSeries; Method::ALL.len()],
}

impl Metrics {
    /// The metrics of a server on `store` ("embedded" or "etcd"), with every
    /// family an alert or the dashboard uses already present at zero.
    pub fn new(store: &'static str) -> Self {
        let metrics = Self {
            rooms_issued: Family::new(&["method"]),
            ranges_reserved: Family::new(&["store"]),
            store_errors: Family::new(&["store"]),
            requests: Family::new(&["method", "code"]),
            request_duration: Family::new(&["method", "code"]),
            reloads: Family::new(&["file", "result"]),
            reload_last_success: Family::new(&["file"]),
            certificate_not_after: Family::new(&["file"]),
            workers_registered: Gauge::default(),
            workers_limit: Gauge::default(),
            space_used: Gauge::default(),
            space_size: Gauge::default(),
            store_reachable: Gauge::default(),
            registrations_confirmed_age: Gauge::default(),
            ranges_held: Gauge::default(),
            ready: Gauge::default(),
            build_info: Family::new(&["version", "store"]),
            store_id: std::sync::OnceLock::new(),
            grpc_started: Family::new(&["grpc_type", "grpc_service", "grpc_method"]),
            grpc_handled: Family::new(&["grpc_type", "grpc_service", "grpc_method", "grpc_code"]),
            grpc_handling: Family::new(&["grpc_type", "grpc_service", "grpc_method"]),
            store,
            request_series: Default::default(),
        };
        for method in ["AllocateRoom", "LeaseRooms"] {
            metrics.rooms_issued.get(&[method]);
        }
        metrics.ranges_reserved.get(&[store]);
        metrics.store_errors.get(&[store]);
        for method in METHODS {
            metrics.grpc_started.get(&["unary", SERVICE, method]);
            for code in [
                "OK",
                "Unavailable",
                "FailedPrecondition",
                "ResourceExhausted",
            ] {
                metrics.grpc_handled.get(&["unary", SERVICE, method, code]);
            }
            metrics.grpc_handling.get(&["unary", SERVICE, method]);
            metrics.requests.get(&[method, "OK"]);
            metrics.request_duration.get(&[method, "OK"]);
        }
        for file in ["tls", "token"] {
            for result in ["success", "failure"] {
                metrics.reloads.get(&[file, result]);
            }
            // Nothing has failed yet (a start with a bad file does not serve).
            metrics.reload_last_success.get(&[file]).set(1.0);
        }
        metrics
            .build_info
            .get(&[env!("CARGO_PKG_VERSION"), store])
            .set(1.0);
        metrics
    }

    pub fn store(&self) -> &'static str {
        self.store
    }

    /// Exports `room_allocator_store_info{store_id}`; the first id set wins
    /// (a process serves one store).
    pub fn set_store_id(&self, store_id: &str) {
        let _ = self.store_id.set(store_id.to_owned());
    }

    /// Counts and times one call to the allocator service, labelled with
    /// the code as the contract names it (`UNAVAILABLE`).
    pub fn observe_request(&self, method: Method, code: tonic::Code, elapsed: Duration) {
        // Refused calls are those with a code other than OK.
        let series = &self.request_series[method as usize];
        let labels = [method.name(), room_allocator_client::code_name(code)];
        series.count.of(code).get(&self.requests, &labels).inc();
        series
            .duration
            .of(code)
            .get(&self.request_duration, &labels)
            .observe(elapsed);
    }

    /// Renders everything; `openmetrics` picks the format.
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = Encoder {
            text: String::with_capacity(16 * 1024),
            openmetrics,
        };
        out.counters(
            "room_allocator_rooms_issued",
            "Rooms handed out by AllocateRoom, plus bases handed out by LeaseRooms",
            &self.rooms_issued,
        );
        out.counters(
            "room_allocator_ranges_reserved",
            "Ranges of the room space durably reserved in the store",
            &self.ranges_reserved,
        );
        out.counters(
            "room_allocator_store_errors",
            "Store operations that failed (each failed caller got UNAVAILABLE)",
            &self.store_errors,
        );
        out.counters(
            "room_allocator_requests",
            "RoomAllocatorService calls by method and status code",
            &self.requests,
        );
        out.histograms(
            "room_allocator_request_duration_seconds",
            "Time to answer RoomAllocatorService calls, by method and status code",
            &self.request_duration,
        );
        out.counters(
            "room_allocator_reloads",
            "Reloads of --tls-cert/--tls-key/--tls-client-ca (file=tls) and --auth-token-file (file=token) after they changed, by result",
            &self.reloads,
        );
        out.gauges(
            "room_allocator_reload_last_success",
            "1 if the last load of --tls-cert/--tls-key/--tls-client-ca (file=tls), --auth-token-file (file=token) or --etcd-ca/--etcd-cert/--etcd-key (file=etcd_tls, with those flags) or --etcd-password-file (file=etcd_password, with that flag) succeeded (or the file is not configured), 0 while a changed file is unusable or unreadable (the previous one stays in use)",
            &self.reload_last_success,
        );
        out.gauges(
            "room_allocator_certificate_not_after_seconds",
            "When the certificate file expires, in unix seconds (the soonest notAfter of its certificates): file=tls (--tls-cert), tls_client_ca (--tls-client-ca), etcd_client (--etcd-cert), etcd_ca (--etcd-ca); only files configured and readable",
            &self.certificate_not_after,
        );
        out.counter(
            "room_allocator_etcd_lookups",
            "ResolveRank look-ups sent to etcd: rooms in neither this replica's memory nor its cache of misses (etcd store only)",
            &ETCD_LOOKUPS,
        );
        out.counter(
            "room_allocator_etcd_lookup_keys",
            "Keys etcd went through to answer those look-ups (the sum of each read's count: etcd visits every key of a read's window, whatever its limit)",
            &ETCD_LOOKUP_KEYS,
        );
        out.gauge(
            "room_allocator_workers_registered",
            "Workers registered now",
            &self.workers_registered,
        );
        out.gauge(
            "room_allocator_workers_limit",
            "--max-workers: registrations past it get RESOURCE_EXHAUSTED",
            &self.workers_limit,
        );
        out.gauge(
            "room_allocator_space_used_rooms",
            "Numbers of the room space between --min-room and the high-water mark (issued, leased or skipped)",
            &self.space_used,
        );
        out.gauge(
            "room_allocator_space_size_rooms",
            "Numbers between --min-room and --max-room",
            &self.space_size,
        );
        out.gauge(
            "room_allocator_store_reachable",
            "1 if the store answered its last request, else 0",
            &self.store_reachable,
        );
        out.gauge(
            "room_allocator_registrations_confirmed_age_seconds",
            "Seconds since this replica last confirmed its view of the registrations with etcd (0 on the embedded store)",
            &self.registrations_confirmed_age,
        );
        out.gauge(
            "room_allocator_ranges_held",
            "Ranges this process is handing out rooms from",
            &self.ranges_held,
        );
        out.gauge(
            "room_allocator_ready",
            "1 if this process can hand out rooms (what readiness reports), else 0",
            &self.ready,
        );
        out.gauges(
            "room_allocator_build_info",
            "Always 1; labels say the version and the store",
            &self.build_info,
        );
        if let Some(store_id) = self.store_id.get() {
            let name = "room_allocator_store_info";
            out.header(
                name,
                "gauge",
                "Always 1; the label is the id written into the store when it was created: a new id is a new room space (an unmounted volume, another data dir)",
            );
            let _ = writeln!(
                out.text,
                "{name}{} 1",
                render_labels(&[("store_id", store_id.as_str())], None)
            );
        }
        out.counters(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            &self.grpc_started,
        );
        out.counters(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            &self.grpc_handled,
        );
        out.histograms(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            &self.grpc_handling,
        );
        out.process();
        if openmetrics {
            out.text.push_str("# EOF\n");
        }
        out.text
    }
}

/// Writes families in either text format; the two differ in counter names
/// in metadata, in `# EOF`, and in the content type.
struct Encoder {
    text: String,
    openmetrics: bool,
}

impl Encoder {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// Counter families: OpenMetrics names the family without `_total`,
    /// Prometheus text names it with.
    fn counters(&mut self, name: &str, help: &str, family: &Family<Counter>) {
        let family_name = if self.openmetrics {
            name.to_owned()
        } else {
            format!("{name}_total")
        };
        self.header(&family_name, "counter", help);
        let mut lines = String::new();
        family.each(|labels, counter| {
            let _ = writeln!(
                lines,
                "{name}_total{} {}",
                render_labels(labels, None),
                counter.get()
            );
        });
        self.text.push_str(&lines);
    }

    /// One counter without labels, named as [`Self::counters`] names them.
    fn counter(&mut self, name: &str, help: &str, counter: &Counter) {
        let family_name = if self.openmetrics {
            name.to_owned()
        } else {
            format!("{name}_total")
        };
        self.header(&family_name, "counter", help);
        let _ = writeln!(self.text, "{name}_total {}", counter.get());
    }

    fn gauge(&mut self, name: &str, help: &str, gauge: &Gauge) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.text, "{name} {}", format_value(gauge.get()));
    }

    fn gauges(&mut self, name: &str, help: &str, family: &Family<Gauge>) {
        self.header(name, "gauge", help);
        let mut lines = String::new();
        family.each(|labels, gauge| {
            let _ = writeln!(
                lines,
                "{name}{} {}",
                render_labels(labels, None),
                format_value(gauge.get())
            );
        });
        self.text.push_str(&lines);
    }

    fn histograms(&mut self, name: &str, help: &str, family: &Family<Histogram>) {
        self.header(name, "histogram", help);
        let mut lines = String::new();
        family.each(|labels, histogram| {
            let mut cumulative = 0;
            for (upper, count) in LATENCY_BUCKETS.iter().zip(&histogram.counts) {
                cumulative += count.load(Ordering::Relaxed);
                let le = format_value(*upper);
                let _ = writeln!(
                    lines,
                    "{name}_bucket{} {cumulative}",
                    render_labels(labels, Some(&le))
                );
            }
            let count = histogram.count.load(Ordering::Relaxed);
            let _ = writeln!(
                lines,
                "{name}_bucket{} {count}",
                render_labels(labels, Some("+Inf"))
            );
            let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                lines,
                "{name}_sum{} {}",
                render_labels(labels, None),
                format_value(sum)
            );
            let _ = writeln!(lines, "{name}_count{} {count}", render_labels(labels, None));
        });
        self.text.push_str(&lines);
    }

    /// The usual process metrics, read from /proc at scrape time.
    fn process(&mut self) {
        let Some(process) = ProcessStats::read() else {
            return;
        };
        let cpu_name = if self.openmetrics {
            "process_cpu_seconds"
        } else {
            "process_cpu_seconds_total"
        };
        self.header(
            cpu_name,
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(
            self.text,
            "process_cpu_seconds_total {}",
            format_value(process.cpu_seconds)
        );
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                process.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                process.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                process.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                process.start_time_seconds,
            ),
        ] {
            self.header(name, "gauge", help);
            let _ = writeln!(self.text, "{name} {}", format_value(value));
        }
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn render_labels(labels: &[(&'static str, &str)], le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut out = String::from("{");
    let mut first = true;
    let le = le.map(|le| ("le", le));
    for (name, value) in labels.iter().copied().chain(le) {
        if !first {
            out.push(',');
        }
        first = false;
        let value = value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{name}=\"{value}\"");
    }
    out.push('}');
    out
}

fn format_value(value: f64) -> String {
    if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

/// What /proc says about this process.
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    open_fds: f64,
    max_fds: f64,
    start_time_seconds: f64,
}

impl ProcessStats {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which may contain spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n).and_then(|f| f.parse::<f64>().ok());
        // SAFETY: sysconf only reads system configuration.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
        let cpu_seconds = (field(11)? + field(12)?) / ticks;
        let start_ticks = field(19)?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()?
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .and_then(|line| line.split_whitespace().nth(3)?.parse::<f64>().ok())
            .unwrap_or(0.0);
        Some(Self {
            cpu_seconds,
            virtual_bytes: field(20)?,
            resident_bytes: field(21)? * page,
            open_fds,
            max_fds,
            start_time_seconds: boot_time + start_ticks / ticks,
        })
    }
}

/// What the scraper asked for: OpenMetrics only when `Accept` names it.
fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| accept.contains("application/openmetrics-text"))
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled; `refresh`
/// sets the gauges just before each scrape. At most
/// [`limits::MAX_SIDE_CONNECTIONS`] connections at once, each closed if a
/// request's headers take longer than [`limits::HEADER_READ_TIMEOUT`].
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
    shutdown: CancellationToken,
) {
    let slots = limits::Slots::new();
    loop {
        let connection = tokio::select! {
            connection = slots.accept(&listener, "metrics") => connection,
            () = shutdown.cancelled() => return,
        };
        let (stream, slot) = connection.into_parts();
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        tokio::spawn(async move {
            serve_connection(stream, peer, metrics, refresh).await;
            drop(slot);
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        async move {
            if request.uri().path() != "/metrics" {
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")));
            }
            let accept = request
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let openmetrics = wants_openmetrics(accept);
            refresh();
            let content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            Response::builder()
                .header(hyper::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(metrics.render(openmetrics))))
        }
    });
    if let Err(error) = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits::HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(%error, %peer, "metrics connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_name_counters_as_their_readers_expect() {
        let metrics = Metrics::new("embedded");
        metrics.observe_request(
            Method::AllocateRoom,
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        let text = metrics.render(false);
        assert!(text.contains("# TYPE room_allocator_requests_total counter"));
        assert!(
            text.contains("room_allocator_requests_total{method=\"AllocateRoom\",code=\"OK\"} 1")
        );
        assert!(text.contains("room_allocator_request_duration_seconds_bucket{method=\"AllocateRoom\",code=\"OK\",le=\"0.005\"} 1"));
        assert!(!text.contains("# EOF"));
        let open = metrics.render(true);
        assert!(open.contains("# TYPE room_allocator_requests counter"));
        assert!(open.ends_with("# EOF\n"));
    }

    #[test]
    fn resolved_series_are_the_familys_and_appear_only_once_used() {
        let metrics = Metrics::new("embedded");
        let unavailable =
            "room_allocator_requests_total{method=\"LeaseRooms\",code=\"UNAVAILABLE\"}";
        assert!(!metrics.render(false).contains(unavailable));
        for _ in 0..2 {
            metrics.observe_request(
                Method::LeaseRooms,
                tonic::Code::Unavailable,
                Duration::from_millis(1),
            );
        }
        metrics.requests.get(&["LeaseRooms", "UNAVAILABLE"]).inc();
        let text = metrics.render(false);
        assert!(text.contains(&format!("{unavailable} 3")), "{text}");
        assert!(text.contains("room_allocator_request_duration_seconds_count{method=\"LeaseRooms\",code=\"UNAVAILABLE\"} 2"));
        // Every code has its series, and every method its name.
        let last = tonic::Code::Unauthenticated;
        metrics.observe_request(Method::GetRoomSpace, last, Duration::ZERO);
        assert!(metrics.render(false).contains(
            "room_allocator_requests_total{method=\"GetRoomSpace\",code=\"UNAUTHENTICATED\"} 1"
        ));
        assert_eq!(last as usize, GRPC_CODES - 1);
        for (method, name) in Method::ALL.iter().zip(METHODS) {
            assert_eq!(method.name(), *name);
        }
    }

    #[test]
    fn accept_picks_the_format() {
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
    }
}
