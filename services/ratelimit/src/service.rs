//! `envoy.service.ratelimit.v3.RateLimitService` on limitador: each descriptor
//! `(feature, organization)` is counted in Redis against the feature's limit, in a fixed window
//! that starts with the organization's first request. Counting, windows and storage are
//! limitador's and Redis's; this file maps the protocol onto them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use limitador::limit::{Context, Expression, Limit as Counted, Namespace, Predicate};
use limitador::AsyncRateLimiter;
use tokio::sync::RwLock;
use tonic::{Request, Response, Status};

use crate::config::{Config, Limit};
use crate::metrics::{Metrics, Outcome};

/// The descriptor entries the gateway sends (see envoy/cloud-connector.yaml, `rate_limits`).
pub const FEATURE: &str = "feature";
pub const ORGANIZATION: &str = "organization";

/// Checks of one counter are serialized in a service instance (see `Limiter::stripes`).
const STRIPES: usize = 1024;

pub struct Limiter {
    domain: String,
    namespace: Namespace,
    limits: HashMap<String, Limit>,
    /// The same limits as limitador has them, installed once Redis answers.
    counted: Vec<Counted>,
    /// None until Redis is reached at start-up; with the storage's connection.
    limiter: RwLock<Option<(AsyncRateLimiter, redis::aio::ConnectionManager)>>,
    /// limitador's Redis storage reads a counter, decides, then increments it: two calls in
    /// flight for one counter can both pass its last unit. A lock per stripe of counters makes
    /// the calls of one service instance take their turn; with several instances the excess is
    /// at most one call per instance in flight.
    stripes: Vec<tokio::sync::Mutex<()>>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
#[error("limit of `{feature}`: {reason}")]
pub struct LimitError {
    feature: String,
    reason: String,
}

/// limitador's limits, one per feature: counted per distinct `organization`.
fn counted(config: &Config) -> Result<Vec<Counted>, LimitError> {
    config
        .limits
        .iter()
        .map(|(feature, limit)| {
            let error = |e: &dyn std::fmt::Display| LimitError { feature: feature.clone(), reason: e.to_string() };
            // `feature` holds letters, digits, `_` and `-` only (Config::parse): a safe literal.
            let when = Predicate::parse(format!("descriptors[0].{FEATURE} == \"{feature}\"")).map_err(|e| error(&e))?;
            let per = Expression::parse(format!("descriptors[0].{ORGANIZATION}")).map_err(|e| error(&e))?;
            let mut counted = Counted::new(config.domain.as_str(), limit.requests, limit.seconds(), [when], [per]);
            counted.set_name(feature.clone());
            Ok(counted)
        })
        .collect()
}

impl Limiter {
    pub fn new(config: &Config) -> Result<Limiter, LimitError> {
        Ok(Limiter {
            counted: counted(config)?,
            domain: config.domain.clone(),
            namespace: config.domain.as_str().into(),
            limits: config.limits.iter().map(|(f, l)| (f.clone(), *l)).collect(),
            limiter: RwLock::new(None),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            metrics: Arc::new(Metrics::new(config.limits.keys())),
        })
    }

    /// Installs the storage (once Redis answered) with the limits.
    pub async fn connect(
        &self,
        storage: limitador::storage::redis::AsyncRedisStorage,
        connection: redis::aio::ConnectionManager,
    ) {
        let limiter = AsyncRateLimiter::new_with_storage(Box::new(storage));
        for limit in &self.counted {
            limiter.add_limit(limit.clone());
        }
        *self.limiter.write().await = Some((limiter, connection));
        self.metrics.set_storage_up(true);
    }

    /// The storage's connection, once there is one.
    pub async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        self.limiter.read().await.as_ref().map(|(_, c)| c.clone())
    }

    /// Checks and counts every descriptor; a storage failure is the whole call's.
    pub async fn check(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let start = Instant::now();
        let result = self.check_all(request).await;
        let outcome = match &result {
            Ok(r) if r.overall_code == Code::OverLimit as i32 => Outcome::OverLimit,
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::Error,
        };
        self.metrics.request(outcome, start.elapsed());
        result
    }

