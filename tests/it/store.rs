//! The store conformance suite: every case is written once against [`Store`] and runs against
//! both backends, SQLite in a temporary directory and Postgres in a fresh database.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use spectral::store::{
    chain_hash, Backend, DecisionRecord, MatchedRule, NewDecision, NewKey, NewModule, NewVersion,
    Scope, Store, StoreConfig, StoreError, GENESIS,
};

use crate::db::{fresh_postgres, fresh_sqlite_dir};

// One `#[tokio::test]` per case and backend: `store::sqlite::<case>` and
// `store::postgres::<case>`. Cases of `one_store` get a store; cases of `two_stores` get two
// stores on the same database, standing for two API instances.
crate::both_backends! {
    one_store => [
        migrate_twice_is_idempotent,
        drafts_are_stored_and_replaced,
        publish_numbers_versions_and_keeps_old_ones,
        modules_are_write_once,
        version_lists_modules_in_action_order,
        deploy_rollback_and_history,
        deploy_of_a_missing_version_is_not_found,
        retired_versions_are_never_deployed_again,
        deployed_lists_every_deployed_world,
        worlds_are_listed_by_slug_with_detail,
        keys_are_stored_and_looked_up_by_hash,
        decisions_form_one_chain_per_world,
        a_batch_with_a_duplicate_decision_id_is_not_appended,
        matched_rules_round_trip_for_the_auditor,
        deployments_are_notified,
        timestamps_round_trip_exactly,
        a_build_resumes_its_own_generation,
    ],
    two_stores => [
        concurrent_appends_form_one_chain,
        concurrent_publishes_get_distinct_versions,
        a_deploy_and_a_retirement_of_one_version_never_both_win,
        instances_of_one_build_starting_together_share_a_generation,
    ],
}

/// A fresh database of `backend`, and the configuration of a store on it.
async fn fixture(backend: crate::app::Backend) -> (StoreConfig, crate::app::Db) {
    match backend {
        crate::app::Backend::Sqlite => {
            let dir = fresh_sqlite_dir();
            let config = StoreConfig {
                database_url: None,
                data_dir: dir.path().join("data"),
                max_connections: 4,
                migrate_on_start: true,
            };
            (config, crate::app::Db::Sqlite(dir))
        }
        crate::app::Backend::Postgres => {
            let db = fresh_postgres().await;
            let config = StoreConfig {
                database_url: Some(db.url().to_owned()),
                data_dir: "unused".into(),
                max_connections: 4,
                migrate_on_start: true,
            };
            (config, crate::app::Db::Postgres(db))
        }
    }
}

pub(crate) async fn one_store<F, Fut>(backend: crate::app::Backend, case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (config, _db) = fixture(backend).await;
    let store = connect(&config).await;
    case(store.clone()).await;
    store.close().await;
}

pub(crate) async fn two_stores<F, Fut>(backend: crate::app::Backend, case: F)
where
    F: FnOnce(Store, Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (config, _db) = fixture(backend).await;
    let store = connect(&config).await;
    let other = connect(&config).await;
    case(store.clone(), other.clone()).await;
    store.close().await;
    other.close().await;
}

async fn connect(config: &StoreConfig) -> Store {
    Store::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect to the test store: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

fn at(secs: i64, nanos: u32) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, nanos).expect("a valid time")
}

fn module(action: &str, content: &str) -> NewModule {
    NewModule {
        action: action.into(),
        hash: spectral::worlds::module::hash_bytes(content.as_bytes()),
        content: content.as_bytes().to_vec(),
    }
}

fn new_version(world: &str, model: Value, modules: Vec<NewModule>) -> NewVersion {
    NewVersion {
        world: world.into(),
        model,
        modules,
        published_by: "op_1".into(),
    }
}

