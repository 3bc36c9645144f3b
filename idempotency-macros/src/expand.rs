//! Rewriting the function: checks across the signature, then the expansion.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, Pat, ReturnType, Type, parse_quote};

use crate::attr::{Args, OnDuplicate, OnInProgress};

/// The entry point: on any error, the user's function is still emitted
/// (unchanged but for `#[envelope]` markers) next to the error, so IDEs and
/// the rest of the crate keep working.
pub(crate) fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(error) => {
            let mut tokens = error.to_compile_error();
            tokens.extend(item);
            return tokens;
        }
    };
    let marked = take_envelope_markers(&mut function);
    let expanded = Args::parse(args).and_then(|args| expand(args, function.clone(), &marked));
    match expanded {
        Ok(tokens) => tokens,
        Err(error) => {
            let error = error.to_compile_error();
            quote!(#error #function)
        }
    }
}

/// Removes `#[envelope]` from the parameters; returns the indexes it was on.
fn take_envelope_markers(function: &mut ItemFn) -> Vec<usize> {
    let mut marked = Vec::new();
    for (index, input) in function.sig.inputs.iter_mut().enumerate() {
        if let FnArg::Typed(param) = input {
            let before = param.attrs.len();
            param.attrs.retain(|a| !a.path().is_ident("envelope"));
            if param.attrs.len() != before {
                marked.push(index);
            }
        }
    }
    marked
}

fn is_envelope_type(ty: &Type) -> bool {
    match ty {
        Type::Reference(reference) => is_envelope_type(&reference.elem),
        Type::Group(group) => is_envelope_type(&group.elem),
        Type::Paren(paren) => is_envelope_type(&paren.elem),
        Type::Path(path) => path
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "EventEnvelope"),
        _ => false,
    }
}

fn is_reference(ty: &Type) -> bool {
    match ty {
        Type::Reference(_) => true,
        Type::Group(group) => is_reference(&group.elem),
        Type::Paren(paren) => is_reference(&paren.elem),
        _ => false,
    }
}

/// The envelope parameter's name, and whether it is a reference.
fn find_envelope(function: &ItemFn, marked: &[usize]) -> syn::Result<(syn::Ident, bool)> {
    let typed = |index: usize| match function.sig.inputs.iter().nth(index) {
        Some(FnArg::Typed(param)) => Some(param),
        _ => None,
    };
    let chosen = match marked {
        [index] => *index,
        [_, second, ..] => {
            let span = typed(*second).map_or_else(|| function.sig.span(), |p| p.span());
            return Err(syn::Error::new(
                span,
                "only one parameter can be marked `#[envelope]`",
            ));
        }
        [] => {
            let candidates: Vec<usize> = function
                .sig
                .inputs
                .iter()
                .enumerate()
                .filter_map(|(i, input)| match input {
                    FnArg::Typed(param) if is_envelope_type(&param.ty) => Some(i),
                    _ => None,
                })
                .collect();
            match candidates[..] {
                [index] => index,
                [] => {
                    return Err(syn::Error::new(
                        function.sig.paren_token.span.join(),
                        "`#[idempotent]` needs an `EventEnvelope<..>` parameter, e.g. \
                         `envelope: EventEnvelope<OrderPlaced>`; mark it `#[envelope]` if its \
                         type is spelled differently",
                    ));
                }
                [_, second, ..] => {
                    let span = typed(second).map_or_else(|| function.sig.span(), |p| p.ty.span());
                    return Err(syn::Error::new(
                        span,
                        "several parameters could be the envelope; mark the one to use with \
                         `#[envelope]`",
                    ));
                }
            }
        }
    };
    let Some(param) = typed(chosen) else {
        return Err(syn::Error::new(
            function.sig.span(),
            "the envelope cannot be `self`",
        ));
    };
    match &*param.pat {
        Pat::Ident(ident) if ident.by_ref.is_none() && ident.subpat.is_none() => {
            Ok((ident.ident.clone(), is_reference(&param.ty)))
        }
        other => Err(syn::Error::new(
            other.span(),
            "the envelope parameter must be a plain name, e.g. `envelope: EventEnvelope<P>`",
        )),
    }
}

