//! `kpxctl certs`: a CA and certificates for a development or demo cluster. Production clusters
//! issue theirs with cert-manager or the cluster CA (deploy/kustomize/security/).

use crate::connect::ClientError;
use kpx_auth::certs::{CertAuthority, Leaf};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Where to write the files (made if missing). An existing ca.pem and ca-key.pem there are
    /// reused, so that more certificates can be issued later from the same CA.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// A name or address of the controlplane (repeat): written as server.pem, server-key.pem.
    #[arg(long = "server-name", value_name = "NAME|IP")]
    pub server_names: Vec<String>,
    /// A node certificate, CN=system:node:NAME, O=system:nodes, as kubelets have (repeat).
    /// NAME=IP also makes it a serving certificate for that address (the node's admin API).
    #[arg(long = "node", value_name = "NAME[=IP]")]
    pub nodes: Vec<String>,
    /// An admin certificate with this CommonName, O=system:masters: admin.pem, admin-key.pem.
    #[arg(long, value_name = "NAME")]
    pub admin: Option<String>,
    /// Validity of new certificates, in days.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
}

fn err(what: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Certs { reason: format!("{what}: {e}") }
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), ClientError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| err(&format!("writing {}", path.display()), e))?;
    file.write_all(text.as_bytes()).map_err(|e| err(&format!("writing {}", path.display()), e))
}

/// Writes a certificate and its key as `<stem>.pem`, `<stem>-key.pem`.
fn write_pair(dir: &Path, stem: &str, issued: &kpx_auth::certs::Issued, out: &mut String) -> Result<(), ClientError> {
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
    write(&cert, &issued.cert_pem, false)?;
    write(&key, &issued.key_pem, true)?;
    out.push_str(&format!("wrote {} and {}\n", cert.display(), key.display()));
    Ok(())
}

fn names_and_ips(names: &[String]) -> (Vec<String>, Vec<IpAddr>) {
    let (ips, dns): (Vec<&String>, Vec<&String>) = names.iter().partition(|n| n.parse::<IpAddr>().is_ok());
    (dns.into_iter().cloned().collect(), ips.into_iter().filter_map(|i| i.parse().ok()).collect())
}

pub fn run(args: &CertsArgs) -> Result<String, ClientError> {
    std::fs::create_dir_all(&args.dir).map_err(|e| err(&format!("making {}", args.dir.display()), e))?;
    let (ca_cert, ca_key) = (args.dir.join("ca.pem"), args.dir.join("ca-key.pem"));
    let mut out = String::new();
    let ca = match (std::fs::read_to_string(&ca_cert), std::fs::read_to_string(&ca_key)) {
        (Ok(cert), Ok(key)) => {
            out.push_str(&format!("reusing the CA in {}\n", ca_cert.display()));
            CertAuthority::from_pem(&cert, &key).map_err(|e| err(&format!("reading {}", ca_cert.display()), e))?
        }
        _ => {
            let ca = CertAuthority::new("kpx development CA", args.days).map_err(|e| err("making the CA", e))?;
            write(&ca_cert, ca.cert_pem(), false)?;
            write(&ca_key, &ca.key_pem(), true)?;
            out.push_str(&format!("wrote {} and {}\n", ca_cert.display(), ca_key.display()));
            ca
        }
    };
    if !args.server_names.is_empty() {
        let (dns, ips) = names_and_ips(&args.server_names);
        let leaf = Leaf::server("kpx-controlplane", &dns, &ips, args.days);
        write_pair(&args.dir, "server", &ca.issue(&leaf).map_err(|e| err("issuing server.pem", e))?, &mut out)?;
    }
    for node in &args.nodes {
        let (name, ip) = match node.split_once('=') {
            Some((n, ip)) => (n, Some(ip.parse::<IpAddr>().map_err(|e| err(&format!("--node {node}"), e))?)),
            None => (node.as_str(), None),
        };
        if name.is_empty() || name.contains('/') {
            return Err(err(&format!("--node {node:?}"), "not a node name"));
        }
        let mut leaf = Leaf::node(name, args.days);
        leaf.dns_names = vec![name.to_string()];
        leaf.ips = ip.into_iter().collect();
        let issued = ca.issue(&leaf).map_err(|e| err(&format!("issuing node-{name}.pem"), e))?;
        write_pair(&args.dir, &format!("node-{name}"), &issued, &mut out)?;
    }
    if let Some(admin) = &args.admin {
        let leaf = Leaf::new(admin, args.days).in_group("system:masters");
        write_pair(&args.dir, "admin", &ca.issue(&leaf).map_err(|e| err("issuing admin.pem", e))?, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpx_auth::identity::CertSubject;

    fn subject(path: &Path) -> CertSubject {
        let certs = kpx_auth::pem::read_certs("certificate file", path).unwrap();
        CertSubject::of(&certs[0]).unwrap()
    }

    #[test]
    fn writes_a_ca_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let args = |nodes: &[&str]| CertsArgs {
            dir: dir.path().to_path_buf(),
            server_names: vec!["127.0.0.1".into(), "kpx.example".into()],
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            admin: Some("alice".into()),
            days: 2,
        };
        let out = run(&args(&["node-a=10.0.0.1"])).unwrap();
        assert!(out.contains("ca.pem"), "{out}");
        assert_eq!(subject(&dir.path().join("node-node-a.pem")).node_name(), Some("node-a"));
        assert_eq!(subject(&dir.path().join("admin.pem")).organizations, vec!["system:masters"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("admin-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "keys are private");

        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let out = run(&args(&["node-b"])).unwrap();
        assert!(out.starts_with("reusing the CA"), "{out}");
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        let roots = kpx_auth::pem::read_roots("CA file", &dir.path().join("ca.pem")).unwrap();
        assert_eq!(roots.len(), 1);
        assert!(run(&args(&["bad=not-an-ip"])).is_err());
    }
}
