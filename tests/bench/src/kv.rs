//! `wasnap-bench kv`: the floor under every mutating call of the daemon, its one write
//! transaction through [`wasnap::kv::Db`], measured alone.
//!
//! Each call on the daemon's overlay path is one write of the root database, durable
//! before the call returns, and the write changes a row in each of several tables (a
//! prepare: the record, the parent's child link, the backend key, the lease's resource,
//! the driver's record and child link). redb's commit copies each changed table's page
//! and rewrites the table tree, the free-page lists and the header, so its cost grows
//! with the pages a transaction changes, not with the bytes. This bench measures that
//! cost at 1, 4 and 7 tables, and for a staged prepare's rows as they are and with the
//! four indexes folded into one table (in a store of a few snapshots, as in the daemon
//! bench, and of 2,000), durable and deferred, with a read beside it (a
//! `Stat`'s database work), so that what a call may cost at least is a figure, not a
//! guess.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasnap::error::{Error, Result};
use wasnap::kv::{Db, Durability};
use wasnap_cli::output::table;
use wasnap_cli::stats::{Stats, fmt_d};

/// Tables keyed like the metadata's records: (snapshotter, namespace, key) to an
/// encoded record.
type Def =
    redb::TableDefinition<'static, (&'static str, &'static str, &'static str), &'static [u8]>;

/// Tables in a set: as many as a write changes at most.
const PER_SET: usize = 7;

/// Two sets of tables: the first for the shapes that keep `FEW` rows, the second for
/// those that keep `MANY`, so that the first set's tables stay a few rows deep.
const NAMES: [[&str; PER_SET]; 2] = [
    ["bench_0", "bench_1", "bench_2", "bench_3", "bench_4", "bench_5", "bench_6"],
    [
        "bench_big_0",
        "bench_big_1",
        "bench_big_2",
        "bench_big_3",
        "bench_big_4",
        "bench_big_5",
        "bench_big_6",
    ],
];

/// Table `i` of set `set`.
fn bench_table(set: usize, i: usize) -> Def {
    redb::TableDefinition::new(NAMES[set][i])
}

/// Rows a shape keeps in each of its tables: a few live snapshots, as in the daemon
/// bench's cycles.
const FEW: u64 = 8;

/// Rows the shapes standing for a store of a few thousand snapshots keep in each of
/// their tables: the trees are deeper, and rows written together land in leaves apart.
const MANY: u64 = 2000;
const _: () = assert!(MANY == 2000, "the rows' labels say 2,000");

/// The size of a row's value: about an encoded record with a few labels.
const VALUE_BYTES: usize = 240;

/// One measured row.
struct Row {
    wall: Vec<Duration>,
    cpu_per_write: Duration,
    writes_per_commit: f64,
}

/// This thread's CPU time (the group commit's leader is the caller: with one caller,
/// every commit runs here).
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec.unsigned_abs(), t.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// Write system calls this process has made (`syscw` of `/proc/self/io`): a redb
/// commit writes each dirty page with its own `pwrite`.
fn write_calls() -> Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io")
        .map_err(|e| Error::internal(format!("read /proc/self/io: {e}")))?;
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::internal("no syscw in /proc/self/io"))
}

/// What one write changes: `rows` rows of `bytes`-byte values in table `table`, each
/// replacing an old row.
#[derive(Clone, Copy)]
struct Change {
    table: usize,
    rows: usize,
    bytes: usize,
}

/// One row in each of the first `n` tables, sized like a record.
fn one_row_in_each(n: usize) -> Vec<Change> {
    (0..n).map(|table| Change { table, rows: 1, bytes: VALUE_BYTES }).collect()
}

/// The size of an index row's value (a child link, a backend key, a lease's resource).
const INDEX_BYTES: usize = 60;

/// A staged overlay prepare's write as it is: the metadata's record, the parent's
/// child link, the backend key, the lease's resource, the driver's record and its child
/// link, each in a table of its own.
fn prepare_as_is() -> Vec<Change> {
    let (record, index) = (VALUE_BYTES, INDEX_BYTES);
    [(0, record), (1, index), (2, index), (3, index), (4, record), (5, index)]
        .map(|(table, bytes)| Change { table, rows: 1, bytes })
        .to_vec()
}