/// Publish a version with one module whose content is unique to it.
async fn publish(store: &Store, world: &str, n: u32) -> u64 {
    let content = format!("{world} module {n}");
    store
        .publish(&new_version(
            world,
            json!({"world": world, "n": n}),
            vec![module("act", &content)],
        ))
        .await
        .unwrap()
}

fn decision(world: &str, id: &str) -> NewDecision {
    NewDecision {
        decision_id: id.into(),
        world: world.into(),
        version: 1,
        action: "refund.issue".into(),
        module_hash: format!("sha256:{}", "ab".repeat(32)),
        status: "RED".into(),
        matched_rules: vec![MatchedRule {
            id: "r1".into(),
            outcome: "RED".into(),
            severity: "T1".into(),
        }],
        caller: "key_1".into(),
        correlation_id: Some(format!("corr-{id}")),
        context_digest: format!("sha256:{}", "cd".repeat(32)),
        decided_at: at(1_700_000_000, 123_456_000),
        context: None,
    }
}

/// Check what an auditor checks: seqs 1, 2, 3 …, each record links to the one before, and
/// every hash recomputes from the record as read back.
fn assert_chain(records: &[DecisionRecord]) {
    let mut prev = GENESIS.to_owned();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1, "seqs are 1..N without gaps");
        assert_eq!(
            r.prev_hash, prev,
            "record {} links to its predecessor",
            r.seq
        );
        assert_eq!(
            r.hash,
            chain_hash(&r.prev_hash, r.seq, &r.decision).unwrap(),
            "record {} hash recomputes",
            r.seq
        );
        prev = r.hash.clone();
    }
}

