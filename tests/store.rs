//! The store's contract, area by area, through its traits: each test opens
//! a migrated store on a real SQLite file or a fresh database on the real
//! PostgreSQL, writes through the trait and reads back what it promises.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{private_tempdir, Db, TestDatabase};
use keyward::audit::{verify_sequence, AuditEvent};
use keyward::store::{
    AgentRecord, AgentStatusChange, AgentTransition, ApprovalRecord, AttestationRecord, CaRecord,
    CertificateInsert, CertificateLog, CertificateRecord, CertificateRevocation,
    ConsoleSessionRecord, KeyRotation, KeyRotationOutcome, NewCertificate, NewEnrollmentToken,
    RevokedCertificate, SignatureLog, SignatureRecord, Store, StoreError, TpmChallengeRecord,
    TpmRedemption, VoteOutcome, KEY_COMPROMISE,
};

/// A time all the tests' rows are relative to: certificates valid around
/// it, revocations at it.
const T: i64 = 1_900_000_000;
const DAY: i64 = 86_400;

/// A migrated store on its own database. The store is declared first so
/// that its connections close before the database is dropped.
struct Opened {
    store: Arc<dyn Store>,
    database: TestDatabase,
    _dir: tempfile::TempDir,
}

async fn open(db: Db) -> Opened {
    let dir = private_tempdir();
    let database = TestDatabase::create(db, dir.path()).await;
    let store = keyward::store::connect(&database.url).await.unwrap();
    Opened {
        store,
        database,
        _dir: dir,
    }
}

fn event(action: &str, subject: &str) -> AuditEvent {
    AuditEvent::new("test", action, subject)
}

fn agent(name: &str) -> AgentRecord {
    AgentRecord {
        name: name.into(),
        spiffe_id: format!("spiffe://test/agent/{name}"),
        custody: "custodial".into(),
        key_id: Some(format!("key-{name}")),
        public_key_der: Some(format!("spki of {name}").into_bytes()),
        key_wrapped: None,
        attestation_digest: None,
        scopes: vec!["payments".into(), "reports".into()],
        status: "active".into(),
        created_at: T - DAY,
    }
}

async fn registered(store: &dyn Store, name: &str) -> AgentRecord {
    let record = agent(name);
    store
        .insert_agent(&record, None, None, &event("agent.create", name))
        .await
        .unwrap();
    record
}

/// A certificate of `agent`'s current key, issued at `created_at` and
/// valid for a day from then.
fn certificate(agent: &AgentRecord, serial: &str, created_at: i64) -> NewCertificate {
    let spki = agent.public_key_der.as_deref().unwrap();
    NewCertificate {
        record: CertificateRecord {
            serial: serial.into(),
            agent_name: agent.name.clone(),
            key_id: agent.key_id.clone(),
            public_key_sha256: keyward::store::public_key_sha256(spki),
            not_before: created_at,
            not_after: created_at + DAY,
            der: format!("certificate {serial}").into_bytes(),
            attestation_digest: None,
            policy_version: 0,
            created_at,
            revoked_at: None,
            revocation_reason: None,
        },
        evidence: None,
        audit: event("certificate.issue", serial),
    }
}

async fn issued(store: &dyn Store, certificates: Vec<NewCertificate>) {
    let outcomes = store.insert_certificates(&certificates).await.unwrap();
    assert!(
        outcomes.iter().all(|o| *o == CertificateInsert::Inserted),
        "{outcomes:?}"
    );
}

fn evidence(name: &str) -> AttestationRecord {
    AttestationRecord {
        digest: format!("digest-{name}"),
        format: "test".into(),
        evidence: name.as_bytes().to_vec(),
        created_at: T,
    }
}

async fn an_agent_is_read_back_as_registered_and_registered_once(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    let alpha = registered(store, "alpha").await;

    assert_eq!(store.agent("alpha").await.unwrap(), Some(alpha.clone()));
    assert_eq!(store.agent("nobody").await.unwrap(), None);
    let again = store
        .insert_agent(&alpha, None, None, &event("agent.create", "alpha"))
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict("agent"))),
        "{again:?}"
    );

    let scopes = vec!["audit".to_owned()];
    assert!(store
        .set_agent_scopes("alpha", &scopes, &event("agent.scopes", "alpha"))
        .await
        .unwrap());
    assert!(!store
        .set_agent_scopes("nobody", &scopes, &event("agent.scopes", "nobody"))
        .await
        .unwrap());
    assert_eq!(store.agent("alpha").await.unwrap().unwrap().scopes, scopes);
}

