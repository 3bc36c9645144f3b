//! Problems: counted and reported, never a panic.

use std::fmt::Display;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) static ERRORS: AtomicU64 = AtomicU64::new(0);
pub(crate) static ANOMALIES: AtomicU64 = AtomicU64::new(0);
pub(crate) static FIRST_PROBLEM: Mutex<Option<String>> = Mutex::new(None);

pub(crate) fn problem(counter: &AtomicU64, what: impl Display) {
    counter.fetch_add(1, Ordering::Relaxed);
    let mut first = FIRST_PROBLEM.lock().unwrap_or_else(PoisonError::into_inner);
    if first.is_none() {
        *first = Some(what.to_string());
    }
}

pub(crate) fn ok<T, E: Display>(result: Result<T, E>) -> Option<T> {
    result.map_err(|e| problem(&ERRORS, e)).ok()
}
