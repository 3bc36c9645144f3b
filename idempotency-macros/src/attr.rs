//! Parsing and checking the attribute's arguments.

use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Expr, LitStr, Path};

const OPTIONS: &str = "`ttl`, `lease`, `key`, `checker`, `on_duplicate`, `on_in_progress`, `crate`";

/// `on_duplicate = ..`
#[derive(Clone, Copy)]
pub(crate) enum OnDuplicate {
    Replay,
    Error,
}

/// `on_in_progress = ..`
#[derive(Clone, Copy)]
pub(crate) enum OnInProgress {
    Error,
    Wait,
}

/// The arguments of one `#[idempotent(..)]`.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) ttl: Option<Duration>,
    pub(crate) lease: Option<Duration>,
    pub(crate) key: Option<Expr>,
    pub(crate) checker: Option<Expr>,
    pub(crate) on_duplicate: Option<OnDuplicate>,
    pub(crate) on_in_progress: Option<OnInProgress>,
    pub(crate) krate: Option<Path>,
}

/// Stores `value` in `slot`, rejecting a second occurrence of the option.
fn set_once<T>(slot: &mut Option<T>, value: T, name: &str, span: Span) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new(
            span,
            format!("`{name}` set multiple times."),
        ));
    }
    *slot = Some(value);
    Ok(())
}

fn duration(meta: &ParseNestedMeta<'_>, name: &str) -> syn::Result<Duration> {
    let lit: LitStr = meta.value()?.parse()?;
    let text = lit.value();
    let parsed = humantime::parse_duration(text.trim()).map_err(|e| {
        syn::Error::new(
            lit.span(),
            format!(
                "`{name}`: `{text}` is not a duration ({e}); write e.g. \"24h\", \"30m\", \"1h30m\""
            ),
        )
    })?;
    // The same bounds, in the same order, as the runtime check
    // (`check_duration` in idempotency-core's config.rs): what compiles
    // never fails on every call. The UI tests and config.rs's unit tests pin
    // both sides to 1ms..=3650 days.
    let bound = if parsed.is_zero() {
        Some("must be greater than zero")
    } else if parsed > MAX_DURATION {
        Some("must be at most 10 years")
    } else if parsed < Duration::from_millis(1) {
        Some("must be at least 1ms")
    } else {
        None
    };
    match bound {
        Some(bound) => Err(syn::Error::new(lit.span(), format!("`{name}` {bound}"))),
        None => Ok(parsed),
    }
}

/// The longest duration the stores accept: 10 years of 365 days.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn choice<T: Copy>(
    meta: &ParseNestedMeta<'_>,
    name: &str,
    choices: &[(&str, T)],
) -> syn::Result<T> {
    let lit: LitStr = meta.value()?.parse()?;
    let text = lit.value();
    choices
        .iter()
        .find(|(word, _)| *word == text)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let valid: Vec<String> = choices.iter().map(|(w, _)| format!("\"{w}\"")).collect();
            syn::Error::new(
                lit.span(),
                format!(
                    "`{name}` must be one of {}, not \"{text}\"",
                    valid.join(", ")
                ),
            )
        })
}

impl Args {
    pub(crate) fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = Self::default();
        let parser = syn::meta::parser(|meta| {
            let span = meta
                .path
                .segments
                .first()
                .map_or_else(Span::call_site, |s| s.ident.span());
            let name = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            match name.as_str() {
                "ttl" => set_once(&mut args.ttl, duration(&meta, "ttl")?, "ttl", span),
                "lease" => set_once(&mut args.lease, duration(&meta, "lease")?, "lease", span),
                "key" => set_once(&mut args.key, meta.value()?.parse()?, "key", span),
                "checker" => set_once(&mut args.checker, meta.value()?.parse()?, "checker", span),
                "on_duplicate" => set_once(
                    &mut args.on_duplicate,
                    choice(
                        &meta,
                        "on_duplicate",
                        &[
                            ("replay", OnDuplicate::Replay),
                            ("error", OnDuplicate::Error),
                        ],
                    )?,
                    "on_duplicate",
                    span,
                ),
                "on_in_progress" => set_once(
                    &mut args.on_in_progress,
                    choice(
                        &meta,
                        "on_in_progress",
                        &[("error", OnInProgress::Error), ("wait", OnInProgress::Wait)],
                    )?,
                    "on_in_progress",
                    span,
                ),
                "crate" => {
                    let lit: LitStr = meta.value()?.parse()?;
                    let path = lit.parse::<Path>().map_err(|_| {
                        syn::Error::new(lit.span(), "`crate` must be a path, e.g. \"idempotency\"")
                    })?;
                    set_once(&mut args.krate, path, "crate", span)
                }
                _ => Err(meta.error(format!(
                    "unknown option `{}`; valid options are {OPTIONS}",
                    quote::ToTokens::to_token_stream(&meta.path)
                        .to_string()
                        .replace(' ', "")
                ))),
            }
        });
        parser.parse2(tokens)?;
        Ok(args)
    }
}
