//! Images named by http(s) URIs, fetched within limits: body size, time, and which addresses
//! the host may resolve to.
//!
//! The host check is the guard against server-side request forgery. The executor fetches the
//! URIs of documents any client sends (with `--allow-http-images`), and the trainer fetches
//! the URIs in a pushed dataset, so both can be made to request addresses that only they can
//! reach: a cloud's metadata service (169.254.169.254, which hands out credentials), or
//! services on their own network. The check runs on the addresses the resolver returns, so it
//! holds for every spelling of a host (names, decimal or IPv4-mapped addresses), for every
//! redirect (each hop is resolved again), and against DNS answers that change between a
//! check and the connection (the connection uses the checked addresses).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// Which addresses an image URI's host may resolve to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageHosts {
    /// Addresses reachable over the internet only: no loopback, private network, link-local,
    /// shared (CGNAT), multicast or reserved address.
    Public,
    /// Also loopback and private networks (images on an internal object store), but never
    /// link-local addresses or the clouds' metadata services.
    #[default]
    Local,
    /// Any address.
    Any,
}

impl ImageHosts {
    /// The values, as the command line spells them.
    pub const NAMES: [&'static str; 3] = ["public", "local", "any"];

    /// Why `ip` may not be fetched under this setting, or None when it may.
    pub fn refuses(self, ip: IpAddr) -> Option<&'static str> {
        let class = classify(ip);
        let refused = match self {
            ImageHosts::Any => false,
            ImageHosts::Local => matches!(
                class,
                Class::LinkLocal | Class::Metadata | Class::Multicast | Class::Reserved
            ),
            ImageHosts::Public => class != Class::Global,
        };
        refused.then(|| class.describe())
    }
}

impl fmt::Display for ImageHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageHosts::Public => "public",
            ImageHosts::Local => "local",
            ImageHosts::Any => "any",
        })
    }
}

impl std::str::FromStr for ImageHosts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "public" => Ok(ImageHosts::Public),
            "local" => Ok(ImageHosts::Local),
            "any" => Ok(ImageHosts::Any),
            other => Err(format!(
                "unknown image hosts {other:?} (one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// What kind of address an IP is, as far as fetching from it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Global,
    /// 127/8, ::1, and the unspecified address (which Linux connects to the local host).
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7.
    Private,
    /// 100.64/10 (carrier-grade NAT).
    Shared,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// A cloud metadata service outside the link-local range (AWS's IPv6 fd00:ec2::254,
    /// Alibaba's 100.100.100.200).
    Metadata,
    Multicast,
    /// Documentation, benchmarking, protocol-assignment, broadcast and future-use ranges.
    Reserved,
}

impl Class {
    fn describe(self) -> &'static str {
        match self {
            Class::Global => "a public address",
            Class::Loopback => "a loopback address",
            Class::Private => "a private network address",
            Class::Shared => "a shared (carrier-grade NAT) address",
            Class::LinkLocal => "a link-local address (where clouds serve instance metadata)",
            Class::Metadata => "a cloud metadata service",
            Class::Multicast => "a multicast address",
            Class::Reserved => "a reserved address",
        }
    }
}

fn classify(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    let [a, b, c, _] = ip.octets();
    if ip == Ipv4Addr::new(100, 100, 100, 200) {
        Class::Metadata
    } else if a == 127 || a == 0 {
        // 0.0.0.0/8: "this network"; a connection to 0.0.0.0 reaches the local host.
        Class::Loopback
    } else if a == 10 || (a == 172 && (16..32).contains(&b)) || (a == 192 && b == 168) {
        Class::Private
    } else if a == 100 && (64..128).contains(&b) {
        Class::Shared
    } else if a == 169 && b == 254 {
        Class::LinkLocal
    } else if (224..240).contains(&a) {
        Class::Multicast
    } else if a >= 240
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        Class::Reserved
    } else {
        Class::Global
    }
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    let s = ip.segments();
    // Forms that carry an IPv4 address: mapped (::ffff:a.b.c.d), the deprecated compatible
    // form (::a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16) are judged by it.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        return classify_v4(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32));
    }
    if s[0] == 0x2002 {
        return classify_v4(Ipv4Addr::from(((s[1] as u32) << 16) | s[2] as u32));
    }
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        Class::Metadata
    } else if ip.is_loopback() || ip.is_unspecified() {
        Class::Loopback
    } else if s[0] & 0xfe00 == 0xfc00 {
        Class::Private
    } else if s[0] & 0xffc0 == 0xfe80 {
        Class::LinkLocal
    } else if s[0] & 0xff00 == 0xff00 {
        Class::Multicast
    } else if (s[0] == 0x2001 && s[1] == 0xdb8) || s[0] & 0xe000 != 0x2000 {
        // Documentation, and everything outside 2000::/3, the only range assigned globally.
        Class::Reserved
    } else {
        Class::Global
    }
}