fn result_type(function: &ItemFn) -> syn::Result<Type> {
    const MESSAGE: &str = "`#[idempotent]` handlers must return `Result<T, E>`: `T` is \
                           stored and replayed to duplicates, `E: From<IdempotencyError>` \
                           carries the framework's errors";
    match &function.sig.output {
        ReturnType::Type(_, ty) => {
            let is_result = matches!(&**ty, Type::Path(p)
                if p.path.segments.last().is_some_and(|s| s.ident == "Result"));
            if is_result {
                Ok((**ty).clone())
            } else {
                Err(syn::Error::new(ty.span(), MESSAGE))
            }
        }
        ReturnType::Default => Err(syn::Error::new(
            function.sig.paren_token.span.close(),
            MESSAGE,
        )),
    }
}

fn duration_tokens(duration: Option<std::time::Duration>) -> TokenStream {
    match duration {
        Some(d) => {
            let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
            quote!(::core::option::Option::Some(::core::time::Duration::new(#secs, #nanos)))
        }
        None => quote!(::core::option::Option::None),
    }
}

fn expand(args: Args, mut function: ItemFn, marked: &[usize]) -> syn::Result<TokenStream> {
    if function.sig.asyncness.is_none() {
        return Err(syn::Error::new(
            function.sig.fn_token.span,
            "`#[idempotent]` can only be applied to an `async fn`",
        ));
    }
    let output = result_type(&function)?;
    let (envelope, by_ref) = find_envelope(&function, marked)?;
    let krate = args.krate.unwrap_or_else(|| parse_quote!(::idempotency));

    let checker = match &args.checker {
        Some(expr) => quote!(&(#expr)),
        None => quote!(#krate::__private::default_checker()),
    };
    // A borrowed envelope outlives the call, so the call borrows its text; an
    // envelope taken by value moves into the handler, so the call copies it.
    let (envelope_ref, owned) = if by_ref {
        (quote!(#envelope), quote!())
    } else {
        (quote!(&#envelope), quote!(.owned()))
    };
    let key = match &args.key {
        Some(expr) => {
            quote!(::core::option::Option::Some(::std::string::ToString::to_string(&(#expr))))
        }
        None => quote!(::core::option::Option::None),
    };
    let ttl = duration_tokens(args.ttl);
    let lease = duration_tokens(args.lease);
    let on_duplicate = match args.on_duplicate {
        Some(OnDuplicate::Replay) => {
            quote!(::core::option::Option::Some(#krate::DuplicatePolicy::Replay))
        }
        Some(OnDuplicate::Error) => {
            quote!(::core::option::Option::Some(#krate::DuplicatePolicy::Error))
        }
        None => quote!(::core::option::Option::None),
    };
    let on_in_progress = match args.on_in_progress {
        Some(OnInProgress::Error) => {
            quote!(::core::option::Option::Some(#krate::__private::OnInProgress::Error))
        }
        Some(OnInProgress::Wait) => {
            quote!(::core::option::Option::Some(#krate::__private::OnInProgress::Wait))
        }
        None => quote!(::core::option::Option::None),
    };
    let block = &function.block;
    let body: syn::Block = parse_quote!({
        let __idempotency_checker = #checker;
        let __idempotency_call = #krate::__private::prepare(
            __idempotency_checker,
            #envelope_ref,
            #key,
            #krate::__private::Options {
                ttl: #ttl,
                lease: #lease,
                on_duplicate: #on_duplicate,
                on_in_progress: #on_in_progress,
            },
        )#owned;
        #krate::__private::run(
            __idempotency_call,
            #krate::__private::typed::<#output, _>(async move #block),
        )
        .await
    });
    *function.block = body;
    Ok(function.to_token_stream())
}
