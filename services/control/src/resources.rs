//! The xDS resources a customer becomes: a cluster (its gateway over mutual TLS) and a secret
//! (its CA), plus the platform's client certificate that every cluster presents.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, data_source, socket_address, transport_socket, AggregatedConfigSource, ApiVersion,
    ConfigSource, DataSource, SocketAddress, TransportSocket, UpstreamHttpProtocolOptions,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, secret, subject_alt_name_matcher, CertificateValidationContext, CommonTlsContext,
    SdsSecretConfig, Secret, SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{http_protocol_options, HttpProtocolOptions};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::{Any, Duration};
use prost::{Message, Name};
use sha2::{Digest, Sha256};

use crate::model::{Address, Customer};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The secret every customer cluster presents: the platform's client certificate.
pub const PLATFORM_CLIENT: &str = "platform-client";

/// One resource as it is sent: its name, a version that changes exactly when its content does
/// (so that a restarted control service sends nothing new to an Envoy that has it) and its
/// message, encoded (its type is the map's that holds it).
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub body: Box<[u8]>,
}

impl Resource {
    fn new<M: Message>(name: String, message: &M) -> Arc<Resource> {
        let body = message.encode_to_vec().into_boxed_slice();
        let version = Sha256::digest(&body).iter().take(8).map(|b| format!("{b:02x}")).collect();
        Arc::new(Resource { name, version, body })
    }

    /// The resource as xDS carries it.
    pub fn any(&self, type_url: &str) -> Any {
        Any { type_url: type_url.to_string(), value: self.body.to_vec() }
    }
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any { type_url: M::type_url(), value: message.encode_to_vec() }
}

/// Everything served over xDS, by type and name.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub clusters: BTreeMap<String, Arc<Resource>>,
    pub secrets: BTreeMap<String, Arc<Resource>>,
}

impl Resources {
    pub fn of(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<Resource>>> {
        match type_url {
            CLUSTER => Some(&self.clusters),
            SECRET => Some(&self.secrets),
            _ => None,
        }
    }

    pub fn put_customer(&mut self, name: &str, customer: &Customer, address: &Address) {
        self.clusters.insert(name.to_string(), Resource::new(name.to_string(), &cluster(name, customer, address)));
        let ca = ca_secret_name(name);
        self.secrets.insert(ca.clone(), Resource::new(ca.clone(), &ca_secret(&ca, &customer.ca)));
    }

    pub fn remove_customer(&mut self, name: &str) {
        self.clusters.remove(name);
        self.secrets.remove(&ca_secret_name(name));
    }

    pub fn put_platform_client(&mut self, chain: &str, key: &str) {
        self.put_certificate(PLATFORM_CLIENT, chain, key);
    }

    fn put_certificate(&mut self, name: &str, chain: &str, key: &str) {
        self.secrets.insert(name.into(), certificate(name, chain, key));
    }
}

impl Resources {
    /// A custom domain's certificate, named by the domain itself: the front listener's on-demand
    /// certificate selector asks for the SNI it is sent.
    pub fn put_domain_certificate(&mut self, domain: &str, chain: &str, key: &str) {
        self.put_certificate(domain, chain, key);
    }

    pub fn remove_domain_certificate(&mut self, domain: &str) {
        self.secrets.remove(domain);
    }
}

/// Whether a secret name is a custom domain's certificate (a DNS name with a dot; the platform's
/// secrets are single labels: `platform-client`, `<customer>-ca`).
pub fn is_domain_secret(name: &str) -> bool {
    name.contains('.')
}

/// A certificate and its key, as the SDS secret `name`.
pub fn certificate(name: &str, chain: &str, key: &str) -> Arc<Resource> {
    let secret = Secret {
        name: name.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(chain)),
            private_key: Some(inline(key)),
            ..Default::default()
        })),
    };
    Resource::new(name.into(), &secret)
}

pub fn ca_secret_name(customer: &str) -> String {
    format!("{customer}-ca")
}

