//! Merges and diffs as snapshots (buildkit's MergeOp and DiffOp), in the metadata.
//!
//! Every committed snapshot stands for a list of *layers*, bottom first, each layer a
//! committed snapshot standing for its own change from its parent only: a plain
//! snapshot for its ancestors and itself, a merge or a diff for the layers its record
//! names ([`Record::layers`]). A merge of inputs stacks the inputs' layers in order,
//! a merge input being flattened to its own layers, and a layer that comes twice is
//! kept at its uppermost place. A diff of `lower` and `upper` where `lower`'s layers
//! begin `upper`'s is the rest of `upper`'s layers: no tree is walked.
//!
//! A merge holds its layers as a child holds its parent (a link in the children
//! table), so none can be removed while it exists, and collection keeps them. A diff
//! made by comparing two trees is one snapshot whose tree is the change itself,
//! deletions written as overlay whiteouts; its record names itself as its only layer.
//!
//! What is made, and how, is decided here ([`Snapshotter::plan_merge`],
//! [`Snapshotter::plan_diff`]); a backend that stacks layers makes the snapshot
//! ([`Snapshotter::merge_stacked`]), otherwise [`crate::layer::Layers`] builds it by
//! applying each layer's change and commits it with its layers
//! ([`Snapshotter::commit_as`]).

use redb::WriteTransaction;

use super::Ctx;
use super::db::{self, CHILDREN, MERGES, Tables};
use super::lease::{self, Resource};
use super::record::Record;
use super::snapshotter::{InFlight, Snapshotter, not_found};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::kv::{Durability, now_nanos};
use crate::snapshot::{Info, Kind, Labels, Mount, inherited_labels, validate_labels};

/// The most layers one merge may stack.
pub const MERGE_MAX_LAYERS: usize = 100_000;

/// What a merge or an ancestor diff comes to, worked out before anything is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergePlan {
    /// The layers, bottom first: (key, backend key).
    pub layers: Vec<(String, String)>,
    /// A snapshot that is this merge already: an input whose layers these are, or an
    /// earlier merge of the same layers. Nothing new is made.
    pub existing: Option<String>,
    /// The longest bottom run of `layers` that is everything one committed snapshot
    /// shows: its key and how many layers. A merge by copying starts from it.
    pub base: Option<(String, usize)>,
}

impl MergePlan {
    /// The layers' keys, bottom first.
    pub fn keys(&self) -> Vec<String> {
        self.layers.iter().map(|(k, _)| k.clone()).collect()
    }
}

/// Whether a record with `layers` is a merge (it stacks other snapshots), as opposed
/// to a plain snapshot or a diff standing alone (whose only layer is itself).
pub(crate) fn is_merge(key: &str, layers: &[String]) -> bool {
    match layers {
        [] => false,
        [only] => only != key,
        _ => true,
    }
}

/// The index key of a layer list.
pub(crate) fn layers_id(layers: &[String]) -> String {
    let mut joined = Vec::new();
    for l in layers {
        joined.extend_from_slice(&(l.len() as u64).to_le_bytes());
        joined.extend_from_slice(l.as_bytes());
    }
    Digest::of(&joined).to_string()
}

/// Links each of `layers` (but `key` itself) to `key` as a child, so none is removed
/// before `key` goes.
pub(crate) fn hold_layers(
    txn: &WriteTransaction,
    sn: &str,
    ns: &str,
    key: &str,
    layers: &[String],
) -> Result<()> {
    link_layers(txn, sn, ns, key, layers, true)
}

/// Checks that each of `layers` (key, backend key) is still that committed snapshot;
/// fails with failed-precondition, saying the layer `what`, if one is not.
pub(crate) fn check_layers(
    txn: &impl Tables,
    sn: &str,
    ns: &str,
    layers: &[(String, String)],
    what: &str,
) -> Result<()> {
    let heads = txn.heads(sn, ns, layers.iter().map(|(l, _)| l.as_str()))?;
    for ((l, b), head) in layers.iter().zip(heads) {
        match head {
            Some(r) if r.bkey == *b && r.kind == Kind::Committed => {}
            _ => return Err(Error::failed_precondition(format!("layer {l:?} {what}; retry"))),
        }
    }
    Ok(())
}