async fn all_decisions(store: &Store, world: &str) -> Vec<DecisionRecord> {
    store.decisions(world, 0, u32::MAX).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Cases.

async fn migrate_twice_is_idempotent(store: Store) {
    // `connect` has migrated once already.
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
    assert_eq!(store.list_worlds().await.unwrap(), vec![]);
}

async fn drafts_are_stored_and_replaced(store: Store) {
    assert_eq!(store.draft("w").await.unwrap(), None);
    let first = json!({"actions": [{"name": "a"}], "config": {"limit": 10.5}});
    store.put_draft("w", &first).await.unwrap();
    assert_eq!(store.draft("w").await.unwrap(), Some(first));
    let second = json!({"actions": [], "nested": {"z": 1, "a": [true, null, "x"]}});
    store.put_draft("w", &second).await.unwrap();
    assert_eq!(store.draft("w").await.unwrap(), Some(second));

    let detail = store.world("w").await.unwrap().unwrap();
    assert!(detail.has_draft);
    assert_eq!(detail.versions, vec![]);
    assert_eq!(detail.deployed_version, None);
    assert_eq!(
        store.list_worlds().await.unwrap()[0].latest_version,
        None,
        "a draft is not a version"
    );
    // Publishing does not touch the draft.
    publish(&store, "w", 1).await;
    assert!(store.draft("w").await.unwrap().is_some());
}

async fn publish_numbers_versions_and_keeps_old_ones(store: Store) {
    let models: Vec<Value> = (1..=3)
        .map(|n| json!({"n": n, "actions": [{"name": format!("act{n}")}]}))
        .collect();
    let mut numbers = vec![];
    for (n, model) in models.iter().enumerate() {
        let v = new_version(
            "w",
            model.clone(),
            vec![module("act", &format!("content {n}"))],
        );
        numbers.push(store.publish(&v).await.unwrap());
    }
    assert_eq!(numbers, vec![1, 2, 3]);
    // Another world numbers from 1 on its own.
    assert_eq!(publish(&store, "other", 1).await, 1);

    for (n, model) in models.iter().enumerate() {
        let version = n as u64 + 1;
        let record = store.version("w", version).await.unwrap().unwrap();
        assert_eq!(record.world, "w");
        assert_eq!(record.version, version);
        assert_eq!(&record.model, model, "version {version} is unchanged");
        assert_eq!(record.published_by, "op_1");
        assert_eq!(
            record.modules,
            vec![(
                "act".to_owned(),
                module("act", &format!("content {n}")).hash
            )]
        );
    }
    assert_eq!(store.version("w", 4).await.unwrap(), None);
    assert_eq!(store.version("w", 0).await.unwrap(), None);
    assert_eq!(store.version("w", u64::MAX).await.unwrap(), None);
    assert_eq!(store.version("nope", 1).await.unwrap(), None);

    let detail = store.world("w").await.unwrap().unwrap();
    let listed: Vec<u64> = detail.versions.iter().map(|v| v.version).collect();
    assert_eq!(listed, vec![1, 2, 3]);
    assert!(!detail.has_draft);
}

async fn modules_are_write_once(store: Store) {
    let original = module("act", "the canonical module");
    let same_hash_other_content = NewModule {
        action: "act".into(),
        hash: original.hash.clone(),
        content: b"something else".to_vec(),
    };
    store
        .publish(&new_version("w", json!({}), vec![original.clone()]))
        .await
        .unwrap();
    // The same hash again, from another world and from a later version of the first.
    store
        .publish(&new_version("v", json!({}), vec![original.clone()]))
        .await
        .unwrap();
    store
        .publish(&new_version("w", json!({}), vec![same_hash_other_content]))
        .await
        .unwrap();
    assert_eq!(
        store.module(&original.hash).await.unwrap(),
        Some(original.content.clone()),
        "the first content stored under a hash stays"
    );
    for (world, version) in [("w", 1), ("v", 1), ("w", 2)] {
        let record = store.version(world, version).await.unwrap().unwrap();
        assert_eq!(record.modules, vec![("act".into(), original.hash.clone())]);
    }
    assert_eq!(store.module("sha256:absent").await.unwrap(), None);
}

async fn version_lists_modules_in_action_order(store: Store) {
    // Neither alphabetical by action nor by hash, and two actions share one module.
    let modules = vec![
        module("zeta.run", "zeta"),
        module("alpha.run", "alpha"),
        module("mid.run", "mid"),
        module("alpha.again", "zeta"),
    ];
    let v = store
        .publish(&new_version("w", json!({}), modules.clone()))
        .await
        .unwrap();
    let record = store.version("w", v).await.unwrap().unwrap();
    let expected: Vec<(String, String)> = modules
        .iter()
        .map(|m| (m.action.clone(), m.hash.clone()))
        .collect();
    assert_eq!(record.modules, expected);
    for m in &modules {
        assert_eq!(
            store.module(&m.hash).await.unwrap(),
            Some(m.content.clone())
        );
    }

    // An action listed twice is refused, and nothing of that version is kept.
    let twice = vec![module("a", "one"), module("a", "two")];
    let err = store
        .publish(&new_version("w", json!({}), twice))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.version("w", v + 1).await.unwrap(), None);
    assert_eq!(store.module(&module("a", "one").hash).await.unwrap(), None);
}

async fn deploy_rollback_and_history(store: Store) {
    publish(&store, "w", 1).await;
    publish(&store, "w", 2).await;

    let first = store.deploy("w", 1, "alice").await.unwrap();
    assert_eq!(
        (first.seq, first.version, first.deployed_by.as_str()),
        (1, 1, "alice")
    );
    let second = store.deploy("w", 2, "bob").await.unwrap();
    assert_eq!((second.seq, second.version), (2, 2));
    assert_eq!(store.deployed().await.unwrap(), vec![("w".to_owned(), 2)]);

    // Rollback is a deployment of an older version.
    let rollback = store.deploy("w", 1, "carol").await.unwrap();
    assert_eq!((rollback.seq, rollback.version), (3, 1));

    let detail = store.world("w").await.unwrap().unwrap();
    assert_eq!(detail.deployed_version, Some(1));
    assert_eq!(detail.deployments, vec![first, second, rollback]);
    assert_eq!(store.deployed().await.unwrap(), vec![("w".to_owned(), 1)]);
    let summary = &store.list_worlds().await.unwrap()[0];
    assert_eq!(
        (summary.deployed_version, summary.latest_version),
        (Some(1), Some(2))
    );
}

