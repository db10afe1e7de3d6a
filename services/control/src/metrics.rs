//! The service's Prometheus metrics; labels are fixed sets (xDS types, results, status classes).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::resources::{CLUSTER, SECRET};

#[derive(Default)]
pub struct Metrics {
    pub customers: AtomicU64,
    pub published: AtomicU64,
    pub functions: AtomicU64,
    pub routes_version: AtomicU64,
    pub routes: AtomicU64,
    pub route_fetches: AtomicU64,
    pub route_not_modified: AtomicU64,
    pub route_pages: AtomicU64,
    /// Route watches held now (streamed ones too).
    pub route_watchers: AtomicU64,
    /// Streamed watches begun, and the lines of changes they were sent.
    pub route_streams: AtomicU64,
    pub route_stream_lines: AtomicU64,
    /// Route watches by how they ended: changes, timeout, gone, refused.
    watches: [AtomicU64; 4],
    pub xds_streams: AtomicU64,
    /// Streams behind on their acknowledgements by more than the wait publication allows.
    pub xds_lagging: AtomicU64,
    /// Streams ended because their Envoy did not take what it was sent.
    pub xds_stalled: AtomicU64,
    /// Per type (cluster, secret, other): responses, ACKs, NACKs.
    xds: [[AtomicU64; 3]; 3],
    /// Per type: resources sent (an Envoy that reconnects with what it holds is sent none).
    xds_resources: [AtomicU64; 3],
    /// Per status class 2xx, 4xx, 5xx.
    api: [AtomicU64; 3],
    /// Custom domains stored.
    pub domains: AtomicU64,
    /// Certificate orders (ACME) by result: issued, failed.
    acme: [AtomicU64; 2],
}

#[derive(Clone, Copy)]
pub enum Watch {
    Changes = 0,
    Timeout = 1,
    Gone = 2,
    Refused = 3,
}

#[derive(Clone, Copy)]
pub enum Xds {
    Response = 0,
    Ack = 1,
    Nack = 2,
}

fn type_index(type_url: &str) -> usize {
    match type_url {
        CLUSTER => 0,
        SECRET => 1,
        _ => 2,
    }
}

impl Metrics {
    pub fn xds(&self, type_url: &str, what: Xds) {
        if let Some(c) = self.xds.get(type_index(type_url)).and_then(|t| t.get(what as usize)) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn xds_resources(&self, type_url: &str, sent: usize) {
        if let Some(c) = self.xds_resources.get(type_index(type_url)) {
            c.fetch_add(sent as u64, Relaxed);
        }
    }

    pub fn watch(&self, how: Watch) {
        if let Some(c) = self.watches.get(how as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn api(&self, status: u16) {
        let class = match status {
            500.. => 2,
            400.. => 1,
            _ => 0,
        };
        if let Some(c) = self.api.get(class) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn acme(&self, issued: bool) {
        if let Some(c) = self.acme.get(usize::from(!issued)) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Relaxed));
        };
        gauge(&mut out, "edgewise_control_customers", "Customers (customer clusters) stored.", &self.customers);
        gauge(
            &mut out,
            "edgewise_control_customers_published",
            "Customers every connected Envoy has acknowledged, whose functions are in the route table.",
            &self.published,
        );
        gauge(&mut out, "edgewise_control_functions", "Functions stored.", &self.functions);
        gauge(
            &mut out,
            "edgewise_control_route_table_version",
            "Version of the route table served.",
            &self.routes_version,
        );
        gauge(&mut out, "edgewise_control_routes", "Routes in the table served.", &self.routes);
        gauge(&mut out, "edgewise_control_xds_streams", "Connected ADS streams (Envoys).", &self.xds_streams);
        gauge(
            &mut out,
            "edgewise_control_xds_lagging_streams",
            "ADS streams that have not acknowledged their updates in time: publication does not wait for them.",
            &self.xds_lagging,
        );
        let _ = writeln!(
            out,
            "# HELP edgewise_control_xds_stalled_total ADS streams ended because their Envoy did not read its \
             updates.\n# TYPE edgewise_control_xds_stalled_total counter\nedgewise_control_xds_stalled_total {}",
            self.xds_stalled.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP edgewise_control_route_fetches_total Route table requests, by result.\n\
             # TYPE edgewise_control_route_fetches_total counter\n\
             edgewise_control_route_fetches_total{{result=\"ok\"}} {}\n\
             edgewise_control_route_fetches_total{{result=\"not_modified\"}} {}\n\
             # HELP edgewise_control_route_pages_total Pages of the route table sent.\n\
             # TYPE edgewise_control_route_pages_total counter\n\
             edgewise_control_route_pages_total {}",
            self.route_fetches.load(Relaxed),
            self.route_not_modified.load(Relaxed),
            self.route_pages.load(Relaxed)
        );
        gauge(&mut out, "edgewise_control_route_watchers", "Route watches held.", &self.route_watchers);
        let _ = writeln!(
            out,
            "# HELP edgewise_control_route_watches_total Route watches, by how they ended: changes sent, wait \
             over (304), cursor gone (410), refused past the bounds (429).\n\
             # TYPE edgewise_control_route_watches_total counter"
        );
        for (result, c) in ["changes", "timeout", "gone", "refused"].iter().zip(&self.watches) {
            let _ = writeln!(out, "edgewise_control_route_watches_total{{result=\"{result}\"}} {}", c.load(Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP edgewise_control_route_streams_total Streamed route watches begun, and the lines of changes \
             they were sent.\n# TYPE edgewise_control_route_streams_total counter\n\
             edgewise_control_route_streams_total {}\n\
             # TYPE edgewise_control_route_stream_lines_total counter\n\
             edgewise_control_route_stream_lines_total {}",
            self.route_streams.load(Relaxed),
            self.route_stream_lines.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP edgewise_control_xds_total xDS responses sent and the ACKs and NACKs they got, by type.\n\
             # TYPE edgewise_control_xds_total counter"
        );
        for (t, counters) in ["cluster", "secret", "other"].iter().zip(&self.xds) {
            for (what, c) in ["response", "ack", "nack"].iter().zip(counters) {
                let _ =
                    writeln!(out, "edgewise_control_xds_total{{type=\"{t}\",event=\"{what}\"}} {}", c.load(Relaxed));
            }
        }
        let _ = writeln!(
            out,
            "# HELP edgewise_control_xds_resources_total xDS resources sent, by type.\n\
             # TYPE edgewise_control_xds_resources_total counter"
        );
        for (t, c) in ["cluster", "secret", "other"].iter().zip(&self.xds_resources) {
            let _ = writeln!(out, "edgewise_control_xds_resources_total{{type=\"{t}\"}} {}", c.load(Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP edgewise_control_api_requests_total REST API requests, by status class.\n\
             # TYPE edgewise_control_api_requests_total counter"
        );
        for (class, c) in ["2xx", "4xx", "5xx"].iter().zip(&self.api) {
            let _ = writeln!(out, "edgewise_control_api_requests_total{{status=\"{class}\"}} {}", c.load(Relaxed));
        }
        gauge(&mut out, "edgewise_control_domains", "Custom domains stored.", &self.domains);
        let _ = writeln!(
            out,
            "# HELP edgewise_control_acme_orders_total Certificate orders for custom domains, by result.\n\
             # TYPE edgewise_control_acme_orders_total counter"
        );
        for (result, c) in ["issued", "failed"].iter().zip(&self.acme) {
            let _ = writeln!(out, "edgewise_control_acme_orders_total{{result=\"{result}\"}} {}", c.load(Relaxed));
        }
        out
    }
}
