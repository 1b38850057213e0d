//! The Rust side of the statements whose text is all that differs between the dialects: each
//! binds its values and decodes its rows the same way on both databases, so it is written
//! once, here, and each dialect gives only its text ([`Sql`]). A statement a dialect must run
//! differently (a lock, a notification, an array bind) is written in that dialect's file.

/// The text of the shared statements in one dialect; the parameters are numbered in the
/// order of the method's arguments (see `shared_statements!`).
pub(crate) struct Sql {
    pub put_draft: &'static str,
    pub draft: &'static str,
    pub ensure_world: &'static str,
    pub lock_world: &'static str,
    pub next_version: &'static str,
    pub insert_version: &'static str,
    pub insert_module: &'static str,
    pub insert_version_module: &'static str,
    pub version_retired_at: &'static str,
    pub next_deployment: &'static str,
    pub set_deployed: &'static str,
    pub insert_deployment: &'static str,
    pub insert_retirement: &'static str,
    pub world_head: &'static str,
    pub versions: &'static str,
    pub deployments: &'static str,
    pub version_row: &'static str,
    pub version_modules: &'static str,
    pub list_worlds: &'static str,
    pub retired: &'static str,
    pub deployed: &'static str,
    pub module: &'static str,
    pub create_key: &'static str,
    pub key_by_hash: &'static str,
    pub has_operator_key: &'static str,
    /// The table decisions are inserted into.
    pub decisions_table: &'static str,
    pub set_chain_head: &'static str,
    pub decisions: &'static str,
    pub allocate_generation: &'static str,
    pub latest_generation: &'static str,
    pub insert_event: &'static str,
    /// The statements that complete a batch of outbox rows bind lists
    /// ([`List`](super::records::List)).
    pub lock_claimed: &'static str,
    pub insert_handled: &'static str,
    pub add_stats: &'static str,
    pub mark_delivered: &'static str,
    pub fail: &'static str,
    pub rescue: &'static str,
    pub outbox_row: &'static str,
    pub outbox_list: &'static str,
    pub replay: &'static str,
    pub adopt: &'static str,
    pub outbox_counts: &'static str,
    pub stats: &'static str,
    pub create_webhook: &'static str,
    pub webhooks: &'static str,
    pub webhook: &'static str,
    pub create_thread: &'static str,
    pub thread: &'static str,
    pub acquire_lease: &'static str,
    pub renew_lease: &'static str,
    pub lock_thread: &'static str,
    pub insert_checkpoint: &'static str,
    pub last_event_seq: &'static str,
    pub insert_thread_event: &'static str,
    pub set_usage: &'static str,
    pub finish_thread: &'static str,
    pub latest_checkpoint: &'static str,
    pub checkpoint: &'static str,
    pub thread_events: &'static str,
    pub expired_runs: &'static str,
    pub insert_candidate: &'static str,
    pub candidate_of_run: &'static str,
    pub candidates: &'static str,
    pub prunable: &'static str,
    pub prune_checkpoints: &'static str,
    pub prune_events: &'static str,
    pub mark_pruned: &'static str,
    pub reopen_thread: &'static str,
    pub candidate: &'static str,
    pub review_candidate: &'static str,
    pub running_threads: &'static str,
    pub world_threads: &'static str,
    // The life cycle of keys, and webhook management.
    pub list_keys: &'static str,
    pub key_by_id: &'static str,
    pub revoke_key: &'static str,
    pub rotate_key: &'static str,
    pub touch_key: &'static str,
    pub delete_webhook: &'static str,
}

/// The columns of `decisions`, in the order of `DecisionRow` and of the inserts.
macro_rules! decision_columns {
    () => {
        "seq, world, decision_id, version, action, module_hash, status, matched_rules, caller, \
         correlation_id, context_digest, decided_at, prev_hash, hash"
    };
}

/// The columns of `outbox`, in the order of `OutboxDbRow`.
macro_rules! outbox_columns {
    () => {
        "id, event_type, event_version, occurred_at, source, target, channel, generation, \
         world, payload, idempotency_key, trace_context, status, attempts, available_at, \
         claimed_at, claimed_by, last_error, failure_history, first_failed_at"
    };
}

