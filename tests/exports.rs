//! The shipped modules export exactly the proxy-wasm callbacks their filters declare
//! (`Filter::HOOKS`, recorded by `export!` and trimmed by build.rs): Envoy enters a VM only for
//! the callbacks it exports, so a callback too many costs every request, and a declared hook whose
//! callback is missing would silently never run. The declaration section itself is gone.

use std::collections::BTreeSet;

/// A LEB128 unsigned integer at `*at`.
fn leb(bytes: &[u8], at: &mut usize) -> usize {
    let (mut value, mut shift) = (0usize, 0);
    loop {
        let byte = bytes[*at];
        *at += 1;
        value |= usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte < 0x80 {
            return value;
        }
    }
}

fn name(bytes: &[u8], at: &mut usize) -> String {
    let len = leb(bytes, at);
    let s = String::from_utf8(bytes[*at..*at + len].to_vec()).unwrap();
    *at += len;
    s
}

/// (exported function names, custom section names) of a module.
fn exports_and_customs(module: &[u8]) -> (BTreeSet<String>, BTreeSet<String>) {
    assert_eq!(&module[..4], b"\0asm");
    let (mut exports, mut customs) = (BTreeSet::new(), BTreeSet::new());
    let mut at = 8;
    while at < module.len() {
        let id = module[at];
        at += 1;
        let len = leb(module, &mut at);
        let end = at + len;
        let mut p = at;
        match id {
            0 => {
                customs.insert(name(module, &mut p));
            }
            7 => {
                for _ in 0..leb(module, &mut p) {
                    let export = name(module, &mut p);
                    let kind = module[p];
                    p += 1;
                    leb(module, &mut p);
                    if kind == 0 {
                        exports.insert(export);
                    }
                }
            }
            _ => {}
        }
        at = end;
    }
    (exports, customs)
}

#[test]
fn each_module_exports_the_callbacks_its_filter_declares() {
    // What each filter declares: response headers (egress's per-destination response metrics),
    // background work (polling a route table, fetching keys).
    let declared = [
        ("serverless", false, true),
        ("egress", true, false),
        ("mesh-identity", false, false),
        ("cloud-connector", false, true),
        ("tunnel-auth", false, true),
    ];
    for (filter, response_headers, background) in declared {
        let path = edgewise::filters_dir().join(format!("{filter}.wasm"));
        let module = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (exports, customs) = exports_and_customs(&module);
        let callbacks: BTreeSet<&str> =
            exports.iter().map(String::as_str).filter(|e| e.starts_with("proxy_on_")).collect();
        let mut expected = BTreeSet::from([
            "proxy_on_context_create",
            "proxy_on_vm_start",
            "proxy_on_configure",
            "proxy_on_request_headers",
            "proxy_on_delete",
            "proxy_on_memory_allocate",
        ]);
        if response_headers {
            expected.insert("proxy_on_response_headers");
        }
        if background {
            expected.extend(["proxy_on_tick", "proxy_on_http_call_response"]);
        }
        let unexpected: Vec<_> = callbacks.difference(&expected).collect();
        let missing: Vec<_> = expected.difference(&callbacks).collect();
        assert!(
            unexpected.is_empty() && missing.is_empty(),
            "{filter}: exports {unexpected:?} too many, {missing:?} missing"
        );
        assert!(!customs.contains("edgewise.hooks"), "{filter}: the declaration section is left in the module");
    }
}
