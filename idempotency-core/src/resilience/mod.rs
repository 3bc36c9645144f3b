//! What keeps the checker useful when the store is slow or down: the
//! circuit breaker in front of the store, and the local replay cache that
//! answers hot duplicates without it. Each module holds its own
//! configuration type.

pub(crate) mod breaker;
pub(crate) mod cache;
