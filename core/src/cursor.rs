//! The unissued rest of a run of bases `first, first + dp_size, ...`: each
//! base comes out at most once, in order. One implementation for both sides
//! of the double buffer: the server's worker state takes its rooms' bases
//! from a reserved range with it (`room_allocator::space::BaseCursor` wraps
//! it with the range's typed view), and this crate's lease state takes a
//! router's bases from a leased block with it.
//!
//! Pure arithmetic on `u64`s, so it needs none of the server's types; a
//! cursor is built only over bases that fit in `u64`, so taking never
//! overflows.

/// The bases `next, next + dp_size, ...` below `end`, each taken once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseCursor {
    next: u64,
    /// Exclusive: the first number past the last base's room block.
    end: u64,
    dp_size: u32,
}

impl BaseCursor {
    /// `count` bases from `first_base`, `dp_size` apart. `None` when
    /// dp_size is 0, `first_base` is not a multiple of it, or the bases run
    /// past `u64::MAX` (a server answer no valid space produces).
    pub fn new(first_base: u64, count: u64, dp_size: u32) -> Option<Self> {
        if dp_size == 0 || !first_base.is_multiple_of(u64::from(dp_size)) {
            return None;
        }
        let end = count
            .checked_mul(u64::from(dp_size))
            .and_then(|span| first_base.checked_add(span))?;
        Some(Self {
            next: first_base,
            end,
            dp_size,
        })
    }

    /// The base the next take returns (the end once none is left).
    pub fn next_base(&self) -> u64 {
        self.next
    }

    /// The dp_size the bases are aligned to (and apart).
    pub fn dp_size(&self) -> u32 {
        self.dp_size
    }

    /// Bases not taken yet.
    pub fn remaining(&self) -> u64 {
        (self.end - self.next) / u64::from(self.dp_size)
    }

    /// Takes one base.
    pub fn take(&mut self) -> Option<u64> {
        self.take_run(1)
    }

    /// Takes `count` (1 or more) consecutive bases and returns the first,
    /// or nothing (and takes nothing) when fewer than `count` remain: the
    /// numbers `[first, first + count * dp_size)` are then all the caller's.
    pub fn take_run(&mut self, count: u64) -> Option<u64> {
        if count == 0 || self.remaining() < count {
            return None;
        }
        let first = self.next;
        // Cannot overflow: `count` bases fit below `end`.
        self.next += count * u64::from(self.dp_size);
        Some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_hands_out_each_base_once_in_order_and_runs_whole_or_not_at_all() {
        let mut cursor = BaseCursor::new(8, 4, 4).expect("aligned, fits");
        assert_eq!(cursor.remaining(), 4);
        assert_eq!(cursor.take(), Some(8));
        assert_eq!(cursor.take_run(2), Some(12));
        assert_eq!(cursor.next_base(), 20);
        assert_eq!(cursor.take_run(2), None, "one base is left");
        assert_eq!(cursor.take_run(0), None);
        assert_eq!(cursor.remaining(), 1, "a refused run takes nothing");
        assert_eq!(cursor.take(), Some(20));
        assert_eq!(cursor.take(), None);
        assert_eq!(cursor.remaining(), 0);
    }

    #[test]
    fn a_cursor_refuses_bases_that_are_misaligned_or_past_the_numbers() {
        assert_eq!(BaseCursor::new(8, 1, 0), None, "dp_size 0");
        assert_eq!(BaseCursor::new(9, 1, 4), None, "misaligned");
        assert_eq!(BaseCursor::new(u64::MAX - 1, 2, 1), None, "past u64::MAX");
        let last = BaseCursor::new(u64::MAX - 1, 1, 1).expect("fits exactly");
        assert_eq!(last.remaining(), 1);
        let empty = BaseCursor::new(8, 0, 4).expect("no bases");
        assert_eq!(empty.remaining(), 0);
    }
}
