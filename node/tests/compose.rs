//! `deploy/docker-compose.yml` without Docker: every service's command runs as a local process
//! with the same config files and environment, and the test checks that the cluster forms,
//! elects a leader and applies the demo producer's deltas, with the compose file's users and
//! subject permissions in force.
//!
//! How a service becomes a process:
//! - argv = `entrypoint` (the service's, else the Dockerfile's `ENTRYPOINT` for services built
//!   from it, else none: the NATS image runs its command) + `command`; `tessel` is this build's
//!   binary, `nats-server` the project's (`TESSEL_NATS_SERVER`);
//! - `environment` with `${VAR:-default}` resolved as compose does (the test sets only
//!   `DEMO_DURATION`, a compose variable);
//! - bind mounts are copied into a temporary directory, named volumes are empty temporary
//!   directories, and container paths in argv, environment and mounted files are rewritten to
//!   those directories (this is how the JetStream `store_dir` moves);
//! - names: as root, each service runs in its own network namespace (`ip netns`) joined to a
//!   bridge by a veth pair, with `/etc/netns/<ns>/hosts` naming every service, so `nats-1:4222`
//!   and `0.0.0.0:8080` work unchanged. Otherwise (or with `TESSEL_COMPOSE_NET=loopback`) every
//!   `<service>:<port>` and every `0.0.0.0:<port>` is rewritten to `127.0.0.1:<a free port>`,
//!   and the test says so.
//! - `depends_on: condition: service_healthy` waits for the dependency's health URL: the one in
//!   its `healthcheck`, or the Dockerfile's `TESSEL_HEALTH_URL` for the tessel image.
//!
//! Processes, namespaces, the bridge and the hosts files are removed by [`Deployment`]'s `Drop`,
//! also when the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_norway::Value as Yaml;

/// The demo's length in the test (the compose default is a minute).
const DEMO_DURATION: &str = "8s";
/// How long the cluster may take to form.
const FORM_LIMIT: Duration = Duration::from_secs(180);
/// How long a dependency may take to become healthy.
const HEALTH_LIMIT: Duration = Duration::from_secs(120);
/// How long the producer may run (it waits for the model to serve, then produces).
const PRODUCER_LIMIT: Duration = Duration::from_secs(300);
/// The cluster name in deploy/tessel/*.toml.
const CLUSTER: &str = "tessel";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

// ---------------------------------------------------------------------------------------------
// The compose file

#[derive(Debug)]
enum Source {
    Bind(PathBuf),
    Named(String),
}

#[derive(Debug)]
struct Mount {
    container: String,
    source: Source,
}

#[derive(Debug)]
struct Service {
    name: String,
    image: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<Mount>,
    depends_on: Vec<String>,
    /// `http://127.0.0.1:PORT/PATH` as seen inside the container.
    health_url: Option<String>,
}

/// What the test takes from deploy/Dockerfile.
struct Dockerfile {
    entrypoint: Vec<String>,
    health_url: Option<String>,
}

fn read_dockerfile(path: &Path) -> Dockerfile {
    let text = fs::read_to_string(path).unwrap();
    let mut entrypoint = Vec::new();
    let mut health_url = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            entrypoint = serde_json::from_str(rest.trim()).unwrap();
        }
        if let Some(rest) = line.strip_prefix("ENV TESSEL_HEALTH_URL=") {
            health_url = Some(rest.trim().to_owned());
        }
    }
    assert!(
        !entrypoint.is_empty(),
        "no ENTRYPOINT in {}",
        path.display()
    );
    Dockerfile {
        entrypoint,
        health_url,
    }
}

