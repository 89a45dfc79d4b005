use std::io;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// No nf_tables in this kernel, no permission, or no such network namespace.
    #[error("nf_tables is not usable: {0}")]
    Unavailable(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused (a transaction: nothing of it was applied).
    #[error("{what}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { what: String, errno: i32 },
    #[error("unexpected reply: {0}")]
    Decode(String),
}
