//! Closed-loop load for crash and outage tests, bounded in time and count.
//! Records every room whose response arrived (what a router would use) and
//! every error with how long the call took.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use room_allocator::pb;
use tonic::{Code, Status};

/// Per-task bound on calls, so every load loop ends by itself.
pub const MAX_CALLS: u32 = 200_000;

#[derive(Debug, Default)]
pub struct Record {
    /// (room, worker, dp_size)
    pub rooms: Vec<(u64, String, u32)>,
    /// When each room of `rooms` arrived.
    pub received: Vec<Instant>,
    /// (code, message, how long the call took)
    pub errors: Vec<(Code, String, Duration)>,
    /// Set to end every load at its next call.
    pub stop: bool,
}

/// Ends every load recording into `record` at its next call.
// Only the failpoint tests stop a load early; without the feature it would be dead.
#[cfg(feature = "failpoints")]
pub fn stop(record: &Shared) {
    record.lock().expect("lock").stop = true;
}

pub type Shared = Arc<Mutex<Record>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The server went away: stop.
    Stop,
    /// Keep calling (after a short pause) until the deadline.
    Continue,
}

pub struct Load {
    pub url: String,
    pub worker: &'static str,
    pub dp_size: u32,
    pub lease: bool,
    pub until: Instant,
    pub on_error: OnError,
}

impl Load {
    /// One load per worker and per mode (`false`: AllocateRoom, `true`:
    /// LeaseRooms) against `url`.
    pub fn each(
        url: &str,
        workers: &[(&'static str, u32)],
        modes: &[bool],
        until: Instant,
        on_error: OnError,
    ) -> Vec<Load> {
        let mut loads = Vec::new();
        for &(worker, dp_size) in workers {
            for &lease in modes {
                loads.push(Load {
                    url: url.to_owned(),
                    worker,
                    dp_size,
                    lease,
                    until,
                    on_error,
                });
            }
        }
        loads
    }

    pub async fn run(self, record: Shared) {
        let channel = tonic::transport::Channel::from_shared(self.url.clone())
            .expect("url")
            .timeout(Duration::from_secs(20))
            .connect_lazy();
        let mut client =
            pb::room_allocator_service_client::RoomAllocatorServiceClient::new(channel);
        for call in 0..MAX_CALLS {
            if Instant::now() > self.until || record.lock().expect("lock").stop {
                return;
            }
            let rank = call % self.dp_size;
            let started = Instant::now();
            let result: Result<Vec<(u64, u32)>, Status> = if self.lease {
                client
                    .lease_rooms(pb::LeaseRoomsRequest {
                        prefill_worker: self.worker.into(),
                        count: 64,
                        dp_size: self.dp_size,
                    })
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        (0..u64::from(r.count))
                            .map(|i| {
                                let room = r.first_base
                                    + i * u64::from(r.dp_size)
                                    + u64::from(rank % r.dp_size);
                                (room, r.dp_size)
                            })
                            .collect()
                    })
            } else {
                client
                    .allocate_room(pb::AllocateRoomRequest {
                        prefill_worker: self.worker.into(),
                        dp_rank: rank,
                        dp_size: self.dp_size,
                    })
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        vec![(r.room, r.dp_size)]
                    })
            };
            match result {
                Ok(rooms) => {
                    let mut record = record.lock().expect("lock");
                    let now = Instant::now();
                    for (room, dp_size) in rooms {
                        assert_eq!(room % u64::from(dp_size), u64::from(rank % dp_size));
                        record.rooms.push((room, self.worker.to_owned(), dp_size));
                        record.received.push(now);
                    }
                }
                Err(status) => {
                    record.lock().expect("lock").errors.push((
                        status.code(),
                        status.message().to_owned(),
                        started.elapsed(),
                    ));
                    match self.on_error {
                        OnError::Stop => return,
                        OnError::Continue => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
        }
    }
}

/// True for the errors a router sees when a server dies or shuts down: the
/// connection breaks, or (on SIGTERM) a call races the GOAWAY and tonic's
/// client reports the h2 error as INTERNAL.
pub fn server_went_away(code: Code, message: &str) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
        || (code == Code::Internal && message.contains("h2 protocol error"))
}

/// Takes what the loads recorded, after checking that every error is one a
/// dying server causes and that the load produced at least `min_rooms`.
pub fn take_after_crashes(record: &Shared, min_rooms: usize) -> Record {
    let record = take(record);
    for (code, message, _) in &record.errors {
        assert!(server_went_away(*code, message), "{code:?} {message}");
    }
    assert!(
        record.rooms.len() >= min_rooms,
        "the load produced {} rooms, expected at least {min_rooms}",
        record.rooms.len()
    );
    record
}

/// Takes what the loads recorded so far.
pub fn take(record: &Shared) -> Record {
    std::mem::take(&mut *record.lock().expect("lock"))
}

/// Waits for the loads' `tasks` to end, then takes what they recorded.
pub async fn join(record: &Shared, tasks: Vec<tokio::task::JoinHandle<()>>) -> Record {
    for task in tasks {
        super::timed(task).await.expect("load task");
    }
    take(record)
}

/// Runs each load in its own task, recording into `record`.
pub fn spawn(loads: Vec<Load>, record: &Shared) -> Vec<tokio::task::JoinHandle<()>> {
    loads
        .into_iter()
        .map(|load| tokio::spawn(load.run(record.clone())))
        .collect()
}