async fn deploy_of_a_missing_version_is_not_found(store: Store) {
    let err = store.deploy("nope", 1, "op").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "world 'nope' version 1"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "world 'nope' version 1 not found");

    publish(&store, "w", 1).await;
    for version in [0, 2, u64::MAX] {
        let err = store.deploy("w", version, "op").await.unwrap_err();
        let expected = format!("world 'w' version {version}");
        assert!(
            matches!(&err, StoreError::NotFound(m) if *m == expected),
            "{err:?}"
        );
    }
    let detail = store.world("w").await.unwrap().unwrap();
    assert_eq!(detail.deployed_version, None);
    assert_eq!(detail.deployments, vec![]);
    assert_eq!(store.deployed().await.unwrap(), vec![]);
}

async fn retired_versions_are_never_deployed_again(store: Store) {
    publish(&store, "w", 1).await;
    publish(&store, "w", 2).await;
    publish(&store, "w", 3).await;
    store.deploy("w", 2, "op").await.unwrap();
    assert_eq!(store.retired().await.unwrap(), vec![]);
    // The deployed version is not retired; a missing one is not found.
    let err = store.retire("w", 2, "op", None).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("deployed")),
        "{err:?}"
    );
    for (world, version) in [("w", 9), ("nope", 1), ("w", u64::MAX)] {
        let err = store.retire(world, version, "op", None).await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    }
    // Rolled back from, and a never-deployed one: both retire.
    store.deploy("w", 1, "op").await.unwrap();
    let two = store
        .retire("w", 2, "alice", Some("too permissive"))
        .await
        .unwrap();
    assert_eq!(
        (two.retired_by.as_str(), two.reason.as_deref()),
        ("alice", Some("too permissive"))
    );
    store.retire("w", 3, "bob", None).await.unwrap();
    let err = store.retire("w", 2, "carol", None).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("already retired")),
        "{err:?}"
    );
    assert_eq!(
        store.retired().await.unwrap(),
        vec![("w".to_owned(), 2), ("w".to_owned(), 3)]
    );
    // Reads show the retirement exactly as written.
    let record = store.version("w", 2).await.unwrap().unwrap();
    assert_eq!(record.retired, Some(two.clone()));
    assert_eq!(store.version("w", 1).await.unwrap().unwrap().retired, None);
    let detail = store.world("w").await.unwrap().unwrap();
    let retired: Vec<Option<&str>> = detail
        .versions
        .iter()
        .map(|v| v.retired.as_ref().map(|r| r.retired_by.as_str()))
        .collect();
    assert_eq!(retired, vec![None, Some("alice"), Some("bob")]);
    // Never deployed again; the deployment history is untouched by the attempt.
    let err = store.deploy("w", 2, "op").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("retired")),
        "{err:?}"
    );
    let detail = store.world("w").await.unwrap().unwrap();
    assert_eq!(detail.deployed_version, Some(1));
    assert_eq!(detail.deployments.len(), 2);
    // Each retirement is an event, written with it.
    let events: Vec<_> = store
        .outbox_list(None, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.event_type == spectral::store::events::VERSION_RETIRED)
        .map(|r| (r.idempotency_key, r.payload["retired_by"].clone()))
        .collect();
    assert_eq!(
        events,
        vec![
            ("w:3".to_owned(), json!("bob")),
            ("w:2".to_owned(), json!("alice"))
        ]
    );
}

