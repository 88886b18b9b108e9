//! Custodial keys kept wrapped (`custodial_storage = "wrapped"`) on a real
//! SoftHSM2 token: generated on the token, out of it only as a blob under
//! the token's trusted wrapping key, unwrapped into session objects to sign.
//! The token is also inspected through a second, independent PKCS#11
//! context in the same process, as any code holding the PIN could.
//!
//! SoftHSM2 reads SOFTHSM2_CONF once per process, so each test needs a
//! process of its own: the suite runs under cargo nextest (scripts/test.sh).

mod common;

use std::process::Command;
use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use keyward::keys::pkcs11::{load_module, Pkcs11Backend, Pkcs11Config, WRAPPING_KEY_LABEL};
use keyward::keys::{KeyBackend, KeyError, KeyId, KeyRef, KeySession, KeyStorage};
use keyward::pool::{BreakerState, KeyPool, PoolConfig, PoolError};
use keyward::telemetry::PoolMetrics;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::VerifyingKey;
use p256::PublicKey;

fn token() -> (tempfile::TempDir, Pkcs11Config) {
    let dir = tempfile::tempdir().unwrap();
    let config = keyward::app::embedded::prepare(dir.path()).unwrap();
    (dir, config)
}

/// A second PKCS#11 context on the same module, logged in through the
/// backend's sessions (a login belongs to the whole application).
fn inspector(config: &Pkcs11Config) -> Session {
    let ctx = load_module(&config.module).unwrap();
    let slot = ctx.get_slots_with_initialized_token().unwrap()[0];
    ctx.open_rw_session(slot).unwrap()
}

fn private_keys_with_id(session: &Session, id: &KeyId) -> Vec<ObjectHandle> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.as_str().as_bytes().to_vec()),
        ])
        .unwrap()
}

fn wrapped(id: &KeyId, blob: &[u8], public_key: PublicKey) -> KeyRef {
    KeyRef::Wrapped {
        id: id.clone(),
        blob: Arc::from(blob),
        public_key,
    }
}

fn verifies(public_key: &PublicKey, digest: &[u8; 32], signature: &p256::ecdsa::Signature) -> bool {
    VerifyingKey::from(public_key)
        .verify_prehash(digest, signature)
        .is_ok()
}

#[test]
fn a_wrapped_key_is_generated_on_the_token_and_signs_in_any_later_session() {
    let (_dir, config) = token();
    let backend = Pkcs11Backend::open(&config).unwrap();
    let id = KeyId::parse("agent-one").unwrap();
    let mut first = backend.open_pkcs11_session().unwrap();
    let generated = first.generate_custodial(&id, KeyStorage::Wrapped).unwrap();
    generated
        .attributes
        .check_custody(KeyStorage::Wrapped)
        .unwrap();
    assert!(generated.attributes.local && generated.attributes.always_sensitive);
    assert!(generated.attributes.extractable && generated.attributes.wrap_with_trusted);
    let blob = generated
        .wrapped
        .expect("a wrapped key comes with its blob");
    assert!(blob.len() >= 32);

    let digest = [7u8; 32];
    let mut second = backend.open_pkcs11_session().unwrap();
    let signature = second
        .sign_wrapped(&id, &blob, &generated.public_key, &digest)
        .unwrap();
    assert!(verifies(&generated.public_key, &digest, &signature));

    // Closing a session destroys its copies; the blob still unwraps, in a
    // session opened after the key's own session is gone.
    drop(first);
    drop(second);
    let mut later = backend.open_pkcs11_session().unwrap();
    let signature = later
        .sign_wrapped(&id, &blob, &generated.public_key, &digest)
        .unwrap();
    assert!(verifies(&generated.public_key, &digest, &signature));
}

