//! A real etcd (Debian's `etcd-server`) for tests: a free loopback port, a
//! temporary data directory, a health wait, optional auth, and clean-up on drop.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use fedmesh_trust::pki::{LocalPki, PemPair};
use tempfile::TempDir;

/// The root user's name when auth is enabled.
pub const ROOT_USER: &str = "root";

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "etcd binary not found at {0}; install Debian's etcd-server (scripts/setup.sh does) or set ETCD_BIN"
    )]
    NotInstalled(PathBuf),
    #[error("starting etcd: {0}")]
    Io(#[from] std::io::Error),
    #[error("etcd exited during start-up ({status}); its log:\n{log}")]
    Exited { status: String, log: String },
    #[error("etcd did not become healthy within {timeout:?}: {last_error}; its log:\n{log}")]
    Unhealthy {
        timeout: Duration,
        last_error: String,
        log: String,
    },
    #[error("etcd client: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("etcd TLS material: {0}")]
    Pki(#[from] fedmesh_trust::CaError),
}

/// How to start etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// The loopback address to bind; one `127.0.<n>.x` block per simulated cluster.
    pub host: IpAddr,
    /// Enable auth with a root user (password in [`Etcd::root_password`]).
    pub auth: bool,
    /// Serve clients over TLS only, with client certificates required
    /// (`--client-cert-auth`); the PKI is in [`Etcd::pki`].
    pub tls: bool,
    /// How long to wait for the member to report healthy.
    pub start_timeout: Duration,
    /// The etcd binary; by default `$ETCD_BIN`, else `etcd` on `PATH`.
    pub binary: Option<PathBuf>,
    /// Extra flags, e.g. `--quota-backend-bytes=8589934592` for benchmarks.
    pub extra_args: Vec<String>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            auth: false,
            tls: false,
            start_timeout: Duration::from_secs(30),
            binary: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running single-member etcd. Dropping it kills the process and removes
/// its data directory.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    // Declared after `child` so the process is gone before the directory is removed.
    data_dir: TempDir,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
    options: EtcdOptions,
    root_password: Option<String>,
    tls: Option<HarnessTls>,
}

/// The harness's etcd PKI: the root, and the client certificate its own
/// clients present.
#[derive(Debug)]
struct HarnessTls {
    pki: LocalPki,
    server: PemPair,
    client: PemPair,
}

