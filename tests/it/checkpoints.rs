//! The World Agent's checkpointer in the store (ARCHITECTURE.md, "src/store"), on both
//! backends: checkpoints read back, the run lease and its fencing token, a step re-run after a
//! crash writing nothing twice, one candidate per run with its outbox event, and retention.

use std::time::Duration;

use serde_json::{json, Value};
use spectral::outbox::events;
use spectral::store::{
    NewCandidate, NewCheckpoint, NewThread, NewThreadEvent, Store, StoreError, ThreadKind, Usage,
};

// The conformance suite's runners: a store, or two on one database, on a fresh one.
use crate::store::{one_store, two_stores};
use crate::support::eventually;

crate::both_backends! {
    one_store => [
        a_thread_reads_back_its_latest_checkpoint_and_its_log_in_order,
        a_step_saved_again_writes_one_checkpoint_and_no_duplicated_events,
        proposing_twice_stores_one_candidate_and_one_outbox_row,
        a_proposed_candidate_fans_out_to_the_worlds_webhooks,
        pruning_keeps_the_thread_its_final_state_and_its_candidate,
    ],
    two_stores => [
        two_workers_racing_for_a_lease_one_gets_it,
        after_the_lease_expires_another_worker_takes_over_and_the_first_is_fenced,
    ],
}

const LONG: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------------
// Fixtures.

async fn run_thread(store: &Store, id: &str) {
    store
        .create_thread(&NewThread {
            id: id.into(),
            world: "acme".into(),
            kind: ThreadKind::Run,
            parent: None,
            created_by: "k_author".into(),
            task: json!({"text": "block payments over 10000 to new vendors"}),
        })
        .await
        .unwrap();
}

fn step(n: u64, node: &str, state: Value) -> NewCheckpoint {
    NewCheckpoint {
        step: n,
        parent_step: n.checked_sub(1).filter(|p| *p > 0),
        node: node.into(),
        state,
    }
}

fn events_of(step: u64, kinds: &[&str]) -> Vec<NewThreadEvent> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| NewThreadEvent {
            kind: (*kind).into(),
            data: json!({"step": step, "i": i}),
        })
        .collect()
}

fn usage(calls: u64) -> Usage {
    Usage {
        calls,
        prompt_tokens: calls * 100,
        completion_tokens: calls * 10,
    }
}

fn candidate(id: &str) -> NewCandidate {
    NewCandidate {
        id: id.into(),
        action: "pay".into(),
        rule: json!({"id": "big_new_vendor", "severity": "T1", "outcome": "RED"}),
        evidence: json!({"checks": "4/4 checks passed", "repairs": 0}),
        model: "stand-in".into(),
        prompt_versions: json!({"draft": "1", "derive_cases": "1"}),
    }
}

/// Save steps `1..=n` of a three-event step each under `fence`.
async fn save_steps(store: &Store, thread: &str, fence: u64, n: u64) {
    for s in 1..=n {
        let saved = store
            .save_checkpoint(
                thread,
                fence,
                &step(s, "draft", json!({"step": s})),
                &events_of(s, &["node_started", "token", "node_finished"]),
                &usage(s),
            )
            .await
            .unwrap();
        assert!(saved.written, "step {s} is new");
        assert_eq!(saved.last_seq, s * 3);
    }
}

async fn rule_candidate_rows(store: &Store) -> usize {
    store
        .outbox_list(None, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.event_type == events::RULE_CANDIDATE_PROPOSED)
        .count()
}

fn is_fenced<T>(r: &Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Fenced(_)))
}

// ---------------------------------------------------------------------------------------------
// Cases.

