//! Certificates for custom domains by ACME (RFC 8555), HTTP-01: the CA fetches
//! `http://<domain>/.well-known/acme-challenge/<token>`, which the ingress's plain-HTTP listener
//! routes to this service's route port (`Control::challenge`). HTTP-01 rather than TLS-ALPN-01:
//! it needs no certificate of its own on the front listener's port 443 (whose selector asks this
//! service for certificates by SNI), and the customer's DNS record that sends traffic to the
//! ingress is all the proof it needs.
//!
//! One worker takes the domains due (no certificate, or in the last third of its lifetime), a
//! few at a time; a failure is shown in the domain's status and retried after a back-off that
//! doubles, while a certificate still valid keeps being served.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use crate::control::Control;
use crate::domains::Certificate;

/// Where the account's credentials are kept in the store.
const ACCOUNT: &str = "acme_account";
/// Longest one order may take, from its creation to the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// Polling an order until it is ready, then until its certificate is: 100 ms, doubling, for at
/// most a minute (a CA validates and issues within a second or two).
fn polling() -> RetryPolicy {
    RetryPolicy::new().initial_delay(Duration::from_millis(100)).timeout(Duration::from_secs(60))
}

#[derive(Debug, Clone)]
pub struct AcmeOptions {
    /// The CA's directory URL (Let's Encrypt: https://acme-v02.api.letsencrypt.org/directory).
    pub directory: String,
    /// A PEM root the directory's HTTPS certificate chains to, instead of the system's roots
    /// (a private or test CA).
    pub ca: Option<PathBuf>,
    /// `mailto:` contacts of the account.
    pub contact: Vec<String>,
    /// The first retry's delay; doubles with each failure in a row, up to `max_retry`.
    pub retry: Duration,
    pub max_retry: Duration,
    /// Orders under way at once.
    pub concurrency: usize,
}

/// Runs for as long as the service does.
pub async fn run(control: Arc<Control>, options: AcmeOptions) {
    let mut account: Option<Account> = None;
    let mut running = tokio::task::JoinSet::new();
    // The orders under way: task -> domain.
    let mut busy = std::collections::HashMap::new();
    // Set by an order the CA refused for an unknown account (a CA that lost its state, or a
    // new directory): the next order makes a new account.
    let unknown_account = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        if unknown_account.swap(false, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("edgewise-control: the ACME CA does not know the account: a new one is made");
            account = None;
            if let Err(e) = control.put_secret(ACCOUNT, "").await {
                eprintln!("edgewise-control: forgetting the ACME account: {e}");
            }
        }
        while let Some(done) = running.try_join_next_with_id() {
            finished(&mut busy, done);
        }
        let room = options.concurrency.saturating_sub(running.len());
        let taken: std::collections::HashSet<String> = busy.values().cloned().collect();
        let mut due = if room > 0 { control.domains_due(room, &taken) } else { Vec::new() };
        // With replicas, one runs the orders; the others answer challenges and serve.
        if !due.is_empty() && !control.leads_acme().await {
            due.clear();
        }
        if !due.is_empty() && account.is_none() {
            match open_account(&control, &options).await {
                Ok(a) => account = Some(a),
                Err(e) => {
                    let e = format!("the ACME account at {}: {e}", options.directory);
                    eprintln!("edgewise-control: {e}");
                    for d in &due {
                        let _ = control.domain_failed(&d.domain, &e, backoff(&options, d.failures)).await;
                    }
                }
            }
        }
        if let Some(account) = &account {
            for d in due {
                let domain = d.domain.clone();
                let (control, account, options) = (control.clone(), account.clone(), options.clone());
                let unknown_account = unknown_account.clone();
                let task = running.spawn(async move {
                    let result = tokio::time::timeout(ORDER_TIMEOUT, issue(&control, &account, &d.domain)).await;
                    let result = result.unwrap_or_else(|_| Err(format!("the order took over {ORDER_TIMEOUT:?}")));
                    let outcome = match result {
                        Ok(certificate) => {
                            eprintln!("edgewise-control: certificate for {} until {}", d.domain, certificate.not_after);
                            control.domain_issued(&d.domain, certificate).await
                        }
                        Err(e) => {
                            eprintln!("edgewise-control: certificate for {}: {e}", d.domain);
                            if e.contains("accountDoesNotExist") {
                                unknown_account.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                            control.domain_failed(&d.domain, &e, backoff(&options, d.failures)).await
                        }
                    };
                    if let Err(e) = outcome {
                        eprintln!("edgewise-control: storing {}'s certificate state: {e}", d.domain);
                    }
                });
                busy.insert(task.id(), domain);
            }
        }
        // A new domain wakes the worker; otherwise a second's tick finds renewals and retries.
        tokio::select! {
            _ = control.acme_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            Some(done) = running.join_next_with_id(), if !running.is_empty() => finished(&mut busy, done),
        }
    }
}