#[test]
fn a_wrapped_key_leaves_the_token_only_under_the_trusted_wrapping_key() {
    let (_dir, config) = token();
    let backend = Pkcs11Backend::open(&config).unwrap();
    let id = KeyId::parse("agent-two").unwrap();
    let mut session = backend.open_pkcs11_session().unwrap();
    let generated = session
        .generate_custodial(&id, KeyStorage::Wrapped)
        .unwrap();
    let blob = generated.wrapped.unwrap();

    let thief = inspector(&config);
    let [key] = private_keys_with_id(&thief, &id)[..] else {
        panic!("the generated key is live in one session");
    };
    // Its value cannot be read...
    assert!(
        matches!(
            thief.get_attributes(key, &[AttributeType::Value]),
            Ok(ref v) if v.is_empty()
        ) || thief.get_attributes(key, &[AttributeType::Value]).is_err()
    );
    // ...nor wrapped under a key whose value the thief knows.
    let known = thief
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Value(vec![0x42; 32]),
            Attribute::Wrap(true),
        ])
        .unwrap();
    assert!(matches!(
        thief.wrap_key(&Mechanism::AesKeyWrapPad, known, key),
        Err(CkError::Pkcs11(RvError::KeyNotWrappable, _))
    ));
    // The wrapping key itself never leaves the token.
    let [wrapping] = thief
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(WRAPPING_KEY_LABEL.as_bytes().to_vec()),
        ])
        .unwrap()[..]
    else {
        panic!("one wrapping key");
    };
    let attributes = thief
        .get_attributes(
            wrapping,
            &[
                AttributeType::Trusted,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
            ],
        )
        .unwrap();
    assert_eq!(
        attributes,
        [
            Attribute::Trusted(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
        ]
    );
    assert!(thief
        .wrap_key(&Mechanism::AesKeyWrapPad, known, wrapping)
        .is_err());

    // A copy unwrapped to sign cannot be wrapped again at all: the stored
    // blob is the key's only form outside the token.
    drop(session);
    let mut signer = backend.open_pkcs11_session().unwrap();
    signer
        .sign_wrapped(&id, &blob, &generated.public_key, &[1; 32])
        .unwrap();
    let [copy] = private_keys_with_id(&thief, &id)[..] else {
        panic!("one live copy");
    };
    assert!(matches!(
        thief.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, copy),
        Err(CkError::Pkcs11(RvError::KeyUnextractable, _))
    ));
}

