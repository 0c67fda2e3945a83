//! `label-policy`: a policy that refuses or rewrites the labels of snapshots by rules from
//! its configuration, in front of any snapshotter.
//!
//! The rules apply to the labels a snapshot is about to have: those given to `prepare`,
//! `view` and `commit`, and, for `update`, the labels the snapshot would have after it.
//! In order:
//!
//! 1. `deny`: a label whose key matches one of these patterns refuses the call;
//! 2. `remove`: labels whose keys match are dropped;
//! 3. `set`: these labels are added, replacing a caller's value;
//! 4. `require`: each pattern must match at least one label left, or the call is refused;
//! 5. `max_labels`: more labels left than this refuses the call.
//!
//! A pattern is a label key, or ends in `*` to match every key that starts with what
//! comes before it. A refused call fails with invalid-argument naming the rule and the
//! label, and the next snapshotter is not called. See the README for the configuration.
//!
//! Behind the host's metadata layer a backend, and so this policy, sees only the labels
//! the backend inherits: `containerd.io/snapshot/*` and `containerd.io/snapshot.ref`.
//! Rewrites show in the backend's labels; the metadata layer keeps the caller's own.

mod rules;

use wasnap_sdk::{Config, FieldPath, Info, Labels, Mount, Next, Policy, Result, fieldpath};

use rules::Rules;

/// The policy: its rules, parsed once per instance.
#[derive(Debug)]
struct LabelPolicy {
    rules: Rules,
}

impl Policy for LabelPolicy {
    fn init(config: Config) -> Result<Self> {
        Ok(LabelPolicy { rules: Rules::from_config(&config)? })
    }

    fn update(&self, next: &Next, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        let paths = FieldPath::parse_all(fieldpaths, &info.name)?;
        // The rules judge whole label sets, so an update that names single labels is
        // turned into the set it leaves, and passed on as a replacement of all labels.
        let whole = if paths.iter().all(|p| *p == FieldPath::Labels) {
            info.labels.clone()
        } else {
            let mut current = next.stat(&info.name)?.labels;
            fieldpath::apply(&mut current, &info.labels, fieldpaths, &info.name)?;
            current
        };
        let labels = self.rules.apply("update", &info.name, &whole)?;
        next.update(&Info { labels, ..info.clone() }, &[String::from("labels")])
    }

    fn prepare(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        next.prepare(key, parent, &self.rules.apply("prepare", key, labels)?)
    }

    fn view(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        next.view(key, parent, &self.rules.apply("view", key, labels)?)
    }

    fn commit(&self, next: &Next, name: &str, key: &str, labels: &Labels) -> Result<()> {
        next.commit(name, key, &self.rules.apply("commit", name, labels)?)
    }
}

wasnap_sdk::export_policy!(LabelPolicy);