/// The shared statements' methods of `impl Dialect for …`, over `Self::SQL` and a `pool`
/// field. A macro rather than default methods, so that each expands with its dialect's
/// concrete sqlx types.
macro_rules! shared_statements {
    () => {
        async fn put_draft(
            &self,
            world: &str,
            model: &serde_json::Value,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.put_draft).bind(world);
            let q = q.bind(Json(model.clone())).bind(Time(at));
            Ok(q.execute(&self.pool).await.map(drop)?)
        }

        async fn draft(&self, world: &str) -> Result<Option<serde_json::Value>, StoreError> {
            let q = sqlx::query_scalar::<_, Option<Json>>(Self::SQL.draft).bind(world);
            Ok(q.fetch_optional(&self.pool).await?.flatten().map(|j| j.0))
        }

        async fn ensure_world(
            tx: &mut Tx<Self>,
            world: &str,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.ensure_world)
                .bind(world)
                .bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn lock_world(
            tx: &mut Tx<Self>,
            world: &str,
        ) -> Result<Option<Option<i64>>, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.lock_world).bind(world);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn next_version(tx: &mut Tx<Self>, world: &str) -> Result<i64, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.next_version).bind(world);
            Ok(q.fetch_one(&mut **tx).await?)
        }

        async fn insert_version(
            tx: &mut Tx<Self>,
            world: &str,
            version: i64,
            model: &serde_json::Value,
            at: DateTime<Utc>,
            by: &str,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.insert_version)
                .bind(world)
                .bind(version);
            let q = q.bind(Json(model.clone())).bind(Time(at)).bind(by);
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn insert_module(
            tx: &mut Tx<Self>,
            module: &NewModule,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.insert_module).bind(&module.hash);
            let q = q.bind(&module.content).bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn insert_version_module(
            tx: &mut Tx<Self>,
            world: &str,
            version: i64,
            position: i32,
            module: &NewModule,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.insert_version_module)
                .bind(world)
                .bind(version);
            let q = q.bind(position).bind(&module.action).bind(&module.hash);
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn version_retired_at(
            tx: &mut Tx<Self>,
            world: &str,
            version: i64,
        ) -> Result<Option<Option<DateTime<Utc>>>, StoreError> {
            let q = sqlx::query_scalar::<_, Option<Time>>(Self::SQL.version_retired_at);
            let found = q
                .bind(world)
                .bind(version)
                .fetch_optional(&mut **tx)
                .await?;
            Ok(found.map(|t| t.map(|t| t.0)))
        }

        async fn next_deployment(tx: &mut Tx<Self>, world: &str) -> Result<i64, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.next_deployment).bind(world);
            Ok(q.fetch_one(&mut **tx).await?)
        }

        async fn set_deployed(
            tx: &mut Tx<Self>,
            world: &str,
            version: i64,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.set_deployed)
                .bind(world)
                .bind(version);
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn insert_deployment(
            tx: &mut Tx<Self>,
            world: &str,
            seq: i64,
            version: i64,
            at: DateTime<Utc>,
            by: &str,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.insert_deployment)
                .bind(world)
                .bind(seq);
            let q = q.bind(version).bind(Time(at)).bind(by);
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn insert_retirement(
            tx: &mut Tx<Self>,
            world: &str,
            version: i64,
            retired: &Retirement,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.insert_retirement)
                .bind(world)
                .bind(version);
            let q = q.bind(Time(retired.retired_at)).bind(&retired.retired_by);
            Ok(q.bind(&retired.reason).execute(&mut **tx).await.map(drop)?)
        }

        async fn world_head(
            tx: &mut Tx<Self>,
            world: &str,
        ) -> Result<Option<WorldHeadRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.world_head).bind(world);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn versions(tx: &mut Tx<Self>, world: &str) -> Result<Vec<VersionRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.versions).bind(world);
            Ok(q.fetch_all(&mut **tx).await?)
        }

        async fn deployments(
            tx: &mut Tx<Self>,
            world: &str,
        ) -> Result<Vec<DeploymentRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.deployments).bind(world);
            Ok(q.fetch_all(&mut **tx).await?)
        }

        async fn version_row(
            tx: &mut Tx<Self>,
            world: &str,
            version: i64,
        ) -> Result<Option<VersionModelRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.version_row)
                .bind(world)
                .bind(version);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn version_modules(
            tx: &mut Tx<Self>,
            world: &str,
            version: i64,
        ) -> Result<Vec<(String, String)>, StoreError> {
            let q = sqlx::query_as(Self::SQL.version_modules)
                .bind(world)
                .bind(version);
            Ok(q.fetch_all(&mut **tx).await?)
        }

        async fn list_worlds(&self) -> Result<Vec<WorldRow>, StoreError> {
            Ok(sqlx::query_as(Self::SQL.list_worlds)
                .fetch_all(&self.pool)
                .await?)
        }

        async fn retired(&self) -> Result<Vec<WorldVersionRow>, StoreError> {
            Ok(sqlx::query_as(Self::SQL.retired)
                .fetch_all(&self.pool)
                .await?)
        }

        async fn deployed(&self) -> Result<Vec<WorldVersionRow>, StoreError> {
            Ok(sqlx::query_as(Self::SQL.deployed)
                .fetch_all(&self.pool)
                .await?)
        }

        async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.module).bind(hash);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn create_key(&self, key: &NewKey, at: DateTime<Utc>) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.create_key)
                .bind(&key.id)
                .bind(&key.secret_hash);
            let q = q.bind(&key.world).bind(ScopeList::of(&key.scopes));
            Ok(q.bind(&key.label)
                .bind(Time(at))
                .bind(key.expires_at.map(Time))
                .execute(&self.pool)
                .await
                .map(drop)?)
        }

        async fn key_by_hash(&self, secret_hash: &str) -> Result<Option<KeyRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.key_by_hash).bind(secret_hash);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn has_operator_key(&self) -> Result<bool, StoreError> {
            Ok(sqlx::query_scalar(Self::SQL.has_operator_key)
                .fetch_one(&self.pool)
                .await?)
        }

        async fn insert_decisions(
            tx: &mut Tx<Self>,
            chunk: &[ChainedDecision],
        ) -> Result<(), StoreError> {
            let mut insert = decisions_insert::<Self::Db>(Self::SQL.decisions_table, chunk);
            Ok(insert.build().execute(&mut **tx).await.map(drop)?)
        }

        async fn set_chain_head(
            tx: &mut Tx<Self>,
            world: &str,
            seq: i64,
            hash: &str,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.set_chain_head)
                .bind(world)
                .bind(seq)
                .bind(hash);
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn decisions(
            &self,
            world: &str,
            after: i64,
            limit: i64,
        ) -> Result<Vec<DecisionRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.decisions)
                .bind(world)
                .bind(after)
                .bind(limit);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn allocate_generation(
            tx: &mut Tx<Self>,
            git_sha: &str,
            note: &str,
            at: DateTime<Utc>,
        ) -> Result<i64, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.allocate_generation).bind(Time(at));
            Ok(q.bind(git_sha).bind(note).fetch_one(&mut **tx).await?)
        }

        async fn latest_generation(
            tx: &mut Tx<Self>,
            git_sha: &str,
        ) -> Result<Option<i64>, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.latest_generation).bind(git_sha);
            Ok(q.fetch_one(&mut **tx).await?)
        }

        async fn insert_event(
            tx: &mut Tx<Self>,
            e: &NewEvent,
            generation: i64,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.insert_event)
                .bind(&e.event_type)
                .bind(Time(at));
            let q = q
                .bind(source())
                .bind(&e.target)
                .bind(OUTBOX_CHANNEL)
                .bind(generation);
            let q = q
                .bind(&e.world)
                .bind(Json(e.payload.clone()))
                .bind(&e.idempotency_key);
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn lock_claimed(
            tx: &mut Tx<Self>,
            ids: &[i64],
            worker: &str,
        ) -> Result<Vec<i64>, StoreError> {
            let q = sqlx::query_scalar::<_, i64>(Self::SQL.lock_claimed)
                .bind(List(ids.to_vec()))
                .bind(worker);
            Ok(q.fetch_all(&mut **tx).await?)
        }

        async fn insert_handled(
            tx: &mut Tx<Self>,
            handlers: Vec<String>,
            keys: Vec<String>,
            ids: Vec<i64>,
            at: DateTime<Utc>,
        ) -> Result<Vec<i64>, StoreError> {
            let q = sqlx::query_scalar::<_, i64>(Self::SQL.insert_handled)
                .bind(List(handlers))
                .bind(List(keys));
            let q = q.bind(List(ids)).bind(Time(at));
            Ok(q.fetch_all(&mut **tx).await?)
        }

        async fn add_stats(tx: &mut Tx<Self>, deltas: &[StatDelta]) -> Result<(), StoreError> {
            let mut worlds = Vec::with_capacity(deltas.len());
            let mut rules = Vec::with_capacity(deltas.len());
            let mut statuses = Vec::with_capacity(deltas.len());
            let mut counts = Vec::with_capacity(deltas.len());
            for d in deltas {
                worlds.push(d.world.clone());
                rules.push(d.rule.clone());
                statuses.push(d.status.clone());
                counts.push(d.count);
            }
            let q = sqlx::query(Self::SQL.add_stats)
                .bind(List(worlds))
                .bind(List(rules));
            let q = q.bind(List(statuses)).bind(List(counts));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn mark_delivered(tx: &mut Tx<Self>, ids: Vec<i64>) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.mark_delivered).bind(List(ids));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn fail(
            &self,
            id: i64,
            worker: &str,
            error: &str,
            retry_at: Option<DateTime<Utc>>,
            at: DateTime<Utc>,
        ) -> Result<Option<String>, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.fail)
                .bind(id)
                .bind(worker)
                .bind(error);
            let q = q.bind(retry_at.map(Time)).bind(Time(at));
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn rescue(&self, generation: i64, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::SQL.rescue)
                .bind(generation)
                .bind(Time(cutoff));
            Ok(q.execute(&self.pool).await?.rows_affected())
        }

        async fn outbox_row(&self, id: i64) -> Result<Option<OutboxDbRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.outbox_row).bind(id);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn outbox_list(
            &self,
            status: Option<&str>,
            generation: Option<i64>,
            limit: i64,
        ) -> Result<Vec<OutboxDbRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.outbox_list)
                .bind(status)
                .bind(generation);
            Ok(q.bind(limit).fetch_all(&self.pool).await?)
        }

        async fn replay(&self, id: i64, at: DateTime<Utc>) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::SQL.replay).bind(id).bind(Time(at));
            Ok(q.execute(&self.pool).await?.rows_affected())
        }

        async fn adopt(&self, from: i64, to: i64) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::SQL.adopt).bind(from).bind(to);
            Ok(q.execute(&self.pool).await?.rows_affected())
        }

        async fn outbox_counts(&self, generation: i64) -> Result<OutboxCounts, StoreError> {
            let q = sqlx::query_as(Self::SQL.outbox_counts).bind(generation);
            Ok(q.fetch_one(&self.pool).await?)
        }

        async fn stats(&self, world: &str) -> Result<Vec<StatDelta>, StoreError> {
            let q = sqlx::query_as(Self::SQL.stats).bind(world);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn create_webhook(&self, hook: &Webhook) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.create_webhook)
                .bind(&hook.id)
                .bind(&hook.world);
            let q = q
                .bind(&hook.url)
                .bind(&hook.secret)
                .bind(hook.events.join(","));
            Ok(q.bind(Time(hook.created_at))
                .execute(&self.pool)
                .await
                .map(drop)?)
        }

        async fn webhooks(&self, world: &str) -> Result<Vec<WebhookRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.webhooks).bind(world);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn webhook(&self, id: &str) -> Result<Option<WebhookRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.webhook).bind(id);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn create_thread(
            tx: &mut Tx<Self>,
            t: &NewThread,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.create_thread)
                .bind(&t.id)
                .bind(&t.world);
            let q = q.bind(t.kind.as_str()).bind(&t.parent).bind(&t.created_by);
            let q = q.bind(Json(t.task.clone())).bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn thread(&self, id: &str) -> Result<Option<ThreadRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.thread).bind(id);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn acquire_lease(
            &self,
            id: &str,
            owner: &str,
            at: DateTime<Utc>,
            expires: DateTime<Utc>,
        ) -> Result<Option<i64>, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.acquire_lease)
                .bind(id)
                .bind(owner);
            let q = q.bind(Time(at)).bind(Time(expires));
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn renew_lease(
            &self,
            id: &str,
            owner: &str,
            fence: i64,
            at: DateTime<Utc>,
            expires: DateTime<Utc>,
        ) -> Result<bool, StoreError> {
            let q = sqlx::query(Self::SQL.renew_lease)
                .bind(id)
                .bind(owner)
                .bind(fence);
            let q = q.bind(Time(at)).bind(Time(expires));
            Ok(q.execute(&self.pool).await?.rows_affected() == 1)
        }

        async fn lock_thread(
            tx: &mut Tx<Self>,
            id: &str,
        ) -> Result<Option<ThreadLockRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.lock_thread).bind(id);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn insert_checkpoint(
            tx: &mut Tx<Self>,
            thread: &str,
            step: i64,
            parent_step: Option<i64>,
            node: &str,
            state: &serde_json::Value,
            at: DateTime<Utc>,
        ) -> Result<bool, StoreError> {
            let q = sqlx::query(Self::SQL.insert_checkpoint)
                .bind(thread)
                .bind(step);
            let q = q
                .bind(parent_step)
                .bind(node)
                .bind(Json(state.clone()))
                .bind(Time(at));
            Ok(q.execute(&mut **tx).await?.rows_affected() == 1)
        }

        async fn last_event_seq(tx: &mut Tx<Self>, thread: &str) -> Result<i64, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.last_event_seq).bind(thread);
            Ok(q.fetch_one(&mut **tx).await?)
        }

        async fn insert_thread_event(
            tx: &mut Tx<Self>,
            thread: &str,
            seq: i64,
            step: i64,
            event: &NewThreadEvent,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.insert_thread_event)
                .bind(thread)
                .bind(seq)
                .bind(step);
            let q = q
                .bind(&event.kind)
                .bind(Json(event.data.clone()))
                .bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn set_usage(
            tx: &mut Tx<Self>,
            thread: &str,
            calls: i64,
            prompt_tokens: i64,
            completion_tokens: i64,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.set_usage).bind(thread).bind(calls);
            let q = q.bind(prompt_tokens).bind(completion_tokens).bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn finish_thread(
            tx: &mut Tx<Self>,
            thread: &str,
            status: &str,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.finish_thread)
                .bind(thread)
                .bind(status)
                .bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn latest_checkpoint(
            &self,
            thread: &str,
        ) -> Result<Option<CheckpointRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.latest_checkpoint).bind(thread);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn checkpoint(
            &self,
            thread: &str,
            step: i64,
        ) -> Result<Option<CheckpointRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.checkpoint).bind(thread).bind(step);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn thread_events(
            &self,
            thread: &str,
            after: i64,
            limit: i64,
        ) -> Result<Vec<ThreadEventRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.thread_events)
                .bind(thread)
                .bind(after)
                .bind(limit);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn expired_runs(
            &self,
            at: DateTime<Utc>,
            limit: i64,
        ) -> Result<Vec<ThreadRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.expired_runs)
                .bind(Time(at))
                .bind(limit);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn insert_candidate(
            tx: &mut Tx<Self>,
            thread: &str,
            world: &str,
            c: &NewCandidate,
            at: DateTime<Utc>,
        ) -> Result<bool, StoreError> {
            let q = sqlx::query(Self::SQL.insert_candidate)
                .bind(&c.id)
                .bind(world)
                .bind(&c.action);
            let q = q
                .bind(thread)
                .bind(Json(c.rule.clone()))
                .bind(Json(c.evidence.clone()));
            let q = q
                .bind(&c.model)
                .bind(Json(c.prompt_versions.clone()))
                .bind(Time(at));
            Ok(q.execute(&mut **tx).await?.rows_affected() == 1)
        }

        async fn candidate_of_run(
            tx: &mut Tx<Self>,
            thread: &str,
        ) -> Result<Option<CandidateRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.candidate_of_run).bind(thread);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn candidates(&self, world: &str) -> Result<Vec<CandidateRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.candidates).bind(world);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn prunable(
            tx: &mut Tx<Self>,
            cutoff: DateTime<Utc>,
            limit: i64,
        ) -> Result<Vec<String>, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.prunable)
                .bind(Time(cutoff))
                .bind(limit);
            Ok(q.fetch_all(&mut **tx).await?)
        }

        async fn prune_checkpoints(tx: &mut Tx<Self>, thread: &str) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::SQL.prune_checkpoints).bind(thread);
            Ok(q.execute(&mut **tx).await?.rows_affected())
        }

        async fn prune_events(tx: &mut Tx<Self>, thread: &str) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::SQL.prune_events).bind(thread);
            Ok(q.execute(&mut **tx).await?.rows_affected())
        }

        async fn mark_pruned(
            tx: &mut Tx<Self>,
            thread: &str,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.mark_pruned)
                .bind(thread)
                .bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn reopen_thread(
            tx: &mut Tx<Self>,
            thread: &str,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.reopen_thread)
                .bind(thread)
                .bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn put_draft_in(
            tx: &mut Tx<Self>,
            world: &str,
            model: &serde_json::Value,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.put_draft).bind(world);
            let q = q.bind(Json(model.clone())).bind(Time(at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn candidate_of(&self, thread: &str) -> Result<Option<CandidateRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.candidate_of_run).bind(thread);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn candidate(&self, id: &str) -> Result<Option<CandidateRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.candidate).bind(id);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn review_candidate(
            tx: &mut Tx<Self>,
            review: &Review,
            at: DateTime<Utc>,
        ) -> Result<bool, StoreError> {
            let q = sqlx::query(Self::SQL.review_candidate)
                .bind(&review.candidate)
                .bind(&review.world);
            let q = q.bind(review.verdict.as_str()).bind(&review.reviewer);
            let q = q.bind(&review.rationale).bind(Time(at));
            Ok(q.execute(&mut **tx).await?.rows_affected() == 1)
        }

        async fn running_threads(&self, world: &str, kind: &str) -> Result<i64, StoreError> {
            let q = sqlx::query_scalar(Self::SQL.running_threads)
                .bind(world)
                .bind(kind);
            Ok(q.fetch_one(&self.pool).await?)
        }

        async fn world_threads(
            &self,
            world: &str,
            kind: &str,
            limit: i64,
        ) -> Result<Vec<ThreadRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.world_threads)
                .bind(world)
                .bind(kind)
                .bind(limit);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn list_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
            Ok(sqlx::query_as(Self::SQL.list_keys)
                .fetch_all(&self.pool)
                .await?)
        }

        async fn key_by_id(&self, id: &str) -> Result<Option<KeyRow>, StoreError> {
            let q = sqlx::query_as(Self::SQL.key_by_id).bind(id);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn revoke_key(
            tx: &mut Tx<Self>,
            id: &str,
            at: DateTime<Utc>,
        ) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::SQL.revoke_key).bind(id).bind(Time(at));
            Ok(q.execute(&mut **tx).await?.rows_affected())
        }

        async fn rotate_key(
            tx: &mut Tx<Self>,
            id: &str,
            secret_hash: &str,
            previous_valid_until: DateTime<Utc>,
        ) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::SQL.rotate_key)
                .bind(id)
                .bind(secret_hash)
                .bind(Time(previous_valid_until));
            Ok(q.execute(&mut **tx).await?.rows_affected())
        }

        async fn touch_key(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
            let q = sqlx::query(Self::SQL.touch_key).bind(id).bind(Time(at));
            Ok(q.execute(&self.pool).await.map(drop)?)
        }

        async fn delete_webhook(&self, world: &str, id: &str) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::SQL.delete_webhook).bind(world).bind(id);
            Ok(q.execute(&self.pool).await?.rows_affected())
        }
    };
}

/// The columns of `api_keys` a [`KeyRow`](super::records::KeyRow) decodes, less
/// `found_by_previous`, which each lookup computes.
macro_rules! key_columns {
    () => {
        "id, world, scopes, label, created_at, expires_at, revoked_at, last_used_at, \
         previous_valid_until"
    };
}

pub(crate) use key_columns;
pub(crate) use {decision_columns, outbox_columns, shared_statements};
