//! A worker's leased bases: blocks of `first_base + i * dp_size`, each base
//! handed out once, each block only until it expires.
//!
//! The server's double buffer, on the client: each block is a
//! [`BaseCursor`], the same code the server's worker state takes its bases
//! with, plus the instant it expires.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::cursor::BaseCursor;

/// One leased block: its bases, taken in order, until it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub cursor: BaseCursor,
    /// Past this the block's bases are dropped unused: its rooms might not
    /// resolve for the retention period, or miss a realignment.
    pub expires_at: Instant,
}

impl Block {
    /// `count` bases from `first_base`, `dp_size` apart, until
    /// `expires_at`; `None` for bases no valid lease has (see
    /// [`BaseCursor::new`]).
    pub fn new(first_base: u64, count: u32, dp_size: u32, expires_at: Instant) -> Option<Self> {
        Some(Self {
            cursor: BaseCursor::new(first_base, u64::from(count), dp_size)?,
            expires_at,
        })
    }
}

#[derive(Debug)]
pub(crate) struct LeaseState {
    /// dp_size the leased bases are aligned to; 0 = none leased yet.
    pub dp_size: u32,
    pub blocks: VecDeque<Block>,
    /// Bases left in all blocks.
    pub available: u64,
    /// Bases asked for at the next refill.
    pub lease_size: u32,
    /// When the last lease was asked for; `None` before the first.
    pub last_lease_at: Option<Instant>,
}

impl LeaseState {
    pub fn new(initial_lease: u32) -> Self {
        Self {
            dp_size: 0,
            blocks: VecDeque::new(),
            available: 0,
            lease_size: initial_lease,
            last_lease_at: None,
        }
    }

    /// Takes the next base. Expired blocks are dropped by a timer (see
    /// `RoomClient::expire_later`), or by `drop_expired` when there is no
    /// runtime, so the hot path reads no clock.
    pub fn take(&mut self) -> Option<u64> {
        let block = self.blocks.front_mut()?;
        let base = block.cursor.take()?;
        if block.cursor.remaining() == 0 {
            self.blocks.pop_front();
        }
        self.available -= 1;
        Some(base)
    }

    /// Takes `n` bases in one go, or none when fewer are leased, so a batch
    /// costs one lock and never leaves half its rooms taken.
    pub fn take_many(&mut self, n: usize) -> Option<Vec<u64>> {
        if self.available < u64::try_from(n).ok()? {
            return None;
        }
        let mut bases = Vec::with_capacity(n);
        for _ in 0..n {
            bases.push(self.take()?);
        }
        Some(bases)
    }

    /// Takes `count` (1 or more) consecutive bases of one block and returns
    /// the first: `base, base + dp_size, ..` are then all used, so every
    /// number of `[base, base + count * dp_size)` is this client's alone (a
    /// lease's bases cover its numbers with no gap, and the server never
    /// hands a number to two leases). `None` when no block has that many left.
    pub fn take_run(&mut self, count: u64) -> Option<u64> {
        if count == 0 {
            return None;
        }
        let index = self
            .blocks
            .iter()
            .position(|block| block.cursor.remaining() >= count)?;
        let block = &mut self.blocks[index];
        let base = block.cursor.take_run(count)?;
        if block.cursor.remaining() == 0 {
            self.blocks.remove(index);
        }
        self.available -= count;
        Some(base)
    }

    /// Drops every block past its expiry; returns how many bases went unused.
    pub fn drop_expired(&mut self, now: Instant) -> u64 {
        let mut dropped = 0;
        self.blocks.retain(|block| {
            let keep = block.expires_at > now;
            if !keep {
                dropped += block.cursor.remaining();
            }
            keep
        });
        self.available -= dropped;
        dropped
    }

    pub fn push(&mut self, block: Block) {
        if block.cursor.remaining() == 0 {
            // An empty block at the front would stop `take` short.
            return;
        }
        self.available += block.cursor.remaining();
        self.blocks.push_back(block);
    }

    /// True when a refill should start: half a lease or less is left.
    pub fn low(&self) -> bool {
        self.available <= u64::from(self.lease_size / 2)
    }

    /// Forgets every leased base (their numbers are skipped, never reissued).
    pub fn drop_leases(&mut self) {
        self.blocks.clear();
        self.available = 0;
    }

    /// Sizes the next lease: doubles while leases run out within
    /// `fast`, halves when they last ten times that.
    pub fn next_lease_size(&mut self, now: Instant, fast: Duration, min: u32, max: u32) -> u32 {
        if let Some(last) = self.last_lease_at {
            let since = now.saturating_duration_since(last);
            if since < fast {
                self.lease_size = self.lease_size.saturating_mul(2);
            } else if since > fast * 10 {
                self.lease_size /= 2;
            }
        }
        self.lease_size = self.lease_size.clamp(min, max);
        self.last_lease_at = Some(now);
        self.lease_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_hands_out_each_base_once_in_order_and_expired_blocks_go() {
        let now = Instant::now();
        let mut state = LeaseState::new(4);
        state.dp_size = 4;
        state.push(Block::new(8, 2, 4, now + Duration::from_secs(10)).expect("an aligned block"));
        state.push(Block::new(100, 1, 4, now + Duration::from_secs(20)).expect("an aligned block"));
        assert_eq!(state.take(), Some(8));
        assert_eq!(state.take(), Some(12));
        assert!(state.low());
        assert_eq!(state.drop_expired(now + Duration::from_secs(30)), 1);
        assert_eq!(state.take(), None);
        assert_eq!(state.available, 0);
    }

    #[test]
    fn a_batch_takes_all_its_bases_or_none_and_a_run_comes_from_one_block() {
        let later = Instant::now() + Duration::from_secs(10);
        let mut state = LeaseState::new(4);
        state.dp_size = 4;
        state.push(Block::new(8, 2, 4, later).expect("an aligned block"));
        state.push(Block::new(100, 3, 4, later).expect("an aligned block"));
        assert_eq!(state.take_many(6), None, "5 bases are leased");
        assert_eq!(state.available, 5, "a refused batch takes nothing");
        // Two bases do not fit in what is left of the first block, so the
        // run comes whole from the second: numbers 100..108 are all ours.
        assert_eq!(state.take(), Some(8));
        assert_eq!(state.take_run(2), Some(100));
        assert_eq!(state.available, 2);
        assert_eq!(state.take_run(2), None, "no block has two bases left");
        assert_eq!(state.take_run(0), None);
        assert_eq!(state.take_many(2), Some(vec![12, 108]));
        assert_eq!(state.available, 0);
        assert!(state.blocks.is_empty());
    }

    #[test]
    fn lease_sizes_grow_while_leases_run_out_fast_and_shrink_when_idle() {
        let now = Instant::now();
        let mut state = LeaseState::new(256);
        let fast = Duration::from_secs(1);
        assert_eq!(
            state.next_lease_size(now, fast, 256, 4096),
            256,
            "the first lease"
        );
        let size = state.next_lease_size(now + Duration::from_millis(100), fast, 256, 4096);
        assert_eq!(size, 512);
        let size = state.next_lease_size(now + Duration::from_secs(60), fast, 256, 4096);
        assert_eq!(size, 256);
    }
}