async fn an_agents_certificates_page_newest_first_then_by_serial(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    let alpha = registered(store, "alpha").await;
    let bravo = registered(store, "bravo").await;
    // Two issued in the same second: the serial orders them.
    issued(
        store,
        vec![
            certificate(&alpha, "0a", T),
            certificate(&alpha, "0c", T + 10),
            certificate(&bravo, "0d", T + 15),
            certificate(&alpha, "0b", T + 10),
            certificate(&alpha, "0e", T + 20),
        ],
    )
    .await;

    let mut pages = Vec::new();
    let mut after: Option<(i64, String)> = None;
    loop {
        let cursor = after.as_ref().map(|(at, serial)| (*at, serial.as_str()));
        let page = store
            .certificates_of_agent_page("alpha", cursor, 2)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.serial.clone()));
        pages.push(page.iter().map(|c| c.serial.clone()).collect::<Vec<_>>());
    }
    assert_eq!(pages, [vec!["0e", "0c"], vec!["0b", "0a"]]);

    let stored = store.certificate("0d").await.unwrap().unwrap();
    assert_eq!(stored, certificate(&bravo, "0d", T + 15).record);
}

async fn a_certificate_is_recorded_only_for_an_active_agent_and_an_unbarred_key(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    let alpha = registered(store, "alpha").await;
    let bravo = registered(store, "bravo").await;
    let charlie = registered(store, "charlie").await;
    issued(store, vec![certificate(&charlie, "01", T)]).await;
    store
        .change_agent_status(
            "bravo",
            AgentTransition::Suspend,
            T,
            &event("agent.suspend", "bravo"),
        )
        .await
        .unwrap();
    store
        .revoke_certificate("01", KEY_COMPROMISE, T, &event("certificate.revoke", "01"))
        .await
        .unwrap();

    let outcomes = store
        .insert_certificates(&[
            certificate(&alpha, "02", T),
            certificate(&bravo, "03", T),
            certificate(&charlie, "04", T),
            certificate(&agent("nobody"), "05", T),
        ])
        .await
        .unwrap();

    assert_eq!(
        outcomes,
        [
            CertificateInsert::Inserted,
            CertificateInsert::AgentNotActive {
                status: "suspended".into()
            },
            CertificateInsert::KeyCompromised,
            CertificateInsert::AgentNotActive {
                status: "absent".into()
            },
        ]
    );
    for (serial, stored) in [("02", true), ("03", false), ("04", false), ("05", false)] {
        assert_eq!(
            store.certificate(serial).await.unwrap().is_some(),
            stored,
            "{serial}"
        );
    }
}

async fn a_rotation_retires_the_old_key_and_revokes_its_certificates(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    let alpha = registered(store, "alpha").await;
    issued(store, vec![certificate(&alpha, "01", T)]).await;
    let new_evidence = evidence("alpha-2");
    let rotation = KeyRotation {
        new_key_id: "key-alpha-2",
        new_public_key_der: b"spki of alpha 2",
        new_key_wrapped: None,
        new_evidence: &new_evidence,
        reason: "superseded",
        at: T + 60,
        sign_until: T + 120,
        destroy_after: T + 600,
        expected_old_key: Some("key-alpha"),
    };

    let outcome = store
        .rotate_agent_key("alpha", &rotation, &event("key.rotate", "alpha"))
        .await
        .unwrap();

    assert_eq!(
        outcome,
        KeyRotationOutcome::Rotated {
            old_key_id: "key-alpha".into(),
            revoked_serials: vec!["01".into()],
        }
    );
    let current = store.agent("alpha").await.unwrap().unwrap();
    assert_eq!(current.key_id.as_deref(), Some("key-alpha-2"));
    assert_eq!(
        current.attestation_digest,
        Some(new_evidence.digest.clone())
    );
    assert_eq!(
        store.attestation(&new_evidence.digest).await.unwrap(),
        Some(new_evidence.clone())
    );
    let retired = store.retired_key("key-alpha").await.unwrap().unwrap();
    assert_eq!((retired.sign_until, retired.destroyed_at), (T + 120, None));
    let revoked = store.certificate("01").await.unwrap().unwrap();
    assert_eq!(revoked.revocation_reason.as_deref(), Some("superseded"));
    // A second replica acting on the same schedule finds it done.
    let again = store
        .rotate_agent_key("alpha", &rotation, &event("key.rotate", "alpha"))
        .await
        .unwrap();
    assert_eq!(
        again,
        KeyRotationOutcome::Refused {
            status: "rotated meanwhile".into()
        }
    );
    assert_eq!(store.retired_keys_due(T + 600).await.unwrap(), [retired]);
    store
        .mark_key_destroyed("key-alpha", T + 700, &event("key.destroy", "key-alpha"))
        .await
        .unwrap();
    assert!(store.retired_keys_due(T + 700).await.unwrap().is_empty());
}

