//! Connecting to NATS: options from the configuration, retries with backoff at start, clear
//! errors, and reconnection counted in metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::{ConnectErrorKind, ConnectOptions, Event};
use tracing::{info, warn};

use crate::config::NodeConfig;
use crate::metrics::Metrics;

/// Exit code for wrong credentials or a refused TLS handshake: retrying will not help.
pub const EXIT_AUTH: i32 = 3;
/// Exit code when NATS stayed unreachable for `connect_retry_for_ms`.
pub const EXIT_UNREACHABLE: i32 = 4;
/// Largest nkey seed file read (a seed is 58 characters).
pub const MAX_NKEY_FILE_BYTES: u64 = 4096;

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// The server refused the credentials (or TLS): a configuration problem.
    #[error(
        "NATS refused the connection to {urls}: {message} (check user/password, creds_file and TLS settings)"
    )]
    Refused {
        /// The URLs tried.
        urls: String,
        /// The server's or client's message.
        message: String,
    },
    /// Nothing answered within the retry window.
    #[error("NATS at {urls} unreachable for {waited_ms} ms: {message}")]
    Unreachable {
        /// The URLs tried.
        urls: String,
        /// How long it tried.
        waited_ms: u64,
        /// The last error.
        message: String,
    },
    /// A configured file could not be used.
    #[error("NATS credentials: {0}")]
    Credentials(String),
}

impl ConnectFailure {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConnectFailure::Refused { .. } | ConnectFailure::Credentials(_) => EXIT_AUTH,
            ConnectFailure::Unreachable { .. } => EXIT_UNREACHABLE,
        }
    }
}

async fn options(
    cfg: &NodeConfig,
    name: &str,
    metrics: Arc<Metrics>,
) -> Result<ConnectOptions, ConnectFailure> {
    let max_delay = Duration::from_millis(cfg.reconnect_max_delay_ms);
    let connected_before = Arc::new(AtomicBool::new(false));
    let mut o = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| {
            let ms = 50u64.saturating_mul(1 << attempts.min(10));
            Duration::from_millis(ms).min(max_delay)
        })
        .event_callback(move |event| {
            let metrics = metrics.clone();
            let connected_before = connected_before.clone();
            async move {
                match event {
                    // The first connection is not a reconnection.
                    Event::Connected if !connected_before.swap(true, Ordering::Relaxed) => {
                        info!("connected to NATS (event)");
                    }
                    Event::Connected => {
                        Metrics::inc(&metrics.nats_reconnects_total);
                        info!("reconnected to NATS");
                    }
                    Event::Disconnected => warn!("disconnected from NATS"),
                    Event::ServerError(e) if is_permission_violation(&e) => {
                        Metrics::inc(&metrics.nats_permission_violations_total);
                        warn!(error = %e, "the NATS server refused a permission");
                    }
                    other => info!(event = %other, "NATS event"),
                }
            }
        });
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(path) = &cfg.creds_file {
        o = o
            .credentials_file(path)
            .await
            .map_err(|e| ConnectFailure::Credentials(format!("{}: {e}", path.display())))?;
    }
    if let Some(path) = &cfg.nkey_file {
        o = o.nkey(read_nkey_seed(path)?);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        o = o
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(o)
}

/// Whether the server's error is a refused publish or subscription (`-ERR 'Permissions
/// Violation for Publish to "…"'`).
fn is_permission_violation(e: &async_nats::ServerError) -> bool {
    matches!(e, async_nats::ServerError::Other(m) if m.to_ascii_lowercase().contains("permissions violation"))
}

/// Whether a connection error comes from the TLS layer (rustls): a certificate or protocol
/// problem of the configuration, not an unreachable server.
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Reads an nkey seed file: the first line that starts with `SU` (a user seed), trimmed.
fn read_nkey_seed(path: &std::path::Path) -> Result<String, ConnectFailure> {
    let fail = |m: String| ConnectFailure::Credentials(format!("{}: {m}", path.display()));
    let len = std::fs::metadata(path)
        .map_err(|e| fail(e.to_string()))?
        .len();
    if len > MAX_NKEY_FILE_BYTES {
        return Err(fail(format!(
            "{len} bytes; an nkey seed file is at most {MAX_NKEY_FILE_BYTES}"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .ok_or_else(|| fail("no user nkey seed (a line starting with SU)".into()))?;
    if seed.len() != 58 || !seed.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(fail("the seed is not 58 base32 characters".into()));
    }
    Ok(seed.to_owned())
}

/// Connects, retrying with backoff for up to `connect_retry_for_ms` (0: forever) while the
/// servers are unreachable; refused credentials fail at once.
pub async fn connect(
    cfg: &NodeConfig,
    name: &str,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, ConnectFailure> {
    let urls = cfg.nats_urls.join(",");
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let o = options(cfg, name, metrics.clone()).await?;
        match o.connect(cfg.nats_urls.clone()).await {
            Ok(client) => {
                info!(%urls, attempt, "connected to NATS");
                return Ok(client);
            }
            Err(e) => {
                let message = e.to_string();
                match e.kind() {
                    ConnectErrorKind::AuthorizationViolation
                    | ConnectErrorKind::Authentication
                    | ConnectErrorKind::Tls
                    | ConnectErrorKind::ServerParse => {
                        return Err(ConnectFailure::Refused { urls, message });
                    }
                    // A certificate the configured CA does not accept arrives as an I/O
                    // error; retrying cannot fix it.
                    _ if is_tls_failure(&e) => {
                        return Err(ConnectFailure::Refused { urls, message });
                    }
                    _ => {}
                }
                let waited_ms = started.elapsed().as_millis() as u64;
                if cfg.connect_retry_for_ms > 0 && waited_ms >= cfg.connect_retry_for_ms {
                    return Err(ConnectFailure::Unreachable {
                        urls,
                        waited_ms,
                        message,
                    });
                }
                warn!(%urls, attempt, error = %message, retry_in_ms = delay.as_millis() as u64, "NATS unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(cfg.reconnect_max_delay_ms.max(100)));
            }
        }
    }
}
