//! Operator documents: every plugin configuration reader, and the route table a serverless
//! filter polls.

use std::fmt::Debug;

use serde::Deserialize;

use super::json::strict;
use super::shown;
use crate::serverless::table::{Batch, LocalTable};
use crate::serverless::{protocol, Decision, RouteSpec, Router};
use crate::{cloud_connector, egress, generic::json, mesh_identity, serverless, tunnel_auth};

/// The shipped serverless configuration (`envoy/serverless.yaml`: the default layout, one inline
/// route, a management service), and GitLab's layout under another domain.
pub(super) const ROUTERS: [&str; 2] = [
    r#"{"domain": "serverless.gitlab.io", "cluster_header": "x-edgewise-cluster",
        "routes": [{"match": {"project": "0000000a", "environment": "0000000b", "function": "000000000c"},
                    "cluster": "customer-a", "host": "hello.ns-42.knative.customer-a.example"}],
        "management": {"cluster": "management", "authority": "management.platform.example",
                       "path": "/v1/serverless/routes", "poll_interval_ms": 2000, "timeout_ms": 1000}}"#,
    r#"{"domain": "Pages.Example.com.",
        "pattern": "(?P<function>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<cluster>[0-9a-f]{14})(?P<environment>[0-9a-f]+)-(?:[a-z0-9-]+)",
        "management": {"cluster": "management"}}"#,
];

/// The shipped egress configuration (`envoy/egress.yaml`).
pub(super) const EGRESS: &str = r#"{"suffix": "egress.local",
    "allow": ["api.github.com", "*.example.com", "example.net:8443", "sneaky.example.org"],
    "allow_private": ["api.github.com", "*.example.com", "example.net:8443"]}"#;

/// The environment cloud-connector configurations are compiled with.
fn env(var: &str) -> Option<String> {
    (var == "EDGEWISE_AUTHENTICITY_SECRET").then(|| "0123456789abcdef0123456789abcdef".into())
}

/// A plugin configuration, given to every filter's reader: none panics, and each reader accepts
/// and reads what its serde derive (the JSON Schema's source) does, on documents without the
/// documented differences of `crate::generic::json` (a key twice, nesting 32 deep, a number beyond f64) and
/// with objects where the schema has them.
pub fn configs(doc: &[u8]) {
    let _ = serverless::Router::from_json(doc);
    let _ = egress::Policy::from_json(doc);
    let _ = mesh_identity::Role::from_json(doc);
    let _ = cloud_connector::Gateway::from_json_env(doc, env);
    let _ = tunnel_auth::Hub::from_json(doc);
    if strict(doc).is_err() {
        return;
    }
    same(doc, json::parse::<serverless::Config>(doc), serde_json::from_slice(doc));
    same(doc, json::parse::<egress::Config>(doc), serde_json::from_slice(doc));
    same(doc, json::parse::<cloud_connector::config::Config>(doc), serde_json::from_slice(doc));
    same(doc, json::parse::<tunnel_auth::Config>(doc), serde_json::from_slice(doc));
    // The reader keeps the gateway's JWKS as written, the serde derive as serde_json writes it.
    let written = |mut c: mesh_identity::Config| {
        if let mesh_identity::Config::Gateway(g) = &mut c {
            let jwks: serde_json::Value = serde_json::from_str(&g.jwks.0).expect("the jwks the reader kept is JSON");
            g.jwks = json::Raw(jwks.to_string());
        }
        c
    };
    same(doc, json::parse::<mesh_identity::Config>(doc).map(written), serde_json::from_slice(doc));
}

fn same<T: Debug>(doc: &[u8], ours: Result<T, json::Error>, theirs: Result<T, serde_json::Error>) {
    match (ours, theirs) {
        (Ok(ours), Ok(theirs)) => assert_eq!(format!("{ours:?}"), format!("{theirs:?}"), "{}", shown(doc)),
        (Err(_), Err(_)) => {}
        // A serde derive also reads a struct from an array of its fields in order, a form the
        // JSON Schema does not have and the readers refuse.
        (Err(e), Ok(_)) if e.reason.ends_with("must be an object") => {}
        (ours, theirs) => panic!("{}: the reader says {ours:?}, the serde derive {theirs:?}", shown(doc)),
    }
}

/// A management document as the serde derives read it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    version: u64,
    routes: Vec<RouteSpec>,
    #[serde(default)]
    #[allow(dead_code)]
    next: Option<String>,
}

/// A page of the whole table, read by each of `ROUTERS`: it has the document's version and every
/// route of it under the key of its `match`; in force, a host of the default layout made of a
/// route's values is routed to that route. The same bytes as a watch answer: read, it has as many
/// changes as serde_json finds, each put a route that reads.
pub fn route_table(doc: &[u8]) {
    for (i, config) in ROUTERS.iter().enumerate() {
        let router = Router::from_json(config.as_bytes()).expect("a serverless configuration");
        if let Ok(changes) = protocol::read_changes(&router.decoder, doc) {
            let listed: serde_json::Value =
                serde_json::from_slice(doc).unwrap_or_else(|e| panic!("{}: read, but serde_json says {e}", shown(doc)));
            let field = |name: &str| listed.get(name).cloned().unwrap_or_default();
            assert_eq!(Some(changes.version), field("version").as_u64(), "{}", shown(doc));
            assert_eq!(Some(changes.changes.len()), field("changes").as_array().map(Vec::len), "{}", shown(doc));
        }
        let mut table = LocalTable::new(4);
        let mut batch = Batch::default();
        let Ok(page) = protocol::read_page(&router.decoder, doc, &mut batch) else {
            continue;
        };
        table.put_batch(&batch);
        let listed: Table = serde_json::from_slice(doc)
            .unwrap_or_else(|e| panic!("{}: read, but the serde derives say {e}", shown(doc)));
        assert_eq!(page.version, listed.version, "{}", shown(doc));
        assert_eq!(table.len(), listed.routes.len(), "{}", shown(doc));
        assert_eq!(page.routes, listed.routes.len(), "{}", shown(doc));
        let groups = router.decoder.groups().to_vec();
        let values = |route: &RouteSpec| -> Vec<String> {
            groups.iter().map(|g| route.matches.get(g).expect("a route names every group").clone()).collect()
        };
        for route in &listed.routes {
            let key = match &route.domain {
                Some(domain) => router.decoder.custom_domain_key(domain).expect("a domain route read has a key"),
                None => router.decoder.key_of(&route.matches).expect("a route read has a key"),
            };
            let target = table.get(&key).unwrap_or_else(|| panic!("{}: no route {key:?}", shown(doc)));
            assert_eq!((target.cluster, target.host), (&*route.cluster, &*route.host), "{}", shown(doc));
        }
        if i != 0 {
            continue;
        }
        for route in &listed.routes {
            // A custom domain's route is found by its own name, whatever its case.
            let host = match &route.domain {
                Some(domain) => domain.to_ascii_uppercase(),
                None => format!("{}.serverless.gitlab.io", values(route).join("-")),
            };
            let mut scratch = router.decoder.scratch();
            match router.decide(&host, &mut scratch, Some(&table)) {
                Decision::Route(t) => assert_eq!((t.cluster, t.host), (&*route.cluster, &*route.host), "{host}"),
                other => panic!("{}: {host} is not routed: {other:?}", shown(doc)),
            }
        }
    }
}