async fn the_revocation_snapshot_holds_what_no_replica_may_honour(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    let alpha = registered(store, "alpha").await;
    let bravo = registered(store, "bravo").await;
    let charlie = registered(store, "charlie").await;
    registered(store, "delta").await;
    issued(
        store,
        vec![
            certificate(&alpha, "01", T),
            certificate(&alpha, "02", T),
            // Expired by the time of the snapshot.
            certificate(&alpha, "03", T - 2 * DAY),
            certificate(&bravo, "04", T),
            certificate(&charlie, "05", T),
        ],
    )
    .await;
    for serial in ["02", "03"] {
        let revoked = store
            .revoke_certificate(
                serial,
                "superseded",
                T,
                &event("certificate.revoke", serial),
            )
            .await
            .unwrap();
        assert_eq!(
            revoked,
            CertificateRevocation::Revoked {
                serials: vec![serial.into()]
            }
        );
    }
    let suspended = store
        .change_agent_status(
            "bravo",
            AgentTransition::Suspend,
            T + 1,
            &event("agent.suspend", "bravo"),
        )
        .await
        .unwrap();
    assert_eq!(
        suspended,
        AgentStatusChange::Changed {
            serials: vec!["04".into()]
        }
    );
    store
        .change_agent_status(
            "charlie",
            AgentTransition::Revoke {
                reason: KEY_COMPROMISE,
            },
            T + 2,
            &event("agent.revoke", "charlie"),
        )
        .await
        .unwrap();
    let delta_evidence = evidence("delta-2");
    store
        .rotate_agent_key(
            "delta",
            &KeyRotation {
                new_key_id: "key-delta-2",
                new_public_key_der: b"spki of delta 2",
                new_key_wrapped: None,
                new_evidence: &delta_evidence,
                reason: "superseded",
                at: T + 3,
                sign_until: T + 60,
                destroy_after: T + DAY,
                expected_old_key: None,
            },
            &event("key.rotate", "delta"),
        )
        .await
        .unwrap();

    let snapshot = store.revocation_snapshot(T + 10).await.unwrap();

    let revoked = |serial: &str, agent: &str, at: i64, reason: &str| RevokedCertificate {
        serial: serial.into(),
        agent_name: agent.into(),
        revoked_at: at,
        reason: reason.into(),
        not_after: T + DAY,
    };
    assert_eq!(
        snapshot.certificates,
        [
            revoked("02", "alpha", T, "superseded"),
            revoked("04", "bravo", T + 1, "certificateHold"),
            revoked("05", "charlie", T + 2, KEY_COMPROMISE),
        ]
    );
    assert_eq!(
        snapshot.inactive_agents,
        [
            ("bravo".to_owned(), "suspended".to_owned()),
            ("charlie".to_owned(), "revoked".to_owned()),
        ]
    );
    assert_eq!(snapshot.retired_keys, ["key-delta"]);
    assert_eq!(snapshot.compromised_keys, ["key-charlie"]);
    let charlie_key = keyward::store::public_key_sha256(b"spki of charlie");
    assert_eq!(
        store.key_compromised_at(&charlie_key).await.unwrap(),
        Some(T + 2)
    );
}

async fn an_enrollment_token_is_redeemed_once_only(db: Db) {
    let opened = open(db).await;
    let store = Arc::clone(&opened.store);
    let token = [7u8; 32];
    store
        .insert_agent(
            &agent("alpha"),
            None,
            Some(&NewEnrollmentToken {
                token_sha256: token,
                expires_at: T + 60,
            }),
            &event("agent.create", "alpha"),
        )
        .await
        .unwrap();
    assert_eq!(
        store.enrollment_token_agent(&token, T).await.unwrap(),
        Some("alpha".into())
    );
    assert_eq!(
        store.enrollment_token_agent(&token, T + 60).await.unwrap(),
        None
    );

    let redemptions = (0..4).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .redeem_enrollment_token(&token, T, &event("enrollment.redeem", "token"))
                .await
                .unwrap()
        })
    });
    let mut winners = Vec::new();
    for redemption in redemptions.collect::<Vec<_>>() {
        winners.extend(redemption.await.unwrap());
    }

    assert_eq!(winners, ["alpha"]);
    assert_eq!(store.enrollment_token_agent(&token, T).await.unwrap(), None);
}

