//! The network the processes run on.
//!
//! - **Namespaces** (when the harness runs as root): every NATS server and every node runs in
//!   its own network namespace (`ip netns`), joined to a bridge by a veth pair, each with its own
//!   address in a private /24; the harness itself talks from the root namespace through the
//!   bridge's address. A cut between two hosts is a pair of `blackhole` routes (one in each
//!   host's namespace, or in the root namespace for the harness): packets between them are
//!   dropped by the kernel, established TCP connections stall as on a real broken link, and
//!   healing deletes the routes.
//! - **Loopback** (not root, or `--no-netns`): everything on 127.0.0.1; kills, pauses, server
//!   restarts and clock skew still work, partitions cannot be made and their scenarios are
//!   refused.
//!
//! Names are `chz<pid>…` (namespaces `chz<pid>-<host>`, bridge `chz<pid>br`, veths
//! `chz<pid>h<i>`); [`sweep_stale`] removes leftovers of harness processes that no longer run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context as _, bail};
use tokio::process::Command;

/// The name of the harness as a host (it runs in the root namespace).
pub const HARNESS: &str = "harness";

/// One host in a namespace.
#[derive(Clone, Debug)]
struct Host {
    ns: String,
    veth: String,
    ip: Ipv4Addr,
}

/// Namespaces, a bridge, and the cuts in force.
#[derive(Debug)]
pub struct Netns {
    prefix: String,
    bridge: String,
    base: [u8; 3],
    hosts: BTreeMap<String, Host>,
    cuts: BTreeSet<(String, String)>,
}

/// The network: namespaces or plain loopback.
#[derive(Debug)]
pub enum Net {
    /// Everything on 127.0.0.1.
    Loopback,
    /// Each process in its own namespace.
    Netns(Netns),
}

/// Runs `ip` with arguments, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip`, ignoring failure (cleanup).
fn ip_quiet(args: &[&str]) {
    let _ = std::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // The effective uid is the second field of the `Uid:` line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Removes namespaces, bridges and veths of earlier harness runs whose process is gone.
pub fn sweep_stale() {
    let pid_of = |name: &str| -> Option<u32> {
        let rest = name.strip_prefix("chz")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Some(pid) = pid_of(name)
                && name.contains('-')
                && !alive(pid)
            {
                ip_quiet(&["netns", "del", name]);
            }
        }
    }
    if let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "12: chz123br: <...>" or "13: chz123h1@if2: <...>"
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or_default();
            if let Some(pid) = pid_of(name)
                && !alive(pid)
            {
                ip_quiet(&["link", "del", name]);
            }
        }
    }
}

impl Net {
    /// Namespaces when root and not refused, loopback otherwise.
    pub fn new(allow_netns: bool) -> anyhow::Result<Net> {
        if !(allow_netns && is_root()) {
            return Ok(Net::Loopback);
        }
        sweep_stale();
        let pid = std::process::id();
        let prefix = format!("chz{pid}");
        let bridge = format!("{prefix}br");
        // A /24 no route on this machine covers yet.
        let routes = std::process::Command::new("ip")
            .args(["-4", "route", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut third = 20 + (pid % 200) as u8;
        for _ in 0..200 {
            if !routes.contains(&format!("10.213.{third}.")) {
                break;
            }
            third = 20 + (third - 20 + 1) % 200;
        }
        let base = [10, 213, third];
        // Root without the rights to make namespaces (a container without CAP_SYS_ADMIN), or
        // without `ip`: fall back to loopback rather than fail the scenarios that need none.
        let probe = format!("{prefix}-probe");
        if let Err(e) = ip(&["netns", "add", &probe])
            .and_then(|()| ip(&["netns", "del", &probe]))
            .and_then(|()| ip(&["link", "add", &bridge, "type", "bridge"]))
        {
            eprintln!("chaos-tests: cannot make network namespaces ({e:#}); using loopback");
            ip_quiet(&["netns", "del", &probe]);
            return Ok(Net::Loopback);
        }
        let n = Netns {
            prefix,
            bridge: bridge.clone(),
            base,
            hosts: BTreeMap::new(),
            cuts: BTreeSet::new(),
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", n.harness_ip()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(Net::Netns(n))
    }

    /// Whether partitions can be made.
    pub fn can_partition(&self) -> bool {
        matches!(self, Net::Netns(_))
    }

    /// Adds a host (a namespace for it); returns the address its process listens on.
    pub fn add_host(&mut self, name: &str) -> anyhow::Result<Ipv4Addr> {
        match self {
            Net::Loopback => Ok(Ipv4Addr::LOCALHOST),
            Net::Netns(n) => n.add_host(name),
        }
    }

    /// A command that runs `program` on host `name`.
    pub fn command(&self, name: &str, program: &Path) -> Command {
        match self {
            Net::Netns(n) if n.hosts.contains_key(name) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.hosts[name].ns]).arg(program);
                c
            }
            _ => Command::new(program),
        }
    }