impl Etcd {
    /// Starts etcd on a free port of 127.0.0.1, without auth.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(EtcdOptions::default()).await
    }

    pub async fn start_with(options: EtcdOptions) -> Result<Self, HarnessError> {
        let bin = options.binary.clone().unwrap_or_else(etcd_binary);
        if !bin.is_file() {
            return Err(HarnessError::NotInstalled(bin));
        }
        // A port found free may be taken by another test before etcd binds
        // it; start again on fresh ports when that happens.
        let mut last = None;
        for _ in 0..5 {
            let data_dir = tempfile::Builder::new().prefix("fedmesh-etcd-").tempdir()?;
            let mut etcd = Etcd {
                child: None,
                client_addr: free_port(options.host)?,
                peer_addr: free_port(options.host)?,
                data_dir,
                options: options.clone(),
                root_password: None,
                tls: None,
            };
            if options.tls {
                let pki = LocalPki::create(&etcd.data_dir.path().join("pki"), "etcd test root")?;
                let server = pki.server("server", &[options.host])?;
                let client = pki.client(ROOT_USER)?;
                etcd.tls = Some(HarnessTls {
                    pki,
                    server,
                    client,
                });
            }
            match etcd.spawn_and_wait().await {
                Ok(()) => {
                    if options.auth {
                        etcd.enable_auth().await?;
                    }
                    return Ok(etcd);
                }
                Err(HarnessError::Exited { log, status })
                    if log.contains("address already in use") =>
                {
                    last = Some(HarnessError::Exited { log, status });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::Io(std::io::Error::other("no free port"))))
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let log = File::create(self.log_path())?;
        let client_url = self.endpoint();
        let peer_url = format!("http://{}", self.peer_addr);
        let bin = self.options.binary.clone().unwrap_or_else(etcd_binary);
        let mut cmd = Command::new(bin);
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cert-file={}", tls.server.cert.display()))
                .arg(format!("--key-file={}", tls.server.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.pki.ca().display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name=fedmesh-test")
            .arg(format!(
                "--data-dir={}",
                self.data_dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=fedmesh-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn")
            .args(&self.options.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    async fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        self.spawn()?;
        self.wait_healthy().await
    }

    /// Polls until the member answers a status request, or fails with its log.
    async fn wait_healthy(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + self.options.start_timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                self.child = None;
                return Err(HarnessError::Exited {
                    status: status.to_string(),
                    log: self.log(),
                });
            }
            let last_error = match self.connect_with_timeout(Duration::from_secs(1)).await {
                Ok(mut c) => match c.status().await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::Unhealthy {
                    timeout: self.options.start_timeout,
                    last_error,
                    log: self.log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn enable_auth(&mut self) -> Result<(), HarnessError> {
        let password = format!("root-{}", std::process::id());
        let mut c = self.client().await?;
        c.user_add(ROOT_USER, password.as_str(), None).await?;
        c.user_grant_role(ROOT_USER, "root").await?;
        c.auth_enable().await?;
        self.root_password = Some(password);
        Ok(())
    }

    async fn connect_with_timeout(&self, timeout: Duration) -> Result<Client, etcd_client::Error> {
        let mut opts = self
            .tls_options()?
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        if let Some(pw) = &self.root_password {
            opts = opts.with_user(ROOT_USER, pw.as_str());
        }
        Client::connect([self.endpoint()], Some(opts)).await
    }

    /// A client with full rights (the root user when auth is on).
    pub async fn client(&self) -> Result<Client, etcd_client::Error> {
        self.connect_with_timeout(Duration::from_secs(5)).await
    }

    /// A client without credentials, whatever the auth setting.
    pub async fn anonymous_client(&self) -> Result<Client, etcd_client::Error> {
        let opts = self
            .tls_options()?
            .with_connect_timeout(Duration::from_secs(5));
        Client::connect([self.endpoint()], Some(opts)).await
    }

    /// Options with the harness's TLS material, when it serves TLS.
    fn tls_options(&self) -> Result<ConnectOptions, etcd_client::Error> {
        let Some(tls) = &self.tls else {
            return Ok(ConnectOptions::new());
        };
        let read = |p: &Path| std::fs::read(p).map_err(etcd_client::Error::IoError);
        let ca = read(&tls.pki.ca())?;
        let identity = Identity::from_pem(read(&tls.client.cert)?, read(&tls.client.key)?);
        Ok(ConnectOptions::new().with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(identity),
        ))
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`, or `https://` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client_addr)
    }

    /// With TLS: the root clients verify etcd with.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|t| t.pki.ca())
    }

    /// With TLS: the harness's own client certificate (CN `root`).
    pub fn client_files(&self) -> Option<&PemPair> {
        self.tls.as_ref().map(|t| &t.client)
    }

    /// With TLS: a fresh client certificate whose CN is `cn` (etcd's user
    /// for requests without a password).
    pub fn issue_client(&self, cn: &str) -> Option<PemPair> {
        self.tls.as_ref().and_then(|t| t.pki.client(cn).ok())
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    pub fn root_password(&self) -> Option<&str> {
        self.root_password.as_deref()
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the member with SIGKILL, as an outage. Its data stays for
    /// [`Etcd::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same address and data.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        // `--initial-cluster-state=new` is ignored once the data dir exists.
        self.spawn_and_wait().await
    }

    /// Kills the member and starts it again with no data: a new, empty
    /// etcd on the same address, with auth off. [`Etcd::root_password`]
    /// still gives the password auth had (what a restore turns auth back
    /// on with); [`Etcd::client`] uses it again, so it works once auth is.
    pub async fn wipe(&mut self) -> Result<(), HarnessError> {
        self.kill();
        std::fs::remove_dir_all(self.data_dir.path().join("data"))?;
        let password = self.root_password.take();
        let started = self.spawn_and_wait().await;
        self.root_password = password;
        started
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("etcd.log")
    }

    /// What etcd has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let candidate = dir.join("etcd");
        if candidate.is_file() {
            return candidate;
        }
    }
    PathBuf::from("/usr/bin/etcd")
}

/// A port that was free on `host` a moment ago.
pub fn free_port(host: IpAddr) -> std::io::Result<SocketAddr> {
    TcpListener::bind((host, 0))?.local_addr()
}
