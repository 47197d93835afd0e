//! Authentication and TLS to NATS from the node's configuration: an nkey seed file, a creds
//! file (JWT + seed) against a server in operator mode (JWTs signed here with `nkeys`), TLS with
//! a CA file (certificates made by `rcgen`), and the clear errors and exit code 3 when the
//! credentials or the certificate chain are wrong. User/password is covered by
//! `cluster.rs` (wrong password) and `compose.rs` (the compose file's users).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tessel_node::natsd::{find_nats_server, free_port};

const TESSEL: &str = env!("CARGO_BIN_EXE_tessel");

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a single nats-server with JetStream and `extra` config; returns it and its client URL.
fn nats_with(dir: &Path, extra: &str) -> (Proc, String) {
    let port = free_port().unwrap();
    let http = free_port().unwrap();
    let conf = dir.join("nats.conf");
    fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\njetstream {{ store_dir: \"{}\" }}\n{extra}\n",
            dir.join("js").display()
        ),
    )
    .unwrap();
    let log = fs::File::create(dir.join("nats.log")).unwrap();
    let child = Command::new(find_nats_server(true).unwrap())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let started = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", http)) {
            let _ = write!(s, "GET /healthz HTTP/1.0\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200") {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nats-server not ready: {}",
            fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (proc, format!("nats://127.0.0.1:{port}"))
}

fn tessel(args: &[&str]) -> Output {
    Command::new(TESSEL)
        .args(args)
        .env("TESSEL_CONNECT_RETRY_FOR_MS", "2000")
        .output()
        .unwrap()
}

/// Runs a node with `config` and waits until `tessel status --config config` shows it owning
/// all 1024 slots.
fn node_serves(dir: &Path, config: &Path, url: &str) {
    let log = fs::File::create(dir.join("node.log")).unwrap();
    let cfg = config.to_str().unwrap();
    let _node = Proc(
        Command::new(TESSEL)
            .args(["node", "--config", cfg, "--nats", url, "--node-id", "n1"])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    loop {
        let out = tessel(&["status", "--config", cfg, "--nats", url, "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            if v["nodes"][0]["id"] == "n1" && v["nodes"][0]["slots"] == 1024 {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node not serving: {out:?}\n{}",
            fs::read_to_string(dir.join("node.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `tessel node` with `config` must exit 3 at once, saying the connection was refused.
fn node_is_refused(config: &Path, url: &str) -> String {
    let out = tessel(&[
        "node",
        "--config",
        config.to_str().unwrap(),
        "--nats",
        url,
        "--node-id",
        "n1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    err
}

#[test]
fn an_nkey_seed_file_authenticates_and_a_wrong_seed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let (_nats, url) = nats_with(
        dir.path(),
        &format!(
            "authorization {{ users: [ {{ nkey: {} }} ] }}",
            user.public_key()
        ),
    );
    let seed = dir.path().join("node.nk");
    fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    let cfg = dir.path().join("node.toml");
    fs::write(&cfg, format!("nkey_file = {:?}\n", seed.to_str().unwrap())).unwrap();
    node_serves(dir.path(), &cfg, &url);

    // Another user's seed: the server refuses it; the node says so and exits 3.
    fs::write(&seed, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let err = node_is_refused(&cfg, &url);
    assert!(err.contains("refused"), "{err}");

    // Not a seed at all: refused before connecting, naming the file.
    fs::write(&seed, "not a seed\n").unwrap();
    let err = node_is_refused(&cfg, &url);
    assert!(err.contains("node.nk") && err.contains("seed"), "{err}");
}

/// Users whose permissions leave out JetStream API subjects tessel needs: the server refuses
/// the request on the connection (the request itself goes unanswered), and the node exits 3
/// saying so, instead of waiting out the readiness limit and retrying its setup until it
/// times out (two and a half minutes before). "narrow" may not use the API at all: refused
/// at the readiness probe. "nostreams" may ask for account info but not create streams:
/// refused after the setup's first attempt (its create and bind each wait out their timeout).
#[test]
fn users_without_jetstream_permissions_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, url) = nats_with(
        dir.path(),
        r#"authorization { users: [
            { user: "narrow", password: "pw", permissions: { publish: { deny: ["$JS.API.>"] } } },
            { user: "nostreams", password: "pw", permissions: { publish: { deny: ["$JS.API.STREAM.>"] } } }
        ] }"#,
    );
    for (user, within) in [
        ("narrow", tessel_node::store::READY_LIMIT),
        ("nostreams", Duration::from_secs(60)),
    ] {
        let cfg = dir.path().join(format!("{user}.toml"));
        fs::write(&cfg, format!("user = {user:?}\npassword = \"pw\"\n")).unwrap();
        let started = Instant::now();
        let err = node_is_refused(&cfg, &url);
        assert!(
            err.contains("lack of permission") && err.contains("$JS.API"),
            "{user}: {err}"
        );
        assert!(
            started.elapsed() < within,
            "{user}: refused only after {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_missing_creds_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    fs::write(&cfg, "creds_file = \"/nonexistent/tessel.creds\"\n").unwrap();
    let port = free_port().unwrap();
    let err = node_is_refused(&cfg, &format!("nats://127.0.0.1:{port}"));
    assert!(
        err.contains("credentials") && err.contains("tessel.creds"),
        "{err}"
    );
}

/// A CA and a certificate for 127.0.0.1/localhost signed by it, as PEM files in `dir`.
fn make_ca(dir: &Path, name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("tessel test {name}"));
    let cert = params.self_signed(&key).unwrap();
    fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    (cert, key)
}

#[test]
fn tls_with_a_ca_file_and_client_certificates_works_and_wrong_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, ca_key) = make_ca(dir.path(), "ca");
    make_ca(dir.path(), "other-ca");
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (cert_path, key_path) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    fs::write(&cert_path, cert.pem()).unwrap();
    fs::write(&key_path, key.serialize_pem()).unwrap();
    let (nats, url) = nats_with(
        dir.path(),
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?} }}",
            cert_path.to_str().unwrap(),
            key_path.to_str().unwrap()
        ),
    );

    let cfg = dir.path().join("node.toml");
    let ca_path = dir.path().join("ca.pem");
    fs::write(
        &cfg,
        format!("tls_ca_file = {:?}\n", ca_path.to_str().unwrap()),
    )
    .unwrap();
    node_serves(dir.path(), &cfg, &url);

    // A CA that did not sign the server's certificate: the handshake fails, exit 3.
    let other = dir.path().join("other-ca.pem");
    fs::write(
        &cfg,
        format!("tls_ca_file = {:?}\n", other.to_str().unwrap()),
    )
    .unwrap();
    let err = node_is_refused(&cfg, &url);
    assert!(err.contains("refused"), "{err}");
    drop(nats);

    // Mutual TLS: the server verifies client certificates signed by the same CA.
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["tessel-node".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    let client_cert = dir.path().join("client.pem");
    let client_key_path = dir.path().join("client.key");
    fs::write(&client_cert, client.pem()).unwrap();
    fs::write(&client_key_path, client_key.serialize_pem()).unwrap();
    let mtls_dir = dir.path().join("mtls");
    fs::create_dir_all(&mtls_dir).unwrap();
    let (_mtls, url) = nats_with(
        &mtls_dir,
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}",
            cert_path.to_str().unwrap(),
            key_path.to_str().unwrap(),
            ca_path.to_str().unwrap()
        ),
    );
    fs::write(
        &cfg,
        format!(
            "tls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            ca_path.to_str().unwrap(),
            client_cert.to_str().unwrap(),
            client_key_path.to_str().unwrap()
        ),
    )
    .unwrap();
    node_serves(&mtls_dir, &cfg, &url);

    // Without a client certificate the server refuses the node: exit 3, not a retry loop.
    fs::write(
        &cfg,
        format!("tls_ca_file = {:?}\n", ca_path.to_str().unwrap()),
    )
    .unwrap();
    let err = node_is_refused(&cfg, &url);
    assert!(err.contains("refused"), "{err}");
}

