//! The route watch of a real `edgewise-control` against its protocol (docs/serverless-control.md,
//! "The route watch"): the whole table with its cursor; the changes after a cursor, in order,
//! held until there is one or `wait` runs out (304); 410 for a cursor it cannot serve from (too
//! old, ahead, of another store, garbage), and a watch that resumes across a restart; bounded
//! watches (429 past them), and a watcher that never reads (a watch or a stream) dropped at a
//! timeout. The route port is plain here (the service without TLS): this is the protocol's test;
//! serverless_control.rs has the port's mutual TLS.

use std::path::Path;
use std::time::{Duration, Instant};

use edgewise::control::{self, ControlService};
use edgewise::flood::{self, source};
use edgewise::scenarios::serverless::Pki;
use edgewise_control::{CURSOR, ROUTES_PATH};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgewise-control"))
}

const LABEL: &str = "0000000a-0000000b-000000000c";
const HOST: &str = "hello.ns-42.knative.customer-a.example";

async fn start(run: &Path, db: &str) -> (Pki, ControlService) {
    let pki = Pki::install(run).unwrap();
    let control = ControlService::start_plain(binary(), run, &run.join(db), (0, 0, 0), &[]).await.unwrap();
    (pki, control)
}

/// A routes request: (status, cursor header, body).
async fn routes(c: &ControlService, query: &str) -> (u16, String, String) {
    c.routes_plain(query).await.unwrap()
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[tokio::test]
async fn the_route_watch_sends_what_changed_after_a_cursor_and_resumes_across_a_restart() {
    let run = tempfile::tempdir().unwrap();
    let (pki, mut c) = start(run.path(), "control.db").await;

    let (status, c0, body) = routes(&c, "").await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["routes"], Value::Array(Vec::new()));
    assert!(c0.contains('.'), "a cursor: {c0:?}");

    // Changes after the cursor, in order, under a new cursor.
    c.put_customer("customer-a", 9, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    c.put_function("hello", LABEL, "customer-a", HOST).await.unwrap();
    let (status, c1, body) = routes(&c, &format!("?since={c0}")).await;
    assert_eq!(status, 200, "{body}");
    let put = &json(&body)["changes"];
    assert_eq!(put.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(put[0]["put"]["host"], HOST);
    assert_eq!(put[0]["put"]["cluster"], "customer-a");
    assert_eq!(put[0]["put"]["match"], control::function_match(LABEL).unwrap());
    assert_ne!(c1, c0);
    // The whole table says the same, and names the same cursor.
    let (_, full_cursor, full) = routes(&c, "").await;
    assert_eq!(full_cursor, c1);
    assert_eq!(json(&full)["routes"][0], put[0]["put"]);

    // A watch held at the current cursor is answered as soon as a change comes.
    let watch = {
        let c1 = c1.clone();
        let http = c.routes_port();
        tokio::spawn(async move {
            let (status, fields, body) = edgewise::service::Service::exchange_on(
                http,
                "GET",
                &format!("{ROUTES_PATH}?since={c1}&wait=20"),
                &[],
                "",
            )
            .await
            .unwrap();
            let cursor = fields.iter().find(|(k, _)| k == CURSOR).map(|(_, v)| v.clone()).unwrap_or_default();
            (status, cursor, body, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!watch.is_finished(), "the watch waits for a change");
    let deleted = Instant::now();
    let (status, _) = c.call("DELETE", "/v1/functions/hello", None).await.unwrap();
    assert_eq!(status, 200);
    let (status, c2, body, answered) = watch.await.unwrap();
    let latency = answered.duration_since(deleted);
    eprintln!("a held watch answered {latency:?} after the change");
    assert!(latency < Duration::from_millis(100), "answered {latency:?} after the change");
    assert_eq!(status, 200);
    assert_eq!(json(&body)["changes"][0]["delete"]["match"], control::function_match(LABEL).unwrap());

    // No change within `wait`: 304, the same cursor.
    let waited = Instant::now();
    let (status, cursor, body) = routes(&c, &format!("?since={c2}&wait=1")).await;
    assert_eq!((status, cursor.as_str(), body.as_str()), (304, c2.as_str(), ""));
    assert!(waited.elapsed() >= Duration::from_millis(950), "answered after {:?}", waited.elapsed());

    // A restart keeps the history: cursors from before it still work.
    c.stop().await.unwrap();
    c.start_again().await.unwrap();
    c.ready(Duration::from_secs(10)).await.unwrap();
    let (status, cursor, body) = routes(&c, &format!("?since={c1}")).await;
    assert_eq!((status, cursor.as_str()), (200, c2.as_str()), "{body}");
    assert!(json(&body)["changes"][0].get("delete").is_some(), "{body}");
    assert_eq!(routes(&c, &format!("?since={c2}")).await.0, 304);

    // Cursors it cannot serve from: 410, the whole table to fetch.
    let (history, version) = c2.split_once('.').unwrap();
    let ahead = format!("{history}.{}", version.parse::<u64>().unwrap() + 1);
    let other = format!("{:x}.1", u64::from_str_radix(history, 16).unwrap() ^ 1);
    // Only the form the service writes is a cursor: the same values signed, in uppercase or
    // with a leading zero are not.
    let signed = format!("+{history}.+{version}");
    let upper = format!("{}.{version}", history.to_uppercase());
    let zero = format!("0{history}.{version}");
    for cursor in [ahead.as_str(), other.as_str(), "garbage", "", "%ff%00", &signed, &upper, &zero] {
        let (status, _, body) = routes(&c, &format!("?since={cursor}")).await;
        assert_eq!(status, 410, "{cursor:?}: {body}");
        assert_eq!(json(&body)["error"], "gone");
    }
    // Another store has another history.
    let other_run = tempfile::tempdir().unwrap();
    let (_, other) = start(other_run.path(), "other.db").await;
    let (status, _, body) = routes(&other, &format!("?since={c1}")).await;
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("another history"), "{body}");
    assert_eq!(routes(&c, "?since=x&wait=soon").await.0, 400);

    let metric = |result: &str| format!("edgewise_control_route_watches_total{{result=\"{result}\"}}");
    assert!(c.metric(&metric("changes")).await.unwrap() >= 1.0);
    assert!(c.metric(&metric("timeout")).await.unwrap() >= 1.0);
    assert!(c.metric(&metric("gone")).await.unwrap() >= 8.0);
}

/// A streamed watch (`&stream=1`): 200 at once, then each change as a line (with its cursor) as
/// soon as it is made, a line with no change after `wait` with nothing to send; counted among the
/// watches held while it lasts. A cursor it cannot serve from is a 410, as for a plain watch.
#[tokio::test]
async fn a_streamed_watch_sends_each_change_as_a_line_and_a_line_with_none_after_wait() {
    let run = tempfile::tempdir().unwrap();
    let (pki, c) = start(run.path(), "control.db").await;
    let (_, c0, _) = routes(&c, "").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", c.routes_port())).await.unwrap();
    let request = format!("GET {ROUTES_PATH}?since={c0}&wait=1&stream=1 HTTP/1.1\r\nhost: control\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let head = read_until(&mut s, &mut got, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/x-ndjson"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(c.metric("edgewise_control_route_watchers").await.unwrap(), 1.0, "held while it lasts");

    c.put_customer("customer-a", 9, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    let put = Instant::now();
    c.put_function("hello", LABEL, "customer-a", HOST).await.unwrap();
    let line = json(&next_line(&mut s, &mut got).await);
    eprintln!("a streamed line {:?} after the change", put.elapsed());
    assert!(put.elapsed() < Duration::from_millis(200), "{:?}", put.elapsed());
    assert_eq!(line["changes"][0]["put"]["host"], HOST, "{line}");
    let c1 = line["cursor"].as_str().unwrap().to_string();
    assert_eq!(line["version"].as_u64().map(|v| v.to_string()), c1.split_once('.').map(|(_, v)| v.to_string()));
    // The whole table names the same cursor.
    assert_eq!(routes(&c, "").await.1, c1);

    // Nothing for `wait` (1 s): a line with no change at the same cursor.
    let quiet = Instant::now();
    let beat = json(&next_line(&mut s, &mut got).await);
    assert!(quiet.elapsed() >= Duration::from_millis(900), "{:?}", quiet.elapsed());
    assert_eq!((beat["cursor"].as_str(), beat["changes"].as_array().map(Vec::len)), (Some(c1.as_str()), Some(0)));

    let (status, _) = c.call("DELETE", "/v1/functions/hello", None).await.unwrap();
    assert_eq!(status, 200);
    let line = json(&next_line(&mut s, &mut got).await);
    assert_eq!(line["changes"][0]["delete"]["match"], control::function_match(LABEL).unwrap(), "{line}");
    assert_ne!(line["cursor"].as_str(), Some(c1.as_str()));

    drop(s);
    let closed = Instant::now();
    while c.metric("edgewise_control_route_watchers").await.unwrap() != 0.0 {
        assert!(closed.elapsed() < Duration::from_secs(5), "the stream is still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.metric("edgewise_control_route_streams_total").await.unwrap(), 1.0);
    assert_eq!(c.metric("edgewise_control_route_stream_lines_total").await.unwrap(), 2.0);
    // What a plain watch refuses, a streamed one refuses the same way.
    assert_eq!(routes(&c, "?since=garbage&stream=1").await.0, 410);
    assert_eq!(routes(&c, &format!("?since={c1}&stream=yes")).await.0, 400);
}

/// Reads from `s` into `got` until `end`: what came before it (taken out of `got`).
async fn read_until(s: &mut tokio::net::TcpStream, got: &mut Vec<u8>, end: &[u8]) -> Vec<u8> {
    loop {
        if let Some(at) = got.windows(end.len()).position(|w| w == end) {
            let before = got[..at].to_vec();
            got.drain(..at + end.len());
            return before;
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended");
        got.extend_from_slice(&buf[..n]);
    }
}

/// The next line of a chunked stream of lines (each line its own chunk, as the service writes).
async fn next_line(s: &mut tokio::net::TcpStream, got: &mut Vec<u8>) -> String {
    let size = read_until(s, got, b"\r\n").await;
    let size = usize::from_str_radix(std::str::from_utf8(&size).unwrap(), 16).unwrap();
    let chunk = read_until(s, got, b"\r\n").await;
    assert_eq!(chunk.len(), size);
    let line = String::from_utf8(chunk).unwrap();
    assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "one line a chunk: {line:?}");
    line
}

/// Pages cover the table once, and a page token names a position that a restart keeps (as
/// would another replica on the same store): paging goes on where it was.
#[tokio::test]
async fn pages_cover_the_table_once_and_a_token_outlives_a_restart() {
    let run = tempfile::tempdir().unwrap();
    let (pki, mut c) = start(run.path(), "control.db").await;
    c.put_customer("customer-a", 9, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    for i in 0..25 {
        c.put_function(&format!("f{i}"), &format!("{i:08x}-0000000b-000000000c"), "customer-a", HOST).await.unwrap();
    }
    let page = |body: &str| {
        let v = json(body);
        let projects: Vec<String> =
            v["routes"].as_array().unwrap().iter().map(|r| r["match"]["project"].as_str().unwrap().into()).collect();
        (projects, v["next"].as_str().map(str::to_string))
    };
    let (mut seen, mut after, mut tokens) = (Vec::new(), String::new(), Vec::new());
    loop {
        let (status, cursor, body) = routes(&c, &format!("?limit=10{after}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(cursor.ends_with(".25"), "{cursor}");
        let (projects, next) = page(&body);
        assert!(projects.len() <= 10, "{body}");
        seen.extend(projects);
        match next {
            Some(token) => {
                assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()), "{token:?}");
                after = format!("&after={token}");
                tokens.push(token);
            }
            None => break,
        }
    }
    assert_eq!(tokens.len(), 2);
    seen.sort();
    let all: Vec<String> = (0..25).map(|i| format!("{i:08x}")).collect();
    assert_eq!(seen, all, "every route once");

    let (_, _, before) = routes(&c, &format!("?limit=10&after={}", tokens[0])).await;
    c.stop().await.unwrap();
    c.start_again().await.unwrap();
    c.ready(Duration::from_secs(10)).await.unwrap();
    let (status, _, after_restart) = routes(&c, &format!("?limit=10&after={}", tokens[0])).await;
    assert_eq!((status, page(&after_restart)), (200, page(&before)), "the same page after a restart");

    let upper = tokens.iter().find(|t| t.bytes().any(|b| b.is_ascii_alphabetic())).unwrap().to_uppercase();
    let signed = format!("+{}", &tokens[0][1..]);
    for bad in ["zz", "6b3234", "%ff%00", "0123456789abcdefg", "", &upper, &signed] {
        let (status, _, body) = routes(&c, &format!("?limit=10&after={bad}")).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
    }
    for bad in ["ten", "+10", "-1", "0x10", ""] {
        assert_eq!(routes(&c, &format!("?limit={bad}")).await.0, 400, "limit={bad}");
    }
}

#[tokio::test]
async fn route_watches_are_bounded_and_a_watcher_that_never_reads_is_dropped() {
    let run = tempfile::tempdir().unwrap();
    let (pki, c) = start(run.path(), "control.db").await;
    let (_, cursor, _) = routes(&c, "").await;
    let request = format!("GET {ROUTES_PATH}?since={cursor}&wait=30 HTTP/1.1\r\nhost: control\r\n\r\n");

    // One address holds 8 watches at most; they never read what they are sent.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = flood::connect_from(source(2), c.routes_port()).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        held.push(s);
    }
    let start = Instant::now();
    while c.metric("edgewise_control_route_watchers").await.unwrap() != 8.0 {
        assert!(start.elapsed() < Duration::from_secs(5), "8 watches not held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ninth = flood::connect_from(source(2), c.routes_port()).await.unwrap();
    ninth.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(1), ninth.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 429") && answer.contains("too_many_watches"), "{answer}");
    // Another address (a gateway) still watches.
    let (status, _, _) = routes(&c, &format!("?since={cursor}&wait=1")).await;
    assert_eq!(status, 304);
    assert_eq!(c.metric("edgewise_control_route_watches_total{result=\"refused\"}").await.unwrap(), 1.0);

    // A change answers them all; they never read it nor ask again: the service closes them at
    // its header timeout (10 s), and holds nothing for them.
    c.put_customer("customer-a", 9, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    c.put_function("hello", LABEL, "customer-a", HOST).await.unwrap();
    let changed = Instant::now();
    let mut closed = 0;
    for s in &mut held {
        let mut all = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut all)).await;
        assert!(read.is_ok(), "a watcher that never reads is still connected after 15 s");
        assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"), "{all:?}");
        closed += 1;
    }
    eprintln!("{closed} watchers that never read closed {:?} after the change", changed.elapsed());
    assert_eq!(c.metric("edgewise_control_route_watchers").await.unwrap(), 0.0);
}

/// A streamed watcher that stops reading (a hung gateway) holds nothing queued in the service:
/// once its socket is full the service stops making its lines, keeps streaming to the others,
/// and closes it at the idle timeout (60 s of no byte moving), which frees its watch.
#[tokio::test]
async fn a_streamed_watcher_that_never_reads_is_dropped_at_the_idle_timeout_and_the_others_go_on() {
    let run = tempfile::tempdir().unwrap();
    let (pki, c) = start(run.path(), "control.db").await;
    c.put_customer("customer-a", 9, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    let (_, cursor, _) = routes(&c, "").await;
    let request = format!("GET {ROUTES_PATH}?since={cursor}&wait=1&stream=1 HTTP/1.1\r\nhost: control\r\n\r\n");

    // The stalled watcher: a small receive buffer, never read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind((source(4), 0).into()).unwrap();
    let mut stalled = socket.connect(([127, 0, 0, 1], c.routes_port()).into()).await.unwrap();
    stalled.write_all(request.as_bytes()).await.unwrap();
    // The healthy one reads every line as it comes.
    let mut healthy = flood::connect_from(source(3), c.routes_port()).await.unwrap();
    healthy.write_all(request.as_bytes()).await.unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = tokio::spawn({
        let read = read.clone();
        async move {
            let mut got = Vec::new();
            read_until(&mut healthy, &mut got, b"\r\n\r\n").await;
            loop {
                let line = json(&next_line(&mut healthy, &mut got).await);
                read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if lines_tx.send(line).is_err() {
                    return;
                }
            }
        }
    });
    let start = Instant::now();
    while c.metric("edgewise_control_route_watchers").await.unwrap() != 2.0 {
        assert!(start.elapsed() < Duration::from_secs(5), "2 streams not held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Changes with long hosts until the stalled stream's socket is full: the lines the service
    // made, less those the healthy watcher read, stop growing.
    let long = format!("{}.{}.{}.example", "a".repeat(60), "b".repeat(60), "c".repeat(60));
    let stalled_lines = || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let made = c.metric("edgewise_control_route_stream_lines_total").await.unwrap();
        made - read.load(std::sync::atomic::Ordering::Relaxed) as f64
    };
    let (mut before, mut n) = (stalled_lines().await, 0usize);
    let stalled_at = loop {
        assert!(n < 40_000, "the stalled stream still takes lines after {n} changes");
        let c = &c;
        let puts = (n..n + 500).map(|i| {
            let host = format!("f{i}.{long}");
            async move {
                c.put_function(&format!("f{i}"), &format!("{i:08x}-0000000b-000000000c"), "customer-a", &host).await
            }
        });
        let results: Vec<_> = futures_util::stream::iter(puts).buffer_unordered(16).collect().await;
        assert!(results.iter().all(Result::is_ok), "{:?}", results.iter().find(|r| r.is_err()));
        n += 500;
        let now = stalled_lines().await;
        if now - before < 3.0 {
            break Instant::now();
        }
        before = now;
    };
    while lines.try_recv().is_ok() {}
    eprintln!("the stalled stream's socket full after {n} changes");
    // The others go on: a change reaches the healthy watcher at once.
    let put = Instant::now();
    c.put_function("late", "fffffff0-0000000b-000000000c", "customer-a", HOST).await.unwrap();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.recv()).await.unwrap().unwrap();
        if line.to_string().contains(HOST) {
            break;
        }
    }
    assert!(put.elapsed() < Duration::from_secs(1), "{:?}", put.elapsed());
    assert_eq!(c.metric("edgewise_control_route_watchers").await.unwrap(), 2.0, "the stalled one is held for now");

    // Dropped at the idle timeout, which frees its watch; the healthy one stays.
    let closed = "edgewise_control_connections_closed_total{port=\"routes\",reason=\"idle_timeout\"}";
    while c.metric("edgewise_control_route_watchers").await.unwrap() != 1.0 {
        assert!(stalled_at.elapsed() < Duration::from_secs(90), "the stalled stream is still held");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("the stalled stream dropped {:?} after its socket was full", stalled_at.elapsed());
    assert_eq!(c.metric(closed).await.unwrap(), 1.0);
    assert!(!reader.is_finished(), "the healthy stream ended");
    drop(stalled);
    reader.abort();
}
