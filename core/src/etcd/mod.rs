//! The etcd store's decisions, apart from its I/O (`room_allocator::store::etcd`
//! drives them).

pub mod carver;
pub mod deregistration;
pub mod watch;