/// How http(s) image URIs are fetched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpFetch {
    /// The largest body read.
    pub max_bytes: u64,
    /// The whole fetch's time limit, redirects included.
    pub timeout: Duration,
    pub hosts: ImageHosts,
}

impl HttpFetch {
    /// The limits of a dataset's images (training and evaluation data).
    pub const DATASET: HttpFetch = HttpFetch {
        max_bytes: 50 << 20,
        timeout: Duration::from_secs(60),
        hosts: ImageHosts::Local,
    };

    /// The body behind `uri`; errors name the URI.
    pub fn get(&self, uri: &str) -> Result<Vec<u8>, String> {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .build();
        let resolver = CheckedResolver {
            hosts: self.hosts,
            proxy_host: config.proxy().map(|p| p.host().to_string()),
        };
        let agent = ureq::Agent::with_parts(config, DefaultConnector::default(), resolver);
        let mut resp = agent
            .get(uri)
            .call()
            .map_err(|e| format!("cannot fetch {uri}: {e}"))?;
        let max = self.max_bytes;
        resp.body_mut()
            .with_config()
            .limit(max)
            .read_to_vec()
            .map_err(|e| format!("cannot fetch {uri} (limit {max} bytes): {e}"))
    }
}

impl Default for HttpFetch {
    fn default() -> Self {
        HttpFetch::DATASET
    }
}

/// The system resolver, keeping only the addresses `hosts` allows. A configured proxy
/// (`HTTP(S)_PROXY`, the operator's choice) is resolved unchecked; the hosts behind it are
/// then the proxy's to resolve and police.
#[derive(Debug)]
struct CheckedResolver {
    hosts: ImageHosts,
    proxy_host: Option<String>,
}

impl Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = DefaultResolver::default().resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        if self.hosts == ImageHosts::Any || self.proxy_host.as_deref() == Some(host) {
            return Ok(addrs);
        }
        let (kept, refused) = keep_allowed(self.hosts, &addrs);
        if kept.is_empty() {
            let (ip, why) = refused.unwrap_or((IpAddr::V4(Ipv4Addr::UNSPECIFIED), "no address"));
            return Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "host {host} resolves to {ip}, {why}, which image hosts {} refuses \
                     (--image-hosts: {})",
                    self.hosts,
                    ImageHosts::NAMES.join(", ")
                ),
            )));
        }
        let mut out = self.empty();
        for a in kept {
            out.push(a);
        }
        Ok(out)
    }
}

