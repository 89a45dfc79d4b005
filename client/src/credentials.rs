//! kpxctl's credentials: `--cacert`, `--cert`/`--key`, `--token-file`, and with `--kubeconfig`
//! the current context's user (its client certificate or token), flags taking precedence. The
//! kubeconfig's cluster CA is the apiserver's, not kpx's, so `--cacert` is still needed for
//! https://. Exec and auth-provider plugins are not run.

use crate::connect::ClientError;
use base64::Engine;
use kpx_auth::client::{ClientCredentials, Material};
use kpx_auth::flags::ClientFlags;
use secrecy::ExposeSecret;
use std::path::Path;

pub fn resolve(flags: &ClientFlags, kubeconfig: Option<&Path>) -> Result<ClientCredentials, ClientError> {
    let mut creds = flags.credentials();
    let Some(path) = kubeconfig else { return Ok(creds) };
    let bad = |reason: String| ClientError::Kubeconfig { path: path.display().to_string(), reason };
    let config = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let context_name = config.current_context.clone().ok_or_else(|| bad("no current-context".into()))?;
    let context = config
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .ok_or_else(|| bad(format!("context {context_name:?} is not defined")))?;
    let user_name = context.user.clone().unwrap_or_default();
    let user = config
        .auth_infos
        .iter()
        .find(|u| u.name == user_name)
        .and_then(|u| u.auth_info.as_ref())
        .ok_or_else(|| bad(format!("user {user_name:?} of context {context_name:?} is not defined")))?;
    let origin = |field: &str| format!("kubeconfig {} user {user_name:?} {field}", path.display());
    let data = |field: &str, b64: &str| -> Result<Material, ClientError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| bad(format!("user {user_name:?} {field}: not base64: {e}")))?;
        Ok(Material::Inline { origin: origin(field), bytes })
    };
    if creds.cert.is_none() {
        let cert = match (&user.client_certificate, &user.client_certificate_data) {
            (_, Some(d)) => Some(data("client-certificate-data", d)?),
            (Some(f), None) => Some(Material::File(f.into())),
            (None, None) => None,
        };
        let key = match (&user.client_key, &user.client_key_data) {
            (_, Some(d)) => Some(data("client-key-data", d.expose_secret())?),
            (Some(f), None) => Some(Material::File(f.into())),
            (None, None) => None,
        };
        creds.cert = cert.zip(key);
    }
    if creds.token.is_none() {
        creds.token = match (&user.token, &user.token_file) {
            (Some(t), _) => {
                Some(Material::Inline { origin: origin("token"), bytes: t.expose_secret().as_bytes().to_vec() })
            }
            (None, Some(f)) => Some(Material::File(f.into())),
            (None, None) => None,
        };
    }
    if creds.cert.is_none() && creds.token.is_none() {
        let plugin = user.exec.is_some() || user.auth_provider.is_some();
        return Err(bad(match plugin {
            true => {
                format!("user {user_name:?} authenticates with a plugin, which kpxctl does not run: give --token-file")
            }
            false => format!("user {user_name:?} has no client certificate or token"),
        }));
    }
    Ok(creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, user: &str) -> std::path::PathBuf {
        let path = dir.join("config");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context: {{cluster: k, user: u}}\nclusters:\n- name: k\n  cluster: {{server: https://k:6443}}\nusers:\n- name: u\n  user:\n{user}"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_current_users_certificate_or_token() {
        let dir = tempfile::tempdir().unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let inline = format!("    client-certificate-data: {}\n    client-key-data: {}\n", b64("CERT"), b64("KEY"));
        let creds = resolve(&ClientFlags::default(), Some(&write(dir.path(), &inline))).unwrap();
        let (cert, key) = creds.cert.unwrap();
        assert!(matches!(&cert, Material::Inline { bytes, .. } if bytes == b"CERT"));
        assert!(matches!(&key, Material::Inline { bytes, .. } if bytes == b"KEY"));
        assert!(creds.token.is_none());

        let files = "    client-certificate: rel/c.pem\n    client-key: /abs/k.pem\n    tokenFile: t\n";
        let creds = resolve(&ClientFlags::default(), Some(&write(dir.path(), files))).unwrap();
        let (cert, _) = creds.cert.unwrap();
        assert!(matches!(&cert, Material::File(p) if *p == dir.path().join("rel/c.pem")), "{cert:?}");
        assert!(matches!(&creds.token, Some(Material::File(p)) if *p == dir.path().join("t")));

        // Flags win over the kubeconfig.
        let flags = ClientFlags { token_file: Some("/flag/token".into()), ..ClientFlags::default() };
        let creds = resolve(&flags, Some(&write(dir.path(), "    token: abc\n"))).unwrap();
        assert!(matches!(&creds.token, Some(Material::File(p)) if p == Path::new("/flag/token")));
    }

    #[test]
    fn plugins_and_empty_users_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let exec = "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: aws\n";
        let err = resolve(&ClientFlags::default(), Some(&write(dir.path(), exec))).unwrap_err();
        assert!(err.to_string().contains("authenticates with a plugin, which kpxctl does not run"), "{err}");
        let err = resolve(&ClientFlags::default(), Some(&write(dir.path(), "    username: x\n"))).unwrap_err();
        assert!(err.to_string().ends_with("user \"u\" has no client certificate or token"), "{err}");
    }
}