async fn a_thread_reads_back_its_latest_checkpoint_and_its_log_in_order(store: Store) {
    run_thread(&store, "t1").await;
    assert_eq!(store.latest_checkpoint("t1").await.unwrap(), None);
    let fence = store
        .acquire_lease("t1", "w1", LONG)
        .await
        .unwrap()
        .unwrap();
    save_steps(&store, "t1", fence, 3).await;

    let latest = store.latest_checkpoint("t1").await.unwrap().unwrap();
    assert_eq!(
        (latest.step, latest.parent_step, latest.state),
        (3, Some(2), json!({"step": 3}))
    );
    let log = store.events_after("t1", 0, 100).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=9).collect::<Vec<_>>()
    );
    assert_eq!(
        log.iter().map(|e| e.step).collect::<Vec<_>>(),
        [1, 1, 1, 2, 2, 2, 3, 3, 3]
    );
    assert_eq!(log[4].kind, "token");
    assert_eq!(log[4].data, json!({"step": 2, "i": 1}));
    // Resuming a stream after seq 4 gets exactly what follows, within the limit.
    let page = store.events_after("t1", 4, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6]);

    let thread = store.thread("t1").await.unwrap().unwrap();
    assert_eq!(thread.usage, usage(3));
    assert_eq!(thread.status, "running");
    assert_eq!(thread.lease_owner.as_deref(), Some("w1"));
    assert_eq!(thread.fence, fence);
}

async fn two_workers_racing_for_a_lease_one_gets_it(a: Store, b: Store) {
    run_thread(&a, "t1").await;
    let (got_a, got_b) = tokio::join!(
        a.acquire_lease("t1", "worker-a", LONG),
        b.acquire_lease("t1", "worker-b", LONG)
    );
    let (got_a, got_b) = (got_a.unwrap(), got_b.unwrap());
    assert!(
        got_a.is_some() != got_b.is_some(),
        "exactly one worker gets the lease: {got_a:?} {got_b:?}"
    );
    let (winner, loser, loser_store) = if got_a.is_some() {
        ("worker-a", "worker-b", &b)
    } else {
        ("worker-b", "worker-a", &a)
    };
    // The loser keeps backing off while the lease is held; the holder may take it again.
    assert_eq!(
        loser_store.acquire_lease("t1", loser, LONG).await.unwrap(),
        None
    );
    let again = a.acquire_lease("t1", winner, LONG).await.unwrap();
    assert_eq!(
        again,
        got_a.or(got_b).map(|f| f + 1),
        "every acquisition bumps the fence"
    );
    // A held run is not one to resume.
    assert!(a.expired_runs(10).await.unwrap().is_empty());
}

async fn after_the_lease_expires_another_worker_takes_over_and_the_first_is_fenced(
    a: Store,
    b: Store,
) {
    run_thread(&a, "t1").await;
    assert_eq!(
        a.expired_runs(10).await.unwrap()[0].id,
        "t1",
        "a run no worker has taken is one to resume"
    );
    let first = a
        .acquire_lease("t1", "worker-a", Duration::from_millis(20))
        .await
        .unwrap()
        .unwrap();
    save_steps(&a, "t1", first, 1).await;

    let resumable = eventually(Duration::from_secs(10), "the lease expires", || async {
        let runs = b.expired_runs(10).await.unwrap();
        (!runs.is_empty()).then_some(runs)
    })
    .await;
    assert_eq!(resumable[0].id, "t1");
    let second = b
        .acquire_lease("t1", "worker-b", LONG)
        .await
        .unwrap()
        .expect("an expired lease is taken over");
    assert!(second > first);

    // The first worker wakes from its stall: every write it tries is refused.
    let stale = a
        .save_checkpoint(
            "t1",
            first,
            &step(2, "derive_cases", json!({"by": "a"})),
            &events_of(2, &["token"]),
            &usage(2),
        )
        .await;
    assert!(is_fenced(&stale), "{stale:?}");
    let renewed = a.renew_lease("t1", "worker-a", first, LONG).await;
    assert!(is_fenced(&renewed), "{renewed:?}");
    let proposed = a.propose("t1", first, &candidate("c1")).await;
    assert!(is_fenced(&proposed), "{proposed:?}");
    let finished = a.finish("t1", first, "proposed").await;
    assert!(is_fenced(&finished), "{finished:?}");
    assert_eq!(a.acquire_lease("t1", "worker-a", LONG).await.unwrap(), None);

    // The new holder resumes from the last checkpoint and advances the thread.
    let latest = b.latest_checkpoint("t1").await.unwrap().unwrap();
    assert_eq!(latest.step, 1);
    b.renew_lease("t1", "worker-b", second, LONG).await.unwrap();
    let saved = b
        .save_checkpoint(
            "t1",
            second,
            &step(2, "derive_cases", json!({"by": "b"})),
            &events_of(2, &["token"]),
            &usage(2),
        )
        .await
        .unwrap();
    assert!(saved.written);
    assert_eq!(saved.last_seq, 4);
    let latest = b.latest_checkpoint("t1").await.unwrap().unwrap();
    assert_eq!(latest.state, json!({"by": "b"}));
    b.finish("t1", second, "proposed").await.unwrap();
    let thread = b.thread("t1").await.unwrap().unwrap();
    assert_eq!(thread.status, "proposed");
    assert!(thread.finished_at.is_some() && thread.lease_owner.is_none());
    // A finished run is neither resumed nor leased again.
    assert!(b.expired_runs(10).await.unwrap().is_empty());
    assert_eq!(b.acquire_lease("t1", "worker-b", LONG).await.unwrap(), None);
}

