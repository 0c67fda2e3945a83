//! The content store: verified ingests, concurrent ingests of one digest, what a crash
//! leaves in `ingest/`, blob mapping, and blobs as garbage-collection resources
//! (leases, mappings, `gc.ref.content` labels, a blob's own references).

use std::io::Write;
use std::sync::Barrier;

use wasnap::content::{ContentStore, Expected};
use wasnap::digest::Digest;

use super::*;

const REF_CONTENT: &str = "containerd.io/gc.ref.content.l.0";

fn blob_files(env: &Env) -> BTreeSet<String> {
    std::fs::read_dir(env.dir.path().join("content/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn ingest_files(env: &Env) -> usize {
    std::fs::read_dir(env.dir.path().join("content/ingest")).unwrap().count()
}

fn ingest(content: &ContentStore, c: &Ctx, bytes: &[u8]) -> Digest {
    content.ingest(c, &mut &bytes[..], None, &none()).unwrap().digest
}

#[test]
fn an_ingest_under_a_missing_lease_fails_and_leaves_no_blob() {
    let env = Env::native(GcOptions::default());
    let content = env.host.content();
    let missing = ctx("default").with_lease(Some("nope".into()));
    let err = content.ingest(&missing, &mut &b"orphan?"[..], None, &none()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(blob_files(&env).is_empty(), "{:?}", blob_files(&env));
    assert_eq!(ingest_files(&env), 0);
}

#[test]
fn an_ingest_is_verified_before_it_is_visible() {
    let env = Env::native(GcOptions::default());
    let content = env.host.content();
    let c = ctx("default");
    let good = Digest::of(b"hello");
    let info = content
        .ingest(&c, &mut &b"hello"[..], Some(Expected { digest: good, size: Some(5) }), &none())
        .unwrap();
    assert_eq!((info.digest, info.size), (good, 5));
    assert_eq!(blob_files(&env), set([good.hex()]));

    // A wrong digest or size: refused, nothing visible, nothing left in ingest/.
    for (bytes, exp) in [
        (&b"hellO"[..], Expected { digest: Digest::of(b"other"), size: None }),
        (&b"hello!"[..], Expected { digest: Digest::of(b"hello!"), size: Some(5) }),
    ] {
        let err = content.ingest(&c, &mut &bytes[..], Some(exp), &none()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    }
    assert_eq!(blob_files(&env), set([good.hex()]));
    assert_eq!(ingest_files(&env), 0);
    assert_eq!(content.info(&c, &Digest::of(b"hellO")).unwrap_err().kind(), ErrorKind::NotFound);

    // Another namespace does not see it until it records it too.
    let other = ctx("other");
    assert_eq!(content.info(&other, &good).unwrap_err().kind(), ErrorKind::NotFound);
    let mut out = Vec::new();
    std::io::copy(&mut content.read(&c, &good).unwrap().1, &mut out).unwrap();
    assert_eq!(out, b"hello");

    // A writer dropped unfinished leaves nothing.
    let mut w = content.writer().unwrap();
    w.write_all(b"half").unwrap();
    drop(w);
    assert_eq!(ingest_files(&env), 0);
}

#[test]
fn concurrent_ingests_of_one_digest_all_succeed_and_leave_one_blob() {
    let env = Env::native(GcOptions::default());
    let content = env.host.content();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let want = Digest::of(&data);
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (data, barrier) = (&data, &barrier);
            s.spawn(move || {
                let c = ctx(if t % 2 == 0 { "a" } else { "b" });
                barrier.wait();
                let exp = Expected { digest: want, size: Some(data.len() as u64) };
                content.ingest(&c, &mut &data[..], Some(exp), &none()).unwrap()
            });
        }
    });
    assert_eq!(blob_files(&env), set([want.hex()]));
    assert_eq!(ingest_files(&env), 0);
    for ns in ["a", "b"] {
        assert_eq!(content.info(&ctx(ns), &want).unwrap().size, data.len() as u64);
    }
}

/// An ingest of a blob the namespace already holds puts the verified bytes in place (a
/// damaged file of the same size is replaced) and sets the labels it gives, which then
/// hold the blob as they say.
#[test]
fn an_ingest_again_repairs_the_file_and_sets_its_labels() {
    let env = Env::native(GcOptions::default());
    let content = env.host.content();
    let leased = env.lease("default", "l1", &[]);
    let d = ingest(content, &leased, b"hello");
    let file = env.dir.path().join("content/blobs/sha256").join(d.hex());
    // Damaged in place (blobs are read-only: made writable first, for a test not root).
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&file, b"jello").unwrap();

    let info = content.ingest(&ctx("default"), &mut &b"hello"[..], None, &labels(&[(ROOT, "1")]));
    assert_eq!(info.unwrap().labels.get(ROOT).map(String::as_str), Some("1"));
    assert_eq!(std::fs::read(&file).unwrap(), b"hello", "the damaged file is replaced");
    // The lease it was ingested under goes; the gc.root label given since holds it.
    env.drop_lease("default", "l1");
    let r = env.collect();
    assert!(r.removed_content.is_empty() && r.deleted_blobs.is_empty(), "{r:?}");
    assert_eq!(blob_files(&env), set([d.hex()]));
}