/// Compose interpolation: `${VAR}`, `${VAR:-default}` and `$$`.
fn interpolate(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('{') {
            let end = a
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {s:?}"));
            let expr = &a[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            let value = vars
                .get(name)
                .filter(|v| !v.is_empty())
                .cloned()
                .or(default.map(str::to_owned))
                .unwrap_or_default();
            out.push_str(&value);
            rest = &a[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn strings(v: Option<&Yaml>, vars: &HashMap<String, String>) -> Vec<String> {
    match v {
        None => Vec::new(),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|i| interpolate(i.as_str().unwrap(), vars))
            .collect(),
        Some(Yaml::String(s)) => s.split_whitespace().map(|w| interpolate(w, vars)).collect(),
        Some(other) => panic!("expected a list of strings, got {other:?}"),
    }
}

fn scalar(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn read_compose(path: &Path, vars: &HashMap<String, String>) -> Vec<Service> {
    let dir = path.parent().unwrap();
    let doc: Yaml = serde_norway::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    let mut out = Vec::new();
    for (name, s) in services {
        let name = name.as_str().unwrap().to_owned();
        let image = s["image"].as_str().unwrap_or_default().to_owned();
        let dockerfile = s.get("build").map(|b| {
            let context = dir.join(b["context"].as_str().unwrap_or("."));
            read_dockerfile(&context.join(b["dockerfile"].as_str().unwrap_or("Dockerfile")))
        });
        let mut argv = match s.get("entrypoint") {
            Some(e) => strings(Some(e), vars),
            None => dockerfile
                .as_ref()
                .map(|d| d.entrypoint.clone())
                .unwrap_or_default(),
        };
        argv.extend(strings(s.get("command"), vars));
        assert!(!argv.is_empty(), "service {name} runs nothing");
        let env = match s.get("environment") {
            None => Vec::new(),
            Some(Yaml::Mapping(m)) => m
                .iter()
                .map(|(k, v)| (scalar(k), interpolate(&scalar(v), vars)))
                .collect(),
            Some(other) => panic!("{name}: environment as a mapping please, got {other:?}"),
        };
        let mounts = strings(s.get("volumes"), vars)
            .iter()
            .map(|v| {
                let mut parts = v.split(':');
                let src = parts.next().unwrap();
                let container = parts.next().expect("volume target").to_owned();
                let source = if src.starts_with('.') || src.starts_with('/') {
                    Source::Bind(dir.join(src))
                } else {
                    Source::Named(src.to_owned())
                };
                Mount { container, source }
            })
            .collect();
        let depends_on = match s.get("depends_on") {
            None => Vec::new(),
            Some(Yaml::Mapping(m)) => m.keys().map(scalar).collect(),
            Some(Yaml::Sequence(l)) => l.iter().map(scalar).collect(),
            Some(other) => panic!("{name}: depends_on {other:?}"),
        };
        let health_url = s
            .get("healthcheck")
            .and_then(|h| h.get("test"))
            .and_then(|t| t.as_sequence())
            .and_then(|t| {
                t.iter()
                    .filter_map(|i| i.as_str())
                    .find(|i| i.starts_with("http://"))
                    .map(str::to_owned)
            })
            .or_else(|| {
                let disabled = s
                    .get("healthcheck")
                    .and_then(|h| h.get("disable"))
                    .and_then(Yaml::as_bool)
                    .unwrap_or(false);
                if disabled {
                    None
                } else {
                    dockerfile.as_ref().and_then(|d| d.health_url.clone())
                }
            });
        out.push(Service {
            name,
            image,
            argv,
            env,
            mounts,
            depends_on,
            health_url,
        });
    }
    out
}

/// The services in an order where each comes after what it depends on.
fn start_order(services: &[Service]) -> Vec<usize> {
    let mut order: Vec<usize> = Vec::new();
    while order.len() < services.len() {
        let before = order.len();
        for (i, s) in services.iter().enumerate() {
            let ready = s.depends_on.iter().all(|d| {
                order.iter().any(|&j| &services[j].name == d)
                    || !services.iter().any(|x| &x.name == d)
            });
            if !order.contains(&i) && ready {
                order.push(i);
            }
        }
        assert!(order.len() > before, "a depends_on cycle");
    }
    order
}

// ---------------------------------------------------------------------------------------------
// Names and addresses

/// Network namespaces joined by a bridge.
struct Netns {
    bridge: String,
    /// service → (namespace, address)
    members: BTreeMap<String, (String, String)>,
}

enum Net {
    /// service → (namespace, address); the namespaces are owned by `Deployment::netns`.
    Namespaces(BTreeMap<String, (String, String)>),
    /// service:port → 127.0.0.1 port
    Loopback(Mutex<HashMap<(String, u16), u16>>),
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Netns {
    /// Removes what an earlier run killed before its `Drop` left behind: namespaces
    /// `tsc<pid>-…` and bridges `tsc<pid>b` of processes that no longer exist.
    fn remove_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(ns) = line.split_whitespace().next() else {
                continue;
            };
            let Some((pid, _)) = ns.strip_prefix("tsc").and_then(|r| r.split_once('-')) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
                println!("compose: removing stale namespace {ns}");
                let _ = run_ip(&["netns", "del", ns]);
                let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
                let _ = run_ip(&["link", "del", &format!("tsc{pid}b")]);
            }
        }
    }

    /// Creates one namespace per service. On failure what was made is removed by `Drop`.
    fn create(names: &[String], into: &mut Option<Netns>) -> Result<(), String> {
        Netns::remove_stale();
        // The whole pid (at most 7 digits): interface names stay within 15 characters.
        let id = std::process::id();
        let net = format!("10.231.{}", id % 250);
        let bridge = format!("tsc{id}b");
        *into = Some(Netns {
            bridge: bridge.clone(),
            members: BTreeMap::new(),
        });
        let this = into.as_mut().unwrap();
        run_ip(&["link", "add", &bridge, "type", "bridge"])?;
        run_ip(&["addr", "add", &format!("{net}.1/24"), "dev", &bridge])?;
        run_ip(&["link", "set", &bridge, "up"])?;
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for (i, name) in names.iter().enumerate() {
            hosts.push_str(&format!("{net}.{} {name}\n", 10 + i));
        }
        for (i, name) in names.iter().enumerate() {
            let ns = format!("tsc{id}-{name}");
            let addr = format!("{net}.{}", 10 + i);
            run_ip(&["netns", "add", &ns])?;
            this.members
                .insert(name.clone(), (ns.clone(), addr.clone()));
            let host_end = format!("tsc{id}h{i}");
            let ns_end = format!("tsc{id}n{i}");
            run_ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ])?;
            run_ip(&["link", "set", &ns_end, "netns", &ns])?;
            run_ip(&["link", "set", &host_end, "master", &bridge, "up"])?;
            run_ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &ns_end,
            ])?;
            run_ip(&["-n", &ns, "link", "set", &ns_end, "up"])?;
            run_ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let etc = Path::new("/etc/netns").join(&ns);
            fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
            fs::write(etc.join("hosts"), &hosts).map_err(|e| format!("hosts: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for (ns, _) in self.members.values() {
            let _ = run_ip(&["netns", "del", ns]);
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
        let _ = run_ip(&["link", "del", &self.bridge]);
    }
}

/// Whether `b` may sit next to a name or path without being part of it.
fn boundary(b: Option<u8>) -> bool {
    !b.is_some_and(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b))
}

