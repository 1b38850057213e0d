//! How a store operation fails, and how a database error becomes one of those failures.

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing asked for does not exist (a world, a version).
    #[error("{0} not found")]
    NotFound(String),
    /// The change conflicts with what is stored (a duplicate key id, …).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A write under an agent thread's lease carried a fence that is no longer the thread's:
    /// another worker took the thread over, and this one must stop advancing it.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The database could not be reached or answered with an error.
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// A unique violation is the caller's conflict; a column that does not decode is corrupt
/// stored data; anything else is the server's.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                return StoreError::Corrupt(e.to_string());
            }
            _ => {}
        }
        match e.as_database_error() {
            Some(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_lowercase()),
            _ => StoreError::Database(Box::new(e)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migration(Box::new(e))
    }
}

impl StoreError {
    /// A conflict reworded to name the caller's value instead of the database's constraint;
    /// any other error unchanged.
    pub(crate) fn conflict_as(self, message: impl FnOnce() -> String) -> Self {
        match self {
            StoreError::Conflict(_) => StoreError::Conflict(message()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_that_does_not_decode_is_corrupt_data() {
        let e = sqlx::Error::ColumnDecode {
            index: "payload".into(),
            source: "expected value at line 1 column 1".into(),
        };
        let e = StoreError::from(e);
        assert!(
            matches!(&e, StoreError::Corrupt(m) if m.contains("payload")),
            "{e:?}"
        );
        let e = StoreError::from(sqlx::Error::PoolTimedOut);
        assert!(matches!(e, StoreError::Database(_)), "{e:?}");
    }
}
