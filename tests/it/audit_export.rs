//! Audit export.