async fn deployed_lists_every_deployed_world(store: Store) {
    for world in ["c", "b", "a"] {
        publish(&store, world, 1).await;
        publish(&store, world, 2).await;
    }
    store.deploy("b", 2, "op").await.unwrap();
    store.deploy("a", 1, "op").await.unwrap();
    assert_eq!(
        store.deployed().await.unwrap(),
        vec![("a".to_owned(), 1), ("b".to_owned(), 2)],
        "a world never deployed is not listed"
    );
}

async fn worlds_are_listed_by_slug_with_detail(store: Store) {
    // Byte order: a locale collation would sort "a-c" after "ab" by ignoring the hyphen.
    for world in ["b-x", "ab", "a-c", "a"] {
        store.put_draft(world, &json!({"w": world})).await.unwrap();
    }
    publish(&store, "ab", 1).await;
    publish(&store, "ab", 2).await;
    store.deploy("ab", 1, "op").await.unwrap();

    let listed = store.list_worlds().await.unwrap();
    let slugs: Vec<&str> = listed.iter().map(|w| w.world.as_str()).collect();
    assert_eq!(slugs, vec!["a", "a-c", "ab", "b-x"]);
    let ab = &listed[2];
    assert_eq!((ab.deployed_version, ab.latest_version), (Some(1), Some(2)));
    assert_eq!(
        (listed[0].deployed_version, listed[0].latest_version),
        (None, None)
    );

    let detail = store.world("ab").await.unwrap().unwrap();
    assert_eq!(detail.world, "ab");
    assert_eq!(detail.deployed_version, Some(1));
    assert!(detail.has_draft);
    assert_eq!(detail.versions.len(), 2);
    assert_eq!(detail.deployments.len(), 1);
    assert_eq!(store.world("unknown").await.unwrap(), None);
}

async fn keys_are_stored_and_looked_up_by_hash(store: Store) {
    assert!(!store.has_operator_key().await.unwrap());
    let world_key = NewKey {
        id: "key_w".into(),
        secret_hash: "11".repeat(32),
        world: Some("w".into()),
        scopes: vec![Scope::Decide, Scope::Read],
        label: "payments bot".into(),
        expires_at: None,
    };
    store.create_key(&world_key).await.unwrap();
    assert!(
        !store.has_operator_key().await.unwrap(),
        "a world key is not an operator key"
    );

    let operator = NewKey {
        id: "key_op".into(),
        secret_hash: "22".repeat(32),
        world: None,
        scopes: Scope::ALL.to_vec(),
        label: "operator".into(),
        expires_at: None,
    };
    store.create_key(&operator).await.unwrap();
    assert!(store.has_operator_key().await.unwrap());

    let no_scopes = NewKey {
        id: "key_none".into(),
        secret_hash: "33".repeat(32),
        world: Some("w".into()),
        scopes: vec![],
        label: String::new(),
        expires_at: None,
    };
    store.create_key(&no_scopes).await.unwrap();

    for key in [&world_key, &operator, &no_scopes] {
        let found = store.key_by_hash(&key.secret_hash).await.unwrap().unwrap();
        assert_eq!(found.id, key.id);
        assert_eq!(found.world, key.world);
        assert_eq!(found.scopes, key.scopes);
        assert_eq!(found.label, key.label);
        assert_eq!(found.created_at.timestamp_subsec_nanos() % 1000, 0);
    }
    assert_eq!(store.key_by_hash(&"44".repeat(32)).await.unwrap(), None);

    let same_id = NewKey {
        secret_hash: "55".repeat(32),
        ..world_key.clone()
    };
    let err = store.create_key(&same_id).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("key_w")),
        "{err:?}"
    );
    let same_secret = NewKey {
        id: "key_other".into(),
        ..world_key.clone()
    };
    let err = store.create_key(&same_secret).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        store
            .key_by_hash(&world_key.secret_hash)
            .await
            .unwrap()
            .unwrap()
            .id,
        "key_w"
    );
}