async fn a_step_saved_again_writes_one_checkpoint_and_no_duplicated_events(store: Store) {
    run_thread(&store, "t1").await;
    let fence = store
        .acquire_lease("t1", "w1", LONG)
        .await
        .unwrap()
        .unwrap();
    save_steps(&store, "t1", fence, 2).await;

    // The worker crashed after committing step 2 and before noting it; it restarts, takes
    // the lease again and re-runs step 2, whose model answers differently this time.
    let fence = store
        .acquire_lease("t1", "w1", LONG)
        .await
        .unwrap()
        .unwrap();
    let again = store
        .save_checkpoint(
            "t1",
            fence,
            &step(2, "draft", json!({"step": 2, "rerun": true})),
            &events_of(2, &["node_started", "token", "token", "node_finished"]),
            &usage(9),
        )
        .await
        .unwrap();
    assert!(!again.written, "the step was already checkpointed");
    assert_eq!(again.last_seq, 6);
    let checkpoint = store.checkpoint("t1", 2).await.unwrap().unwrap();
    assert_eq!(checkpoint.state, json!({"step": 2}), "the first write wins");
    let log = store.events_after("t1", 0, 100).await.unwrap();
    assert_eq!(log.len(), 6, "no event of the re-run is appended: {log:?}");
    assert_eq!(store.thread("t1").await.unwrap().unwrap().usage, usage(2));

    // The next step continues the log.
    let saved = store
        .save_checkpoint(
            "t1",
            fence,
            &step(3, "verify", json!({"step": 3})),
            &events_of(3, &["node_started"]),
            &usage(3),
        )
        .await
        .unwrap();
    assert_eq!((saved.written, saved.last_seq), (true, 7));
}

async fn proposing_twice_stores_one_candidate_and_one_outbox_row(store: Store) {
    run_thread(&store, "t1").await;
    let fence = store
        .acquire_lease("t1", "w1", LONG)
        .await
        .unwrap()
        .unwrap();
    let first = store.propose("t1", fence, &candidate("c1")).await.unwrap();
    assert_eq!(first, "c1");
    // A re-run after a crash proposes again, under a new id and a new fence.
    let fence = store
        .acquire_lease("t1", "w1", LONG)
        .await
        .unwrap()
        .unwrap();
    let second = store.propose("t1", fence, &candidate("c2")).await.unwrap();
    assert_eq!(second, "c1", "the run's first candidate stands");

    let candidates = store.candidates("acme").await.unwrap();
    assert_eq!(candidates.len(), 1, "{candidates:?}");
    let c = &candidates[0];
    assert_eq!(
        (c.id.as_str(), c.run_thread.as_str(), c.status.as_str()),
        ("c1", "t1", "proposed")
    );
    assert_eq!(c.evidence, candidate("c1").evidence);
    assert!(store.candidates("other").await.unwrap().is_empty());

    assert_eq!(rule_candidate_rows(&store).await, 1);
    let row = store
        .outbox_list(None, None, 10)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.event_type == events::RULE_CANDIDATE_PROPOSED)
        .unwrap();
    assert_eq!(row.world.as_deref(), Some("acme"));
    assert_eq!(row.payload["candidate"], "c1");
    assert_eq!(row.payload["run_thread"], "t1");
}

