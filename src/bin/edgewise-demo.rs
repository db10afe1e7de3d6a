//! `make run`: every shipped scenario on fixed ports with its stand-ins, and the curl commands
//! that show it working. Ctrl-C stops everything.

use std::time::Duration;

use anyhow::{Context, Result};
use edgewise::dns::Dns;
use edgewise::envoy::{Config, Envoy, Options};

use edgewise::ratelimit::{RateLimitService, Redis};
use edgewise::scenarios::cloud_connector as cc;
use edgewise::scenarios::egress as eg;
use edgewise::scenarios::mesh;
use edgewise::scenarios::serverless::{self as sl, ports, Pki};
use edgewise::scenarios::tunnel as tn;
use edgewise::server::{Document, Listen, Server};

const B_LABEL: &str = "1111111a-2222222b-333333333c";

#[tokio::main]
async fn main() -> Result<()> {
    let root = edgewise::repo_root();
    let build = edgewise::envoy::Build::current();
    println!("edgewise demo on the {build:?} build ({}/)", build.yaml_dir());
    let run = root.join("target/run");
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run)?;

    // Serverless ingress: two customer clusters behind mTLS gateways, a management service.
    let pki = Pki::install(&run)?;
    let _a = sl::gateway(
        "customer-a",
        ports::CUSTOMER_A,
        &sl::gateway_leaf(&pki.customer_a_ca, "customer-a")?,
        &pki.platform_ca,
    )
    .await?;
    let _b = sl::gateway(
        "customer-b",
        ports::CUSTOMER_B,
        &sl::gateway_leaf(&pki.customer_b_ca, "customer-b")?,
        &pki.platform_ca,
    )
    .await?;
    let _www = Server::echo("www", Listen { port: ports::WWW, ..Listen::default() }).await?;
    let doc = Document::new(sl::table(1, &[(B_LABEL, "customer-b", "fn-b.ns-7.knative.customer-b.example")]));
    let _mgmt =
        Server::start("management", Listen { port: ports::MANAGEMENT, ..Listen::default() }, doc.handler()).await?;
    let envoy = Envoy::start_in(&Config::shipped("serverless"), &run, Options { concurrency: 2, ..Options::default() })
        .await
        .context("starting envoy/serverless.yaml")?;

    // The same ingress fed by edgewise-control (envoy/serverless-xds.yaml), customer-a added
    // through its REST API.
    let xds = start_serverless_xds(&run, &pki).await?;

    // Egress: a DNS stand-in for Envoy only, HTTPS destinations on loopback addresses (port 443
    // needs root or CAP_NET_BIND_SERVICE; without it the egress part is left out).
    let egress = match start_egress(&run).await {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("egress demo left out: {e:#}");
            None
        }
    };

    // Out-of-cluster gateway in front of a sidecar mesh.
    let mesh = start_mesh(&run).await?;

    // Cloud Connector gateway and the reverse-tunnel hub and agent, with one issuer stand-in
    // (OIDC discovery + JWKS for gitlab.com and customers.gitlab.com) for both.
    let issuer_ca = edgewise::certs::Ca::new("demo issuer CA")?;
    let (issuers, issuer_server) = cc::Issuers::start_on(&issuer_ca, DEMO_ISSUER_PORT).await?;
    let gitlab = edgewise::idp::Idp::rs256(cc::GITLAB, "gitlab-demo-1")?;
    let customers = edgewise::idp::Idp::new(cc::CUSTOMERS, "customers-demo-1")?;
    issuers.publish(cc::GITLAB, vec![gitlab.jwk()]);
    issuers.publish(cc::CUSTOMERS, vec![customers.jwk()]);
    let cloud = start_cloud_connector(&run, &issuer_ca).await?;
    let tunnel = start_tunnel(&run, &issuer_ca).await?;

    // Give the serverless filter its first poll of the management service.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let curl = |host: &str, path: &str| {
        format!(
            "curl -s --cacert target/run/serverless/front-ca.pem --resolve {host}:{p}:127.0.0.1 https://{host}:{p}{path}",
            p = ports::FRONT
        )
    };
    println!(
        r#"
edgewise demo is up (Envoy admin: http://127.0.0.1:9901, log: target/run/serverless.log).

Serverless ingress (envoy/serverless.yaml, https://*.{domain}:{front}):

  # A function from the inline table -> customer-a, Host rewritten, over mTLS (see tls.peer_sans):
  {inline}

  # A function from the management service's table -> customer-b, over HTTP/2:
  {polled} --http2

  # Unknown and malformed function hosts -> 404 with a JSON body, no upstream contacted:
  {unknown}
  {malformed}

  # Metrics:
  curl -s http://127.0.0.1:9901/stats/prometheus | grep edgewise_serverless
{xds}{egress}{mesh}{cloud}{tunnel}
Ctrl-C stops everything."#,
        domain = sl::DOMAIN,
        front = ports::FRONT,
        inline = curl(sl::INLINE_HOST, "/hello"),
        polled = curl(&format!("{B_LABEL}.{}", sl::DOMAIN), "/"),
        unknown = curl(&format!("0000000a-0000000b-00000000ff.{}", sl::DOMAIN), "/"),
        malformed = curl(&format!("0000000a-0000000b-0000000.{}", sl::DOMAIN), "/"),
        xds = xds_help(&curl),
        egress = if egress.is_some() { EGRESS_HELP } else { "" },
        mesh = mesh_help(&mesh.token),
        cloud = cloud_help(&gitlab),
        tunnel = tunnel_help(&gitlab),
    );
    // Ctrl-C or a plain kill: either way the Envoys are stopped (dropped), not orphaned.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = terminate.recv() => {}
    }
    println!("\nstopping");
    drop(envoy);
    drop(xds);
    drop(egress);
    drop(mesh);
    drop((cloud, tunnel, issuer_server));
    Ok(())
}