fn inline(pem: &str) -> DataSource {
    DataSource { specifier: Some(data_source::Specifier::InlineString(pem.to_string())), ..Default::default() }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn ca_secret(name: &str, pem: &str) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(inline(pem)),
            ..Default::default()
        })),
    }
}

/// The customer's cluster, as envoy/serverless.yaml declares its static ones: the gateway over
/// mutual TLS (the platform's certificate, the customer's CA and SAN), SNI from the rewritten
/// Host, HTTP/2 when the gateway offers it.
fn cluster(name: &str, customer: &Customer, address: &Address) -> Cluster {
    let endpoint = LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: address.host.clone(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(address.port.into())),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let tls = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: PLATFORM_CLIENT.into(),
                sds_config: Some(ads()),
            }],
            validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: subject_alt_name_matcher::SanType::Dns as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(customer.san.clone())),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(SdsSecretConfig {
                        name: ca_secret_name(name),
                        sds_config: Some(ads()),
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    let http = HttpProtocolOptions {
        upstream_http_protocol_options: Some(UpstreamHttpProtocolOptions { auto_sni: true, ..Default::default() }),
        upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::AutoConfig(
            http_protocol_options::AutoHttpConfig::default(),
        )),
        ..Default::default()
    };
    let discovery = if address.ip { cluster::DiscoveryType::Static } else { cluster::DiscoveryType::StrictDns };
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(discovery as i32)),
        connect_timeout: Some(Duration { seconds: 2, nanos: 0 }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: vec![LocalityLbEndpoints { lb_endpoints: vec![endpoint], ..Default::default() }],
            ..Default::default()
        }),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            any(&http),
        )]
        .into(),
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_changes_exactly_when_the_content_does() {
        let address = Address { host: "127.0.0.1".into(), port: 1, ip: true };
        let c = Customer { address: "127.0.0.1:1".into(), ca: "pem".into(), san: "a.example".into() };
        let (mut one, mut two) = (Resources::default(), Resources::default());
        one.put_customer("a", &c, &address);
        two.put_customer("a", &c, &address);
        assert_eq!(one.clusters["a"], two.clusters["a"]);
        assert_eq!(one.secrets["a-ca"], two.secrets["a-ca"]);
        two.put_customer("a", &Customer { ca: "other".into(), ..c.clone() }, &address);
        assert_eq!(one.clusters["a"].version, two.clusters["a"].version, "the CA is in the secret");
        assert_ne!(one.secrets["a-ca"].version, two.secrets["a-ca"].version);
        two.put_customer("a", &Customer { san: "b.example".into(), ..c }, &address);
        assert_ne!(one.clusters["a"].version, two.clusters["a"].version);
        two.remove_customer("a");
        assert!(two.clusters.is_empty() && two.secrets.is_empty());
    }

    #[test]
    fn the_cluster_decodes_as_envoy_reads_it() {
        let address = Address { host: "gw.example".into(), port: 443, ip: false };
        let c = Customer { address: "gw.example:443".into(), ca: "pem".into(), san: "ingress.a.example".into() };
        let mut r = Resources::default();
        r.put_customer("a", &c, &address);
        let body = r.clusters["a"].any(CLUSTER);
        assert_eq!(body.type_url, CLUSTER);
        let cluster = Cluster::decode(body.value.as_slice()).unwrap();
        assert_eq!(
            cluster.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::StrictDns as i32))
        );
        let socket = cluster.transport_socket.unwrap();
        let Some(transport_socket::ConfigType::TypedConfig(tls)) = socket.config_type else { panic!("no TLS") };
        let tls = UpstreamTlsContext::decode(tls.value.as_slice()).unwrap();
        let common = tls.common_tls_context.unwrap();
        assert_eq!(common.tls_certificate_sds_secret_configs[0].name, PLATFORM_CLIENT);
        let secret = Secret::decode(&r.secrets["a-ca"].body[..]).unwrap();
        assert_eq!(secret.name, "a-ca");
    }
}