/// A blob whose record cannot be written goes at once, unless another namespace records
/// it; nothing waits for a restart's full scan of the blob directory.
#[test]
fn a_blob_whose_record_fails_is_removed_unless_recorded() {
    let env = Env::native(GcOptions::default());
    let content = env.host.content();
    env.collect(); // the one full scan of this process is done
    env.faults.arm("content.publish.record", Action::Error);
    let err = content.ingest(&ctx("a"), &mut &b"lost"[..], None, &none()).unwrap_err();
    assert!(err.to_string().contains("injected fault"), "{err}");
    assert!(blob_files(&env).is_empty(), "{:?}", blob_files(&env));
    assert_eq!(ingest_files(&env), 0);

    // Held by a, the file stays when b's record fails.
    env.faults.disarm("content.publish.record");
    let d = ingest(content, &ctx("a"), b"kept");
    env.faults.arm("content.publish.record", Action::Error);
    assert!(content.ingest(&ctx("b"), &mut &b"kept"[..], None, &none()).is_err());
    env.faults.disarm("content.publish.record");
    assert_eq!(blob_files(&env), set([d.hex()]));
    let mut out = Vec::new();
    std::io::copy(&mut content.read(&ctx("a"), &d).unwrap().1, &mut out).unwrap();
    assert_eq!(out, b"kept");
    assert_eq!(content.info(&ctx("b"), &d).unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn what_a_crash_leaves_is_removed_at_open_and_by_a_collection() {
    let env = Env::native(GcOptions::default());
    // An interrupted ingest, and a blob file whose record was never written.
    let stray = Digest::of(b"no record");
    std::fs::write(env.dir.path().join("content/ingest/123-interrupted"), b"partial").unwrap();
    std::fs::write(env.dir.path().join("content/blobs/sha256").join(stray.hex()), b"no record")
        .unwrap();
    let root = env.dir.path().to_owned();
    let Env { dir, host, .. } = env;
    host.close().unwrap();
    drop(host);
    let config = config(&["native"], GcOptions::default());
    let host = Host::open_config(&root, Arc::new(Faults::new()), config).unwrap();
    let env = Env { dir, faults: Arc::new(Faults::new()), host };
    assert_eq!(ingest_files(&env), 0, "interrupted ingests are removed at open");
    let r = env.collect();
    assert_eq!(r.deleted_blobs, vec![stray.to_string()]);
    assert!(blob_files(&env).is_empty());
}

#[test]
fn blobs_live_while_a_lease_a_mapping_or_a_label_holds_them() {
    let env = Env::native(GcOptions::default());
    let (sn, content) = (env.sn("native"), env.host.content());
    let plain = ctx("default");

    // Nothing holds it: collected, file and all.
    let loose = ingest(content, &plain, b"loose");
    // Held by a lease until the lease goes.
    let leased_ctx = env.lease("default", "l1", &[]);
    let leased = ingest(content, &leased_ctx, b"leased");
    // Held by the snapshot mapped to it.
    let mapped = ingest(content, &leased_ctx, b"mapped");
    commit(&sn, &plain, "base", None, &[]);
    sn.set_blob(&plain, "base", &mapped).unwrap();
    // Held by a snapshot's gc.ref.content label, and through a blob's own labels.
    let labelled = ingest(content, &leased_ctx, b"labelled");
    let child = ingest(content, &leased_ctx, b"child of a blob");
    let mut l = none();
    l.insert("containerd.io/gc.ref.content.m".into(), child.to_string());
    content.set_labels(&leased_ctx, &labelled, &l).unwrap();
    commit(&sn, &plain, "refs", None, &[(REF_CONTENT, &labelled.to_string())]);
    // A root by label.
    let rooted = ingest(content, &plain, b"rooted");
    content.set_labels(&plain, &rooted, &labels(&[(ROOT, "1")])).unwrap();

    let r = env.collect();
    assert_eq!(r.removed_content, vec![("default".to_owned(), loose.to_string())]);
    assert_eq!(r.deleted_blobs, vec![loose.to_string()]);

    env.drop_lease("default", "l1");
    let r = env.collect();
    assert_eq!(r.removed_content, vec![("default".to_owned(), leased.to_string())]);
    let kept = set([mapped.hex(), labelled.hex(), child.hex(), rooted.hex()]);
    assert_eq!(blob_files(&env), kept);

    // Removing the snapshots lets the collector take their blobs.
    sn.remove(&plain, "base").unwrap();
    sn.remove(&plain, "refs").unwrap();
    let r = env.collect();
    let mut gone: Vec<String> = r.deleted_blobs.clone();
    gone.sort();
    let mut want = vec![mapped.to_string(), labelled.to_string(), child.to_string()];
    want.sort();
    assert_eq!(gone, want);
    assert_eq!(blob_files(&env), set([rooted.hex()]));
}

#[test]
fn a_blob_held_by_a_snapshot_can_reference_a_collectable_snapshot() {
    let env = Env::native(GcOptions::default());
    let (sn, content) = (env.sn("native"), env.host.content());
    let leased = env.lease("default", "l", &[]);
    // A collectable snapshot, referenced only from a blob's label.
    commit(&sn, &leased, "target", None, &[]);
    let blob = ingest(content, &leased, b"config");
    content.set_labels(&leased, &blob, &labels(&[(REF_NATIVE, "target"), (ROOT, "x")])).unwrap();
    env.drop_lease("default", "l");
    let r = env.collect();
    assert!(removed(&r).is_empty(), "{:?}", removed(&r));
    content.set_labels(&ctx("default"), &blob, &none()).unwrap();
    let r = env.collect();
    assert_eq!(removed(&r), vec!["native/default/target".to_owned()]);
    assert_eq!(r.deleted_blobs, vec![blob.to_string()]);
}

#[test]
fn blob_mapping_is_set_once_follows_commit_and_guards_deletion() {
    let env = Env::native(GcOptions::default());
    let (sn, content) = (env.sn("native"), env.host.content());
    let c = ctx("default");
    let (a, b) = (ingest(content, &c, b"blob a"), ingest(content, &c, b"blob b"));
    sn.prepare(&c, "work", None, &none()).unwrap();
    let unknown = Digest::of(b"never ingested");
    assert_eq!(sn.set_blob(&c, "work", &unknown).unwrap_err().kind(), ErrorKind::NotFound);
    sn.set_blob(&c, "work", &a).unwrap();
    sn.set_blob(&c, "work", &a).unwrap(); // the same again: nothing changes
    let err = sn.set_blob(&c, "work", &b).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(sn.set_blob(&c, "nope", &a).unwrap_err().kind(), ErrorKind::NotFound);

    sn.commit(&c, "done", "work", &none()).unwrap();
    assert_eq!(sn.blob(&c, "done").unwrap(), Some(a));
    assert_eq!(content.mapped_snapshots(&c, &a).unwrap(), vec![("native".into(), "done".into())]);

    let err = content.delete(&c, &a).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("done"), "{err}");
    content.delete(&c, &b).unwrap();
    assert_eq!(content.info(&c, &b).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(!blob_files(&env).contains(&b.hex()));

    sn.remove(&c, "done").unwrap();
    assert!(content.mapped_snapshots(&c, &a).unwrap().is_empty());
    content.delete(&c, &a).unwrap();
    assert!(blob_files(&env).is_empty());
}

#[test]
fn leases_hold_content_as_a_resource() {
    let env = Env::native(GcOptions::default());
    let content = env.host.content();
    let c = ctx("default");
    let d = ingest(content, &c, b"by hand");
    env.host.leases().create(&c, Some("l"), &none()).unwrap();
    env.host.leases().add_resource(&c, "l", &Resource::content(&d)).unwrap();
    let bad = Resource { kind: "content".into(), id: "sha256:nope".into() };
    assert_eq!(
        env.host.leases().add_resource(&c, "l", &bad).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert!(env.collect().removed_content.is_empty());
    env.host.leases().delete_resource(&c, "l", &Resource::content(&d)).unwrap();
    assert_eq!(env.collect().deleted_blobs, vec![d.to_string()]);
}
