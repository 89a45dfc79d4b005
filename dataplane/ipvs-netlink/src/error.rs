//! Errors of the codec ([`DecodeError`]) and of the client ([`IpvsError`]).

use std::io;

use crate::consts::{EEXIST, EINVAL, ENOENT, ESRCH};

/// Bytes that are not a well-formed IPVS message. Decoding never panics; it returns one of these.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{what}: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length { what: &'static str, expected: usize, got: usize },
    #[error("{what}: invalid value {value}")]
    Value { what: &'static str, value: u64 },
    #[error("{what}: not UTF-8")]
    Utf8 { what: &'static str },
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("malformed attribute in {what}: {detail}")]
    Attribute { what: &'static str, detail: String },
}

/// A failed IPVS operation. Kernel refusals carry the errno's meaning and a description of the
/// request, e.g. "add destination 10.244.1.2:8080 to TCP 10.96.0.10:80".
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("{request}: already exists")]
    Exists { request: String },
    #[error("{request}: not found")]
    NotFound { request: String },
    #[error("{request}: invalid argument")]
    Invalid { request: String },
    #[error("{request}: kernel error {}", io::Error::from_raw_os_error(*errno))]
    Other { errno: i32, request: String },
    /// No "IPVS" generic netlink family: the ip_vs module is not loaded (or not built).
    #[error("IPVS is not available in this kernel (ip_vs module not loaded?)")]
    Unavailable,
    #[error("{request}: netlink I/O")]
    Io {
        request: String,
        #[source]
        source: io::Error,
    },
    #[error("{request}: undecodable reply")]
    Decode {
        request: String,
        #[source]
        source: DecodeError,
    },
    /// A reply that is well-formed but not what the request calls for.
    #[error("{request}: unexpected reply: {detail}")]
    Protocol { request: String, detail: String },
}

impl IpvsError {
    /// The typed error for a negative errno from an NLMSG_ERROR reply.
    pub fn from_errno(errno: i32, request: String) -> IpvsError {
        match errno.abs() {
            EEXIST => IpvsError::Exists { request },
            ENOENT | ESRCH => IpvsError::NotFound { request },
            EINVAL => IpvsError::Invalid { request },
            e => IpvsError::Other { errno: e, request },
        }
    }

    /// The request this error is about, if it came from one.
    pub fn request(&self) -> Option<&str> {
        match self {
            IpvsError::Exists { request }
            | IpvsError::NotFound { request }
            | IpvsError::Invalid { request }
            | IpvsError::Other { request, .. }
            | IpvsError::Io { request, .. }
            | IpvsError::Decode { request, .. }
            | IpvsError::Protocol { request, .. } => Some(request),
            IpvsError::Unavailable => None,
        }
    }
}
