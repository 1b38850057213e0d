//! The API of impact analysis (docs/impact.md): starting, reading and ending a world's
//! shadow, and queueing and reading replays. The evaluation, comparison and replay runner are
//! `crate::impact`'s.

use serde::{Deserialize, Serialize};

use super::cache::VersionLoadError;
use super::ServiceError;
use crate::impact::{merge, ReplayReport, Report};
use crate::store::{NewReplay, ReplayRecord, Scope, ShadowRecord};

/// The body of `POST /api/worlds/{world}/shadow`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowInput {
    /// The published version to evaluate beside the deployed one.
    #[serde(default, deserialize_with = "super::whole_number")]
    pub version: Option<u64>,
    /// The share of decisions also evaluated against it; 1.0 when absent.
    #[serde(default)]
    pub sample: Option<f64>,
}

/// A world's shadow with what every instance has counted for it.
#[derive(Debug, Serialize)]
pub struct ShadowView {
    pub shadow: ShadowRecord,
    /// The version the shadow is compared with.
    pub deployed_version: Option<u64>,
    /// Sampled decisions this instance has queued and not yet evaluated.
    pub pending: u64,
    pub summary: String,
    pub report: Report,
}

/// What to replay: a published version, or the world's draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Version(u64),
    Draft,
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        if raw.get().trim() == "\"draft\"" {
            return Ok(Self::Draft);
        }
        let text = raw.get().trim().to_owned();
        text.parse::<u64>().map(Self::Version).map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid version {text}, expected a whole number ≥ 0 or \"draft\""
            ))
        })
    }
}

/// The body of `POST /api/worlds/{world}/replays`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayInput {
    pub version: Target,
    /// Only decisions decided at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// The most recent decisions to replay, at most `SPECTRAL_REPLAY_MAX_ROWS` (its default).
    #[serde(default)]
    pub limit: Option<u64>,
}

/// A replay with its report so far.
#[derive(Debug, Serialize)]
pub struct ReplayView {
    #[serde(flatten)]
    pub replay: ReplayRecord,
    pub report: Option<ReplayReport>,
}

impl ReplayView {
    fn of(replay: ReplayRecord) -> Self {
        let report = replay
            .report
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok());
        Self { replay, report }
    }
}

