//! The only conversions between `ferry.v1` messages and `ferry-core` types.
//!
//! Input is validated here, on the way in: every name, path and command is
//! parsed into its ferry-core type and every app is checked for
//! consistency, and a refusal names the field it is about
//! (`inventory.apps[0].components[1].name: invalid component name …`).

mod inventory;

pub use inventory::{INVENTORY_PART_BYTES, InventoryParts, inventory_parts};

use ferry_core::{CodedError, ErrorCode, ModelError, NameError};

/// A message that does not convert into the domain model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    #[error("{field}: {source}")]
    Invalid {
        field: String,
        #[source]
        source: NameError,
    },
    #[error("{field} is missing")]
    Missing { field: String },
    #[error("{field}: {reason}")]
    TooLarge { field: String, reason: String },
    #[error("{field}: unknown value {value:?}")]
    Unknown { field: String, value: String },
    #[error("{field}: {source}")]
    Inconsistent {
        field: String,
        #[source]
        source: Box<ModelError>,
    },
}

impl ConvertError {
    /// The field the error is about, as a path into the message.
    pub fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. }
            | Self::Missing { field }
            | Self::TooLarge { field, .. }
            | Self::Unknown { field, .. }
            | Self::Inconsistent { field, .. } => field,
        }
    }
}

impl CodedError for ConvertError {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

/// Parses a required value of a validated type, naming `field` on error.
pub fn parse<T, V>(field: impl FnOnce() -> String, value: V) -> Result<T, ConvertError>
where
    T: TryFrom<V, Error = NameError>,
{
    T::try_from(value).map_err(|source| ConvertError::Invalid {
        field: field(),
        source,
    })
}

/// Parses an optional name: the empty string (proto3's default) is `None`.
pub fn optional<T>(field: &str, value: String) -> Result<Option<T>, ConvertError>
where
    T: TryFrom<String, Error = NameError>,
{
    if value.is_empty() {
        Ok(None)
    } else {
        parse(|| field.to_owned(), value).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::ClusterName;

    #[test]
    fn optional_names_treat_empty_as_none() {
        assert_eq!(
            optional::<ClusterName>("cluster", String::new()).ok(),
            Some(None)
        );
        let some = optional::<ClusterName>("cluster", "prod".into()).expect("valid");
        assert_eq!(some.map(String::from).as_deref(), Some("prod"));
        let err = optional::<ClusterName>("cluster", "Prod".into()).expect_err("invalid");
        assert_eq!(err.field(), "cluster");
        assert!(
            err.to_string()
                .starts_with("cluster: invalid cluster name \"Prod\""),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
    }
}
