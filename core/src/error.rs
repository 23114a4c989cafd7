//! Error codes with a retry class.
//!
//! Every layer keeps its own `thiserror` enum with context in fields, and
//! reports through [`CodedError`] what kind of failure it is ([`ErrorCode`])
//! and whether trying again can help ([`RetryClass`]). The job engine
//! decides on retries from the class; the gRPC edge maps the code to a
//! status in one place (`ferry_proto::status`).

use std::fmt;

/// What kind of failure an error is, independent of the transport. Not
/// `non_exhaustive`: a new code must be mapped wherever codes are matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The input is malformed: a bad name, a bad duration, a bad record.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// The object to create exists already.
    AlreadyExists,
    /// The caller is known but may not do this.
    PermissionDenied,
    /// The caller's credentials (certificate, join token) are not accepted.
    Unauthenticated,
    /// The system is not in the state the operation needs (a token already
    /// used, an app reported by another node, a command that failed).
    FailedPrecondition,
    /// The operation was cancelled by its caller.
    Cancelled,
    /// The operation did not finish in time.
    DeadlineExceeded,
    /// A dependency (storage, network, the peer) is unavailable right now.
    Unavailable,
    /// A bug or damaged state: an invariant does not hold.
    Internal,
}

/// Whether retrying the same operation later can succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryClass {
    /// Trying again later may succeed (I/O trouble, a timeout, a peer away).
    Transient,
    /// Trying again gives the same answer until something else changes.
    Permanent,
}

impl ErrorCode {
    /// Every code, for exhaustive tests of mappings.
    pub const ALL: [ErrorCode; 10] = [
        Self::InvalidArgument,
        Self::NotFound,
        Self::AlreadyExists,
        Self::PermissionDenied,
        Self::Unauthenticated,
        Self::FailedPrecondition,
        Self::Cancelled,
        Self::DeadlineExceeded,
        Self::Unavailable,
        Self::Internal,
    ];

    /// The retry class an error of this code has unless it says otherwise.
    pub const fn retry_class(self) -> RetryClass {
        match self {
            Self::Unavailable | Self::DeadlineExceeded => RetryClass::Transient,
            Self::InvalidArgument
            | Self::NotFound
            | Self::AlreadyExists
            | Self::PermissionDenied
            | Self::Unauthenticated
            | Self::FailedPrecondition
            | Self::Cancelled
            | Self::Internal => RetryClass::Permanent,
        }
    }

    /// A stable lowercase name (`not_found`), for logs and JSON output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::PermissionDenied => "permission_denied",
            Self::Unauthenticated => "unauthenticated",
            Self::FailedPrecondition => "failed_precondition",
            Self::Cancelled => "cancelled",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The code named by [`ErrorCode::as_str`], as read back off the wire.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Implemented by every layer's error type.
pub trait CodedError: std::error::Error {
    /// What kind of failure this is.
    fn code(&self) -> ErrorCode;

    /// Whether a retry can help; the code's class unless overridden.
    fn retry_class(&self) -> RetryClass {
        self.code().retry_class()
    }

    /// True when retrying the same operation later may succeed.
    fn is_transient(&self) -> bool {
        self.retry_class() == RetryClass::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_name("Cancelled"), None);
    }

    #[test]
    fn only_unavailable_and_deadline_are_transient() {
        for code in ErrorCode::ALL {
            let transient = matches!(code, ErrorCode::Unavailable | ErrorCode::DeadlineExceeded);
            assert_eq!(
                code.retry_class() == RetryClass::Transient,
                transient,
                "{code}"
            );
        }
    }

    #[test]
    fn names_are_distinct_snake_case() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert!(
            names
                .iter()
                .all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("flaky")]
    struct Flaky;

    impl CodedError for Flaky {
        fn code(&self) -> ErrorCode {
            ErrorCode::Internal
        }
        fn retry_class(&self) -> RetryClass {
            RetryClass::Transient
        }
    }

    #[test]
    fn an_error_may_override_its_class() {
        assert!(Flaky.is_transient());
        assert_eq!(Flaky.code().retry_class(), RetryClass::Permanent);
    }
}