    /// Drops every packet between `a` and `b` (either may be [`HARNESS`]).
    pub fn cut(&mut self, a: &str, b: &str) -> anyhow::Result<()> {
        match self {
            Net::Loopback => bail!("partitions need network namespaces (run as root)"),
            Net::Netns(n) => n.cut(a, b),
        }
    }

    /// Heals the cut between `a` and `b`.
    pub fn heal(&mut self, a: &str, b: &str) {
        if let Net::Netns(n) = self {
            n.heal(a, b);
        }
    }

    /// Heals every cut.
    pub fn heal_all(&mut self) {
        if let Net::Netns(n) = self {
            let cuts: Vec<(String, String)> = n.cuts.iter().cloned().collect();
            for (a, b) in cuts {
                n.heal(&a, &b);
            }
        }
    }

    /// A short description for the report.
    pub fn describe(&self) -> String {
        match self {
            Net::Loopback => "loopback (no partitions)".into(),
            Net::Netns(n) => format!(
                "network namespaces on bridge {} ({}.{}.{}.0/24), cuts are blackhole routes",
                n.bridge, n.base[0], n.base[1], n.base[2]
            ),
        }
    }
}

impl Netns {
    fn harness_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.base[0], self.base[1], self.base[2], 1)
    }

    fn add_host(&mut self, name: &str) -> anyhow::Result<Ipv4Addr> {
        let i = self.hosts.len() + 1;
        let last = u8::try_from(10 + i).context("too many hosts")?;
        let ip4 = Ipv4Addr::new(self.base[0], self.base[1], self.base[2], last);
        let ns = format!("{}-{name}", self.prefix);
        let veth = format!("{}h{i}", self.prefix);
        let peer = format!("{}p{i}", self.prefix);
        ip(&["netns", "add", &ns])?;
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &ns])?;
        ip(&["link", "set", &veth, "master", &self.bridge])?;
        ip(&["link", "set", &veth, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{ip4}/24"), "dev", &peer])?;
        ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.hosts.insert(name.into(), Host { ns, veth, ip: ip4 });
        Ok(ip4)
    }

    fn addr(&self, name: &str) -> Option<Ipv4Addr> {
        if name == HARNESS {
            Some(self.harness_ip())
        } else {
            self.hosts.get(name).map(|h| h.ip)
        }
    }

    /// A blackhole route on `from` towards `to`'s address.
    fn route(&self, op: &str, from: &str, to: Ipv4Addr) -> anyhow::Result<()> {
        let dst = format!("{to}/32");
        if from == HARNESS {
            ip(&["route", op, "blackhole", &dst])
        } else {
            let ns = &self
                .hosts
                .get(from)
                .with_context(|| format!("no host {from}"))?
                .ns;
            ip(&["-n", ns, "route", op, "blackhole", &dst])
        }
    }

    fn key(a: &str, b: &str) -> (String, String) {
        if a <= b {
            (a.into(), b.into())
        } else {
            (b.into(), a.into())
        }
    }

    fn cut(&mut self, a: &str, b: &str) -> anyhow::Result<()> {
        let key = Self::key(a, b);
        if a == b || self.cuts.contains(&key) {
            return Ok(());
        }
        let (Some(ia), Some(ib)) = (self.addr(a), self.addr(b)) else {
            bail!("cannot cut {a} from {b}: unknown host");
        };
        self.route("add", a, ib)?;
        if let Err(e) = self.route("add", b, ia) {
            let _ = self.route("del", a, ib);
            return Err(e);
        }
        self.cuts.insert(key);
        Ok(())
    }

    fn heal(&mut self, a: &str, b: &str) {
        let key = Self::key(a, b);
        if !self.cuts.remove(&key) {
            return;
        }
        if let (Some(ia), Some(ib)) = (self.addr(a), self.addr(b)) {
            let _ = self.route("del", a, ib);
            let _ = self.route("del", b, ia);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let cuts: Vec<(String, String)> = self.cuts.iter().cloned().collect();
        for (a, b) in cuts {
            self.heal(&a, &b);
        }
        for h in self.hosts.values() {
            ip_quiet(&["netns", "del", &h.ns]);
            ip_quiet(&["link", "del", &h.veth]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
    }
}
