//! Process shutdown, the same for both binaries.

/// Resolves on SIGTERM (the kubelet stopping the pod) or Ctrl-C. Both planes then stop serving
/// and flush their traces; the dataplane leaves the kernel's rules in place.
pub async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