async fn pruning_keeps_the_thread_its_final_state_and_its_candidate(store: Store) {
    for id in ["old1", "old2", "live"] {
        run_thread(&store, id).await;
        let fence = store.acquire_lease(id, "w1", LONG).await.unwrap().unwrap();
        save_steps(&store, id, fence, 3).await;
        if id != "live" {
            store
                .propose(id, fence, &candidate(&format!("c-{id}")))
                .await
                .unwrap();
            store.finish(id, fence, "proposed").await.unwrap();
        }
    }
    let cutoff = chrono::Utc::now();
    run_thread(&store, "recent").await;
    let fence = store
        .acquire_lease("recent", "w1", LONG)
        .await
        .unwrap()
        .unwrap();
    save_steps(&store, "recent", fence, 2).await;
    store
        .finish("recent", fence, "failed_verification")
        .await
        .unwrap();

    // One thread per batch: the pruning goes on until no thread is left.
    let pruned = store.prune(cutoff, 1).await.unwrap();
    assert_eq!(
        (pruned.threads, pruned.checkpoints, pruned.events),
        (2, 4, 18),
        "{pruned:?}"
    );
    for id in ["old1", "old2"] {
        let thread = store.thread(id).await.unwrap().unwrap();
        assert_eq!(thread.status, "proposed");
        assert_eq!(thread.usage, usage(3));
        assert!(thread.pruned_at.is_some());
        let last = store.latest_checkpoint(id).await.unwrap().unwrap();
        assert_eq!(last.state, json!({"step": 3}), "the final state is kept");
        assert_eq!(store.checkpoint(id, 1).await.unwrap(), None);
        assert!(store.events_after(id, 0, 100).await.unwrap().is_empty());
    }
    assert_eq!(store.candidates("acme").await.unwrap().len(), 2);
    // A running thread and one finished after the cutoff are left alone.
    for (id, steps) in [("live", 3), ("recent", 2)] {
        assert!(store.checkpoint(id, 1).await.unwrap().is_some());
        let log = store.events_after(id, 0, 100).await.unwrap();
        assert_eq!(log.len(), steps * 3, "{id}");
    }
    let again = store.prune(cutoff, 10).await.unwrap();
    assert_eq!(again.threads, 0, "pruned threads are not pruned again");
}

async fn a_proposed_candidate_fans_out_to_the_worlds_webhooks(store: Store) {
    store.put_draft("acme", &json!({})).await.unwrap();
    store
        .create_webhook(&spectral::store::Webhook {
            id: "h1".into(),
            world: "acme".into(),
            url: "http://127.0.0.1:9/hook".into(),
            secret: "s".into(),
            events: vec![events::RULE_CANDIDATE_PROPOSED.into()],
            created_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    run_thread(&store, "t1").await;
    let fence = store
        .acquire_lease("t1", "w1", LONG)
        .await
        .unwrap()
        .unwrap();
    store.propose("t1", fence, &candidate("c1")).await.unwrap();
    let row = store
        .outbox_list(None, None, 10)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.event_type == events::RULE_CANDIDATE_PROPOSED)
        .unwrap();
    let registry = spectral::outbox::handlers::registry(
        store.clone(),
        Duration::from_secs(1),
        &spectral::egress::Egress::default(),
        std::sync::Arc::new(tokio::sync::Notify::new()),
        spectral::seal::Sealer::none(),
    )
    .unwrap();
    let handler = registry
        .get(events::RULE_CANDIDATE_PROPOSED)
        .expect("a handler, so the event is not dead-lettered");
    match handler.handle(&row).await {
        Ok(spectral::store::Effect::Enqueue(deliveries)) => {
            assert_eq!(deliveries.len(), 1, "{deliveries:?}");
            assert_eq!(deliveries[0].payload["webhook_id"], "h1");
        }
        other => panic!("{other:?}"),
    }
}