/// The addresses `hosts` allows, and the first refused one with the reason.
fn keep_allowed(
    hosts: ImageHosts,
    addrs: &[SocketAddr],
) -> (Vec<SocketAddr>, Option<(IpAddr, &'static str)>) {
    let mut kept = Vec::new();
    let mut refused = None;
    for a in addrs {
        match hosts.refuses(a.ip()) {
            None => kept.push(*a),
            Some(why) => {
                refused.get_or_insert((a.ip(), why));
            }
        }
    }
    (kept, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_classified_by_range() {
        let cases = [
            ("8.8.8.8", Class::Global),
            ("2606:4700::1111", Class::Global),
            ("127.0.0.1", Class::Loopback),
            ("127.255.0.9", Class::Loopback),
            ("0.0.0.0", Class::Loopback),
            ("::1", Class::Loopback),
            ("::", Class::Loopback),
            ("10.1.2.3", Class::Private),
            ("172.16.0.1", Class::Private),
            ("172.31.255.255", Class::Private),
            ("172.32.0.1", Class::Global),
            ("192.168.1.1", Class::Private),
            ("fd12:3456::1", Class::Private),
            ("100.64.0.1", Class::Shared),
            ("100.128.0.1", Class::Global),
            ("169.254.169.254", Class::LinkLocal),
            ("fe80::1", Class::LinkLocal),
            ("fd00:ec2::254", Class::Metadata),
            ("100.100.100.200", Class::Metadata),
            ("224.0.0.1", Class::Multicast),
            ("ff02::1", Class::Multicast),
            ("255.255.255.255", Class::Reserved),
            ("192.0.2.1", Class::Reserved),
            ("198.18.0.1", Class::Reserved),
            ("2001:db8::1", Class::Reserved),
            // IPv4 inside IPv6 is judged by the IPv4 address.
            ("::ffff:127.0.0.1", Class::Loopback),
            ("::ffff:169.254.169.254", Class::LinkLocal),
            ("::10.0.0.1", Class::Private),
            ("64:ff9b::a9fe:a9fe", Class::LinkLocal),
            ("2002:a9fe:a9fe::1", Class::LinkLocal),
            ("64:ff9b::808:808", Class::Global),
        ];
        for (s, want) in cases {
            assert_eq!(classify(ip(s)), want, "{s}");
        }
    }

    #[test]
    fn each_setting_refuses_its_ranges() {
        let metadata = ip("169.254.169.254");
        let loopback = ip("127.0.0.1");
        let private = ip("10.0.0.7");
        let public = ip("93.184.215.14");
        assert!(ImageHosts::Any.refuses(metadata).is_none());
        assert!(ImageHosts::Local.refuses(metadata).is_some());
        assert!(ImageHosts::Local.refuses(ip("fd00:ec2::254")).is_some());
        assert!(ImageHosts::Local.refuses(loopback).is_none());
        assert!(ImageHosts::Local.refuses(private).is_none());
        assert!(ImageHosts::Public.refuses(loopback).is_some());
        assert!(ImageHosts::Public.refuses(private).is_some());
        for h in [ImageHosts::Public, ImageHosts::Local, ImageHosts::Any] {
            assert!(h.refuses(public).is_none(), "{h}");
            assert_eq!(h.to_string().parse::<ImageHosts>(), Ok(h));
        }
        assert!("intranet".parse::<ImageHosts>().is_err());
    }

    #[test]
    fn mixed_answers_keep_only_allowed_addresses() {
        let addrs: Vec<SocketAddr> = ["127.0.0.1:80", "93.184.215.14:80", "[::1]:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let (kept, refused) = keep_allowed(ImageHosts::Public, &addrs);
        assert_eq!(kept, vec![addrs[1]]);
        assert_eq!(refused.map(|r| r.0), Some(ip("127.0.0.1")));
        let (kept, refused) = keep_allowed(ImageHosts::Local, &addrs);
        assert_eq!(kept, addrs);
        assert!(refused.is_none());
    }

    /// A one-thread HTTP/1.1 server on 127.0.0.1 answering each connection with the next of
    /// `replies` (status line and headers, then body); its address.
    fn serve(replies: Vec<(String, Vec<u8>)>) -> SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for (head, body) in replies {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "{head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body);
            }
        });
        addr
    }

    fn ok(body: &[u8]) -> (String, Vec<u8>) {
        ("HTTP/1.1 200 OK".into(), body.to_vec())
    }

    fn fetch(hosts: ImageHosts, max_bytes: u64) -> HttpFetch {
        HttpFetch {
            max_bytes,
            timeout: Duration::from_secs(20),
            hosts,
        }
    }

    #[test]
    fn fetches_within_the_host_and_size_limits() {
        let addr = serve(vec![ok(b"0123456789"), ok(b"0123456789")]);
        let uri = format!("http://{addr}/a.png");
        assert_eq!(
            fetch(ImageHosts::Local, 10).get(&uri).unwrap(),
            b"0123456789"
        );
        let err = fetch(ImageHosts::Local, 9).get(&uri).unwrap_err();
        assert!(err.contains("limit 9 bytes"), "{err}");
        // Refused before connecting: the server has no third reply to give.
        let err = fetch(ImageHosts::Public, 1 << 20).get(&uri).unwrap_err();
        assert!(
            err.contains("127.0.0.1") && err.contains("loopback") && err.contains("--image-hosts"),
            "{err}"
        );
    }

    #[test]
    fn a_redirect_is_checked_like_the_first_host() {
        // A local server that sends the fetch on to the metadata service: the hop is resolved
        // again and refused, without any network (169.254.169.254 is never dialled).
        let hop = |to: &str| (format!("HTTP/1.1 302 Found\r\nlocation: {to}"), Vec::new());
        let addr = serve(vec![
            hop("http://169.254.169.254/latest/meta-data/"),
            hop("http://[::ffff:169.254.169.254]/"),
        ]);
        let uri = format!("http://{addr}/a.png");
        for _ in 0..2 {
            let err = fetch(ImageHosts::Local, 1 << 20).get(&uri).unwrap_err();
            assert!(err.contains("link-local"), "{err}");
        }
    }
}
