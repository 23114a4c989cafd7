//! The one mapping between Ferry's error codes and gRPC status codes.
//!
//! Servers turn any layer's error into a `tonic::Status` with
//! [`to_status`]; clients read a received status back as an [`ErrorCode`]
//! with [`code_from_grpc`], so the retry class survives the wire.

use ferry_core::{CodedError, ErrorCode};
use tonic::{Code, Status};

/// The gRPC code for a Ferry error code.
pub fn code_to_grpc(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::Cancelled => Code::Cancelled,
        ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    }
}

/// The Ferry error code for a received gRPC code. Codes Ferry does not
/// send map to their nearest meaning (resource exhaustion and aborts are
/// worth a retry, like unavailability).
pub fn code_from_grpc(code: Code) -> ErrorCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange => ErrorCode::InvalidArgument,
        Code::NotFound => ErrorCode::NotFound,
        Code::AlreadyExists => ErrorCode::AlreadyExists,
        Code::PermissionDenied => ErrorCode::PermissionDenied,
        Code::Unauthenticated => ErrorCode::Unauthenticated,
        Code::FailedPrecondition | Code::Unimplemented => ErrorCode::FailedPrecondition,
        Code::Cancelled => ErrorCode::Cancelled,
        Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted => ErrorCode::Unavailable,
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => ErrorCode::Internal,
    }
}

/// The status a server answers with for `error`: its code and its message.
pub fn to_status<E: CodedError + ?Sized>(error: &E) -> Status {
    Status::new(code_to_grpc(error.code()), error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::RetryClass;

    #[test]
    fn every_code_survives_the_wire() {
        for code in ErrorCode::ALL {
            let grpc = code_to_grpc(code);
            assert_eq!(code_from_grpc(grpc), code, "{code} -> {grpc:?}");
            if code != ErrorCode::Internal {
                assert_ne!(grpc, Code::Internal, "{code} must have its own gRPC code");
            }
        }
    }

    #[test]
    fn retry_worthy_grpc_codes_are_transient() {
        for grpc in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::DeadlineExceeded,
        ] {
            assert_eq!(
                code_from_grpc(grpc).retry_class(),
                RetryClass::Transient,
                "{grpc:?}"
            );
        }
        for grpc in [
            Code::InvalidArgument,
            Code::Internal,
            Code::Unknown,
            Code::PermissionDenied,
        ] {
            assert_eq!(
                code_from_grpc(grpc).retry_class(),
                RetryClass::Permanent,
                "{grpc:?}"
            );
        }
    }

    #[test]
    fn status_carries_code_and_message() {
        let err = ferry_core::AppName::new("Bad").expect_err("invalid");
        let status = to_status(&err);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), err.to_string());
    }
}
