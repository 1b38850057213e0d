//! Where the service may send requests of its own (webhook deliveries): never to internal
//! networks unless they are allowed by configuration. A key with webhook rights could
//! otherwise make the service POST to its own loopback, the cloud's metadata address or a
//! private network (server-side request forgery).
//!
//! Addresses are checked twice: when a subscription is made (an address literal, or a name
//! such as `localhost` that can only mean this machine), and at every delivery after the name
//! is resolved, by the HTTP client's resolver itself, so a name that resolves elsewhere later
//! (DNS rebinding) is refused at the moment the connection would be made.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The networks deliveries may reach although they are internal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    allowed: Vec<IpNet>,
}

impl Egress {
    /// Parse a comma-separated list of networks (`127.0.0.0/8, ::1/128`); empty allows none.
    pub fn parse(list: &str) -> Result<Self, String> {
        let allowed = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|e| format!("'{s}' is not a network or an address: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { allowed })
    }

    /// Whether a delivery may connect to this address.
    pub(crate) fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !is_internal(ip) || self.allowed.iter().any(|n| n.contains(&ip))
    }

    /// Check a webhook URL before it is stored or used: an address literal must be permitted,
    /// and `localhost` names can only mean this machine. Other names are checked when they
    /// are resolved.
    pub(crate) fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        match url.host() {
            None => Err("the url has no host".into()),
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") {
                    self.check_ip(IpAddr::from([127, 0, 0, 1]))
                } else {
                    Ok(())
                }
            }
        }
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        if self.permits(ip) {
            Ok(())
        } else {
            Err(format!(
                "{ip} is an internal address (loopback, private, link-local, multicast or \
                 similar); webhooks are not delivered there unless SPECTRAL_WEBHOOK_ALLOW_NETWORKS \
                 allows it"
            ))
        }
    }

    /// A resolver for the HTTP client that drops every address this policy refuses, and fails
    /// when none is left.
    pub(crate) fn resolver(&self) -> Arc<Resolver> {
        Arc::new(Resolver {
            egress: self.clone(),
        })
    }
}

/// IPv4-mapped and -compatible IPv6 addresses are the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Loopback, private, shared (CGNAT), link-local (the metadata address among them),
/// multicast, broadcast, unspecified, documentation and other reserved ranges.
fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || a >= 240
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)
                || (first == 0x0064 && v6.segments()[1] == 0xff9b)
        }
    }
}

/// The webhook client's resolver: the system's, filtered by the policy.
pub(crate) struct Resolver {
    egress: Egress,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| egress.permits(a.ip()))
                .collect();
            if permitted.is_empty() {
                let refused: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                return Err(format!(
                    "{host} resolves only to internal addresses ({}); webhooks are not \
                     delivered there unless SPECTRAL_WEBHOOK_ALLOW_NETWORKS allows it",
                    refused.join(", ")
                )
                .into());
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        match reqwest::Url::parse(s) {
            Ok(u) => u,
            Err(e) => unreachable!("{s}: {e}"),
        }
    }

    #[test]
    fn every_internal_address_class_is_refused_by_default() {
        let egress = Egress::default();
        for u in [
            "http://127.0.0.1:9/",
            "http://127.1.2.3/",
            "http://[::1]/",
            "http://localhost:8000/",
            "http://api.localhost/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[ff02::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://2130706433/",
        ] {
            assert!(egress.check_url(&url(u)).is_err(), "{u} was accepted");
        }
    }

    #[test]
    fn public_addresses_and_names_pass_the_subscription_check() {
        let egress = Egress::default();
        for u in [
            "https://93.184.216.34/hook",
            "https://[2606:2800:220:1::1]/hook",
            "https://hooks.example.com/x",
        ] {
            assert_eq!(egress.check_url(&url(u)), Ok(()), "{u}");
        }
    }

    #[test]
    fn an_allowed_network_is_reachable_and_nothing_else_is() {
        let egress = Egress::parse("127.0.0.0/8, ::1").unwrap_or_default();
        assert_eq!(egress.check_url(&url("http://127.0.0.1:9/")), Ok(()));
        assert_eq!(egress.check_url(&url("http://localhost:9/")), Ok(()));
        assert_eq!(egress.check_url(&url("http://[::1]:9/")), Ok(()));
        assert!(egress.check_url(&url("http://10.0.0.1/")).is_err());
        assert!(Egress::parse("not-a-network").is_err());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_an_internal_address_is_refused_when_resolved() {
        use reqwest::dns::Resolve;
        let resolver = Egress::default().resolver();
        let name: reqwest::dns::Name = match "localhost".parse() {
            Ok(n) => n,
            Err(_) => unreachable!("a valid name"),
        };
        let err = resolver.resolve(name).await.err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("resolves only to internal addresses")),
            "{err:?}"
        );
        let allowed = match Egress::parse("127.0.0.0/8, ::1/128") {
            Ok(e) => e.resolver(),
            Err(e) => unreachable!("{e}"),
        };
        let name: reqwest::dns::Name = match "localhost".parse() {
            Ok(n) => n,
            Err(_) => unreachable!("a valid name"),
        };
        assert!(allowed.resolve(name).await.is_ok());
    }
}
