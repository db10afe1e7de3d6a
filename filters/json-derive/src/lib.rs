//! `#[derive(FromJson)]`: the reader of a plugin configuration type, generated from the serde
//! attributes the type already carries for its JSON Schema. One declaration per configuration:
//! the struct and its `#[serde(...)]` attributes say what the document holds, and the filters read
//! it with `edgewise_core::generic::json` (small code in the .wasm modules, errors that name the
//! field), never with serde's deserializers.
//!
//! Supported, and nothing else (any other serde attribute is a compile error, so the reader and
//! the schema cannot silently disagree):
//! - structs with named fields and `#[serde(deny_unknown_fields)]` (required: a misspelt field
//!   must be refused, not ignored), optionally container `default` (missing fields from
//!   `Default`); fields with `default`, `default = "path"`, `rename = "name"`. An `Option` field
//!   may be absent, as with serde.
//! - enums of unit variants (a string), and enums of one-field tuple variants with
//!   `tag = "name"` (internally tagged); `rename_all = "lowercase"` on either.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as Tokens};
use quote::{format_ident, quote};
use syn::{Attribute, Data, DeriveInput, Error, Fields, LitStr, Path};

#[proc_macro_derive(FromJson, attributes(serde))]
pub fn derive_from_json(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Default)]
struct Container {
    deny_unknown_fields: bool,
    default: bool,
    tag: Option<String>,
    lowercase: bool,
}

#[derive(Default)]
struct FieldAttrs {
    rename: Option<String>,
    default: Option<Option<Path>>,
}

fn serde_attrs(
    attrs: &[Attribute],
    mut each: impl FnMut(&syn::meta::ParseNestedMeta) -> syn::Result<()>,
) -> syn::Result<()> {
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| each(&meta))?;
    }
    Ok(())
}

fn string(meta: &syn::meta::ParseNestedMeta) -> syn::Result<String> {
    Ok(meta.value()?.parse::<LitStr>()?.value())
}

fn unsupported(meta: &syn::meta::ParseNestedMeta) -> Error {
    let name = meta.path.get_ident().map(ToString::to_string).unwrap_or_default();
    meta.error(format!("#[derive(FromJson)] does not support `#[serde({name})]`"))
}

fn container(attrs: &[Attribute]) -> syn::Result<Container> {
    let mut c = Container::default();
    serde_attrs(attrs, |meta| {
        if meta.path.is_ident("deny_unknown_fields") {
            c.deny_unknown_fields = true;
        } else if meta.path.is_ident("default") {
            c.default = true;
        } else if meta.path.is_ident("tag") {
            c.tag = Some(string(meta)?);
        } else if meta.path.is_ident("rename_all") {
            if string(meta)? != "lowercase" {
                return Err(meta.error("#[derive(FromJson)] supports only `rename_all = \"lowercase\"`"));
            }
            c.lowercase = true;
        } else {
            return Err(unsupported(meta));
        }
        Ok(())
    })?;
    Ok(c)
}

fn field_attrs(attrs: &[Attribute]) -> syn::Result<FieldAttrs> {
    let mut f = FieldAttrs::default();
    serde_attrs(attrs, |meta| {
        if meta.path.is_ident("rename") {
            f.rename = Some(string(meta)?);
        } else if meta.path.is_ident("default") {
            f.default = Some(if meta.input.peek(syn::Token![=]) {
                Some(syn::parse_str::<Path>(&string(meta)?)?)
            } else {
                None
            });
        } else {
            return Err(unsupported(meta));
        }
        Ok(())
    })?;
    Ok(f)
}

fn expand(input: &DeriveInput) -> syn::Result<Tokens> {
    let c = container(&input.attrs)?;
    match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(fields) => expand_struct(input, &c, fields),
            _ => Err(Error::new_spanned(&input.ident, "#[derive(FromJson)] reads structs with named fields")),
        },
        Data::Enum(e) if c.tag.is_some() => expand_tagged(input, &c, e),
        Data::Enum(e) => expand_unit_enum(input, &c, e),
        Data::Union(_) => Err(Error::new_spanned(&input.ident, "#[derive(FromJson)] does not read unions")),
    }
}