async fn decisions_form_one_chain_per_world(store: Store) {
    // Two worlds interleaved in one batch, then a second batch for both.
    let first = vec![
        decision("a", "d1"),
        decision("b", "d2"),
        decision("a", "d3"),
        decision("a", "d4"),
        decision("b", "d5"),
    ];
    store.append_decisions(&first).await.unwrap();
    let second = vec![
        decision("b", "d6"),
        decision("a", "d7"),
        decision("a", "d8"),
    ];
    store.append_decisions(&second).await.unwrap();
    store.append_decisions(&[]).await.unwrap();

    let a = all_decisions(&store, "a").await;
    let b = all_decisions(&store, "b").await;
    assert_chain(&a);
    assert_chain(&b);
    let ids = |records: &[DecisionRecord]| -> Vec<String> {
        records
            .iter()
            .map(|r| r.decision.decision_id.clone())
            .collect()
    };
    assert_eq!(ids(&a), vec!["d1", "d3", "d4", "d7", "d8"]);
    assert_eq!(ids(&b), vec!["d2", "d5", "d6"]);
    // Every field comes back as it went in.
    let sent: BTreeMap<&str, &NewDecision> = first
        .iter()
        .chain(&second)
        .map(|d| (d.decision_id.as_str(), d))
        .collect();
    for r in a.iter().chain(&b) {
        assert_eq!(&&r.decision, &sent[r.decision.decision_id.as_str()]);
    }
    // The chains are separate: both start at GENESIS.
    assert_eq!(a[0].prev_hash, GENESIS);
    assert_eq!(b[0].prev_hash, GENESIS);

    // Paging by seq.
    let page = store.decisions("a", 2, 2).await.unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(page, a[2..4].to_vec());
    assert_eq!(store.decisions("a", 5, 10).await.unwrap(), vec![]);
    assert_eq!(store.decisions("a", 0, 0).await.unwrap(), vec![]);
    assert_eq!(store.decisions("a", u64::MAX, 10).await.unwrap(), vec![]);
    assert_eq!(store.decisions("nope", 0, 10).await.unwrap(), vec![]);
}

async fn a_batch_with_a_duplicate_decision_id_is_not_appended(store: Store) {
    store
        .append_decisions(&[decision("a", "d1")])
        .await
        .unwrap();
    let batch = vec![decision("b", "fresh"), decision("a", "d1")];
    let err = store.append_decisions(&batch).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    // The batch is one transaction: its other decision and the chain heads are untouched.
    assert_eq!(all_decisions(&store, "b").await, vec![]);
    store
        .append_decisions(&[decision("a", "d2")])
        .await
        .unwrap();
    let a = all_decisions(&store, "a").await;
    assert_chain(&a);
    assert_eq!(a.len(), 2);
}

async fn matched_rules_round_trip_for_the_auditor(store: Store) {
    // Unicode, escapes and several rules: what is read back must hash exactly as what was
    // hashed when it was written.
    let mut d = decision("w", "d1");
    let rule = |id: &str, outcome: &str, severity: &str| MatchedRule {
        id: id.into(),
        outcome: outcome.into(),
        severity: severity.into(),
    };
    d.matched_rules = vec![
        rule("zz \"quoted\" \\ \n", "YELLOW", "T2"),
        rule("é ✓ \u{1F600}", "RED", "T1"),
    ];
    store.append_decisions(&[d.clone()]).await.unwrap();
    let records = all_decisions(&store, "w").await;
    assert_chain(&records);
    assert_eq!(records[0].decision.matched_rules, d.matched_rules);
    assert_eq!(
        serde_json::to_vec(&records[0].decision).unwrap(),
        serde_json::to_vec(&d).unwrap(),
        "the decision serializes to the same bytes it was hashed from"
    );
    assert_eq!(records[0].hash, chain_hash(GENESIS, 1, &d).unwrap());
}