/// Ends the pool's workers before the test's process exits: a worker still
/// inside SoftHSM2 during the library's own teardown crashes the process
/// (seen once as a SIGSEGV after a passing test).
fn stop(pool: KeyPool) {
    pool.join_workers(std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_foreign_blob_is_refused_and_is_no_outage() {
    let (_dir, config) = token();
    let backend: Arc<dyn KeyBackend> = Arc::new(Pkcs11Backend::open(&config).unwrap());
    let pool = KeyPool::start(
        backend.clone(),
        &PoolConfig::default(),
        PoolMetrics::unregistered(),
    )
    .unwrap();
    let alice = KeyId::parse("agent-alice").unwrap();
    let mallory = KeyId::parse("agent-mallory").unwrap();
    let alice_key = pool
        .generate_custodial(&alice, KeyStorage::Wrapped)
        .await
        .unwrap();
    let mallory_key = pool
        .generate_custodial(&mallory, KeyStorage::Wrapped)
        .await
        .unwrap();
    let alice_blob = alice_key.wrapped.clone().unwrap();
    let mallory_blob = mallory_key.wrapped.clone().unwrap();

    let mut damaged = alice_blob.clone();
    damaged[9] ^= 0x01;
    // A blob stored under the other agent's key id, with that agent's
    // public key, as a database edit would make it: it must never sign for
    // that agent (its signature would be read as the other agent's).
    let mut bad_refs = vec![
        wrapped(
            &KeyId::parse("agent-fresh").unwrap(),
            &damaged,
            alice_key.public_key,
        ),
        wrapped(
            &KeyId::parse("agent-swapped").unwrap(),
            &mallory_blob,
            alice_key.public_key,
        ),
        wrapped(
            &KeyId::parse("agent-short").unwrap(),
            &[0u8; 7],
            alice_key.public_key,
        ),
    ];
    for key in bad_refs.drain(..) {
        let id = key.id().clone();
        for _ in 0..4 {
            let answer = pool.start_sign(key.clone(), [3; 32]).unwrap().wait().await;
            assert!(
                matches!(answer, Err(PoolError::Key(KeyError::WrappedKeyInvalid(ref k))) if *k == id),
                "{id}: {answer:?}"
            );
        }
    }
    assert_eq!(pool.breaker_state(), BreakerState::Closed);
    assert_eq!(
        backend.generation(),
        0,
        "the module was never re-initialized"
    );

    // The genuine blobs still sign, each for its own key.
    for (id, blob, public_key) in [
        (&alice, &alice_blob, alice_key.public_key),
        (&mallory, &mallory_blob, mallory_key.public_key),
    ] {
        let signature = pool
            .start_sign(wrapped(id, blob, public_key), [4; 32])
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert!(verifies(&public_key, &[4; 32], &signature));
    }
    stop(pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_wrapped_key_keeps_no_live_copy_in_any_session() {
    let (_dir, config) = token();
    let backend: Arc<dyn KeyBackend> = Arc::new(Pkcs11Backend::open(&config).unwrap());
    let pool = KeyPool::start(
        backend,
        &PoolConfig {
            workers: 2,
            ..PoolConfig::default()
        },
        PoolMetrics::unregistered(),
    )
    .unwrap();
    let inspector = inspector(&config);
    let gone = KeyId::parse("agent-gone").unwrap();
    let other = KeyId::parse("agent-other").unwrap();
    let gone_key = pool
        .generate_custodial(&gone, KeyStorage::Wrapped)
        .await
        .unwrap();
    let other_key = pool
        .generate_custodial(&other, KeyStorage::Wrapped)
        .await
        .unwrap();
    let gone_ref = wrapped(
        &gone,
        gone_key.wrapped.as_ref().unwrap(),
        gone_key.public_key,
    );
    let other_ref = wrapped(
        &other,
        other_key.wrapped.as_ref().unwrap(),
        other_key.public_key,
    );
    // Concurrent signatures, so that both workers hold a copy.
    let signing: Vec<_> = (0..400)
        .map(|_| pool.start_sign(gone_ref.clone(), [5; 32]).unwrap())
        .collect();
    for pending in signing {
        pending.wait().await.unwrap();
    }
    assert!(!private_keys_with_id(&inspector, &gone).is_empty());

    pool.destroy_custodial(&gone_ref).await.unwrap();
    // Each worker lets go of its copy before its next wrapped-key job.
    let signing: Vec<_> = (0..400)
        .map(|_| pool.start_sign(other_ref.clone(), [6; 32]).unwrap())
        .collect();
    for pending in signing {
        pending.wait().await.unwrap();
    }
    assert_eq!(
        private_keys_with_id(&inspector, &gone),
        [],
        "a session still holds the destroyed key"
    );
    stop(pool);
}

/// A wrapped key has a home worker: at a load its home keeps up with, it
/// is unwrapped in one session, not in every worker's (an unwrap costs
/// SoftHSM2 about twelve signatures), and the copy generation left live is
/// the one that signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_key_lives_in_one_session_at_moderate_load() {
    let (_dir, config) = token();
    let backend: Arc<dyn KeyBackend> = Arc::new(Pkcs11Backend::open(&config).unwrap());
    let pool = KeyPool::start(
        backend,
        &PoolConfig {
            workers: 2,
            ..PoolConfig::default()
        },
        PoolMetrics::unregistered(),
    )
    .unwrap();
    let inspector = inspector(&config);
    for i in 0..20 {
        let id = KeyId::parse(&format!("agent-home-{i}")).unwrap();
        let generated = pool
            .generate_custodial(&id, KeyStorage::Wrapped)
            .await
            .unwrap();
        let key = wrapped(
            &id,
            generated.wrapped.as_ref().unwrap(),
            generated.public_key,
        );
        for round in 0..10u8 {
            let signature = pool
                .start_sign(key.clone(), [round; 32])
                .unwrap()
                .wait()
                .await
                .unwrap();
            assert!(verifies(&generated.public_key, &[round; 32], &signature));
        }
        assert_eq!(private_keys_with_id(&inspector, &id).len(), 1, "{id}");
    }
    stop(pool);
}

#[test]
fn live_copies_are_bounded_and_evicted_keys_unwrap_again() {
    let (_dir, config) = token();
    let backend = Pkcs11Backend::open(&config)
        .unwrap()
        .with_live_wrapped_capacity(3);
    let mut session = backend.open_pkcs11_session().unwrap();
    let keys: Vec<_> = (0..10)
        .map(|i| {
            let id = KeyId::parse(&format!("agent-{i}")).unwrap();
            let generated = session
                .generate_custodial(&id, KeyStorage::Wrapped)
                .unwrap();
            (id, generated)
        })
        .collect();
    let inspector = inspector(&config);
    for round in 0..3u8 {
        for (id, generated) in &keys {
            let digest = [round; 32];
            let signature = session
                .sign_wrapped(
                    id,
                    generated.wrapped.as_ref().unwrap(),
                    &generated.public_key,
                    &digest,
                )
                .unwrap();
            assert!(verifies(&generated.public_key, &digest, &signature));
        }
        let live: usize = keys
            .iter()
            .map(|(id, _)| private_keys_with_id(&inspector, id).len())
            .sum();
        assert!(live <= 3, "{live} live copies with room for 3");
    }
}

/// An operator's PKCS#11 token (here a SoftHSM2 token the operator made
/// with softhsm2-util) keeps keys wrapped only once its security officer
/// made the wrapping key: before that keyward refuses to start and says
/// how; after it, keyward starts and the token holds the key.
#[test]
fn an_operator_token_keeps_keys_wrapped_once_its_security_officer_made_the_wrapping_key() {
    let dir = common::private_tempdir();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\n", tokens.display()),
    )
    .unwrap();
    let (ok, out) = common::run(
        Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", "operator"])
            .args(["--so-pin", "5150-so", "--pin", "2112-user"])
            .env("SOFTHSM2_CONF", &conf),
    );
    assert!(ok, "{out}");
    let pin_file = dir.path().join("user.pin");
    std::fs::write(&pin_file, "2112-user").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let module = keyward::app::embedded::find_softhsm_module().unwrap();
    let config = dir.path().join("keyward.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[keys]\nbackend = \"pkcs11\"\nmodule = \"{}\"\n\
             token_label = \"operator\"\nuser_pin_file = \"{}\"\ncustodial_storage = \"wrapped\"\n",
            dir.path().join("data").display(),
            module.display(),
            pin_file.display()
        ),
    )
    .unwrap();
    let keyward = |args: &[&str]| {
        common::run(
            Command::new(common::keyward_bin())
                .args(args)
                .arg("--config")
                .arg(&config)
                .env("SOFTHSM2_CONF", &conf)
                .env("KEYWARD_TEST_SO_PIN", "5150-so"),
        )
    };

    let (ok, out) = keyward(&["init"]);
    assert!(!ok, "started without a wrapping key: {out}");
    assert!(out.contains("keyward keys create-wrapping-key"), "{out}");
    assert!(
        !out.contains("2112-user"),
        "the PIN is never printed: {out}"
    );

    let (ok, out) = keyward(&["keys", "create-wrapping-key", "--so-pin-env", "WRONG_VAR"]);
    assert!(!ok && out.contains("WRONG_VAR"), "{out}");
    let (ok, out) = keyward(&[
        "keys",
        "create-wrapping-key",
        "--so-pin-env",
        "KEYWARD_TEST_SO_PIN",
    ]);
    assert!(ok && out.contains("keyward-wrapping-key created"), "{out}");
    let (ok, out) = keyward(&[
        "keys",
        "create-wrapping-key",
        "--so-pin-env",
        "KEYWARD_TEST_SO_PIN",
    ]);
    assert!(ok && out.contains("already on the token"), "{out}");

    let (ok, out) = keyward(&["init"]);
    assert!(ok, "{out}");
}
