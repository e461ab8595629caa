//! [`StateCell`]: domain state in a `static`, without `static mut`.

use core::cell::{Cell, UnsafeCell};
use core::fmt;

/// A value in a `static` that the domain mutates through [`with`](StateCell::with).
///
/// Domain state must live in linear memory; a `static StateCell<T>` is exactly
/// that, and it is snapshotted and migrated with the memory. A borrow flag
/// (also in memory) turns re-entrant use — `with` inside `with` on the same
/// cell — into a panic instead of aliased `&mut`.
///
/// It is `Sync` (usable in a `static`) only on `wasm32` without the `atomics`
/// target feature, where a domain has exactly one thread; on the host it can
/// still be used as a local value (e.g. in tests).
///
/// ```
/// use metta_sdk::StateCell;
///
/// struct Stats { requests: u64 }
/// let stats = StateCell::new(Stats { requests: 0 }); // `static` in a domain
/// stats.with(|s| s.requests += 1);
/// assert_eq!(stats.with(|s| s.requests), 1);
/// ```
pub struct StateCell<T> {
    borrowed: Cell<bool>,
    value: UnsafeCell<T>,
}

// SAFETY: a wasm32 module without the `atomics` feature cannot share its
// memory with another thread: every access to the cell happens on the
// domain's single thread, one activation at a time, and `with` refuses
// re-entrant borrows.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl<T: Send> Sync for StateCell<T> {}

impl<T> StateCell<T> {
    /// A cell holding `value` (usable in `static` initializers).
    pub const fn new(value: T) -> StateCell<T> {
        StateCell {
            borrowed: Cell::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Run `f` with exclusive access to the value.
    ///
    /// # Panics
    /// If called from inside another `with` on the same cell.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        struct Release<'a>(&'a Cell<bool>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        assert!(!self.borrowed.replace(true), "StateCell borrowed twice");
        let _release = Release(&self.borrowed);
        // SAFETY: the flag was clear and is now set until `_release` drops, so
        // this is the only reference to the value; the cell is not shared
        // across threads (see the `Sync` impl).
        f(unsafe { &mut *self.value.get() })
    }
}

impl<T> fmt::Debug for StateCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateCell")
            .field("borrowed", &self.borrowed.get())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::StateCell;

    #[test]
    fn exclusive_access() {
        let c = StateCell::new(1u32);
        c.with(|v| *v += 1);
        assert_eq!(c.with(|v| *v), 2);
    }

    #[test]
    #[should_panic(expected = "borrowed twice")]
    fn reentrant_use_panics() {
        let c = StateCell::new(0u32);
        c.with(|_| c.with(|v| *v));
    }

    #[test]
    fn released_after_panic() {
        extern crate std;
        let c = StateCell::new(0u32);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.with(|_| panic!("x"))));
        assert!(r.is_err());
        assert_eq!(c.with(|v| *v), 0);
    }
}