fn challenge(agent: &str, nonce: &[u8]) -> TpmChallengeRecord {
    TpmChallengeRecord {
        nonce: nonce.to_vec(),
        agent_name: agent.into(),
        secret_sha256: [1; 32],
        ak_public: b"ak public".to_vec(),
        ek_sha256: [2; 32],
        key_location: "tpm".into(),
        created_at: T,
        expires_at: T + 300,
        used_at: None,
    }
}

async fn a_tpm_challenge_is_redeemed_once_and_spends_its_token_with_it(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    let token = [9u8; 32];
    let mut tpm_agent = agent("alpha");
    tpm_agent.custody = "agent-tpm".into();
    (tpm_agent.key_id, tpm_agent.public_key_der) = (None, None);
    store
        .insert_agent(
            &tpm_agent,
            None,
            Some(&NewEnrollmentToken {
                token_sha256: token,
                expires_at: T + 600,
            }),
            &event("agent.create", "alpha"),
        )
        .await
        .unwrap();
    let nonce = b"nonce-1";
    store
        .insert_tpm_challenge(&challenge("alpha", nonce), &event("tpm.challenge", "alpha"))
        .await
        .unwrap();
    assert_eq!(store.open_tpm_challenges("alpha", T).await.unwrap(), 1);
    let stored = store.tpm_challenge(nonce).await.unwrap().unwrap();
    assert_eq!(
        (stored.secret_sha256, stored.ek_sha256, stored.used_at),
        ([1; 32], [2; 32], None)
    );

    // Both or neither: a token that does not pay leaves the challenge open.
    let unpaid = store
        .redeem_tpm_challenge(nonce, &[0; 32], T + 1, &event("tpm.redeem", "alpha"))
        .await
        .unwrap();
    assert_eq!(unpaid, TpmRedemption::TokenInvalid);
    assert_eq!(
        store.tpm_challenge(nonce).await.unwrap().unwrap().used_at,
        None
    );

    let paid = store
        .redeem_tpm_challenge(nonce, &token, T + 2, &event("tpm.redeem", "alpha"))
        .await
        .unwrap();
    assert_eq!(paid, TpmRedemption::Redeemed);
    assert_eq!(
        store.tpm_challenge(nonce).await.unwrap().unwrap().used_at,
        Some(T + 2)
    );
    assert_eq!(
        store.enrollment_token_agent(&token, T + 2).await.unwrap(),
        None
    );
    assert_eq!(store.open_tpm_challenges("alpha", T + 2).await.unwrap(), 0);

    let replayed = store
        .redeem_tpm_challenge(nonce, &token, T + 3, &event("tpm.redeem", "alpha"))
        .await
        .unwrap();
    assert_eq!(replayed, TpmRedemption::ChallengeSpent);
    assert_eq!(
        store.delete_expired_tpm_challenges(T + 301).await.unwrap(),
        1
    );
    assert!(store.tpm_challenge(nonce).await.unwrap().is_none());
}

fn approval(id: &str, agent: &str, required: i64) -> ApprovalRecord {
    ApprovalRecord {
        id: id.into(),
        agent_name: agent.into(),
        kind: "sign".into(),
        request: "{}".into(),
        approvals_required: required,
        policy_version: 1,
        status: "pending".into(),
        result: None,
        created_at: T,
        expires_at: T + 3600,
        decided_at: None,
    }
}

