//! The store against the native test harness: the rules of each change, paging, and
//! several threads sharing one store as several instances share one host.

use std::sync::Arc;

use super::*;
use crate::ErrorKind;
use crate::testing::Harness;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn kind_of<T: std::fmt::Debug>(r: Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

fn fresh(_: Option<&Record>) -> Result<Layer> {
    Layer::create()
}

fn make(s: &Store, kind: Kind, key: &str, parent: Option<&str>) -> Result<Record> {
    s.create(kind, key, parent, &Labels::new(), fresh)
}

/// A committed snapshot `name`, made through an active one.
fn committed(s: &Store, name: &str, parent: Option<&str>) -> Record {
    let key = format!("{name}-active");
    make(s, Kind::Active, &key, parent).unwrap();
    s.commit(name, &key, &Labels::new()).unwrap()
}

#[test]
fn create_stat_and_the_checks_of_create() {
    let h = Harness::new_temp();
    let _in = h.enter();
    let s = Store::new();
    s.create(Kind::Active, "ns/1/a", None, &labels(&[("l", "v")]), fresh).unwrap();
    let info = s.stat("ns/1/a").unwrap();
    assert_eq!((info.kind, info.parent, info.labels), (Kind::Active, None, labels(&[("l", "v")])));
    assert_eq!(kind_of(make(&s, Kind::View, "ns/1/a", None)), ErrorKind::AlreadyExists);
    assert_eq!(kind_of(make(&s, Kind::Active, "x", Some("missing"))), ErrorKind::NotFound);
    assert_eq!(kind_of(make(&s, Kind::Active, "x", Some("ns/1/a"))), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(make(&s, Kind::Active, "", None)), ErrorKind::InvalidArgument);
    // A refused create leaves no layer behind.
    assert_eq!(Layer::list().unwrap().len(), 1);
}

#[test]
fn commit_moves_the_record_and_keeps_the_layer() {
    let h = Harness::new_temp();
    let _in = h.enter();
    let s = Store::new();
    let a = make(&s, Kind::Active, "a", None).unwrap();
    let c = s.commit("base", "a", &labels(&[("x", "y")])).unwrap();
    assert_eq!(
        (c.layer, c.kind, c.labels.clone()),
        (a.layer, Kind::Committed, labels(&[("x", "y")]))
    );
    assert_eq!(kind_of(s.get("a")), ErrorKind::NotFound);
    assert_eq!(kind_of(s.commit("base", "a", &Labels::new())), ErrorKind::AlreadyExists);
    let v = make(&s, Kind::View, "v", Some("base")).unwrap();
    assert_eq!(kind_of(s.commit("v2", "v", &Labels::new())), ErrorKind::FailedPrecondition);
    assert_eq!(s.chain(&v).unwrap(), [v.layer, a.layer]);
}

#[test]
fn remove_refuses_a_parent_and_frees_the_key() {
    let h = Harness::new_temp();
    let _in = h.enter();
    let s = Store::new();
    committed(&s, "ns/2/base", None);
    make(&s, Kind::Active, "ns/3/child", Some("ns/2/base")).unwrap();
    assert_eq!(kind_of(s.remove("ns/2/base")), ErrorKind::FailedPrecondition);
    s.remove("ns/3/child").unwrap();
    let rec = s.remove("ns/2/base").unwrap();
    rec.layer.remove().unwrap();
    assert!(s.records().unwrap().is_empty());
    make(&s, Kind::Active, "ns/2/base", None).unwrap();
}

#[test]
fn lists_page_in_byte_order() {
    let h = Harness::new_temp();
    let _in = h.enter();
    let s = Store::new();
    for i in 0..25 {
        make(&s, Kind::Active, &format!("k{i:02}"), None).unwrap();
    }
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = s.list(after.as_deref(), 10).unwrap();
        let full = page.len() == 10;
        after = page.last().map(|i| i.name.clone());
        all.extend(page.into_iter().map(|i| i.name));
        if !full {
            break;
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
    assert_eq!(all, expected);
}

#[test]
fn updates_follow_field_paths() {
    let h = Harness::new_temp();
    let _in = h.enter();
    let s = Store::new();
    s.create(Kind::Active, "a", None, &labels(&[("keep", "1"), ("drop", "2")]), fresh).unwrap();
    let mut info = s.stat("a").unwrap();
    info.labels = labels(&[("new", "3")]);
    let got = s.update(&info, &["labels.drop".into(), "labels.new".into()]).unwrap();
    assert_eq!(got.labels, labels(&[("keep", "1"), ("new", "3")]));
    assert_eq!(kind_of(s.update(&info, &["parent".into()])), ErrorKind::InvalidArgument);
}

#[test]
fn instances_racing_on_one_store_keep_its_rules() {
    let h = Harness::new_temp();
    {
        let _in = h.enter();
        committed(&Store::new(), "base", None);
    }
    let store = Arc::new(Store::new());
    // Eight "instances" create children of one parent, and race to create the same keys.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (h, s) = (h.clone(), store.clone());
            std::thread::spawn(move || {
                let _in = h.enter();
                let mut won = 0;
                for i in 0..20 {
                    if make(&s, Kind::Active, &format!("same-{i}"), Some("base")).is_ok() {
                        won += 1;
                    }
                    make(&s, Kind::Active, &format!("own-{t}-{i}"), Some("base")).unwrap();
                }
                won
            })
        })
        .collect();
    let won: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let _in = h.enter();
    assert_eq!(won, 20, "each shared key was created exactly once");
    let records = store.records().unwrap();
    assert_eq!(records.len(), 1 + 20 + 8 * 20);
    // Every loser removed the layer it made: one layer per record.
    assert_eq!(Layer::list().unwrap().len(), records.len());
    assert_eq!(kind_of(store.remove("base")), ErrorKind::FailedPrecondition);
}

#[test]
fn reclaim_takes_exactly_the_layers_no_record_names() {
    let h = Harness::new_temp();
    let _in = h.enter();
    let s = Store::new();
    let kept = make(&s, Kind::Active, "a", None).unwrap().layer;
    let stray = Layer::create().unwrap();
    assert_eq!(s.reclaim_layers().unwrap(), [stray]);
    assert_eq!(Layer::list().unwrap(), [kept]);
}