/// Undoes [`hold_layers`].
pub(crate) fn release_layers(
    txn: &WriteTransaction,
    sn: &str,
    ns: &str,
    key: &str,
    layers: &[String],
) -> Result<()> {
    link_layers(txn, sn, ns, key, layers, false)
}

/// Adds (`hold`) or removes the child links from each of `layers` but `key` itself to
/// `key`.
fn link_layers(
    txn: &WriteTransaction,
    sn: &str,
    ns: &str,
    key: &str,
    layers: &[String],
    hold: bool,
) -> Result<()> {
    if layers.is_empty() {
        return Ok(());
    }
    let mut children = txn.open_multimap_table(CHILDREN)?;
    for l in layers.iter().filter(|l| *l != key) {
        if hold {
            children.insert((sn, ns, l.as_str()), key)?;
        } else {
            children.remove((sn, ns, l.as_str()), key)?;
        }
    }
    Ok(())
}

/// A committed snapshot's record and its layers, bottom first.
fn layers_of(txn: &impl Tables, sn: &str, ns: &str, key: &str) -> Result<(Record, Vec<String>)> {
    let rec = txn.record(sn, ns, key)?.ok_or_else(|| not_found(key))?;
    if rec.kind != Kind::Committed {
        return Err(Error::invalid_argument(format!(
            "snapshot {key:?} is a {} snapshot; merges and diffs take committed snapshots",
            rec.kind
        )));
    }
    if !rec.layers.is_empty() {
        let layers = rec.layers.clone();
        return Ok((rec, layers));
    }
    let mut chain = vec![key.to_owned()];
    let mut next = rec.parent.clone();
    while let Some(p) = next {
        let prec = txn.record(sn, ns, &p)?.ok_or_else(|| {
            Error::internal(format!("the record of {key:?} names a missing ancestor {p:?}"))
        })?;
        if !prec.layers.is_empty() {
            chain.extend(prec.layers.iter().rev().cloned());
            break;
        }
        chain.push(p);
        next = prec.parent;
        if chain.len() > MERGE_MAX_LAYERS {
            return Err(Error::internal(format!("the chain of {key:?} does not end")));
        }
    }
    chain.reverse();
    Ok((rec, chain))
}

impl Snapshotter {
    /// The layers `key`'s record names: a merge's, `[key]` for a diff standing alone,
    /// none for any other snapshot.
    pub fn layers(&self, ctx: &Ctx, key: &str) -> Result<Vec<String>> {
        Ok(self.stat_with_layers(ctx, key)?.1)
    }

    /// [`Snapshotter::stat`] and [`Snapshotter::layers`] from one read of the record.
    pub fn stat_with_layers(&self, ctx: &Ctx, key: &str) -> Result<(Info, Vec<String>)> {
        let rec = self.db.read_with(|txn| txn.record(self.name(), ctx.namespace(), key))?;
        let rec = rec.ok_or_else(|| not_found(key))?;
        let info = rec.info(key);
        Ok((info, rec.layers))
    }