    async fn check_all(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let mut response = RateLimitResponse { overall_code: Code::Ok as i32, ..Default::default() };
        let guard = self.limiter.read().await;
        for descriptor in &request.descriptors {
            let entry = |key: &str| descriptor.entries.iter().find(|e| e.key == key).map(|e| e.value.as_str());
            let feature = entry(FEATURE).unwrap_or_default();
            let limit = match (request.domain == self.domain, self.limits.get(feature), entry(ORGANIZATION)) {
                (true, Some(limit), Some(organization)) => (limit, organization),
                _ => {
                    self.metrics.descriptor(feature, Outcome::Unlimited);
                    response.statuses.push(DescriptorStatus { code: Code::Ok as i32, ..Default::default() });
                    continue;
                }
            };
            let Some((limiter, _)) = guard.as_ref() else {
                self.metrics.descriptor(feature, Outcome::Error);
                return Err(Status::unavailable("the limits storage (Redis) has not been reached yet"));
            };
            let (status, headers) = self.check_one(limiter, request, descriptor, feature, limit).await?;
            if status.code == Code::OverLimit as i32 {
                response.overall_code = Code::OverLimit as i32;
            }
            // The headers of the most constraining descriptor (the last over the limit, else the
            // last counted).
            if status.code == Code::OverLimit as i32 || response.overall_code == Code::Ok as i32 {
                response.response_headers_to_add = headers;
            }
            response.statuses.push(status);
        }
        Ok(response)
    }

    async fn check_one(
        &self,
        limiter: &AsyncRateLimiter,
        request: &RateLimitRequest,
        descriptor: &RateLimitDescriptor,
        feature: &str,
        (limit, organization): (&Limit, &str),
    ) -> Result<(DescriptorStatus, Vec<HeaderValue>), Status> {
        let hits = descriptor.hits_addend.map(|h| h.value).unwrap_or(u64::from(request.hits_addend)).max(1);
        let mut ctx = Context::default();
        ctx.list_binding(
            "descriptors".into(),
            vec![HashMap::from([
                (FEATURE.to_string(), feature.to_string()),
                (ORGANIZATION.to_string(), organization.to_string()),
            ])],
        );
        let stripe = {
            use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
            let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one((feature, organization));
            usize::try_from(hash % STRIPES as u64).unwrap_or(0)
        };
        let _turn = match self.stripes.get(stripe) {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        let result = match limiter.check_rate_limited_and_update(&self.namespace, &ctx, hits).await {
            Ok(result) => {
                self.metrics.set_storage_up(true);
                result
            }
            Err(e) => {
                self.metrics.storage_error();
                self.metrics.set_storage_up(false);
                self.metrics.descriptor(feature, Outcome::Error);
                return Err(Status::unavailable(format!("limits storage: {e}")));
            }
        };
        let counter = result.counters.first();
        let remaining = counter.and_then(|c| c.remaining()).unwrap_or(0);
        let reset = counter.and_then(|c| c.expires_in()).unwrap_or(Duration::from_secs(limit.seconds()));
        let reset_s = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        let outcome = if result.limited { Outcome::OverLimit } else { Outcome::Ok };
        self.metrics.descriptor(feature, outcome);
        let status = DescriptorStatus {
            code: if result.limited { Code::OverLimit } else { Code::Ok } as i32,
            current_limit: Some(RateLimit {
                name: feature.to_string(),
                requests_per_unit: u32::try_from(limit.requests).unwrap_or(u32::MAX),
                unit: unit(limit) as i32,
            }),
            limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            duration_until_reset: Some(ProtoDuration {
                seconds: i64::try_from(reset.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(reset.subsec_nanos()).unwrap_or(0),
            }),
            quota: None,
        };
        // The same headers as the filter's own buckets (draft IETF RateLimit fields).
        let mut headers = vec![
            header("ratelimit-limit", limit.requests.to_string()),
            header("ratelimit-remaining", remaining.to_string()),
            header("ratelimit-reset", reset_s.to_string()),
            header("ratelimit-policy", format!("{};w={}", limit.requests, limit.seconds())),
        ];
        if result.limited {
            headers.push(header("retry-after", reset_s.max(1).to_string()));
        }
        Ok((status, headers))
    }
}

fn unit(limit: &Limit) -> Unit {
    use edgewise_core::cloud_connector::config::Period;
    match limit.per {
        Period::Second => Unit::Second,
        Period::Minute => Unit::Minute,
        Period::Hour => Unit::Hour,
    }
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue { key: key.into(), value, raw_value: Vec::new() }
}

/// The gRPC service.
pub struct Rls(pub Arc<Limiter>);

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.0.check(request.get_ref()).await.map(Response::new)
    }
}
