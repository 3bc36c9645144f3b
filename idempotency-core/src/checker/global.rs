//! The process-wide default checker used by `#[idempotent]` without `checker = ..`.

use std::sync::OnceLock;

use crate::IdempotencyChecker;

static DEFAULT: OnceLock<IdempotencyChecker> = OnceLock::new();

/// Installs the process-wide default checker, once, at start-up.
///
/// `#[idempotent]` handlers without a `checker = ..` argument use it. Returns
/// the checker back as `Err` if one was already installed.
///
/// ```
/// use idempotency_core::{IdempotencyChecker, MemoryStore, set_default_checker, default_checker};
///
/// assert!(set_default_checker(IdempotencyChecker::new(MemoryStore::new())).is_ok());
/// assert!(default_checker().is_some());
/// assert!(set_default_checker(IdempotencyChecker::new(MemoryStore::new())).is_err());
/// ```
pub fn set_default_checker(checker: IdempotencyChecker) -> Result<(), IdempotencyChecker> {
    DEFAULT.set(checker)
}

/// The process-wide default checker, if one was installed.
pub fn default_checker() -> Option<&'static IdempotencyChecker> {
    DEFAULT.get()
}
