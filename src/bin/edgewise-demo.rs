//! `make run`: every shipped scenario on fixed ports with its stand-ins, and the curl commands
//! that show it working. Ctrl-C stops everything.

use std::time::Duration;

use anyhow::{Context, Result};
use edgewise::envoy::{Config, Envoy, Options};
use edgewise::scenarios::serverless::{self as sl, ports, Pki};
use edgewise::server::{Document, Listen, Server};

const B_LABEL: &str = "1111111a-2222222b-333333333c";

#[tokio::main]
async fn main() -> Result<()> {
    let root = edgewise::repo_root();
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
    // Give the filter its first poll of the management service.
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

Ctrl-C stops everything."#,
        domain = sl::DOMAIN,
        front = ports::FRONT,
        inline = curl(sl::INLINE_HOST, "/hello"),
        polled = curl(&format!("{B_LABEL}.{}", sl::DOMAIN), "/"),
        unknown = curl(&format!("0000000a-0000000b-00000000ff.{}", sl::DOMAIN), "/"),
        malformed = curl(&format!("0000000a-0000000b-0000000.{}", sl::DOMAIN), "/"),
    );
    tokio::signal::ctrl_c().await?;
    println!("\nstopping");
    drop(envoy);
    Ok(())
}