async fn an_approval_is_decided_by_enough_approvals_or_one_denial(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    registered(store, "alpha").await;
    for (id, required) in [("two-needed", 2), ("denied", 2), ("expiring", 1)] {
        store
            .insert_approval(
                &approval(id, "alpha", required),
                &event("approval.hold", id),
            )
            .await
            .unwrap();
    }
    let vote = |id: &'static str, admin: &'static str, approve: bool, now: i64| async move {
        store
            .vote_on_approval(id, admin, approve, None, now, &event("approval.vote", id))
            .await
            .unwrap()
    };
    let pending = store.pending_approvals_page(T, None, 10).await.unwrap();
    assert_eq!(pending.len(), 3);

    assert_eq!(
        vote("two-needed", "ann", true, T).await,
        VoteOutcome::Recorded {
            status: "pending".into(),
            approvals: 1
        }
    );
    assert_eq!(
        vote("two-needed", "ann", true, T).await,
        VoteOutcome::AlreadyVoted
    );
    assert_eq!(
        vote("two-needed", "bob", true, T + 1).await,
        VoteOutcome::Recorded {
            status: "approved".into(),
            approvals: 2
        }
    );
    assert_eq!(
        vote("two-needed", "cat", false, T + 2).await,
        VoteOutcome::NotPending {
            status: "approved".into()
        }
    );
    assert_eq!(
        vote("denied", "ann", false, T).await,
        VoteOutcome::Recorded {
            status: "denied".into(),
            approvals: 0
        }
    );
    assert_eq!(
        vote("expiring", "ann", true, T + 3600).await,
        VoteOutcome::NotPending {
            status: "expired".into()
        }
    );
    assert_eq!(vote("unknown", "ann", true, T).await, VoteOutcome::NotFound);

    let decided = store.approval("two-needed").await.unwrap().unwrap();
    assert_eq!(
        (decided.status.as_str(), decided.decided_at),
        ("approved", Some(T + 1))
    );
    store
        .finish_approval("two-needed", "completed", r#"{"ok":true}"#)
        .await
        .unwrap();
    let finished = store.approval("two-needed").await.unwrap().unwrap();
    assert_eq!(finished.result.as_deref(), Some(r#"{"ok":true}"#));
    assert!(store
        .pending_approvals_page(T, None, 10)
        .await
        .unwrap()
        .is_empty());
    // The recent ones, decided or not, and every vote on them in the
    // order cast (the console's queue).
    let since = store.approval("denied").await.unwrap().unwrap().created_at;
    let recent = store.recent_approvals(since, 10).await.unwrap();
    assert_eq!(recent.len(), 3);
    assert!(store
        .recent_approvals(since + 1, 10)
        .await
        .unwrap()
        .is_empty());
    let votes: Vec<(String, String, bool)> = store
        .recent_approval_votes(since)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, v)| (id, v.admin, v.approve))
        .collect();
    assert_eq!(
        votes,
        [
            ("denied".to_owned(), "ann".to_owned(), false),
            ("two-needed".to_owned(), "ann".to_owned(), true),
            ("two-needed".to_owned(), "bob".to_owned(), true),
        ]
    );
}

/// The certificate serial a delivery's event is about.
fn delivered_subject(event: &str) -> String {
    let event: serde_json::Value = serde_json::from_str(event).unwrap();
    event["subject"].as_str().unwrap().to_owned()
}

async fn the_hook_outbox_hands_each_hook_its_events_in_order(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    let first = store
        .insert_hook("https://hooks.test/1", "secret-1", &event("hook.add", "1"))
        .await
        .unwrap();
    let second = store
        .insert_hook("https://hooks.test/2", "secret-2", &event("hook.add", "2"))
        .await
        .unwrap();
    let again = store
        .insert_hook("https://hooks.test/1", "other", &event("hook.add", "1"))
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict("hook"))),
        "{again:?}"
    );
    let alpha = registered(store, "alpha").await;
    issued(
        store,
        vec![certificate(&alpha, "01", T), certificate(&alpha, "02", T)],
    )
    .await;
    for (serial, at) in [("01", T), ("02", T + 1)] {
        store
            .revoke_certificate(
                serial,
                "superseded",
                at,
                &event("certificate.revoke", serial),
            )
            .await
            .unwrap();
    }
    assert_eq!(store.pending_hook_deliveries().await.unwrap(), 4);
    let leased = |now: i64| async move {
        let mut leased = store.lease_hook_deliveries(now, 30).await.unwrap();
        leased.sort_by_key(|d| d.hook_id);
        leased
            .into_iter()
            .map(|d| (d.id, d.hook_id, delivered_subject(&d.event), d.attempts))
            .collect::<Vec<_>>()
    };

    // One event per hook, the oldest; none while leased.
    let first_round = leased(T + 1).await;
    assert_eq!(
        first_round
            .iter()
            .map(|(_, hook, serial, _)| (*hook, serial.as_str()))
            .collect::<Vec<_>>(),
        [(first.id, "01"), (second.id, "01")]
    );
    assert!(leased(T + 2).await.is_empty());

    // The second hook's first event is delivered, the first hook's fails
    // until T + 100: the first hook's later event does not overtake it.
    let (failing, _, _, _) = first_round[0];
    let (delivered, _, _, _) = first_round[1];
    store.hook_delivered(delivered, T + 2).await.unwrap();
    store
        .hook_failed(failing, T + 100, "timeout")
        .await
        .unwrap();
    let second_round = leased(T + 50).await;
    assert_eq!(
        second_round
            .iter()
            .map(|(_, hook, serial, _)| (*hook, serial.as_str()))
            .collect::<Vec<_>>(),
        [(second.id, "02")]
    );
    store
        .hook_delivered(second_round[0].0, T + 50)
        .await
        .unwrap();
    assert_eq!(
        leased(T + 100).await,
        [(failing, first.id, "01".to_owned(), 1)]
    );
    store.hook_delivered(failing, T + 100).await.unwrap();
    assert_eq!(store.pending_hook_deliveries().await.unwrap(), 1);

    assert!(store
        .deactivate_hook(first.id, &event("hook.remove", "1"))
        .await
        .unwrap());
    assert!(leased(T + 200).await.is_empty());
    assert_eq!(store.hooks().await.unwrap(), std::slice::from_ref(&second));
    assert_eq!(store.hooks_page(None, 10).await.unwrap(), [second]);
}