/// A signed NATS JWT (`ed25519-nkey`) with `claims` for `subject`, issued by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{name}{}", std::process::id()),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", b64.encode(claims.to_string()));
    let sig = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", b64.encode(sig))
}

#[test]
fn a_creds_file_authenticates_in_operator_mode_and_a_foreign_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let sys_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2, "limits": {"conn": -1}}),
    );
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "tessel",
        serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let (_nats, url) = nats_with(
        dir.path(),
        &format!(
            "operator: {op_jwt}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {sys_jwt}\n  {}: {acc_jwt}\n}}",
            system.public_key(),
            system.public_key(),
            account.public_key()
        ),
    );
    let creds = |issuer: &nkeys::KeyPair| {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            issuer,
            &user.public_key(),
            "node",
            serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {},
                               "subs": -1, "data": -1, "payload": -1}),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        )
    };
    let creds_path = dir.path().join("node.creds");
    fs::write(&creds_path, creds(&account)).unwrap();
    let cfg = dir.path().join("node.toml");
    fs::write(
        &cfg,
        format!("creds_file = {:?}\n", creds_path.to_str().unwrap()),
    )
    .unwrap();
    node_serves(dir.path(), &cfg, &url);

    // A user signed by an account the server does not know: refused, exit 3.
    fs::write(&creds_path, creds(&nkeys::KeyPair::new_account())).unwrap();
    let err = node_is_refused(&cfg, &url);
    assert!(err.contains("refused"), "{err}");
}