/// An order done (or its task gone, whatever happened): its domain is free again.
fn finished(
    busy: &mut std::collections::HashMap<tokio::task::Id, String>,
    done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
) {
    let id = match done {
        Ok((id, ())) => id,
        Err(e) => e.id(),
    };
    busy.remove(&id);
}

fn backoff(options: &AcmeOptions, failures: u32) -> Duration {
    options.retry.saturating_mul(1 << failures.min(16)).min(options.max_retry)
}

fn builder(options: &AcmeOptions) -> Result<instant_acme::AccountBuilder, String> {
    match &options.ca {
        Some(ca) => Account::builder_with_root(ca).map_err(|e| format!("--acme-ca {}: {e}", ca.display())),
        None => Account::builder().map_err(|e| explain(&e)),
    }
}

/// The account kept in the store, or a new one (kept there: its key is the account).
async fn open_account(control: &Control, options: &AcmeOptions) -> Result<Account, String> {
    if let Some(stored) = control.secret(ACCOUNT).await?.filter(|s| !s.is_empty()) {
        let credentials: AccountCredentials =
            serde_json::from_str(&stored).map_err(|e| format!("the stored account does not read: {e}"))?;
        return builder(options)?.from_credentials(credentials).await.map_err(|e| explain(&e));
    }
    let contact: Vec<&str> = options.contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) =
        builder(options)?.create(&new, options.directory.clone(), None).await.map_err(|e| explain(&e))?;
    let stored = serde_json::to_string(&credentials).map_err(|e| e.to_string())?;
    control.put_secret(ACCOUNT, &stored).await?;
    eprintln!("edgewise-control: ACME account created at {}", options.directory);
    Ok(account)
}

/// One order: HTTP-01 for `domain`, then a new key and its certificate.
async fn issue(control: &Control, account: &Account, domain: &str) -> Result<Certificate, String> {
    let identifiers = [Identifier::Dns(domain.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| explain(&e))?;
    let mut tokens = Vec::new();
    let validated = validate(control, &mut order, domain, &mut tokens).await;
    // The answers are withdrawn whatever happened.
    for token in &tokens {
        if let Err(e) = control.set_challenge(token, None).await {
            eprintln!("edgewise-control: withdrawing a challenge of {domain}: {e}");
        }
    }
    validated?;
    let key = order.finalize().await.map_err(|e| explain(&e))?;
    let chain = order.poll_certificate(&polling()).await.map_err(|e| explain(&e))?;
    let (not_before, not_after) = validity(&chain)?;
    Ok(Certificate { chain, key, not_before, not_after })
}

/// Answers the order's HTTP-01 challenges (their tokens in `tokens`) and waits until it is
/// ready, or says why the CA refused it.
async fn validate(
    control: &Control,
    order: &mut instant_acme::Order,
    domain: &str,
    tokens: &mut Vec<String>,
) -> Result<(), String> {
    let acme = |e: instant_acme::Error| explain(&e);
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(acme)?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("the authorization is {other:?}")),
        }
        let mut challenge =
            authorization.challenge(ChallengeType::Http01).ok_or("the CA offers no http-01 challenge")?;
        tokens.push(challenge.token.clone());
        control.set_challenge(&challenge.token, Some((domain, challenge.key_authorization().as_str()))).await?;
        challenge.set_ready().await.map_err(acme)?;
    }
    match order.poll_ready(&polling()).await.map_err(acme)? {
        OrderStatus::Ready => Ok(()),
        OrderStatus::Invalid => Err(validation_error(order).await),
        other => Err(format!("the order is {other:?}, not ready")),
    }
}

/// An error with its causes ("client error (Connect): tcp connect error: Connection refused").
fn explain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// Why an invalid order's validation failed, as the CA said.
async fn validation_error(order: &mut instant_acme::Order) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(authorization)) = authorizations.next().await {
        for challenge in &authorization.challenges {
            if let Some(problem) = &challenge.error {
                return format!("validation failed: {problem}");
            }
        }
    }
    "the order is invalid".into()
}

/// The validity of a chain's first certificate (Unix seconds).
fn validity(chain: &str) -> Result<(i64, i64), String> {
    let pem = x509_parser::pem::Pem::iter_from_buffer(chain.as_bytes())
        .next()
        .ok_or("the CA sent no certificate")?
        .map_err(|e| format!("the CA's certificate is not PEM: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| format!("the CA's certificate does not parse: {e}"))?;
    Ok((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}