async fn deployments_are_notified(store: Store) {
    let listener = store.listen_deployments().await.unwrap();
    let mut listener = match (store.backend(), listener) {
        (Backend::Sqlite, None) => return,
        (Backend::Postgres, Some(listener)) => listener,
        (backend, listener) => panic!("{backend:?} listener: {}", listener.is_some()),
    };
    publish(&store, "w", 1).await;
    // A failed deploy notifies nobody, so the first notification is the real one.
    assert!(store.deploy("ghost", 1, "op").await.is_err());
    store.deploy("w", 1, "op").await.unwrap();
    let slug = tokio::time::timeout(Duration::from_secs(10), listener.next())
        .await
        .expect("a notification within 10 s")
        .unwrap();
    assert_eq!(slug, "w");
    // A rollback notifies too.
    publish(&store, "w", 2).await;
    store.deploy("w", 2, "op").await.unwrap();
    store.deploy("w", 1, "op").await.unwrap();
    for _ in 0..2 {
        let slug = tokio::time::timeout(Duration::from_secs(10), listener.next())
            .await
            .expect("a notification within 10 s")
            .unwrap();
        assert_eq!(slug, "w");
    }
}

async fn timestamps_round_trip_exactly(store: Store) {
    // Nanoseconds are truncated to microseconds before storing and hashing.
    let mut precise = decision("w", "d1");
    precise.decided_at = at(1_700_000_000, 123_456_789);
    let mut early = decision("w", "d2");
    early.decided_at = at(0, 1_000);
    let mut late = decision("w", "d3");
    late.decided_at = at(4_102_444_799, 999_999_999);
    store
        .append_decisions(&[precise, early, late])
        .await
        .unwrap();
    let records = all_decisions(&store, "w").await;
    assert_chain(&records);
    let times: Vec<DateTime<Utc>> = records.iter().map(|r| r.decision.decided_at).collect();
    assert_eq!(
        times,
        vec![
            at(1_700_000_000, 123_456_000),
            at(0, 1_000),
            at(4_102_444_799, 999_999_000)
        ]
    );

    // Times the store takes itself read back equal to what it returned.
    publish(&store, "w", 1).await;
    let deployment = store.deploy("w", 1, "op").await.unwrap();
    let detail = store.world("w").await.unwrap().unwrap();
    assert_eq!(detail.deployments, vec![deployment.clone()]);
    assert_eq!(deployment.deployed_at.timestamp_subsec_nanos() % 1000, 0);
    let version = store.version("w", 1).await.unwrap().unwrap();
    assert_eq!(detail.versions[0].published_at, version.published_at);
    assert_eq!(version.published_at.timestamp_subsec_nanos() % 1000, 0);
    assert!(version.published_at <= deployment.deployed_at);
}

