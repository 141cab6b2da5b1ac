//! The client's errors, typed where a router acts on them.

use std::fmt;

use tonic::{Code, Status};

/// Response metadata naming why a call failed (like
/// `google.rpc.ErrorInfo.reason`): `DP_SIZE_MISMATCH`, `WORKER_DEREGISTERED`, ...
pub const ERROR_REASON: &str = "error-reason";
/// Response metadata of a `DP_SIZE_MISMATCH`: the dp_size the worker is
/// registered with.
pub const REGISTERED_DP_SIZE: &str = "registered-dp-size";

/// Why a call failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// The worker is registered with another dp_size than the caller's:
    /// refresh the router's view (`registered`) or realign with `register`.
    DpSizeMismatch {
        worker: String,
        registered: u32,
        requested: u32,
    },
    /// The worker was deregistered; only `register` brings it back.
    Deregistered { worker: String },
    /// `dp_rank` is not below `dp_size`; nothing was sent.
    RankOutOfRange { dp_rank: u32, dp_size: u32 },
    /// `allocate_block` was asked for 0 numbers, or for more than one lease
    /// can hold at this dp_size (`max`); nothing was sent.
    BlockSize { num: u32, dp_size: u32, max: u64 },
    /// No endpoint could be reached; `reason` is the underlying cause.
    Connect { url: String, reason: String },
    /// A client option is unusable (a token with non-ASCII bytes, a bad URL,
    /// bad TLS material); nothing was sent.
    Config(String),
    /// Any other failure, as the server (or the transport) reported it.
    Status(Status),
}

impl Error {
    /// The gRPC code: the server's, or the one that best describes a local failure.
    pub fn code(&self) -> Code {
        match self {
            Error::DpSizeMismatch { .. } | Error::Deregistered { .. } => Code::FailedPrecondition,
            Error::RankOutOfRange { .. } | Error::BlockSize { .. } | Error::Config(_) => {
                Code::InvalidArgument
            }
            Error::Connect { .. } => Code::Unavailable,
            Error::Status(status) => status.code(),
        }
    }

    /// Whether retrying the same call later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
        )
    }

    /// Types a failed call's status by its `error-reason` metadata.
    pub(crate) fn from_status(worker: &str, requested_dp_size: u32, status: Status) -> Self {
        let metadata = |key: &str| {
            status
                .metadata()
                .get(key)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        match metadata(ERROR_REASON).as_deref() {
            Some("DP_SIZE_MISMATCH") => {
                match metadata(REGISTERED_DP_SIZE).and_then(|v| v.parse().ok()) {
                    Some(registered) => Error::DpSizeMismatch {
                        worker: worker.to_owned(),
                        registered,
                        requested: requested_dp_size,
                    },
                    None => Error::Status(status),
                }
            }
            Some("WORKER_DEREGISTERED") => Error::Deregistered {
                worker: worker.to_owned(),
            },
            _ => Error::Status(status),
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::Status(status)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::DpSizeMismatch {
                worker,
                registered,
                requested,
            } => write!(
                f,
                "prefill_worker {worker:?} is registered with dp_size {registered}, not {requested}; refresh the router's view of the worker or register it again"
            ),
            Error::Deregistered { worker } => write!(
                f,
                "prefill_worker {worker:?} was deregistered; stop routing to it, or register it again"
            ),
            Error::RankOutOfRange { dp_rank, dp_size } => write!(
                f,
                "dp_rank {dp_rank} is out of range for dp_size {dp_size}; choose a rank in 0..{dp_size}"
            ),
            Error::BlockSize { num, dp_size, max } => write!(
                f,
                "a block of {num} consecutive rooms cannot be leased at dp_size {dp_size}: ask for 1 to {max} (split a larger request)"
            ),
            Error::Connect { url, reason } => write!(f, "cannot connect to {url}: {reason}"),
            Error::Config(message) => f.write_str(message),
            Error::Status(status) => {
                write!(f, "{}: {}", code_name(status.code()), status.message())?;
                // A transport failure says only "transport error"; the
                // cause (a TLS handshake, a reset) is below it.
                if let Some(cause) = std::error::Error::source(status) {
                    write!(f, ": {}", cause_chain(cause))?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {}

/// The canonical name of a gRPC code, as grpcurl and other stacks print it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The error and its causes, `outer: inner: innermost`: tonic's transport
/// errors say only "transport error" at the top, the useful part (connection
/// refused, DNS, a peer that is not HTTP/2) is below.
pub fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