async fn the_audit_log_numbers_entries_unbroken_through_single_and_batch_appends(db: Db) {
    let opened = open(db).await;
    let store = &opened.store;
    let alpha = registered(store.as_ref(), "alpha").await;
    store
        .append_audit_event(&event("hook.failing", "1"))
        .await
        .unwrap();
    issued(
        store.as_ref(),
        vec![certificate(&alpha, "01", T), certificate(&alpha, "02", T)],
    )
    .await;
    let signature = |n: usize| SignatureRecord {
        request_id: format!("request-{n}"),
        agent_name: "alpha".into(),
        key_id: "key-alpha".into(),
        digest: format!("{n:064x}"),
        purpose: "sign".into(),
        message: None,
        policy_version: 0,
        signed_at_ms: T * 1000 + n as i64,
    };
    store
        .insert_signatures(&[signature(1), signature(2)])
        .await
        .unwrap();
    // The group-commit writers: on SQLite, their own rusqlite connections.
    let certificates = CertificateLog::start(Arc::clone(store), &opened.database.url).unwrap();
    let outcome = certificates
        .record(certificate(&alpha, "03", T))
        .await
        .unwrap();
    assert_eq!(outcome, CertificateInsert::Inserted);
    let signatures = SignatureLog::start(&opened.database.url).await.unwrap();
    signatures
        .record(signature(3), Instant::now())
        .await
        .unwrap();
    store
        .append_audit_event(&event("hook.failing", "2"))
        .await
        .unwrap();

    let records = store.audit_records(0, 100).await.unwrap();

    assert_eq!(verify_sequence(&records), Ok(()));
    let actions: Vec<&str> = records.iter().map(|r| r.event.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "agent.create",
            "hook.failing",
            "certificate.issue",
            "certificate.issue",
            "signature.batch",
            "certificate.issue",
            "signature.batch",
            "hook.failing",
        ]
    );
    assert!(store
        .signature_made("key-alpha", &format!("{:064x}", 3), Some("sign"), {
            let at = T * 1000 + 3;
            at..at + 1
        })
        .await
        .unwrap());
    // A page starts at the index given.
    let tail = store.audit_records(6, 100).await.unwrap();
    assert_eq!(tail, records[6..]);
    // Sealing's reads (on SQLite, through the store's own connection)
    // give the stored bytes, and their leaf hashes, for exactly the range
    // asked.
    let entries = store.audit_entries(2..7).await.unwrap();
    let stored: Vec<(u64, Vec<u8>)> = records[2..7]
        .iter()
        .map(|r| (r.index, r.entry.clone().into_bytes()))
        .collect();
    assert_eq!(entries, stored);
    let leaves = store.audit_leaf_hashes(2..7).await.unwrap();
    let hashed: Vec<(u64, [u8; 32])> = stored
        .iter()
        .map(|(index, entry)| (*index, keyward::audit::merkle::leaf_hash(entry)))
        .collect();
    assert_eq!(leaves, hashed);
    assert!(store.audit_leaf_hashes(8..20).await.unwrap().is_empty());
}

