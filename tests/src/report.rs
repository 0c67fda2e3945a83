//! Reports: a table for people, JSON and JUnit XML for CI systems.

use std::io::Write;
use std::time::Duration;

use quick_junit::{NonSuccessKind, TestCase, TestCaseStatus, TestSuite};

use crate::harness::{Group, Outcome};

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Its suite.
    pub group: Group,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub duration: Duration,
}

/// The results of a run against one backend.
#[derive(Debug, Clone)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// One result per case run, in the suite's order.
    pub results: Vec<CaseResult>,
}

impl Report {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }
    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Passed))
    }
    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }
    /// Cases that were skipped.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skipped(_)))
    }

    /// The summary line: `N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed, {} skipped", self.passed(), self.failed(), self.skipped())
    }

    /// An aligned table, one case a line, ending with the summary.
    pub fn write_table(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let width = self.results.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        writeln!(w, "{:<width$}  {:<10}  {:<6}  {:>9}  DETAIL", "CASE", "SUITE", "RESULT", "TIME")?;
        for r in &self.results {
            let (result, detail) = match &r.outcome {
                Outcome::Passed => ("pass", ""),
                Outcome::Failed(m) => ("FAIL", m.as_str()),
                Outcome::Skipped(m) => ("skip", m.as_str()),
            };
            let ms = format!("{:.1} ms", r.duration.as_secs_f64() * 1e3);
            let line = format!(
                "{:<width$}  {:<10}  {:<6}  {:>9}  {detail}",
                r.name,
                r.group.as_str(),
                result,
                ms
            );
            writeln!(w, "{}", line.trim_end())?;
        }
        writeln!(w)?;
        writeln!(w, "{}: {}", self.backend, self.summary())
    }

    /// One JSON document.
    pub fn write_json(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let cases: Vec<serde_json::Value> = self
            .results
            .iter()
            .map(|r| {
                let (result, reason) = match &r.outcome {
                    Outcome::Passed => ("passed", None),
                    Outcome::Failed(m) => ("failed", Some(m)),
                    Outcome::Skipped(m) => ("skipped", Some(m)),
                };
                serde_json::json!({
                    "name": r.name, "suite": r.group, "result": result, "reason": reason,
                    "duration_ms": r.duration.as_secs_f64() * 1e3,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "backend": self.backend, "passed": self.passed(), "failed": self.failed(),
            "skipped": self.skipped(), "cases": cases,
        });
        serde_json::to_writer_pretty(&mut *w, &doc)?;
        writeln!(w)
    }

    /// JUnit XML, one test suite per backend.
    pub fn write_junit(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut report = quick_junit::Report::new("wasnap-conformance");
        let mut suite = TestSuite::new(self.backend.as_str());
        for r in &self.results {
            let status = match &r.outcome {
                Outcome::Passed => TestCaseStatus::success(),
                Outcome::Failed(m) => {
                    let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    s.set_message(m.as_str());
                    s
                }
                Outcome::Skipped(m) => {
                    let mut s = TestCaseStatus::skipped();
                    s.set_message(m.as_str());
                    s
                }
            };
            let mut case = TestCase::new(r.name.as_str(), status);
            case.set_classname(format!("{}.{}", self.backend, r.group.as_str()));
            case.set_time(r.duration);
            suite.add_test_case(case);
        }
        report.add_test_suite(suite);
        let xml = report.to_string().map_err(std::io::Error::other)?;
        w.write_all(xml.as_bytes())?;
        writeln!(w)
    }
}