/// The same rows with the four indexes folded into one table (a design measured, not
/// built: its rows keyed apart, as they would be by a prefix for each index).
fn prepare_indexes_folded() -> Vec<Change> {
    vec![
        Change { table: 0, rows: 1, bytes: VALUE_BYTES },
        Change { table: 4, rows: 1, bytes: VALUE_BYTES },
        Change { table: 6, rows: 4, bytes: INDEX_BYTES },
    ]
}

/// What one row of the table measures: `changes` in each write to the tables of `set`,
/// with `live` rows of each kept there.
struct Shape {
    what: &'static str,
    changes: Vec<Change>,
    live: u64,
    set: usize,
}

/// `n` writes, each making the changes of `shape` (and dropping the rows written
/// `shape.live` writes before). Each shape's rows are keyed apart by its `tag`, so that
/// each keeps its own live rows.
fn writes(
    db: &Db,
    (tag, shape): (usize, &Shape),
    durability: Durability,
    n: u64,
    base: u64,
) -> Result<Row> {
    const VALUE: [u8; VALUE_BYTES] = [7u8; VALUE_BYTES];
    let mut wall = Vec::with_capacity(n as usize);
    let (cpu0, calls0, commits0) = (thread_cpu(), write_calls()?, db.stats().commits);
    for i in base..base + n {
        let start = Instant::now();
        let (changes, live, set) = (shape.changes.clone(), shape.live, shape.set);
        db.write(durability, move |txn| {
            for c in &changes {
                let mut t = txn.open_table(bench_table(set, c.table))?;
                for r in 0..c.rows {
                    let (new, old) = (
                        format!("key-{tag}-{r}-{i}"),
                        format!("key-{tag}-{r}-{}", i.wrapping_sub(live)),
                    );
                    t.insert(
                        ("overlay", "bench", new.as_str()),
                        &VALUE[..c.bytes.min(VALUE_BYTES)],
                    )?;
                    t.remove(("overlay", "bench", old.as_str()))?;
                }
            }
            Ok(())
        })?;
        wall.push(start.elapsed());
    }
    let cpu = thread_cpu().saturating_sub(cpu0);
    let calls = write_calls()?.saturating_sub(calls0);
    let commits = db.stats().commits.saturating_sub(commits0).max(1);
    Ok(Row {
        wall,
        cpu_per_write: cpu / n.max(1) as u32,
        writes_per_commit: calls as f64 / commits as f64,
    })
}

/// `n` reads of one row, as a `Stat` makes.
fn reads(db: &Db, n: u64) -> Result<Row> {
    let mut wall = Vec::with_capacity(n as usize);
    let cpu0 = thread_cpu();
    for i in 0..n {
        // Shape 0's live rows in table 0, as the fill leaves them.
        let key = format!("key-0-0-{}", i % FEW);
        let start = Instant::now();
        db.read_with(|txn| {
            let t = txn.open_table(bench_table(0, 0))?;
            let found = t.get(("overlay", "bench", key.as_str()))?.map(|g| g.value().len());
            Ok(std::hint::black_box(found))
        })?;
        wall.push(start.elapsed());
    }
    let cpu = thread_cpu().saturating_sub(cpu0);
    Ok(Row { wall, cpu_per_write: cpu / n.max(1) as u32, writes_per_commit: 0.0 })
}