fn json() -> Tokens {
    quote!(::edgewise_core::generic::json)
}

fn expand_struct(input: &DeriveInput, c: &Container, fields: &syn::FieldsNamed) -> syn::Result<Tokens> {
    if !c.deny_unknown_fields {
        return Err(Error::new_spanned(
            &input.ident,
            "#[derive(FromJson)] needs #[serde(deny_unknown_fields)]: a misspelt field must be refused",
        ));
    }
    let json = json();
    let ident = &input.ident;
    // Each field starts as its default, like the struct a hand-written reader fills in; only a
    // required field is an `Option` until the object is read.
    let (mut names, mut slots, mut arms, mut values) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, field) in fields.named.iter().enumerate() {
        let attrs = field_attrs(&field.attrs)?;
        let member = field.ident.as_ref().ok_or_else(|| Error::new_spanned(field, "a named field"))?;
        let name = attrs.rename.unwrap_or_else(|| member.to_string().trim_start_matches("r#").to_string());
        let ty = &field.ty;
        let read = quote!(#json::FromJson::from_json(r, &field)?);
        if c.default && attrs.default.is_none() {
            arms.push(quote!(#name => value.#member = #read,));
            names.push(name);
            continue;
        }
        let slot = format_ident!("field{i}");
        let start = match attrs.default {
            Some(Some(path)) => Some(quote!(#path())),
            Some(None) => Some(quote!(::core::default::Default::default())),
            // As with serde, an `Option` field may be absent.
            None if is_option(ty) => Some(quote!(::core::option::Option::None)),
            None => None,
        };
        let value = match start {
            Some(start) => {
                slots.push(quote!(let mut #slot: #ty = #start;));
                arms.push(quote!(#name => #slot = #read,));
                quote!(#slot)
            }
            None => {
                slots.push(quote!(let mut #slot: ::core::option::Option<#ty> = ::core::option::Option::None;));
                arms.push(quote!(#name => #slot = ::core::option::Option::Some(#read),));
                quote!(#slot.ok_or_else(|| at.key(#name).missing())?)
            }
        };
        values.push((member, value));
        names.push(name);
    }
    let (start, build) = if c.default {
        let set = values.iter().map(|(member, value)| quote!(value.#member = #value;));
        (quote!(let mut value = <Self as ::core::default::Default>::default();), quote!(#(#set)* value))
    } else {
        let members = values.iter().map(|(member, value)| quote!(#member: #value,));
        (quote!(), quote!(#ident { #(#members)* }))
    };
    Ok(quote! {
        impl #json::FromJson for #ident {
            #[inline(never)]
            fn from_json(r: &mut #json::Reader<'_>, at: &#json::Field<'_>) -> ::core::result::Result<Self, #json::Error> {
                <Self as #json::FromJsonObject>::from_object(r, at, ::core::option::Option::None)
            }
        }

        impl #json::FromJsonObject for #ident {
            #[inline(never)]
            fn from_object(
                r: &mut #json::Reader<'_>,
                at: &#json::Field<'_>,
                tag: ::core::option::Option<&str>,
            ) -> ::core::result::Result<Self, #json::Error> {
                const FIELDS: &[&str] = &[#(#names),*];
                #start
                #(#slots)*
                r.object(at, |r, key| {
                    let field = at.key(&key);
                    match &*key {
                        #(#arms)*
                        other => r.tag_or_unknown(at, other, tag, FIELDS)?,
                    }
                    ::core::result::Result::Ok::<(), #json::Error>(())
                })?;
                ::core::result::Result::Ok(#build)
            }
        }
    })
}

/// `Option<...>`, as serde recognises it: by name.
fn is_option(ty: &syn::Type) -> bool {
    matches!(ty, syn::Type::Path(p) if p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == "Option"))
}

/// The JSON name of a variant.
fn variant_name(c: &Container, v: &syn::Variant) -> syn::Result<String> {
    let mut rename = None;
    serde_attrs(&v.attrs, |meta| {
        if meta.path.is_ident("rename") {
            rename = Some(string(meta)?);
            Ok(())
        } else {
            Err(unsupported(meta))
        }
    })?;
    let ident = v.ident.to_string();
    Ok(rename.unwrap_or_else(|| if c.lowercase { ident.to_lowercase() } else { ident }))
}

/// "must be a, b or c"
fn one_of(names: &[String]) -> String {
    match names.split_last() {
        Some((last, [])) => format!("must be {last}"),
        Some((last, rest)) => format!("must be {} or {last}", rest.join(", ")),
        None => "cannot be read (no variants)".into(),
    }
}

fn expand_unit_enum(input: &DeriveInput, c: &Container, e: &syn::DataEnum) -> syn::Result<Tokens> {
    let json = json();
    let ident = &input.ident;
    let (mut names, mut arms) = (Vec::new(), Vec::new());
    for v in &e.variants {
        if !matches!(v.fields, Fields::Unit) {
            return Err(Error::new_spanned(v, "#[derive(FromJson)]: an enum with data needs #[serde(tag = \"...\")]"));
        }
        let name = variant_name(c, v)?;
        let variant = &v.ident;
        arms.push(quote!(#name => ::core::result::Result::Ok(#ident::#variant),));
        names.push(name);
    }
    let expected = one_of(&names);
    Ok(quote! {
        impl #json::FromJson for #ident {
            #[inline(never)]
            fn from_json(r: &mut #json::Reader<'_>, at: &#json::Field<'_>) -> ::core::result::Result<Self, #json::Error> {
                match &*r.str(at)? {
                    #(#arms)*
                    _ => ::core::result::Result::Err(at.error(#expected)),
                }
            }
        }
    })
}

fn expand_tagged(input: &DeriveInput, c: &Container, e: &syn::DataEnum) -> syn::Result<Tokens> {
    let json = json();
    let ident = &input.ident;
    let tag = c.tag.clone().unwrap_or_default();
    let (mut names, mut arms) = (Vec::new(), Vec::new());
    for v in &e.variants {
        if !matches!(&v.fields, Fields::Unnamed(f) if f.unnamed.len() == 1) {
            return Err(Error::new_spanned(v, "#[derive(FromJson)]: a tagged variant holds one struct"));
        }
        let name = variant_name(c, v)?;
        let variant = &v.ident;
        arms.push(quote! {
            ::core::option::Option::Some(#name) => {
                #json::FromJsonObject::from_object(&mut again, at, ::core::option::Option::Some(#tag)).map(#ident::#variant)
            }
        });
        names.push(name);
    }
    let expected = one_of(&names);
    let tag_lit = LitStr::new(&tag, Span::call_site());
    Ok(quote! {
        impl #json::FromJson for #ident {
            #[inline(never)]
            fn from_json(r: &mut #json::Reader<'_>, at: &#json::Field<'_>) -> ::core::result::Result<Self, #json::Error> {
                // The tag may come anywhere in the object: find it, then read the object again.
                let mut again = r.clone();
                let tag_at = at.key(#tag_lit);
                let mut tag = ::core::option::Option::None;
                r.object(at, |r, key| {
                    if key == #tag_lit {
                        tag = ::core::option::Option::Some(r.string(&tag_at)?);
                        ::core::result::Result::Ok(())
                    } else {
                        r.skip(&at.key(&key))
                    }
                })?;
                match tag.as_deref() {
                    #(#arms)*
                    ::core::option::Option::Some(_) => ::core::result::Result::Err(tag_at.error(#expected)),
                    ::core::option::Option::None => ::core::result::Result::Err(tag_at.missing()),
                }
            }
        }
    })
}