async fn policies_take_consecutive_versions_and_page_oldest_first(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    assert_eq!(store.latest_policy_version().await.unwrap(), 0);
    for content in ["first", "second", "third"] {
        store
            .insert_policy(content, "ann", "api", &event("policy.apply", "policy"))
            .await
            .unwrap();
    }

    assert_eq!(store.latest_policy_version().await.unwrap(), 3);
    let second = store.policy(2).await.unwrap().unwrap();
    assert_eq!(
        (second.content.as_str(), second.content_sha256.len()),
        ("second", 64)
    );
    let pages = [
        store.policies_page(None, 2).await.unwrap(),
        store.policies_page(Some(2), 2).await.unwrap(),
    ];
    let versions: Vec<Vec<i64>> = pages
        .iter()
        .map(|page| page.iter().map(|p| p.version).collect())
        .collect();
    assert_eq!(versions, [vec![1, 2], vec![3]]);
    let audited = store.audit_records(0, 10).await.unwrap();
    assert_eq!(audited[2].event.details["version"], 3);
}

/// A write that reads before it writes (a policy's next version) is not
/// refused because another writer committed in between: on SQLite it holds
/// the write lock from its first statement, so it waits its turn instead of
/// failing with "database is locked" (seen as a 500 on `POST /v1/policies`
/// while the hook deliverer wrote).
async fn a_write_that_reads_first_waits_for_other_writers_instead_of_failing(db: Db) {
    let opened = open(db).await;
    let other = opened.store.clone();
    let writer = tokio::spawn(async move {
        for i in 0..300 {
            other
                .append_audit_event(&event("test.write", &i.to_string()))
                .await
                .unwrap();
        }
    });
    for i in 0..300 {
        opened
            .store
            .insert_policy(
                &format!("# {i}"),
                "ann",
                "api",
                &event("policy.apply", "policy"),
            )
            .await
            .unwrap_or_else(|e| panic!("policy {i}: {e}"));
    }
    writer.await.unwrap();
    assert_eq!(opened.store.latest_policy_version().await.unwrap(), 300);
}

/// Two replicas applying policies at the same time each get the next
/// version: neither computes one the other already took (on PostgreSQL
/// both read the same latest version unless the version is locked).
async fn concurrent_applies_take_consecutive_versions_without_a_conflict(db: Db) {
    let opened = open(db).await;
    let replicas = [opened.store.clone(), opened.store.clone()];
    let applying = replicas.map(|store| {
        tokio::spawn(async move {
            for i in 0..100 {
                store
                    .insert_policy(
                        &format!("# {i}"),
                        "ann",
                        "api",
                        &event("policy.apply", "policy"),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("policy {i}: {e}"));
            }
        })
    });
    for task in applying {
        task.await.unwrap();
    }
    assert_eq!(opened.store.latest_policy_version().await.unwrap(), 200);
}

fn ca(key_id: &str) -> CaRecord {
    CaRecord {
        key_id: key_id.into(),
        cert_der: key_id.as_bytes().to_vec(),
        chain_pem: format!("chain of {key_id}"),
        created_at: T,
    }
}

async fn one_issuing_ca_is_active_and_a_replaced_one_stays_previous(db: Db) {
    let opened = open(db).await;
    let store = opened.store.as_ref();
    assert_eq!(store.active_ca().await.unwrap(), None);
    store
        .install_ca(&ca("ca-1"), false, &event("ca.install", "ca-1"))
        .await
        .unwrap();
    let racing = store
        .install_ca(&ca("ca-2"), false, &event("ca.install", "ca-2"))
        .await;
    assert!(
        matches!(racing, Err(StoreError::Conflict("active CA"))),
        "{racing:?}"
    );
    let since = time::OffsetDateTime::now_utc().unix_timestamp();
    store
        .install_ca(&ca("ca-2"), true, &event("ca.rotate", "ca-2"))
        .await
        .unwrap();

    assert_eq!(store.active_ca().await.unwrap(), Some(ca("ca-2")));
    assert_eq!(store.previous_cas(since).await.unwrap(), [ca("ca-1")]);
    let numbers = [
        store.next_crl_number().await.unwrap(),
        store.next_crl_number().await.unwrap(),
    ];
    assert_eq!(numbers, [1, 2]);
    store
        .insert_admin_token(&[3; 32], "ann", &event("admin.token", "ann"))
        .await
        .unwrap();
    assert_eq!(
        store.admin_tokens().await.unwrap(),
        [([3; 32], "ann".to_owned())]
    );
}