/// envoy/serverless-xds.yaml's ports in the demo (beside envoy/serverless.yaml's).
const XDS_FRONT: u16 = 10447;
const XDS_ADMIN: u16 = 9908;
const CONTROL_HTTP: u16 = 19101;
const CONTROL_ROUTES: u16 = 19211;
/// Its plain-HTTP listener (ACME's HTTP-01 challenges), where Pebble validates.
const XDS_HTTP: u16 = 10087;
/// The custom domain the demo adds, with a certificate from Pebble.
const CUSTOM_DOMAIN: &str = "app.customer-a.example";

async fn start_serverless_xds(
    run: &std::path::Path,
    pki: &Pki,
) -> Result<(edgewise::control::ControlService, Envoy, edgewise::pebble::Pebble)> {
    let binary = std::env::current_exe()?.with_file_name("edgewise-control");
    let db = run.join("control.db");
    let ports = (edgewise::control::GRPC_PORT, CONTROL_HTTP, CONTROL_ROUTES);
    // Pebble, Let's Encrypt's test CA, for the custom domain's certificate (validated through
    // the Envoy below; its DNS answers 127.0.0.1 for every name).
    let pebble = edgewise::pebble::Pebble::start(&run.join("pebble"), XDS_HTTP, Duration::from_secs(3600)).await?;
    let (directory, api_ca) = (pebble.directory(), pebble.api_ca_file());
    let acme = ["--acme-directory", &directory, "--acme-ca", api_ca.to_str().unwrap_or_default()];
    let control = edgewise::control::ControlService::start(&binary, run, &db, ports, &acme).await?;
    control.put_customer("customer-a", ports::CUSTOMER_A, &[&pki.customer_a_ca], "ingress.customer-a.example").await?;
    control.put_function("hello", "0000000a-0000000b-000000000c", "customer-a", sl::INLINE_KNATIVE_HOST).await?;
    let config = Config::shipped("serverless-xds")
        .port(ports::FRONT, XDS_FRONT)
        .port(10080, XDS_HTTP)
        .port(9901, XDS_ADMIN)
        .port(edgewise::control::ROUTES_PORT, CONTROL_ROUTES);
    let envoy = Envoy::start_in(&config, run, Options { concurrency: 2, ..Options::default() })
        .await
        .context("starting envoy/serverless-xds.yaml")?;
    let body = serde_json::json!({ "function": "hello" });
    control.call("PUT", &format!("/v1/domains/{CUSTOM_DOMAIN}"), Some(&body)).await?;
    edgewise::certs::write_pem(&run.join("serverless"), "pebble-root.pem", &pebble.roots().await?)?;
    Ok((control, envoy, pebble))
}