/// Runs the bench with a database in each of `dirs`.
pub fn run(dirs: &[PathBuf], smoke: bool, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let n: u64 = if smoke { 50 } else { 2000 };
    let mut rows = Vec::new();
    for dir in dirs {
        let fs = wasnap::probe::filesystem_name(dir);
        let tmp =
            tempfile::Builder::new().prefix("wasnap-bench-kv-").tempdir_in(dir).map_err(io)?;
        let cap = cap_std::fs::Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority())
            .map_err(io)?;
        let db = Db::open(&cap, "bench.redb", "the bench database")?;
        let few = |what, changes| Shape { what, changes, live: FEW, set: 0 };
        let many = |what, changes| Shape { what, changes, live: MANY, set: 1 };
        let shapes = [
            few("write 1 table", one_row_in_each(1)),
            few("write 4 tables", one_row_in_each(4)),
            few("write 7 tables", one_row_in_each(PER_SET)),
            few("a prepare's rows, 6 tables", prepare_as_is()),
            few("the same, indexes in 1", prepare_indexes_folded()),
            many("a prepare's rows, 2,000 live", prepare_as_is()),
            many("the same, indexes in 1", prepare_indexes_folded()),
        ];
        // Every table exists and holds the live rows of every shape before anything is
        // measured (filled without a sync each, then synced once); each shape counts its
        // own writes.
        let mut next = vec![0u64; shapes.len()];
        for (tag, shape) in shapes.iter().enumerate() {
            writes(&db, (tag, shape), Durability::Deferred, shape.live, 0)?;
            next[tag] = shape.live;
        }
        db.write(Durability::Immediate, |_| Ok(()))?;
        let read = reads(&db, n)?;
        rows.push(cells(&fs, dir, "read one row", &read, None));
        // Durable and deferred alternate in blocks, and the shapes take turns, so that a
        // machine or disk slowing down over the run weighs on each alike.
        let mut durable: Vec<Vec<Row>> = shapes.iter().map(|_| Vec::new()).collect();
        let mut deferred: Vec<Vec<Row>> = shapes.iter().map(|_| Vec::new()).collect();
        let block = (n / 4).max(1);
        for _ in 0..4 {
            for (tag, shape) in shapes.iter().enumerate() {
                durable[tag].push(writes(
                    &db,
                    (tag, shape),
                    Durability::Immediate,
                    block,
                    next[tag],
                )?);
                next[tag] += block;
                deferred[tag].push(writes(
                    &db,
                    (tag, shape),
                    Durability::Deferred,
                    block,
                    next[tag],
                )?);
                next[tag] += block;
            }
        }
        for ((shape, durable), deferred) in shapes.iter().zip(durable).zip(deferred) {
            let (durable, deferred) = (merge(durable), merge(deferred));
            rows.push(cells(&fs, dir, shape.what, &durable, Some(&deferred)));
        }
        drop(db);
    }
    writeln!(
        out,
        "kv: one write transaction of the root database (kv::Db), {n} per row, each \
         changing a row in each of N tables, or a staged prepare's rows; durable (synced \
         before it returns, as every mutating call is) and deferred; CPU of the calling \
         thread, which leads the commit; write calls per commit (one per page redb writes)"
    )
    .map_err(io)?;
    table(
        out,
        &[
            "FS",
            "WHAT",
            "DURABLE P50",
            "DURABLE P99",
            "CPU",
            "WRITES/COMMIT",
            "DEFERRED P50",
            "DEFERRED CPU",
        ],
        &rows,
    )
}

/// The blocks of one setting as one row.
fn merge(blocks: Vec<Row>) -> Row {
    let k = blocks.len().max(1);
    let cpu = blocks.iter().map(|b| b.cpu_per_write).sum::<Duration>() / k as u32;
    let writes = blocks.iter().map(|b| b.writes_per_commit).sum::<f64>() / k as f64;
    let wall = blocks.into_iter().flat_map(|b| b.wall).collect();
    Row { wall, cpu_per_write: cpu, writes_per_commit: writes }
}

fn cells(fs: &str, dir: &Path, what: &str, row: &Row, deferred: Option<&Row>) -> Vec<String> {
    let dash = || "-".to_owned();
    let wall = Stats::new(row.wall.clone());
    let deferred = deferred.map(|d| (Stats::new(d.wall.clone()), d.cpu_per_write));
    vec![
        format!("{} ({fs})", dir.display()),
        what.to_owned(),
        fmt_d(wall.pct(0.5)),
        fmt_d(wall.pct(0.99)),
        fmt_d(row.cpu_per_write),
        if row.writes_per_commit > 0.0 { format!("{:.1}", row.writes_per_commit) } else { dash() },
        deferred.as_ref().map_or_else(dash, |(d, _)| fmt_d(d.pct(0.5))),
        deferred.as_ref().map_or_else(dash, |(_, cpu)| fmt_d(*cpu)),
    ]
}