async fn concurrent_appends_form_one_chain(store: Store, other: Store) {
    const TASKS: usize = 8;
    const BATCHES: usize = 10;
    const PER_BATCH: usize = 3;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        // Half the writers go through each instance.
        let store = if t % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.spawn(async move {
            for b in 0..BATCHES {
                let batch: Vec<NewDecision> = (0..PER_BATCH)
                    .map(|i| decision("busy", &format!("t{t}-b{b}-{i}")))
                    .collect();
                store.append_decisions(&batch).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let records = all_decisions(&store, "busy").await;
    assert_eq!(records.len(), TASKS * BATCHES * PER_BATCH);
    assert_chain(&records);
    // Each batch is contiguous: its decisions were appended in one transaction.
    for chunk in records.chunks(PER_BATCH) {
        let prefix = |r: &DecisionRecord| {
            r.decision
                .decision_id
                .rsplit_once('-')
                .unwrap()
                .0
                .to_owned()
        };
        assert!(
            chunk.iter().all(|r| prefix(r) == prefix(&chunk[0])),
            "batch split: {chunk:?}"
        );
    }
    assert_eq!(all_decisions(&other, "busy").await, records);
}

async fn concurrent_publishes_get_distinct_versions(store: Store, other: Store) {
    const TASKS: u32 = 8;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let store = if t % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.spawn(async move {
            let v = publish(&store, "w", t).await;
            let deployment = store.deploy("w", v, &format!("op{t}")).await.unwrap();
            (v, deployment.seq)
        });
    }
    let mut versions = vec![];
    let mut seqs = vec![];
    while let Some(done) = tasks.join_next().await {
        let (v, seq) = done.unwrap();
        versions.push(v);
        seqs.push(seq);
    }
    versions.sort_unstable();
    seqs.sort_unstable();
    let expected: Vec<u64> = (1..=u64::from(TASKS)).collect();
    assert_eq!(versions, expected);
    assert_eq!(seqs, expected);
    let detail = store.world("w").await.unwrap().unwrap();
    let last = detail.deployments.last().unwrap();
    assert_eq!(
        detail.deployed_version,
        Some(last.version),
        "the last deployment is live"
    );
}

/// Two instances, one deploying a version while the other retires it: exactly one wins, so a
/// version is never both deployed and retired.
async fn a_deploy_and_a_retirement_of_one_version_never_both_win(store: Store, other: Store) {
    for i in 0..8 {
        let world = format!("w{i}");
        publish(&store, &world, 1).await;
        publish(&store, &world, 2).await;
        store.deploy(&world, 1, "op").await.unwrap();
        let (deployed, retired) = tokio::join!(
            store.deploy(&world, 2, "deployer"),
            other.retire(&world, 2, "retirer", None)
        );
        let detail = store.world(&world).await.unwrap().unwrap();
        let is_retired = store.version(&world, 2).await.unwrap().unwrap().retired;
        match (deployed, retired) {
            (Ok(_), Err(StoreError::Conflict(m))) => {
                assert!(m.contains("deployed"), "{m}");
                assert_eq!(detail.deployed_version, Some(2));
                assert_eq!(is_retired, None);
            }
            (Err(StoreError::Conflict(m)), Ok(_)) => {
                assert!(m.contains("retired"), "{m}");
                assert_eq!(detail.deployed_version, Some(1));
                assert!(is_retired.is_some());
            }
            (d, r) => panic!("both or neither won: {d:?} {r:?}"),
        }
    }
}

async fn a_build_resumes_its_own_generation(store: Store) {
    let (first, resumed) = store
        .generation_for_build("aaa", "start")
        .await
        .expect("gen");
    assert!(!resumed, "the build's first start allocates");
    assert_eq!(
        store
            .generation_for_build("aaa", "restart")
            .await
            .expect("gen"),
        (first, true),
        "a restart of the same build resumes its generation"
    );
    let (second, resumed) = store
        .generation_for_build("bbb", "deploy")
        .await
        .expect("gen");
    assert!(!resumed);
    assert!(second > first, "{second} after {first}");
    // A rollback to the first build goes on with its generation, not the newest.
    assert_eq!(
        store
            .generation_for_build("aaa", "rollback")
            .await
            .expect("gen"),
        (first, true)
    );
    // An explicit allocation is always new, and becomes the build's newest.
    let third = store
        .allocate_generation("aaa", "forced")
        .await
        .expect("gen");
    assert!(third > second);
    assert_eq!(
        store
            .generation_for_build("aaa", "restart")
            .await
            .expect("gen"),
        (third, true)
    );
}

async fn instances_of_one_build_starting_together_share_a_generation(store: Store, other: Store) {
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let store = if t % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.spawn(async move { store.generation_for_build("ccc", "start").await });
    }
    let mut got = Vec::new();
    while let Some(r) = tasks.join_next().await {
        got.push(r.expect("join").expect("gen"));
    }
    let generations: std::collections::BTreeSet<i64> = got.iter().map(|(g, _)| *g).collect();
    assert_eq!(generations.len(), 1, "{got:?}");
    assert_eq!(
        got.iter().filter(|(_, resumed)| !resumed).count(),
        1,
        "{got:?}"
    );
}