/// A console session is found while it is used within the idle timeout
/// and younger than the absolute one; signing out ends it for good; a new
/// sign-in forgets the expired ones; each change has its audit entry.
async fn a_console_session_lives_until_idle_absolute_or_signed_out(db: Db) {
    let opened = open(db).await;
    let store = &*opened.store;
    let ms = |s: i64| s * 1000;
    let session = |id: &str, at: i64| ConsoleSessionRecord {
        id_sha256: id.into(),
        admin: "alice".into(),
        credential: "token:0a1b2c3d".into(),
        created_ms: ms(at),
        last_seen_ms: ms(at),
    };
    let idle = 15 * 60;
    let absolute = 8 * 3600;
    // Touching at `now` finds a session used since `now - idle` and made
    // since `now - absolute`.
    let touch = |id: &'static str, now: i64| async move {
        store
            .touch_console_session(id, ms(now), ms(now - idle), ms(now - absolute))
            .await
            .unwrap()
    };
    store
        .create_console_session(&session("a", T), 0, 0, &event("console.login", "alice"))
        .await
        .unwrap();
    // A background read finds it without moving its last use.
    let read = store
        .console_session("a", ms(T + 60 - idle), ms(T + 60 - absolute))
        .await
        .unwrap()
        .expect("in use");
    assert_eq!(read.last_seen_ms, ms(T));
    assert!(
        store
            .console_session("a", ms(T + idle + 1 - idle), 0)
            .await
            .unwrap()
            .is_none(),
        "reads alone do not keep it alive"
    );
    let found = touch("a", T + 60).await.expect("in use");
    assert_eq!(
        (found.admin.as_str(), found.credential.as_str()),
        ("alice", "token:0a1b2c3d")
    );
    assert_eq!(
        found.last_seen_ms,
        ms(T + 60),
        "a use moves the idle deadline"
    );
    // Used every ten minutes, it lasts until eight hours after sign-in.
    let mut at = T + 60;
    while at + 600 < T + absolute {
        at += 600;
        assert!(touch("a", at).await.is_some(), "at +{}s", at - T);
    }
    assert!(
        touch("a", T + absolute + 1).await.is_none(),
        "past eight hours"
    );
    // Idle for more than fifteen minutes, it is over.
    store
        .create_console_session(&session("b", T), 0, 0, &event("console.login", "alice"))
        .await
        .unwrap();
    assert!(touch("b", T + idle + 1).await.is_none());
    assert!(touch("b", T + idle + 600).await.is_none(), "and stays over");
    // Signed out, it is gone; signing out twice writes nothing.
    store
        .create_console_session(&session("c", T), 0, 0, &event("console.login", "alice"))
        .await
        .unwrap();
    let logout = event("console.logout", "alice");
    assert!(store.end_console_session("c", &logout).await.unwrap());
    assert!(!store.end_console_session("c", &logout).await.unwrap());
    assert!(touch("c", T + 1).await.is_none());
    assert!(!store.end_console_session("nobody", &logout).await.unwrap());
    let actions: Vec<String> = store
        .audit_records(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event.action)
        .collect();
    assert_eq!(
        actions,
        [
            "console.login",
            "console.login",
            "console.login",
            "console.logout"
        ]
    );
    // A sign-in prunes what has expired, and keeps the rest.
    store
        .create_console_session(
            &session("d", T + absolute),
            ms(T + 10),
            ms(T + 10),
            &event("console.login", "alice"),
        )
        .await
        .unwrap();
    let rows = opened
        .store
        .touch_console_session("a", ms(T + absolute), 0, 0)
        .await
        .unwrap();
    assert!(rows.is_none(), "the expired session was pruned");
    assert!(touch("d", T + absolute + 5).await.is_some());
}

on_both_databases!(
    an_agent_is_read_back_as_registered_and_registered_once,
    an_agents_certificates_page_newest_first_then_by_serial,
    a_certificate_is_recorded_only_for_an_active_agent_and_an_unbarred_key,
    a_rotation_retires_the_old_key_and_revokes_its_certificates,
    the_revocation_snapshot_holds_what_no_replica_may_honour,
    an_enrollment_token_is_redeemed_once_only,
    a_tpm_challenge_is_redeemed_once_and_spends_its_token_with_it,
    an_approval_is_decided_by_enough_approvals_or_one_denial,
    the_hook_outbox_hands_each_hook_its_events_in_order,
    the_audit_log_numbers_entries_unbroken_through_single_and_batch_appends,
    policies_take_consecutive_versions_and_page_oldest_first,
    one_issuing_ca_is_active_and_a_replaced_one_stays_previous,
    a_write_that_reads_first_waits_for_other_writers_instead_of_failing,
    concurrent_applies_take_consecutive_versions_without_a_conflict,
    a_console_session_lives_until_idle_absolute_or_signed_out,
);