/// Replaces every `<name>:<port>` for the given service names, and every `0.0.0.0:<port>` (a
/// service's own bind; `f` gets the name `0.0.0.0`), by what `f` returns.
fn rewrite_addrs(text: &str, names: &[String], mut f: impl FnMut(&str, u16) -> String) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    'outer: while i < bytes.len() {
        for name in names.iter().map(String::as_str).chain(["0.0.0.0"]) {
            let pat = format!("{name}:");
            // `/` may precede an address (`nats://nats-1:4222`), unlike a path.
            let before = i.checked_sub(1).map(|j| bytes[j]);
            if text[i..].starts_with(&pat) && (before == Some(b'/') || boundary(before)) {
                let digits: String = text[i + pat.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(port) = digits.parse::<u16>() {
                    out.push_str(&f(name, port));
                    i += pat.len() + digits.len();
                    continue 'outer;
                }
            }
        }
        let c = text[i..].chars().next().unwrap();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Replaces container paths by host paths (longest first).
fn rewrite_paths(text: &str, paths: &[(String, PathBuf)]) -> String {
    let mut out = text.to_owned();
    for (container, host) in paths {
        let mut result = String::new();
        let mut rest = out.as_str();
        let mut prev: Option<u8> = None;
        while let Some(i) = rest.find(container.as_str()) {
            let before = if i == 0 {
                prev
            } else {
                Some(rest.as_bytes()[i - 1])
            };
            let after = rest.as_bytes().get(i + container.len()).copied();
            let ok_after =
                after.is_none_or(|b| !(b.is_ascii_alphanumeric() || b"_-.".contains(&b)));
            result.push_str(&rest[..i]);
            if boundary(before) && ok_after {
                result.push_str(host.to_str().unwrap());
            } else {
                result.push_str(container);
            }
            prev = Some(container.as_bytes()[container.len() - 1]);
            rest = &rest[i + container.len()..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The running deployment

struct Running {
    name: String,
    child: Child,
    log: PathBuf,
    /// Stopped on purpose: no longer expected to run.
    stopped: bool,
}

struct Deployment {
    services: Vec<Service>,
    names: Vec<String>,
    net: Net,
    /// Held for its `Drop`: removes the namespaces after the processes are gone.
    _netns: Option<Netns>,
    dir: tempfile::TempDir,
    tessel: PathBuf,
    nats_server: PathBuf,
    running: Vec<Running>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for r in &mut self.running {
            // Each service leads its own process group: the group goes, helpers included.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", r.child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        // `netns` drops after this, removing namespaces once no process is in them.
    }
}

impl Deployment {
    fn new(vars: &HashMap<String, String>) -> Deployment {
        let services = read_compose(&deploy_dir().join("docker-compose.yml"), vars);
        let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
        let forced_loopback = std::env::var("TESSEL_COMPOSE_NET").is_ok_and(|v| v == "loopback");
        let mut netns = None;
        let net = if forced_loopback {
            println!(
                "compose: TESSEL_COMPOSE_NET=loopback: services share 127.0.0.1 with rewritten ports"
            );
            Net::Loopback(Mutex::new(HashMap::new()))
        } else if !is_root() {
            println!(
                "compose: not root: no network namespaces; services share 127.0.0.1 with rewritten ports"
            );
            Net::Loopback(Mutex::new(HashMap::new()))
        } else {
            match Netns::create(&names, &mut netns) {
                Ok(()) => {
                    let ns = netns.as_ref().unwrap();
                    let list: Vec<String> = ns
                        .members
                        .iter()
                        .map(|(s, (n, a))| format!("{s}={a} ({n})"))
                        .collect();
                    println!("compose: network namespaces: {}", list.join(", "));
                    Net::Namespaces(ns.members.clone())
                }
                Err(e) => {
                    drop(netns.take());
                    println!(
                        "compose: network namespaces unavailable ({e}); services share 127.0.0.1 with rewritten ports"
                    );
                    Net::Loopback(Mutex::new(HashMap::new()))
                }
            }
        };
        Deployment {
            services,
            names,
            net,
            _netns: netns,
            dir: tempfile::tempdir().unwrap(),
            tessel: PathBuf::from(env!("CARGO_BIN_EXE_tessel")),
            nats_server: tessel_node::natsd::find_nats_server(true).unwrap(),
            running: Vec::new(),
        }
    }

    fn uses_netns(&self) -> bool {
        matches!(self.net, Net::Namespaces(_))
    }

    /// The loopback port standing for `service:port`.
    fn loopback_port(&self, service: &str, port: u16) -> u16 {
        let Net::Loopback(map) = &self.net else {
            return port;
        };
        let mut map = map.lock().unwrap();
        *map.entry((service.to_owned(), port))
            .or_insert_with(|| tessel_node::natsd::free_port().unwrap())
    }

    /// Where the test (in the host namespace) reaches `service:port`.
    fn host_addr(&self, service: &str, port: u16) -> String {
        match &self.net {
            Net::Namespaces(ns) => format!("{}:{port}", ns[service].1),
            Net::Loopback(_) => format!("127.0.0.1:{}", self.loopback_port(service, port)),
        }
    }

    /// A text as `service` sees it here: container paths and (on loopback) addresses rewritten.
    fn rewrite(&self, service: &str, text: &str, paths: &[(String, PathBuf)]) -> String {
        let text = rewrite_paths(text, paths);
        if self.uses_netns() {
            return text;
        }
        rewrite_addrs(&text, &self.names, |name, port| {
            let owner = if name == "0.0.0.0" { service } else { name };
            format!("127.0.0.1:{}", self.loopback_port(owner, port))
        })
    }

    /// Copies `from` into `to`, rewriting text files as `service` sees them.
    fn copy_tree(&self, service: &str, from: &Path, to: &Path, paths: &[(String, PathBuf)]) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                self.copy_tree(service, &entry.path(), &target, paths);
            } else {
                let bytes = fs::read(entry.path()).unwrap();
                match String::from_utf8(bytes) {
                    Ok(text) => fs::write(&target, self.rewrite(service, &text, paths)).unwrap(),
                    Err(e) => fs::write(&target, e.into_bytes()).unwrap(),
                }
            }
        }
    }

    /// Container path → host path for a service; bind mounts materialised (rewritten).
    fn mounts(&self, index: usize) -> Vec<(String, PathBuf)> {
        let s = &self.services[index];
        let mut paths: Vec<(String, PathBuf)> = s
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let host = match &m.source {
                    Source::Bind(_) => self
                        .dir
                        .path()
                        .join("mounts")
                        .join(&s.name)
                        .join(i.to_string()),
                    Source::Named(n) => self.dir.path().join("volumes").join(n),
                };
                (m.container.clone(), host)
            })
            .collect();
        paths.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        for m in &s.mounts {
            let (_, host) = paths.iter().find(|(c, _)| *c == m.container).unwrap();
            match &m.source {
                Source::Bind(from) => self.copy_tree(&s.name, from, host, &paths),
                Source::Named(_) => fs::create_dir_all(host).unwrap(),
            }
        }
        paths
    }

    /// A command that runs `argv` as `service` would: in its namespace, with `env` only.
    fn command(&self, service: &str, argv: &[String], env: &[(String, String)]) -> Command {
        let program = match argv[0].as_str() {
            "tessel" => self.tessel.to_str().unwrap().to_owned(),
            "nats-server" => self.nats_server.to_str().unwrap().to_owned(),
            other => other.to_owned(),
        };
        let mut cmd = match &self.net {
            Net::Namespaces(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns[service].0, &program]);
                c
            }
            Net::Loopback(_) => Command::new(&program),
        };
        cmd.args(&argv[1..]);
        let bin_dir = self.tessel.parent().unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        cmd.env_clear()
            .env("PATH", path)
            .env("HOME", self.dir.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Ok(log) = std::env::var("RUST_LOG") {
            cmd.env("RUST_LOG", log);
        }
        cmd
    }

    fn start(&mut self, index: usize) {
        let paths = self.mounts(index);
        let s = &self.services[index];
        let argv: Vec<String> = s
            .argv
            .iter()
            .map(|a| self.rewrite(&s.name, a, &paths))
            .collect();
        let env: Vec<(String, String)> = s
            .env
            .iter()
            .map(|(k, v)| (k.clone(), self.rewrite(&s.name, v, &paths)))
            .collect();
        let log = self.dir.path().join("logs").join(format!("{}.log", s.name));
        fs::create_dir_all(log.parent().unwrap()).unwrap();
        let out = fs::File::create(&log).unwrap();
        let mut cmd = self.command(&s.name, &argv, &env);
        let stdout = if s.name == "producer" {
            Stdio::from(fs::File::create(self.dir.path().join("producer.out")).unwrap())
        } else {
            Stdio::from(out.try_clone().unwrap())
        };
        cmd.stdout(stdout).stderr(Stdio::from(out)).process_group(0);
        println!("compose: starting {}: {}", s.name, argv.join(" "));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}", s.name));
        self.running.push(Running {
            name: s.name.clone(),
            child,
            log,
            stopped: false,
        });
    }

    fn service(&self, name: &str) -> &Service {
        self.services.iter().find(|s| s.name == name).unwrap()
    }

    /// Waits until `name`'s health URL answers 200.
    fn wait_healthy(&self, name: &str) {
        let Some(url) = self.service(name).health_url.clone() else {
            return;
        };
        let rest = url.strip_prefix("http://127.0.0.1:").unwrap();
        let (port, path) = rest.split_at(rest.find('/').unwrap());
        let addr = self.host_addr(name, port.parse().unwrap());
        let started = Instant::now();
        loop {
            if http_status(&addr, path) == Some(200) {
                println!("compose: {name} healthy after {:?}", started.elapsed());
                return;
            }
            self.assert_alive();
            assert!(
                started.elapsed() < HEALTH_LIMIT,
                "{name} not healthy at {addr}{path} after {HEALTH_LIMIT:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Panics with the logs when a long-running service exited.
    fn assert_alive(&self) {
        for r in &self.running {
            if r.name == "producer" || r.stopped {
                continue;
            }
            let pid = r.child.id();
            let alive = Path::new(&format!("/proc/{pid}")).exists()
                && !fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ");
            assert!(alive, "service {} exited\n{}", r.name, self.logs());
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for r in &self.running {
            let text = fs::read_to_string(&r.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            out.push_str(&format!(
                "--- {} ({}):\n{}\n",
                r.name,
                r.log.display(),
                tail.join("\n")
            ));
        }
        out
    }

    fn log_of(&self, name: &str) -> String {
        let r = self.running.iter().find(|r| r.name == name).unwrap();
        fs::read_to_string(&r.log).unwrap_or_default()
    }

    /// Waits until `tessel status` (as the admin) shows `nodes` Active nodes owning all 1024
    /// slots under a leader; returns the status.
    fn wait_formed(&self, nodes: usize, admin_password: &str) -> Json {
        let started = Instant::now();
        loop {
            let (code, out, err) = self.tessel_as(
                "producer",
                "tessel-admin",
                admin_password,
                &["status", "--json", "--cluster", CLUSTER],
            );
            if code == 0 {
                let s: Json = serde_json::from_str(out.trim()).unwrap();
                let list = s["nodes"].as_array().cloned().unwrap_or_default();
                let owned: u64 = list.iter().filter_map(|n| n["slots"].as_u64()).sum();
                let active = list.iter().filter(|n| n["status"] == "Active").count();
                if list.len() == nodes
                    && active == nodes
                    && owned == 1024
                    && s["unowned_slots"] == 0
                    && !s["leader"].is_null()
                {
                    println!(
                        "compose: {nodes} nodes settled after {:?}",
                        started.elapsed()
                    );
                    return s;
                }
            }
            self.assert_alive();
            assert!(
                started.elapsed() < FORM_LIMIT,
                "not {nodes} settled nodes after {FORM_LIMIT:?}: {out}{err}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Stops a service with SIGTERM (a node drains) and returns its exit code.
    fn terminate(&mut self, name: &str) -> Option<i32> {
        let r = self.running.iter_mut().find(|r| r.name == name).unwrap();
        r.stopped = true;
        let pid = r.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let started = Instant::now();
        loop {
            if let Some(status) = r.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(started.elapsed() < FORM_LIMIT, "{name} ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The NATS URLs of the compose's NATS services, as `service` reaches them.
    fn nats_urls(&self, service: &str) -> String {
        let urls: Vec<String> = self
            .services
            .iter()
            .filter(|s| s.image.contains("nats"))
            .map(|s| format!("nats://{}:4222", s.name))
            .collect();
        self.rewrite(service, &urls.join(","), &[])
    }

    /// Runs `tessel <args>` as a client next to `service` with a user; returns (code, out, err).
    fn tessel_as(
        &self,
        service: &str,
        user: &str,
        password: &str,
        args: &[&str],
    ) -> (i32, String, String) {
        let mut argv = vec!["tessel".to_owned()];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv.extend(["--nats".to_owned(), self.nats_urls(service)]);
        let env = vec![
            ("TESSEL_USER".to_owned(), user.to_owned()),
            ("TESSEL_PASSWORD".to_owned(), password.to_owned()),
        ];
        let out = self
            .command(service, &argv, &env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The status code of `GET path` at `addr`, if it answered.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let sock = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace().nth(1)?.parse().ok()
}

fn env_of<'a>(s: &'a Service, key: &str) -> &'a str {
    s.env
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{} has no {key}", s.name))
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn compose_file_passes_the_schema_validation() {
    let script = repo().join("scripts/validate-compose.sh");
    let out = Command::new("bash").arg(&script).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("docker-compose.yml: valid"), "{stdout}");
    assert!(stdout.contains("docker-compose.gpu.yml: valid"), "{stdout}");

    // The same check refuses a broken copy.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yml");
    let text = fs::read_to_string(deploy_dir().join("docker-compose.yml")).unwrap();
    fs::write(&bad, text.replace("    restart: ", "    restart_policy: ")).unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restart_policy"),
        "{out:?}"
    );
}

#[test]
fn compose_services_form_a_cluster_and_apply_the_demo_deltas() {
    let vars: HashMap<String, String> = [("DEMO_DURATION".to_owned(), DEMO_DURATION.to_owned())]
        .into_iter()
        .collect();
    let mut d = Deployment::new(&vars);
    let netns_ran = d.uses_netns();
    println!("compose: network namespaces used: {netns_ran}");

    // The contract of the compose file.
    let nats: Vec<String> = d
        .services
        .iter()
        .filter(|s| s.image.contains("nats"))
        .map(|s| s.name.clone())
        .collect();
    let nodes = d
        .services
        .iter()
        .filter(|s| {
            s.argv.first().is_some_and(|a| a == "tessel")
                && s.argv.get(1).is_some_and(|a| a == "node")
        })
        .count();
    assert_eq!(nats.len(), 3, "three NATS services");
    assert_eq!(nodes, 3, "three `tessel node` services");
    assert!(d.services.iter().any(|s| s.name == "producer"));
    let admin_password = env_of(d.service(&nats[0]), "TESSEL_ADMIN_PASSWORD").to_owned();
    let producer_password = env_of(d.service("producer"), "TESSEL_PASSWORD").to_owned();

    // Start everything but the producer, in depends_on order, honouring health conditions.
    let order = start_order(&d.services);
    let mut producer = None;
    for i in order {
        for dep in d.services[i].depends_on.clone() {
            d.wait_healthy(&dep);
        }
        if d.services[i].name == "producer" {
            producer = Some(i);
            continue;
        }
        d.start(i);
    }

    // The cluster forms: three Active nodes, a leader, 1024 owned slots.
    let formed = d.wait_formed(3, &admin_password);
    println!("compose: formed: {formed}");
    let leader = formed["leader"]["node"].as_str().unwrap().to_owned();
    let ids: Vec<&str> = formed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert!(
        ids.contains(&leader.as_str()),
        "leader {leader} is not one of {ids:?}"
    );

    // The demo producer: create the model, wait for it to serve, produce.
    let producer = producer.unwrap();
    d.start(producer);
    let started = Instant::now();
    let status = loop {
        let r = d.running.iter_mut().find(|r| r.name == "producer").unwrap();
        if let Some(status) = r.child.try_wait().unwrap() {
            break status;
        }
        d.assert_alive();
        assert!(
            started.elapsed() < PRODUCER_LIMIT,
            "producer still running after {PRODUCER_LIMIT:?}\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let out = fs::read_to_string(d.dir.path().join("producer.out")).unwrap();
    assert!(
        status.success(),
        "producer: {status}; stdout {out}\n{}",
        d.logs()
    );
    let summary: Json = serde_json::from_str(out.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("producer output {out:?}: {e}"));
    println!("compose: producer: {summary}");
    let acked = summary["rows_acked"].as_u64().unwrap();
    assert!(acked > 0, "{summary}");

    // The deltas are applied: the owners' tables hold non-zero rows (read with the admin user).
    let model = env_of(d.service("producer"), "DEMO_MODEL").to_owned();
    let rows: Vec<String> = (0..64).map(|r| r.to_string()).collect();
    let rows = rows.join(",");
    let started = Instant::now();
    let nonzero = loop {
        let (code, out, err) = d.tessel_as(
            "producer",
            "tessel-admin",
            &admin_password,
            &[
                "model",
                "get",
                &model,
                "--rows",
                &rows,
                "--json",
                "--cluster",
                CLUSTER,
            ],
        );
        if code == 0 {
            let v: Json = serde_json::from_str(out.trim()).unwrap();
            let nonzero = v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| {
                    r["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x.as_f64() != Some(0.0))
                })
                .count();
            if nonzero > 0 {
                break nonzero;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no applied rows: {out}{err}\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("compose: {nonzero} of 64 rows read back non-zero");

    // Replaying the stream gives the live tables: every acknowledged delta applied once.
    let (code, out, err) = d.tessel_as(
        "producer",
        "tessel-admin",
        &admin_password,
        &[
            "replay",
            "--model",
            &model,
            "--verify",
            "--json",
            "--cluster",
            CLUSTER,
        ],
    );
    assert_eq!(code, 0, "replay --verify: {out}{err}");
    let verify: Json = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(verify["verified"], true, "{verify}");
    println!("compose: replay --verify: {verify}");

    // The producer user can read rows too, fresh ones included (its permissions cover row
    // reads and the direct gets of each slot's last delta).
    let (code, out, err) = d.tessel_as(
        "producer",
        "tessel-producer",
        &producer_password,
        &[
            "model",
            "get",
            &model,
            "--rows",
            "0",
            "--fresh",
            "--json",
            "--cluster",
            CLUSTER,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");

    // The leader leaves gracefully (drains: hands its slots over with checkpoints, releases the
    // lease and its membership key); the other two take everything over.
    let code = d.terminate(&leader);
    assert_eq!(
        code,
        Some(0),
        "{leader} did not drain cleanly\n{}",
        d.logs()
    );
    let after = d.wait_formed(2, &admin_password);
    assert_ne!(after["leader"]["node"], leader.as_str(), "{after}");

    // Nothing any node or the producer did was refused by the permissions.
    for s in &nats {
        let log = d.log_of(s);
        let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
        assert!(
            violations.is_empty(),
            "{s}: permission violations:\n{}",
            violations.join("\n")
        );
    }

    // Authentication is on: a wrong password is refused with exit code 3 ...
    let (code, out, err) = d.tessel_as(
        "producer",
        "tessel-admin",
        "wrong",
        &["status", "--cluster", CLUSTER],
    );
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("refused"), "{err}");
    // ... and the producer may not use the JetStream API that `tessel status` needs.
    let (code, out, err) = d.tessel_as(
        "producer",
        "tessel-producer",
        &producer_password,
        &["status", "--json", "--cluster", CLUSTER],
    );
    assert_ne!(code, 0, "the producer user read the buckets: {out}{err}");
    let violated = nats.iter().any(|s| d.log_of(s).contains("Violation"));
    assert!(
        violated,
        "no server reported the producer's refused request"
    );

    // Routes authenticate too: a server that reaches the route port without the route password
    // is refused and never joins.
    let route = d.rewrite("producer", &format!("nats-route://{}:6222", nats[0]), &[]);
    let argv: Vec<String> = [
        "nats-server",
        "-a",
        "127.0.0.1",
        "-p",
        "-1",
        "--cluster_name",
        "tessel-nats",
        "--cluster",
        "nats://127.0.0.1:-1",
        "--routes",
        &route,
    ]
    .map(str::to_owned)
    .to_vec();
    let rogue_log = d.dir.path().join("rogue-route.log");
    let mut rogue = d
        .command("producer", &argv, &[])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&rogue_log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let refused = loop {
        let log = fs::read_to_string(&rogue_log).unwrap_or_default();
        if log.contains("Route Error 'Authorization Violation'")
            || started.elapsed() > Duration::from_secs(20)
        {
            break log;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = rogue.kill();
    let _ = rogue.wait();
    assert!(
        refused.contains("Route Error 'Authorization Violation'"),
        "a route without the password was not refused:\n{refused}"
    );
    println!("compose: passed (network namespaces: {netns_ran})");
}

#[test]
fn the_dockerfile_builds_in_two_stages_and_runs_tessel_unprivileged_with_a_health_check() {
    let text = fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {froms:?}");
    assert!(
        text.contains("cargo build --release --locked -p node --bin tessel"),
        "the builder builds the tessel binary from the lock file"
    );
    assert!(
        froms[1].contains("slim"),
        "a slim runtime image: {}",
        froms[1]
    );
    let runtime = text.split(froms[1]).nth(1).unwrap();
    let user = runtime
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with("USER "))
        .expect("a USER in the runtime stage");
    assert!(
        !user.contains("root") && !user.ends_with(" 0") && !user.contains(" 0:"),
        "{user}"
    );
    assert!(runtime.contains("HEALTHCHECK"), "no health check");
    let d = read_dockerfile(&deploy_dir().join("Dockerfile"));
    assert_eq!(d.entrypoint, ["tessel"]);
    assert!(
        d.health_url
            .as_deref()
            .is_some_and(|u| u.ends_with("/status")),
        "the health check asks the node's /status"
    );
}
