//! The `#[idempotent]` attribute of the `idempotency` framework.
//!
//! Use it through the umbrella crate: `use idempotency::idempotent;`. This
//! crate only parses and checks the attribute's arguments and rewrites the
//! function body into one call of `idempotency_core::__private`; all runtime
//! logic lives in `idempotency-core`.
//!
//! See the guide chapter "The #[idempotent] attribute" for every option and
//! the equivalent code written without the macro.

use proc_macro::TokenStream;

mod attr;
mod expand;

/// Makes an `async fn` taking an `EventEnvelope<P>` idempotent.
///
/// ```ignore
/// #[idempotent(ttl = "24h")]
/// async fn handle(envelope: EventEnvelope<FieldCreated>) -> Result<FieldReceipt, AppError> {
///     // runs at most once per idempotency key; a duplicate gets the first receipt back
/// }
/// ```
///
/// Options (all optional): `ttl = "24h"`, `lease = "5m"`,
/// `key = <expr>`, `checker = <expr>`, `on_duplicate = "replay" | "error"`,
/// `on_in_progress = "error" | "wait"`, `crate = "path"`.
///
/// The function must be `async`, return `Result<T, E>` with
/// `T: Serialize + DeserializeOwned` and `E: From<IdempotencyError> + Display`,
/// and take one `EventEnvelope<..>` parameter (mark it `#[envelope]` when
/// several parameters could be the envelope).
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}