    /// The read-only mounts of the committed snapshot `key` as the backend gives them,
    /// counted as no use of it: what merges and diffs read a layer through, in place.
    /// A backend that does not mount committed snapshots fails; the caller makes a
    /// view instead.
    pub fn committed_mounts(&self, ctx: &Ctx, key: &str) -> Result<Vec<Mount>> {
        let rec = self.db.read_with(|txn| txn.record(self.name(), ctx.namespace(), key))?;
        let rec = rec.ok_or_else(|| not_found(key))?;
        if rec.kind != Kind::Committed {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is a {} snapshot, not a committed one",
                rec.kind
            )));
        }
        let mounts = self
            .backend
            .mounts(&rec.bkey)
            .map_err(|e| self.in_user_terms(e, &[(&rec.bkey, key)]))?;
        super::snapshotter::check_readonly(key, rec.kind, &mounts)?;
        Ok(mounts)
    }

    /// What merging `inputs` (committed snapshots, later ones winning) comes to.
    pub fn plan_merge(&self, ctx: &Ctx, inputs: &[String]) -> Result<MergePlan> {
        if inputs.is_empty() {
            return Err(Error::invalid_argument("a merge needs at least one input"));
        }
        let (sn, ns) = (self.name(), ctx.namespace());
        self.db.read_with(|txn| {
            let mut lists = Vec::with_capacity(inputs.len());
            for input in inputs {
                lists.push(layers_of(txn, sn, ns, input)?.1);
            }
            // A layer that comes twice is kept at its uppermost place.
            let mut seen = std::collections::HashSet::new();
            let mut layers: Vec<String> = Vec::new();
            for l in lists.iter().rev().flat_map(|list| list.iter().rev()) {
                if seen.insert(l.as_str()) {
                    layers.push(l.clone());
                }
            }
            layers.reverse();
            if layers.len() > MERGE_MAX_LAYERS {
                return Err(Error::invalid_argument(format!(
                    "a merge of {} layers is more than the {MERGE_MAX_LAYERS} allowed",
                    layers.len()
                )));
            }
            let existing = inputs
                .iter()
                .zip(&lists)
                .find(|(_, list)| **list == layers)
                .map(|(input, _)| input.clone());
            self.plan_of(txn, ctx, layers, existing, inputs.iter().zip(&lists))
        })
    }

    /// What the diff of `lower` (none: empty) and `upper` comes to when `lower`'s
    /// layers begin `upper`'s (the layers between them), or `None` when they do not
    /// and the trees must be compared.
    pub fn plan_diff(
        &self,
        ctx: &Ctx,
        lower: Option<&str>,
        upper: &str,
    ) -> Result<Option<MergePlan>> {
        let (sn, ns) = (self.name(), ctx.namespace());
        self.db.read_with(|txn| {
            let below = match lower {
                Some(l) => layers_of(txn, sn, ns, l)?.1,
                None => Vec::new(),
            };
            let above = layers_of(txn, sn, ns, upper)?.1;
            if !above.starts_with(&below) {
                return Ok(None);
            }
            let layers = above[below.len()..].to_vec();
            let existing = below.is_empty().then(|| upper.to_owned());
            let inputs = [(upper.to_owned(), above.clone())];
            let inputs = inputs.iter().map(|(k, l)| (k, l));
            self.plan_of(txn, ctx, layers, existing, inputs).map(Some)
        })
    }

    fn plan_of<'a>(
        &self,
        txn: &redb::ReadTransaction,
        ctx: &Ctx,
        layers: Vec<String>,
        existing: Option<String>,
        inputs: impl Iterator<Item = (&'a String, &'a Vec<String>)>,
    ) -> Result<MergePlan> {
        let (sn, ns) = (self.name(), ctx.namespace());
        let mut recs = Vec::with_capacity(layers.len());
        for l in &layers {
            recs.push(txn.record(sn, ns, l)?.ok_or_else(|| not_found(l))?);
        }
        let existing = match existing {
            Some(e) => Some(e),
            None if layers.is_empty() => None,
            None => {
                let id = layers_id(&layers);
                let found = txn.open_table(MERGES)?.get((sn, ns, id.as_str()))?;
                match found.map(|g| g.value().to_owned()) {
                    Some(key) => txn
                        .record(sn, ns, &key)?
                        .filter(|r| r.layers == layers && r.kind == Kind::Committed)
                        .map(|_| key),
                    None => None,
                }
            }
        };
        // The longest bottom run that is one snapshot's whole: an input's, or a chain
        // of plain snapshots each on the one before.
        let mut base: Option<(String, usize)> = None;
        for (input, list) in inputs {
            if !list.is_empty()
                && layers.starts_with(list)
                && base.as_ref().is_none_or(|(_, n)| list.len() > *n)
            {
                base = Some((input.clone(), list.len()));
            }
        }
        let mut run = 0;
        for (i, rec) in recs.iter().enumerate() {
            let on_previous = match i {
                0 => rec.parent.is_none(),
                _ => rec.parent.as_deref() == Some(layers[i - 1].as_str()),
            };
            if !rec.layers.is_empty() || !on_previous {
                break;
            }
            run = i + 1;
        }
        if run > 0 && base.as_ref().is_none_or(|(_, n)| run > *n) {
            base = Some((layers[run - 1].clone(), run));
        }
        let layers = layers.into_iter().zip(recs).map(|(k, r)| (k, r.bkey)).collect();
        Ok(MergePlan { layers, existing, base })
    }

    /// Makes the merge `name` of `plan` in a backend that stacks layers, recorded as
    /// stacking them and held by the caller's lease. `None` if the backend does not
    /// stack layers (the caller then merges by copying).
    pub fn merge_stacked(
        &self,
        ctx: &Ctx,
        name: &str,
        plan: &MergePlan,
        labels: &Labels,
    ) -> Result<Option<Info>> {
        if name.is_empty() {
            return Err(Error::invalid_argument("snapshot name must not be empty"));
        }
        validate_labels(labels)?;
        let labels = &*crate::snapshot::without_empty(labels);
        let (sn, ns) = (self.name().to_owned(), ctx.namespace().to_owned());
        {
            let taken = self.db.read_with(|txn| {
                Ok(txn.record(&sn, &ns, name)?.is_some() || txn.intent(&sn, &ns, name)?.is_some())
            })?;
            if taken {
                return Err(Error::already_exists(format!("snapshot {name:?}")));
            }
        }
        let bkey = format!("{ns}/{}/{name}", self.db.next_seq()?);
        let _inflight = InFlight::new(&self.inflight, &bkey);
        let blayers: Vec<String> = plan.layers.iter().map(|(_, b)| b.clone()).collect();
        match self.backend.merge(&bkey, &blayers, &inherited_labels(labels)) {
            Ok(()) => {}
            Err(e) if e.kind() == crate::ErrorKind::NotImplemented => return Ok(None),
            Err(e) => {
                self.discard_backend(&bkey, "its merge failed");
                return Err(self.in_user_terms(e, &[(&bkey, name)]));
            }
        }
        let now = now_nanos();
        let rec = Record {
            bkey: bkey.clone(),
            kind: Kind::Committed,
            parent: None,
            labels: labels.clone(),
            created: now,
            updated: now,
            collectable: ctx.lease().is_some(),
            committing: None,
            blob: None,
            layers: plan.keys(),
            last_used: 0,
            use_count: 0,
        };
        let (key, layers, lease) =
            (name.to_owned(), plan.layers.clone(), ctx.lease().map(str::to_owned));
        let stored = self.faults.hit("metadata.merge.after-backend").and_then(|()| {
            let rec = rec.clone();
            self.db.write(Durability::Immediate, move |txn| {
                if txn.record(&sn, &ns, &key)?.is_some() || txn.intent(&sn, &ns, &key)?.is_some() {
                    return Err(Error::already_exists(format!("snapshot {key:?}")));
                }
                // The layers must still be the ones planned with.
                check_layers(txn, &sn, &ns, &layers, "changed while the merge was made")?;
                if let Some(l) = &lease {
                    lease::hold_in(txn, &ns, l, &Resource::snapshot(&sn, &key))?;
                }
                db::put_record(txn, &sn, &ns, &key, &rec)
            })
        });
        if let Err(e) = stored {
            self.remove_backend(&bkey, "its record could not be stored");
            return Err(e);
        }
        self.mutated();
        Ok(Some(rec.info(name)))
    }
}