fn xds_help(curl: &dyn Fn(&str, &str) -> String) -> String {
    let auth = format!("-H 'authorization: Bearer {}'", edgewise::control::DEMO_TOKEN);
    let api = format!("http://127.0.0.1:{CONTROL_HTTP}");
    let b = format!("{B_LABEL}.{}", sl::DOMAIN);
    format!(
        r#"
The same ingress with its customer clusters and certificates from edgewise-control (envoy/serverless-xds.yaml,
https://*.{domain}:{XDS_FRONT}; REST API on {api}, docs/serverless-control.md):

  # customer-a's function, added through the REST API at start:
  {inline}

  # The customers and functions (customer-a's CA and SAN, whether every Envoy has its cluster):
  curl -s {auth} {api}/v1/customers
  curl -s {auth} {api}/v1/functions

  # Add a function of customer-a; it answers about a second later, no restart:
  curl -s -X PUT {auth} {api}/v1/functions/fn-b -d '{{"match": {{"project": "1111111a", "environment": "2222222b", "function": "333333333c"}}, "customer": "customer-a", "host": "fn-b.knative.customer-a.example"}}'
  {added}

  # A custom domain of customer-a's function (PUT at start): its certificate from Pebble (HTTP-01
  # through this Envoy's port {XDS_HTTP}), served by SNI, verified against Pebble's root:
  curl -s {auth} {api}/v1/domains/{CUSTOM_DOMAIN}
  curl -s --cacert target/run/serverless/pebble-root.pem --resolve {CUSTOM_DOMAIN}:{XDS_FRONT}:127.0.0.1 https://{CUSTOM_DOMAIN}:{XDS_FRONT}/

  # edgewise-control's metrics, and what Envoy got from it:
  curl -s {api}/metrics
  curl -s http://127.0.0.1:{XDS_ADMIN}/clusters | grep customer-a::default_priority::max_connections
"#,
        domain = sl::DOMAIN,
        inline = curl(sl::INLINE_HOST, "/hello").replace(&format!(":{}", ports::FRONT), &format!(":{XDS_FRONT}")),
        added = curl(&b, "/").replace(&format!(":{}", ports::FRONT), &format!(":{XDS_FRONT}")),
    )
}

/// The issuer stand-in of the demo (the shipped configs name gitlab.com:443).
const DEMO_ISSUER_PORT: u16 = 19403;

fn issuer_ca_file(run: &std::path::Path, ca: &edgewise::certs::Ca, scenario: &str) -> Result<std::path::PathBuf> {
    edgewise::certs::write_pem(&run.join(scenario), "demo-issuer-ca.pem", &ca.pem)
}

/// Points a shipped config's issuer cluster(s) at the demo issuer stand-in.
fn at_demo_issuer(config: Config, ca_file: &std::path::Path, hosts: &[&str]) -> Config {
    let mut config = config.replace("/etc/ssl/certs/ca-certificates.crt", &ca_file.display().to_string());
    for host in hosts {
        config = config.replace(
            &format!("{{ address: {host}, port_value: 443 }}"),
            &format!("{{ address: 127.0.0.1, port_value: {DEMO_ISSUER_PORT} }}"),
        );
    }
    config
}

struct Running {
    _servers: Vec<Server>,
    _envoys: Vec<Envoy>,
    _kubectl: Option<tn::KubectlProxy>,
    _fleet: Option<(Redis, RateLimitService)>,
}

async fn start_cloud_connector(run: &std::path::Path, issuer_ca: &edgewise::certs::Ca) -> Result<Running> {
    cc::Pki::install(run)?;
    let ai = Server::echo("ai-gateway", Listen { port: cc::ports::AI_GATEWAY, ..Listen::default() }).await?;
    let obs = Server::echo("observability", Listen { port: cc::ports::OBSERVABILITY, ..Listen::default() }).await?;
    // The fleet-wide limits: Redis and edgewise-ratelimit (built beside this binary by `make run`).
    let redis = Redis::start(&run.join("redis"), cc::ports::REDIS).await?;
    let binary = std::env::current_exe()?.with_file_name("edgewise-ratelimit");
    let limits = edgewise::ratelimit::shipped_limits();
    let rls = RateLimitService::start(
        &binary,
        &limits,
        &redis.url(),
        cc::ports::RATE_LIMIT_GRPC,
        cc::ports::RATE_LIMIT_HTTP,
        &run.join("ratelimit.log"),
    )
    .await?;
    rls.ready(std::time::Duration::from_secs(10)).await?;
    let ca_file = issuer_ca_file(run, issuer_ca, "cloud-connector")?;
    let config = at_demo_issuer(Config::shipped("cloud-connector"), &ca_file, &["gitlab.com", "customers.gitlab.com"])
        // Global mode: the limits of deploy/ratelimit/limits.json, shared through Redis.
        .replace("numerator: 0, denominator: HUNDRED", "numerator: 100, denominator: HUNDRED");
    let envoy = Envoy::start_in(&config, run, Options { concurrency: 2, ..Options::default() })
        .await
        .context("starting envoy/cloud-connector.yaml")?;
    Ok(Running { _servers: vec![ai, obs], _envoys: vec![envoy], _kubectl: None, _fleet: Some((redis, rls)) })
}

async fn start_tunnel(run: &std::path::Path, issuer_ca: &edgewise::certs::Ca) -> Result<Running> {
    tn::Pki::install(run)?;
    let kubectl = tn::KubectlProxy::start_on(tn::ports::KUBECTL_PROXY, 30).await?;
    let ca_file = issuer_ca_file(run, issuer_ca, "tunnel")?;
    let hub = at_demo_issuer(Config::shipped("tunnel-hub"), &ca_file, &["gitlab.com"]);
    let hub = Envoy::start_in(&hub, run, Options::default()).await.context("starting envoy/tunnel-hub.yaml")?;
    let agent =
        Envoy::start_in(&Config::shipped("tunnel-agent"), run, Options { concurrency: 1, ..Options::default() })
            .await
            .context("starting envoy/tunnel-agent.yaml")?;
    Ok(Running { _servers: vec![], _envoys: vec![hub, agent], _kubectl: Some(kubectl), _fleet: None })
}

fn cloud_help(gitlab: &edgewise::idp::Idp) -> String {
    let now = edgewise::idp::now();
    let token = gitlab.token(serde_json::json!({
        "sub": "6b1a2c3d-0000-4000-8000-000000000001", "aud": cc::AUDIENCE, "gitlab_realm": "self-managed",
        "scopes": ["code_suggestions"], "iat": now, "nbf": now, "exp": now + 86_400
    }));
    format!(
        r#"
Cloud Connector gateway (envoy/cloud-connector.yaml, https://cloud.gitlab.com:{front}):

  # An instance token (RS256, from the demo gitlab.com issuer, valid 24 h, scope code_suggestions):
  CC_TOKEN={token}
  CC="curl -s --cacert target/run/cloud-connector/front-ca.pem --resolve cloud.gitlab.com:{front}:127.0.0.1"

  # Allowed: the AI gateway stand-in sees /v2/code/completions, the verified X-Gitlab-* headers and
  # the x-edgewise-signature:
  $CC -H "Authorization: Bearer $CC_TOKEN" https://cloud.gitlab.com:{front}/ai/v2/code/completions

  # 403 insufficient_scope (duo_chat), 401 without a token, 404 for an unknown path:
  $CC -i -H "Authorization: Bearer $CC_TOKEN" https://cloud.gitlab.com:{front}/ai/v1/chat/agent
  $CC -i https://cloud.gitlab.com:{front}/ai/v2/code/completions
  $CC -H "Authorization: Bearer $CC_TOKEN" https://cloud.gitlab.com:{front}/nothing-here

  # Health and the gateway's own metrics:
  $CC https://cloud.gitlab.com:{front}/-/health
  $CC https://cloud.gitlab.com:{front}/-/metrics | grep edgewise_cloud_connector_requests

  # Fleet-wide limits (deploy/ratelimit/limits.json) through edgewise-ratelimit and Redis:
  # the RateLimit-* headers of each answer, and the service's metrics and readiness:
  $CC -D - -o /dev/null -H "Authorization: Bearer $CC_TOKEN" https://cloud.gitlab.com:{front}/ai/v2/code/completions | grep -i ratelimit
  curl -s 127.0.0.1:{rls}/metrics | grep edgewise_ratelimit_descriptors_total
  curl -s 127.0.0.1:{rls}/readyz
"#,
        front = cc::ports::FRONT,
        rls = cc::ports::RATE_LIMIT_HTTP
    )
}

fn tunnel_help(gitlab: &edgewise::idp::Idp) -> String {
    let now = edgewise::idp::now();
    let token = gitlab.token(serde_json::json!({
        "sub": "alice", "aud": tn::AUDIENCE, "clusters": ["cluster-a"], "iat": now, "exp": now + 86_400
    }));
    format!(
        r#"
Reverse tunnels (envoy/tunnel-hub.yaml: users on {users}, agents on {handshake}; envoy/tunnel-agent.yaml
dials out, no listening socket; the kubectl-proxy stand-in on {kubectl}):

  # A user token allowed to reach cluster-a (valid 24 h):
  TUNNEL_TOKEN={token}

  # Through the hub, the tunnel and the agent to "kubectl proxy" (it echoes what it saw):
  curl -s -H "Authorization: Bearer $TUNNEL_TOKEN" http://127.0.0.1:{users}/clusters/cluster-a/api/v1/namespaces

  # A watch streams through the tunnel (30 events, one a second):
  curl -sN -H "Authorization: Bearer $TUNNEL_TOKEN" 'http://127.0.0.1:{users}/clusters/cluster-a/api/v1/pods?watch=true'

  # Not allowed (403), and a cluster without an agent would be 503:
  curl -s -H "Authorization: Bearer $TUNNEL_TOKEN" http://127.0.0.1:{users}/clusters/cluster-b/api
"#,
        users = tn::ports::USERS,
        handshake = tn::ports::HANDSHAKE,
        kubectl = tn::ports::KUBECTL_PROXY,
    )
}

fn mesh_help(token: &str) -> String {
    format!(
        r#"
Out-of-cluster gateway in an mTLS mesh (envoy/mesh-gateway.yaml on 18080, envoy/mesh-sidecar.yaml on 15006):

  # A user token from the demo identity provider (valid 24 h):
  TOKEN={token}

  # Through the gateway: alternately to the meshed workload (mTLS to its sidecar: see the
  # x-forwarded-client-cert with the gateway's SPIFFE ID and x-edgewise-user) and to the
  # non-meshed one (plaintext, "tls":null):
  curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:18080/catalog/items
  curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:18080/catalog/items

  # Without a token: 401.
  curl -s http://127.0.0.1:18080/catalog/items

  # Straight to the sidecar without a mesh certificate: refused.
  curl -sk https://127.0.0.1:15006/catalog/items
"#
    )
}

/// The mesh scenario: the sidecar in front of a workload, a non-meshed workload, the gateway.
struct Mesh {
    token: String,
    _servers: Vec<Server>,
    _envoys: Vec<Envoy>,
}

async fn start_mesh(run: &std::path::Path) -> Result<Mesh> {
    let pki = mesh::Pki::install(run)?;
    let workload =
        Server::echo("catalog (behind its sidecar)", Listen { port: mesh::ports::WORKLOAD, ..Listen::default() })
            .await?;
    let legacy =
        Server::echo("legacy (not meshed)", Listen { port: mesh::ports::NON_MESHED, ..Listen::default() }).await?;
    let options = || Options { concurrency: 1, ..Options::default() };
    let sidecar = Envoy::start_in(&Config::shipped("mesh-sidecar"), run, options())
        .await
        .context("starting envoy/mesh-sidecar.yaml")?;
    let gateway = Envoy::start_in(&pki.gateway_config(Config::shipped("mesh-gateway")), run, options())
        .await
        .context("starting envoy/mesh-gateway.yaml")?;
    let now = edgewise::idp::now();
    let token = pki.idp.token(serde_json::json!({"sub": "alice", "aud": mesh::AUDIENCE, "groups": ["shoppers"], "iat": now, "exp": now + 86_400}));
    Ok(Mesh { token, _servers: vec![workload, legacy], _envoys: vec![sidecar, gateway] })
}

const EGRESS_HELP: &str = r#"
Egress proxy (envoy/egress.yaml, http://<destination>.egress.local via 127.0.0.1:10080):

  # Allowlisted: plain HTTP in, HTTPS out with SNI = api.github.com and the certificate verified:
  curl -s -H 'Host: api.github.com.egress.local' http://127.0.0.1:10080/repos/edgewise

  # A destination with its own port, and a *.example.com wildcard entry:
  curl -s -H 'Host: example.net.egress.local:8443' http://127.0.0.1:10080/
  curl -s -H 'Host: www.example.com.egress.local' http://127.0.0.1:10080/

  # Refused (403, JSON): not on the allowlist, an IP literal, the metadata address, a loopback name,
  # an allowed name that resolves to a private address, a host outside .egress.local:
  curl -s -H 'Host: gist.github.com.egress.local' http://127.0.0.1:10080/
  curl -s -H 'Host: 169.254.169.254.egress.local' http://127.0.0.1:10080/
  curl -s -H 'Host: localhost.egress.local' http://127.0.0.1:10080/
  curl -s -H 'Host: sneaky.example.org.egress.local' http://127.0.0.1:10080/
  curl -s -H 'Host: api.github.com' http://127.0.0.1:10080/

  # A destination whose certificate is not valid for its name fails closed (503, JSON):
  curl -s -H 'Host: badcert.example.com.egress.local' http://127.0.0.1:10080/

  # Metrics per allowlisted destination:
  curl -s http://127.0.0.1:9902/stats/prometheus | grep edgewise_egress
"#;

/// The egress scenario's stand-ins and Envoy, kept alive together.
struct Egress {
    _dns: Dns,
    _destinations: Vec<Server>,
    _envoy: Envoy,
}

async fn start_egress(run: &std::path::Path) -> Result<Egress> {
    let ca = eg::install(run)?;
    let ip = |last: u8| std::net::Ipv4Addr::new(127, 0, 0, last);
    let destinations = vec![
        eg::destination("api.github.com", ip(11), 443, &ca, &["api.github.com"]).await?,
        eg::destination("www.example.com", ip(12), 443, &ca, &["www.example.com"]).await?,
        eg::destination("example.net", ip(13), 8443, &ca, &["example.net"]).await?,
        eg::destination("badcert", ip(14), 443, &ca, &["someone-else.example"]).await?,
    ];
    let dns = Dns::start(
        eg::ports::DNS,
        &[
            ("api.github.com", ip(11)),
            ("www.example.com", ip(12)),
            ("example.net", ip(13)),
            ("badcert.example.com", ip(14)),
            ("sneaky.example.org", std::net::Ipv4Addr::new(10, 11, 12, 13)),
        ],
    )
    .await?;
    let envoy = Envoy::start_in(&Config::shipped("egress"), run, Options { concurrency: 2, ..Options::default() })
        .await
        .context("starting envoy/egress.yaml")?;
    Ok(Egress { _dns: dns, _destinations: destinations, _envoy: envoy })
}