impl super::App {
    /// Make `version` the shadow of `world`'s deployed version, sampled at `sample`; every
    /// instance evaluates it from its next refresh, this one before answering.
    pub async fn start_shadow(
        &self,
        caller: &super::Caller,
        world: &str,
        input: ShadowInput,
    ) -> Result<ShadowView, ServiceError> {
        caller.check(world, Scope::Deploy)?;
        let version = input.version.ok_or_else(|| {
            ServiceError::BadRequest("version must be a whole number, not null".into())
        })?;
        let sample = input.sample.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample) {
            return Err(ServiceError::BadRequest(format!(
                "sample must be between 0.0 and 1.0, not {sample}"
            )));
        }
        let deployed = self.cache.deployed(world).ok_or_else(|| {
            ServiceError::Conflict(format!("world '{world}' has no deployed version to shadow"))
        })?;
        if deployed.version == version {
            return Err(ServiceError::Conflict(format!(
                "version {version} is the deployed version of world '{world}'; a shadow is \
                 another version"
            )));
        }
        self.cache
            .version(world, version)
            .await
            .map_err(|e| match e {
                VersionLoadError::NotFound { .. } => ServiceError::NotFound(e.to_string()),
                VersionLoadError::Retired { .. } | VersionLoadError::Failed { .. } => {
                    ServiceError::Conflict(e.to_string())
                }
            })?;
        let shadow = ShadowRecord {
            world: world.to_owned(),
            id: format!("sh_{}", uuid::Uuid::now_v7().simple()),
            version,
            sample,
            started_by: caller.key_id.clone(),
            started_at: crate::store::now_micros(),
        };
        self.store
            .start_shadow(&shadow)
            .await
            .map_err(ServiceError::from_store)?;
        self.cache
            .refresh()
            .await
            .map_err(ServiceError::from_store)?;
        tracing::info!(world, version, sample, by = caller.key_id, "shadow started");
        Ok(ShadowView {
            shadow,
            deployed_version: Some(deployed.version),
            pending: 0,
            summary: Report::default().summary(),
            report: Report::default(),
        })
    }

    /// `world`'s shadow and every instance's counts, this instance's up to now.
    pub async fn shadow_report(
        &self,
        caller: &super::Caller,
        world: &str,
    ) -> Result<ShadowView, ServiceError> {
        caller.check(world, Scope::Read)?;
        let shadow = self
            .store
            .shadow(world)
            .await
            .map_err(ServiceError::from_store)?
            .ok_or_else(|| ServiceError::NotFound(format!("world '{world}' has no shadow")))?;
        self.view(shadow).await
    }

    async fn view(&self, shadow: ShadowRecord) -> Result<ShadowView, ServiceError> {
        self.shadows
            .flush(&self.store, || self.cache.shadow_ids())
            .await
            .map_err(ServiceError::from_store)?;
        let reports = self
            .store
            .shadow_reports(&shadow.id)
            .await
            .map_err(ServiceError::from_store)?;
        let report = merge(&reports).map_err(ServiceError::from_store)?;
        Ok(ShadowView {
            deployed_version: self.cache.deployed(&shadow.world).map(|d| d.version),
            pending: self.shadows.pending(),
            summary: report.summary(),
            report,
            shadow,
        })
    }

    /// End `world`'s shadow: its final report, after which no instance evaluates it.
    pub async fn end_shadow(
        &self,
        caller: &super::Caller,
        world: &str,
    ) -> Result<ShadowView, ServiceError> {
        caller.check(world, Scope::Deploy)?;
        let shadow = self
            .store
            .shadow(world)
            .await
            .map_err(ServiceError::from_store)?
            .ok_or_else(|| ServiceError::NotFound(format!("world '{world}' has no shadow")))?;
        let view = self.view(shadow).await?;
        self.store
            .end_shadow(world)
            .await
            .map_err(ServiceError::from_store)?;
        self.cache
            .refresh()
            .await
            .map_err(ServiceError::from_store)?;
        tracing::info!(world, by = caller.key_id, "shadow ended");
        Ok(view)
    }

    /// Queue a replay of a version or the draft over `world`'s kept contexts; the workers
    /// run it.
    pub async fn queue_replay(
        &self,
        caller: &super::Caller,
        world: &str,
        input: ReplayInput,
    ) -> Result<ReplayView, ServiceError> {
        caller.check(world, Scope::Author)?;
        let max = self.impact.replay_max_rows;
        let limit = input.limit.unwrap_or(max);
        if limit == 0 || limit > max {
            return Err(ServiceError::BadRequest(format!(
                "limit must be between 1 and {max}, not {limit}"
            )));
        }
        let (version, model) = match input.version {
            Target::Version(v) => {
                let record = self
                    .store
                    .version(world, v)
                    .await
                    .map_err(ServiceError::from_store)?
                    .ok_or_else(|| {
                        ServiceError::NotFound(format!("world '{world}' has no version {v}"))
                    })?;
                (Some(v), record.model)
            }
            Target::Draft => {
                let draft = self
                    .store
                    .draft(world)
                    .await
                    .map_err(ServiceError::from_store)?
                    .ok_or_else(|| {
                        ServiceError::NotFound(format!("world '{world}' has no draft"))
                    })?;
                (None, draft)
            }
        };
        let kept = self
            .store
            .context_count(world)
            .await
            .map_err(ServiceError::from_store)?;
        if kept == 0 {
            return Err(ServiceError::Conflict(format!(
                "world '{world}' has no kept contexts to replay; a world keeps them with \
                 record_context = \"full\" (docs/impact.md)"
            )));
        }
        let replay = NewReplay {
            id: format!("rp_{}", uuid::Uuid::now_v7().simple()),
            world: world.to_owned(),
            version,
            model: model.to_string(),
            since: input.since,
            limit,
            requested_by: caller.key_id.clone(),
        };
        self.store
            .queue_replay(&replay)
            .await
            .map_err(ServiceError::from_store)?;
        tracing::info!(world, replay = replay.id, version = ?version, limit, "replay queued");
        let record = self
            .store
            .replay_record(&replay.id)
            .await
            .map_err(ServiceError::from_store)?
            .ok_or_else(|| ServiceError::Internal("a queued replay is gone".into()))?;
        Ok(ReplayView::of(record))
    }

    /// A replay of `world` with its report so far.
    pub async fn replay(
        &self,
        caller: &super::Caller,
        world: &str,
        id: &str,
    ) -> Result<ReplayView, ServiceError> {
        caller.check(world, Scope::Read)?;
        let record = self
            .store
            .replay_record(id)
            .await
            .map_err(ServiceError::from_store)?
            .filter(|r| r.world == world)
            .ok_or_else(|| {
                ServiceError::NotFound(format!("world '{world}' has no replay '{id}'"))
            })?;
        Ok(ReplayView::of(record))
    }
}
