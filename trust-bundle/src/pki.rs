//! A small X.509 PKI for TLS between processes that are not SPIFFE
//! workloads: the etcd that `fedmesh up` and the tests run. One root, server
//! certificates for IP addresses, client certificates named by their CN
//! (etcd takes a client certificate's CN as its user). The root's key lives
//! only in memory; what is written is 0600.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::CaError;
use crate::ca::{random_serial, to_offset, write_private};

/// How long the certificates of a local PKI live: longer than any run of
/// `fedmesh up`, short enough that a copied key soon means nothing.
pub const LOCAL_PKI_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A root that issues server and client certificates into a directory.
pub struct LocalPki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    now: SystemTime,
}

impl std::fmt::Debug for LocalPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPki").field("dir", &self.dir).finish()
    }
}

impl LocalPki {
    /// A fresh root named `name`, its certificate written to `dir/ca.pem`.
    pub fn create(dir: &Path, name: &str) -> Result<Self, CaError> {
        let now = SystemTime::now();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_offset(now - Duration::from_secs(60));
        params.not_after = to_offset(now + LOCAL_PKI_LIFETIME);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        create_private_dir(dir)?;
        write_private(&dir.join("ca.pem"), cert.pem().as_bytes())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            now,
        })
    }

    /// The root's certificate: what clients verify the server with.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server certificate for `ips` (also usable as a client's, for
    /// peer-to-peer TLS between etcd members), written as `<name>.pem`.
    pub fn server(&self, name: &str, ips: &[IpAddr]) -> Result<PemPair, CaError> {
        let sans = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        self.leaf(
            name,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A client certificate whose CN is `cn`, written as `<cn>.pem`.
    pub fn client(&self, cn: &str) -> Result<PemPair, CaError> {
        self.leaf(cn, Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn leaf(
        &self,
        name: &str,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<PemPair, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.not_before = to_offset(self.now - Duration::from_secs(60));
        params.not_after = to_offset(self.now + LOCAL_PKI_LIFETIME);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let pair = PemPair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        write_private(&pair.cert, cert.pem().as_bytes())?;
        write_private(&pair.key, key.serialize_pem().as_bytes())?;
        Ok(pair)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::io(dir, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_server_and_client_certificates_under_one_root() {
        let dir = tempfile::tempdir().unwrap();
        let pki = LocalPki::create(&dir.path().join("pki"), "etcd test root").unwrap();
        let server = pki
            .server("etcd-0", &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let client = pki.client("fedmesh-cluster-aws").unwrap();
        for path in [
            pki.ca(),
            server.cert,
            server.key,
            client.cert.clone(),
            client.key,
        ] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        let pem = std::fs::read(&client.cert).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "fedmesh-cluster-aws");
    }
}
