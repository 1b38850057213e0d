//! Configuration: one typed struct per module, assembled here from the environment. Nothing
//! else reads environment variables. Every option has a default that works with zero setup.

use crate::sandbox::Limits;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Limits of the predicate sandbox (`SPECTRAL_SANDBOX_*`).
    pub sandbox: Limits,
}

/// A configuration value could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

impl Config {
    /// Read the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Read the configuration from `(name, value)` pairs; unknown names are ignored.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        let s = &mut config.sandbox;
        for (name, value) in vars {
            let target: &mut dyn SetFrom = match name.as_str() {
                "SPECTRAL_SANDBOX_MAX_OPERATIONS" => &mut s.max_operations,
                "SPECTRAL_SANDBOX_MAX_CALL_LEVELS" => &mut s.max_call_levels,
                "SPECTRAL_SANDBOX_MAX_EXPR_DEPTH" => &mut s.max_expr_depth,
                "SPECTRAL_SANDBOX_MAX_STRING_BYTES" => &mut s.max_string_bytes,
                "SPECTRAL_SANDBOX_MAX_ARRAY_LEN" => &mut s.max_array_len,
                "SPECTRAL_SANDBOX_MAX_MAP_LEN" => &mut s.max_map_len,
                "SPECTRAL_SANDBOX_MAX_SOURCE_BYTES" => &mut s.max_source_bytes,
                "SPECTRAL_SANDBOX_DEADLINE_US" => &mut s.deadline_us,
                _ => continue,
            };
            target.set_from(&value).map_err(|reason| ConfigError {
                name: name.clone(),
                value: value.clone(),
                reason,
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.sandbox;
        let checks: [(&str, u64, u64, u64); 8] = [
            (
                "SPECTRAL_SANDBOX_MAX_OPERATIONS",
                s.max_operations,
                1,
                10_000_000,
            ),
            (
                "SPECTRAL_SANDBOX_MAX_CALL_LEVELS",
                s.max_call_levels as u64,
                1,
                64,
            ),
            // Deeper than 128 risks overflowing a 2 MiB stack during evaluation.
            (
                "SPECTRAL_SANDBOX_MAX_EXPR_DEPTH",
                s.max_expr_depth as u64,
                4,
                128,
            ),
            (
                "SPECTRAL_SANDBOX_MAX_STRING_BYTES",
                s.max_string_bytes as u64,
                64,
                16 << 20,
            ),
            (
                "SPECTRAL_SANDBOX_MAX_ARRAY_LEN",
                s.max_array_len as u64,
                1,
                1 << 20,
            ),
            (
                "SPECTRAL_SANDBOX_MAX_MAP_LEN",
                s.max_map_len as u64,
                1,
                1 << 20,
            ),
            (
                "SPECTRAL_SANDBOX_MAX_SOURCE_BYTES",
                s.max_source_bytes as u64,
                16,
                1 << 20,
            ),
            (
                "SPECTRAL_SANDBOX_DEADLINE_US",
                s.deadline_us,
                10,
                10_000_000,
            ),
        ];
        for (name, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(ConfigError {
                    name: name.into(),
                    value: value.to_string(),
                    reason: format!("must be within {min}..={max}"),
                });
            }
        }
        Ok(())
    }
}

trait SetFrom {
    fn set_from(&mut self, text: &str) -> Result<(), String>;
}

impl SetFrom for u64 {
    fn set_from(&mut self, text: &str) -> Result<(), String> {
        *self = text
            .trim()
            .parse()
            .map_err(|e| format!("not a whole number: {e}"))?;
        Ok(())
    }
}

impl SetFrom for usize {
    fn set_from(&mut self, text: &str) -> Result<(), String> {
        *self = text
            .trim()
            .parse()
            .map_err(|e| format!("not a whole number: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_with_no_environment() {
        assert_eq!(Config::from_vars(vec![]), Ok(Config::default()));
    }

    #[test]
    fn reads_sandbox_limits() {
        let c = Config::from_vars(vars(&[
            ("SPECTRAL_SANDBOX_MAX_OPERATIONS", "500"),
            ("SPECTRAL_SANDBOX_DEADLINE_US", "2000"),
            ("UNRELATED", "x"),
        ]));
        let c = c.map_err(|e| e.to_string());
        assert_eq!(c.as_ref().map(|c| c.sandbox.max_operations), Ok(500));
        assert_eq!(c.as_ref().map(|c| c.sandbox.deadline_us), Ok(2000));
    }

    #[test]
    fn rejects_garbage_and_out_of_range_values_by_name() {
        let e = Config::from_vars(vars(&[("SPECTRAL_SANDBOX_MAX_OPERATIONS", "lots")]));
        assert_eq!(
            e.map_err(|e| e.name),
            Err("SPECTRAL_SANDBOX_MAX_OPERATIONS".to_string())
        );
        let e = Config::from_vars(vars(&[("SPECTRAL_SANDBOX_MAX_EXPR_DEPTH", "100000")]));
        assert!(e.is_err_and(|e| e.reason.contains("4..=128")));
    }
}
