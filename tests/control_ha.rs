//! edgewise-control highly available: three replicas on a real three-member etcd cluster (three
//! `etcd` processes on loopback). A write on any replica is on every replica; a match is taken
//! once however the writes race; the route table has the same versions everywhere, so a watch
//! moves between replicas with its cursor; a deleted customer's functions do not come back with
//! a new customer of its name; losing a replica (kill -9) or an etcd member loses no change; an
//! etcd without quorum refuses writes with 503 and, past a bound, the replicas say they are
//! stale.

use std::path::Path;
use std::time::{Duration, Instant};

use edgewise::control::{self, ControlService};
use edgewise::etcd::EtcdCluster;
use edgewise::scenarios::serverless::Pki;
use edgewise_control::ROUTES_PATH;
use serde_json::{json, Value};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgewise-control"))
}

const HOST: &str = "hello.ns-42.knative.customer-a.example";

fn label(i: usize) -> String {
    format!("0000000a-0000000b-{i:010x}")
}

/// A routes request: (status, cursor header, body).
async fn routes(c: &ControlService, query: &str) -> (u16, String, String) {
    c.routes_plain(query).await.unwrap()
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// The hosts of a replica's route table, sorted, and its cursor.
async fn table(c: &ControlService) -> (Vec<String>, String) {
    let (status, cursor, body) = routes(c, "").await;
    assert_eq!(status, 200, "{body}");
    let mut hosts: Vec<String> =
        json_of(&body)["routes"].as_array().unwrap().iter().map(|r| r["host"].as_str().unwrap().to_string()).collect();
    hosts.sort();
    (hosts, cursor)
}

/// Waits until every replica serves the same table (and cursor), which must be `hosts`.
async fn converged(replicas: &[&ControlService], hosts: &[String]) -> String {
    let start = Instant::now();
    loop {
        let mut seen = Vec::new();
        for r in replicas {
            seen.push(table(r).await);
        }
        if seen.iter().all(|s| s == &seen[0]) && seen[0].0 == hosts {
            return seen[0].1.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "replicas did not converge on {hosts:?}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn put_function(c: &ControlService, name: &str, i: usize, customer: &str, host: &str) -> (u16, Value) {
    let body = json!({ "match": control::function_match(&label(i)).unwrap(), "customer": customer, "host": host });
    c.call("PUT", &format!("/v1/functions/{name}"), Some(&body)).await.unwrap()
}

/// A customer whose routes are published (every replica acknowledged it), seen from `on`.
async fn published(on: &ControlService, name: &str) {
    let start = Instant::now();
    loop {
        let (status, body) = on.call("GET", &format!("/v1/customers/{name}"), None).await.unwrap();
        if status == 200 && body["published"] == true {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{name} not published: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Retries a write while etcd elects a leader (a member was just killed): its final answer.
async fn eventually(c: &ControlService, name: &str, i: usize, customer: &str, host: &str) -> (u16, Value) {
    let start = Instant::now();
    loop {
        let answer = put_function(c, name, i, customer, host).await;
        if answer.0 != 503 || start.elapsed() > Duration::from_secs(20) {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn three_replicas_on_etcd_share_every_change_and_survive_losing_a_replica_or_a_member() {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let mut etcd = EtcdCluster::start(&run.path().join("etcd"), 3).await.unwrap();
    let endpoints = etcd.endpoints();
    let start = |name: &'static str| {
        let (run, endpoints) = (run.path().to_path_buf(), endpoints.clone());
        async move {
            let stale = ["--etcd-stale-ms", "3000"];
            ControlService::start_replica(binary(), &run, &endpoints, name, (0, 0, 0), &stale).await.unwrap()
        }
    };
    let (mut r0, r1, r2) = (start("r0").await, start("r1").await, start("r2").await);
    let hosts = |n: usize| (0..n).map(|i| format!("f{i}.{HOST}")).collect::<Vec<_>>();

    // A customer put on one replica is published once every replica has acknowledged it; a
    // function put on another is then in every replica's table, under one cursor.
    r0.put_customer("customer-a", 9, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    published(&r2, "customer-a").await;
    let (status, body) = put_function(&r1, "f0", 0, "customer-a", &format!("f0.{HOST}")).await;
    assert_eq!(status, 201, "{body}");
    let cursor = converged(&[&r0, &r1, &r2], &hosts(1)).await;
    assert!(cursor.contains('.'), "{cursor}");
    let (status, listed) = r2.call("GET", "/v1/functions/f0", None).await.unwrap();
    assert_eq!((status, listed["host"].as_str()), (200, Some(format!("f0.{HOST}").as_str())));

    // A watch at that cursor moves to another replica: it gets the next change there, not 410.
    let (status, body) = put_function(&r2, "f1", 1, "customer-a", &format!("f1.{HOST}")).await;
    assert_eq!(status, 201, "{body}");
    for other in [&r0, &r1] {
        let (status, next, body) = routes(other, &format!("?since={cursor}&wait=10")).await;
        assert_eq!(status, 200, "{body}");
        let changes = json_of(&body)["changes"].as_array().unwrap().clone();
        assert_eq!(changes.len(), 1, "{body}");
        assert_eq!(changes[0]["put"]["host"], format!("f1.{HOST}"));
        assert_ne!(next, cursor);
    }
    let cursor = converged(&[&r0, &r1, &r2], &hosts(2)).await;

    // One match, two functions, two replicas at once: exactly one of them gets it.
    let f2 = format!("f2.{HOST}");
    let (a, b) = tokio::join!(
        put_function(&r0, "dup-a", 7, "customer-a", &f2),
        put_function(&r1, "dup-b", 7, "customer-a", &f2)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409], "{a:?} {b:?}");
    converged(&[&r0, &r1, &r2], &hosts(3)).await;
    let loser = if a.0 == 409 { "dup-a" } else { "dup-b" };
    assert_eq!(r2.call("GET", &format!("/v1/functions/{loser}"), None).await.unwrap().0, 404);

    // A function of a customer that does not exist is refused by the store itself.
    let (status, body) = put_function(&r2, "ghost", 8, "customer-z", "ghost.example").await;
    assert_eq!((status, body["field"].as_str()), (400, Some("customer")), "{body}");

    // A deleted customer's functions leave every table, and do not come back with a new
    // customer of the same name.
    let (status, body) = r2.call("DELETE", "/v1/customers/customer-a", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    converged(&[&r0, &r1, &r2], &[]).await;
    r1.put_customer("customer-a", 9, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    published(&r0, "customer-a").await;
    assert_eq!(table(&r0).await.0, Vec::<String>::new(), "the old functions stay gone");
    assert_eq!(r0.call("GET", "/v1/functions", None).await.unwrap().1["functions"], json!([]));
    // Their matches are free again.
    let (status, body) = put_function(&r0, "f0", 0, "customer-a", &format!("f0.{HOST}")).await;
    assert_eq!(status, 201, "{body}");
    converged(&[&r0, &r1, &r2], &hosts(1)).await;
    let _ = cursor;

    // Whatever another writer leaves under the prefix (bytes that are not JSON, not UTF-8, keys
    // of no collection, a function under a generation that is not its customer's, a publication
    // of no customer, a customer whose CA is no certificate): skipped, and nothing else changes.
    let orphan = json!({ "key": "x", "generation": 1, "function": { "match": control::function_match(&label(40)).unwrap(), "customer": "customer-a", "host": "orphan.example" } });
    let bad_customer = json!({ "address": "127.0.0.1:9", "ca": "not a certificate", "san": "x.example" });
    for (key, value) in [
        (&b"/edgewise/functions/junk"[..], &b"\xff\x00 not json"[..]),
        (b"/edgewise/customers/bad", b"{"),
        (b"/edgewise/customers/no-ca", bad_customer.to_string().as_bytes()),
        (b"/edgewise/acks/no-slash", b""),
        (b"/edgewise/\xff\xfe", b"x"),
        (b"/edgewise/nothing", b"x"),
        (b"/edgewise/published/ghost", b""),
        (b"/edgewise/functions/orphan", orphan.to_string().as_bytes()),
        (b"/edgewise/functions/00/orphan", orphan.to_string().as_bytes()),
    ] {
        etcd.put_raw(key, value).await.unwrap();
    }
    let (status, body) = put_function(&r0, "f9", 9, "customer-a", &format!("f9.{HOST}")).await;
    assert_eq!(status, 201, "{body}");
    let mut with_f9 = hosts(1);
    with_f9.push(format!("f9.{HOST}"));
    converged(&[&r0, &r1, &r2], &with_f9).await;
    let (status, listed) = r1.call("GET", "/v1/customers", None).await.unwrap();
    let names: Vec<&str> = listed["customers"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!((status, names), (200, vec!["customer-a"]), "{listed}");
    assert_eq!(r2.call("GET", "/v1/functions/orphan", None).await.unwrap().0, 404);
    let (status, body) = r2.call("DELETE", "/v1/functions/f9", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let before_kill = converged(&[&r0, &r1, &r2], &hosts(1)).await;

    // kill -9 a replica: the others go on taking and serving changes.
    r0.kill().await.unwrap();
    let (status, body) = put_function(&r1, "f1", 1, "customer-a", &format!("f1.{HOST}")).await;
    assert_eq!(status, 201, "{body}");
    converged(&[&r1, &r2], &hosts(2)).await;

    // An etcd member killed: writes go on (once a leader is elected, if it was the leader).
    etcd.kill(0).await;
    let (status, body) = eventually(&r2, "f2", 2, "customer-a", &format!("f2.{HOST}")).await;
    assert_eq!(status, 201, "{body}");
    converged(&[&r1, &r2], &hosts(3)).await;

    // Both back: the restarted replica catches up, and a cursor of before its death continues
    // on it with the changes it missed (no whole-table fetch).
    etcd.restart(0).await.unwrap();
    r0.start_again().await.unwrap();
    r0.ready(Duration::from_secs(30)).await.unwrap();
    converged(&[&r0, &r1, &r2], &hosts(3)).await;
    let (status, _, body) = routes(&r0, &format!("?since={before_kill}")).await;
    assert_eq!(status, 200, "{body}");
    let missed = json_of(&body);
    let missed: Vec<&str> =
        missed["changes"].as_array().unwrap().iter().filter_map(|c| c["put"]["host"].as_str()).collect();
    assert_eq!(missed, [format!("f1.{HOST}"), format!("f2.{HOST}")], "{body}");

    // etcd compacted: a replica starting now loads the store at its current revision (the
    // history it would replay is gone); a cursor older than that is refused there (410: the
    // filter loads the table once), while the running replicas still serve it from memory.
    etcd.compact().await.unwrap();
    let mut r3 = start("r3").await;
    assert_eq!(table(&r3).await.0, hosts(3), "the same table (at a later version: the store's)");
    assert_eq!(routes(&r3, &format!("?since={before_kill}")).await.0, 410);
    assert_eq!(routes(&r1, &format!("?since={before_kill}")).await.0, 200);
    r3.kill().await.unwrap();

    // Idle past the staleness bound (3 s here): a replica that reaches etcd stays ready.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for r in [&r0, &r1, &r2] {
        assert_eq!(r.get("/readyz").await.unwrap(), (200, "ready\n".to_string()));
    }

    // etcd without a leader (two members down long enough for the third to know it has none:
    // it refuses at once), one member started again 300 ms after a write is sent: the write
    // waits for the election, and is taken.
    etcd.kill(1).await;
    etcd.kill(2).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (f3, sent) = (format!("f3.{HOST}"), Instant::now());
    let ((status, body), restarted) = tokio::join!(put_function(&r1, "f3", 3, "customer-a", &f3), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        etcd.restart(1).await
    });
    restarted.unwrap();
    assert_eq!(status, 201, "a write made while etcd had no leader, answered after {:?}: {body}", sent.elapsed());
    converged(&[&r0, &r1, &r2], &hosts(4)).await;

    // etcd without quorum: writes are refused with 503 (once the wait for an election is over)
    // and nothing changes; the routes held are served until the bound, then the replica says it
    // is stale.
    etcd.kill(1).await;
    etcd.kill(2).await;
    assert_eq!(table(&r1).await.0, hosts(4), "the table held is served");
    let (status, body) = r1.call("GET", "/v1/customers/customer-a", None).await.unwrap();
    assert_eq!((status, body["published"].as_bool()), (200, Some(true)), "reads are served from memory: {body}");
    let (status, body) = put_function(&r1, "f4", 4, "customer-a", &format!("f4.{HOST}")).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("store_unavailable")), "{body}");
    let start = Instant::now();
    loop {
        let (status, body) = r1.get("/readyz").await.unwrap();
        if status == 503 {
            assert!(body.contains("etcd unreachable"), "{body}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "/readyz stayed {status} {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, _, body) = routes(&r1, "").await;
    assert_eq!(status, 503, "{body}");
    etcd.stop().await;
}

/// A function of customer-a as the ingress serves it: its public host and its Knative host.
fn ingress_host(i: usize) -> String {
    format!("{}.serverless.gitlab.io", label(i))
}

fn knative_host(i: usize) -> String {
    format!("f{i}.ns-1.knative.customer-a.example")
}

/// The function the writer moves from host to host.
const MOVING: usize = 0xffff;

fn moving_host(i: usize) -> String {
    format!("moving-{i}.ns-1.knative.customer-a.example")
}

/// The replicas' xDS streams: which replica holds the Envoy's ADS stream.
async fn streams(replicas: &[&ControlService]) -> Vec<f64> {
    let mut out = Vec::new();
    for r in replicas {
        out.push(r.metric("edgewise_control_xds_streams").await.unwrap_or(-1.0));
    }
    out
}

/// envoy/serverless-xds.yaml, its xds and control clusters on three replicas on etcd. Under
/// traffic and a steady stream of REST changes, spread over the replicas: kill -9 the replica
/// the Envoy's ADS stream is on, then etcd's leader (the writes go on through the election),
/// then start both again. No request fails,
/// the ADS stream moves to another replica, the filter's route watch goes on without a full
/// load or a 410, and every change the API acknowledged reaches traffic.
#[tokio::test]
async fn an_envoy_on_three_replicas_loses_no_request_and_no_change_when_its_replica_and_an_etcd_member_die() {
    use edgewise::client::Load;
    use edgewise::envoy::{stat, Config, Envoy};
    use edgewise::scenarios::serverless::{self as sl, ports};

    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let mut etcd = EtcdCluster::start(&run.path().join("etcd"), 3).await.unwrap();
    let endpoints = etcd.endpoints();
    let mut replicas = Vec::new();
    for name in ["r0", "r1", "r2"] {
        let mut args = control::xds_tls(run.path());
        args.extend(["--removal-delay-ms", "1500", "--etcd-stale-ms", "3000"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        replicas.push(
            ControlService::start_replica(binary(), run.path(), &endpoints, name, (0, 0, 0), &args).await.unwrap(),
        );
    }
    let mut config = Config::shipped("serverless-xds").run_dir(run.path()).port(ports::FRONT, 0);
    for (k, r) in replicas.iter().enumerate() {
        let k = k as u16;
        config = config.port(control::GRPC_PORT + k, r.grpc).port(control::ROUTES_PORT + k, r.routes_port());
    }
    let envoy = Envoy::start(&config).await.unwrap();
    let front = envoy.listener("serverless_https").await.unwrap();
    let client = pki.front_client(false).unwrap().sni(sl::INLINE_HOST);
    let gateway =
        sl::gateway("customer-a", 0, &sl::gateway_leaf(&pki.customer_a_ca, "customer-a").unwrap(), &pki.platform_ca)
            .await
            .unwrap();

    // customer-a and its first function, through one replica; traffic once it is published.
    let r = |k: usize| &replicas[k];
    r(0).put_customer("customer-a", gateway.port(), &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    let (status, body) = put_function(r(0), "f0", 0, "customer-a", &knative_host(0)).await;
    assert_eq!(status, 201, "{body}");
    let serves = |i: usize| {
        let client = client.clone();
        async move {
            let response = client.get(front, &ingress_host(i), "/").await.unwrap();
            response.status == 200 && response.json()["host"] == knative_host(i)
        }
    };
    // Until the customer is published (every replica's Envoys hold its cluster), the function
    // is unknown (404; 503 route_table_unavailable while the filter's first load runs), never
    // routed to a cluster the Envoy lacks (503 unknown_cluster): the publication rule across
    // replicas.
    let start = Instant::now();
    loop {
        let response = client.get(front, &ingress_host(0), "/").await.unwrap();
        if response.status == 200 && response.json()["host"] == knative_host(0) {
            break;
        }
        let loading = response.status == 503 && response.text().contains("route_table_unavailable");
        assert!(response.status == 404 || loading, "before publication: {} {}", response.status, response.text());
        assert!(start.elapsed() < Duration::from_secs(30), "f0 never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (full_loads, gone) =
        (stat("edgewise.serverless.table.full_loads"), stat("edgewise.serverless.management_fetch.gone"));
    let before = envoy.stats().await.unwrap();
    let loads_before = before.get(&full_loads).copied().unwrap_or(0);
    assert!(loads_before >= 1, "the table was loaded once at start");

    // Traffic, and a writer deploying a function every 100 ms on the replicas in turn, and
    // moving one function (`MOVING`) to a new Knative host each time: in the end it must be
    // served at the last host acknowledged (no change lost, applied twice or out of order).
    let load = Load::start(&client, front, &ingress_host(0), 4, 200);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let ports: Vec<u16> = replicas.iter().map(|r| r.http).collect();
        tokio::spawn(async move {
            let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
            let mut moved = None;
            let mut i = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let port = ports[i % ports.len()];
                let body = json!({ "match": control::function_match(&label(i)).unwrap(), "customer": "customer-a", "host": knative_host(i) });
                let auth = format!("Bearer {}", control::DEMO_TOKEN);
                let answer = edgewise::service::Service::exchange_on(
                    port,
                    "PUT",
                    &format!("/v1/functions/f{i}"),
                    &[("authorization", &auth)],
                    &body.to_string(),
                )
                .await;
                match answer {
                    Ok((201, _, _)) => acknowledged.push(i),
                    Ok((status, _, body)) => refused.push((port, format!("f{i}: {status} {body}"))),
                    Err(e) => refused.push((port, format!("f{i}: {e}"))),
                }
                let body = json!({ "match": control::function_match(&label(MOVING)).unwrap(), "customer": "customer-a", "host": moving_host(i) });
                let answer = edgewise::service::Service::exchange_on(
                    port,
                    "PUT",
                    "/v1/functions/moving",
                    &[("authorization", &auth)],
                    &body.to_string(),
                )
                .await;
                match answer {
                    Ok((200 | 201, _, _)) => moved = Some(i),
                    Ok((status, _, body)) => refused.push((port, format!("moving {i}: {status} {body}"))),
                    Err(e) => refused.push((port, format!("moving {i}: {e}"))),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (acknowledged, refused, moved, i - 1)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // kill -9 the replica holding the ADS stream: another one holds it within seconds.
    let held = streams(&replicas.iter().collect::<Vec<_>>()).await;
    let victim = held.iter().position(|n| *n >= 1.0).unwrap_or_else(|| panic!("no replica holds the stream: {held:?}"));
    replicas[victim].kill().await.unwrap();
    let others: Vec<usize> = (0..3).filter(|k| *k != victim).collect();
    let killed = Instant::now();
    let heir = loop {
        let held = streams(&others.iter().map(|k| &replicas[*k]).collect::<Vec<_>>()).await;
        if let Some(k) = held.iter().position(|n| *n >= 1.0) {
            eprintln!("the ADS stream moved to another replica {:?} after the kill", killed.elapsed());
            break others[k];
        }
        assert!(killed.elapsed() < Duration::from_secs(15), "no other replica took the ADS stream: {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The Envoy said what it holds; the same versions on every replica: nothing was sent again.
    for kind in ["cluster", "secret"] {
        let series = format!("edgewise_control_xds_resources_total{{type=\"{kind}\"}}");
        let sent = replicas[heir].metric(&series).await.unwrap();
        assert_eq!(sent, 0.0, "{kind}s sent again by the replica that took the stream");
    }

    // etcd's leader (the others elect another while the writes go on), then both back.
    let leader = etcd.leader().await.unwrap();
    etcd.kill(leader).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.restart(leader).await.unwrap();
    replicas[victim].start_again().await.unwrap();
    replicas[victim].ready(Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acknowledged, refused, moved, tried) = writer.await.unwrap();
    let (ok, failed) = load.stop().await;
    eprintln!("{ok} requests, {failed} failed; {} of {tried} changes acknowledged", acknowledged.len());
    assert_eq!(failed, 0, "no request fails");
    assert!(ok > 100, "traffic flowed: {ok}");
    // Only the dead replica refused changes: an etcd member down is no error for the others.
    let elsewhere: Vec<&String> =
        refused.iter().filter(|(port, _)| *port != replicas[victim].http).map(|(_, what)| what).collect();
    assert!(elsewhere.is_empty(), "changes refused by live replicas: {elsewhere:?}");
    assert!(acknowledged.len() * 2 > tried, "most changes were acknowledged: {} of {tried}", acknowledged.len());

    // Every acknowledged change reaches traffic, each function under its own host.
    let start = Instant::now();
    for &i in &acknowledged {
        while !serves(i).await {
            assert!(start.elapsed() < Duration::from_secs(30), "f{i}, acknowledged, never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let last = moving_host(moved.expect("a move acknowledged"));
    let start = Instant::now();
    loop {
        let response = client.get(front, &ingress_host(MOVING), "/").await.unwrap();
        if response.status == 200 && response.json()["host"] == last.as_str() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the moving function is not at {last}: {}", response.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same table on every replica (their route ports, over mutual TLS as Envoy reads it),
    // holding every acknowledged function once. Writes answered 503 during the etcd election
    // may still have committed: they are served like the others.
    let hosts_of = |body: &str| {
        let mut hosts: Vec<String> = json_of(body)["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["host"].as_str().unwrap().to_string())
            .collect();
        hosts.sort();
        hosts
    };
    let mut tables = Vec::new();
    for r in &replicas {
        let (status, body) = r.routes_get(&pki.control_ca, ROUTES_PATH).await.unwrap();
        assert_eq!(status, 200, "{body}");
        tables.push(hosts_of(&body));
    }
    assert!(tables.iter().all(|t| t == &tables[0]), "the replicas' tables differ");
    let mut once = tables[0].clone();
    once.dedup();
    assert_eq!(once, tables[0], "one route per function");
    for i in std::iter::once(0).chain(acknowledged.iter().copied()) {
        assert!(tables[0].contains(&knative_host(i)), "f{i} missing from the table");
    }
    let after = envoy.stats().await.unwrap();
    assert_eq!(after.get(&full_loads).copied().unwrap_or(0), loads_before, "no full load of the table on failover");
    assert_eq!(after.get(&gone).copied().unwrap_or(0), 0, "no cursor refused (410) on failover");

    // etcd without quorum, past the replicas' staleness bound (3 s here): they refuse to serve
    // the route table, and traffic goes on from what the Envoy holds.
    let load = Load::start(&client, front, &ingress_host(0), 4, 200);
    etcd.kill(0).await;
    etcd.kill(2).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(replicas[heir].get("/readyz").await.unwrap().0, 503, "stale");
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "traffic during the etcd outage");
    assert!(ok > 100, "traffic flowed: {ok}");
    assert!(serves(acknowledged[0]).await, "a function still routed to its host");
    etcd.stop().await;
}

/// etcd as a real deployment has it: its client port over TLS, client certificates required.
/// A replica with etcd's CA and a client certificate of it works; one without a client
/// certificate, or one not trusting etcd's CA, does not start, and says why.
#[tokio::test]
async fn a_replica_reaches_etcd_over_mutual_tls_and_refuses_to_start_without_it() {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let mut etcd = EtcdCluster::start_tls(&run.path().join("etcd"), 1).await.unwrap();
    let endpoints = etcd.endpoints();
    assert!(endpoints.starts_with("https://"), "{endpoints}");
    let tls = etcd.tls.as_ref().unwrap();
    let (ca, cert, key) = (tls.ca_file(), tls.cert_file(), tls.key_file());
    let path = |p: &std::path::PathBuf| p.display().to_string();
    let good = ["--etcd-ca", &path(&ca), "--etcd-cert", &path(&cert), "--etcd-key", &path(&key)];
    let r = ControlService::start_replica(binary(), run.path(), &endpoints, "tls", (0, 0, 0), &good).await.unwrap();
    r.put_customer("customer-a", 9, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    published(&r, "customer-a").await;
    let (status, body) = put_function(&r, "f0", 0, "customer-a", &format!("f0.{HOST}")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(table(&r).await.0, [format!("f0.{HOST}")]);

    // Without a client certificate, or trusting another CA: no start, and the log says etcd.
    let other = run.path().join("other-ca.crt");
    std::fs::write(&other, &pki.control_ca.pem).unwrap();
    for (name, args) in [
        ("no-cert", vec!["--etcd-ca", &path(&ca)]),
        (
            "other-ca",
            vec!["--etcd-ca", other.to_str().unwrap(), "--etcd-cert", &path(&cert), "--etcd-key", &path(&key)],
        ),
    ] {
        let started = tokio::time::timeout(
            Duration::from_secs(60),
            ControlService::start_replica(binary(), run.path(), &endpoints, name, (0, 0, 0), &args),
        )
        .await;
        assert!(!matches!(started, Ok(Ok(_))), "{name}: started");
        let log = std::fs::read_to_string(run.path().join(format!("control-{name}.log"))).unwrap_or_default();
        assert!(log.contains("--etcd"), "{name}: the log names the etcd connection: {log}");
    }
    etcd.stop().await;
}
